"""One error taxonomy for the whole engine, mapped to HTTP status in one place.

Raise the kind that says what went wrong; the server turns it into Docker's
status code and ``{"message": ...}`` body, the CLI into a message and exit status.
"""

from __future__ import annotations


class PalletError(Exception):
    """Base of every error pallet reports to a user."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(PalletError):
    """The request is malformed or names an impossible value."""

    status = 400


class Unauthorized(PalletError):
    status = 401


class Forbidden(PalletError):
    status = 403


class NotFound(PalletError):
    """The named object does not exist."""

    status = 404


class Conflict(PalletError):
    """The request conflicts with the current state (name in use, container running...)."""

    status = 409


class NotModified(PalletError):
    """Nothing to do (container already started/stopped)."""

    status = 304


class Internal(PalletError):
    status = 500


class NotImplementedErr(PalletError):
    status = 501


class Unavailable(PalletError):
    """A needed service or resource is not there now (driver skipped, daemon busy)."""

    status = 503


class PluginSkip(Exception):
    """Raised by a plugin that cannot work on this host; carries the reason.

    The plugin manager records the reason and carries on; ``pallet info`` shows it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def http_status(exc: BaseException) -> int:
    """The HTTP status for an exception (500 for anything not in the taxonomy)."""
    return exc.status if isinstance(exc, PalletError) else 500
