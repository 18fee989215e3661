"""Errors a user can cause: the CLI prints them as one line, the servers as 4xx JSON."""


class UserError(Exception):
    """A mistake in what the user asked for (path, architecture, dtype, parameter)."""


class Conflict(UserError):
    """The request exists but is in a state that forbids this call (HTTP 409)."""


class NotFound(UserError):
    """No such request, engine or model here (HTTP 404)."""
