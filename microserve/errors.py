"""Errors a user can cause: the CLI prints them as one line, the servers as 4xx JSON."""


class UserError(Exception):
    """A mistake in what the user asked for (path, architecture, dtype, parameter)."""
