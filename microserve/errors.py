"""Errors a user can cause: the CLI prints them as one line, the servers as 4xx JSON."""


class UserError(Exception):
    """A mistake in what the user asked for (path, architecture, dtype, parameter)."""


class Conflict(UserError):
    """The request exists but is in a state that forbids this call (HTTP 409)."""


class NotFound(UserError):
    """No such request, engine or model here (HTTP 404)."""


class RequestFailed(Exception):
    """The engine failed while serving one request: that request alone stopped, its KV freed,
    and the engine goes on. Clients get a 500 that says so; the cause stays in the log."""

    def __init__(self, request_id: str):
        super().__init__(f"the engine failed while generating request {request_id!r}; it was stopped "
                         "and nothing else was affected")
