"""The one exception family of the orders service, shared by server and client.

Each class carries the canonical gRPC status name in ``code``; the service maps it onto the wire
and the client maps the wire status back to the same class, so ``except NotFound`` works the same
in server-side code and in code using :class:`orders.client.OrderClient`.
"""

from __future__ import annotations


class OrderError(Exception):
    """Base of every error the service reports; ``code`` is the gRPC status name.

    ``request_id``: on an error of :meth:`orders.client.OrderClient.create`, the idempotency key it sent;
    creating again with it cannot make a second order, whatever became of the first attempt.
    """

    code = "UNKNOWN"
    request_id: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(OrderError):
    """The request is malformed or breaks a validation rule."""

    code = "INVALID_ARGUMENT"


class NotFound(OrderError):
    """No order has this id."""

    code = "NOT_FOUND"


class Aborted(OrderError):
    """``expected_version`` does not match the order's current version: re-read and retry."""

    code = "ABORTED"


class FailedPrecondition(OrderError):
    """The status change is not allowed from the order's current status."""

    code = "FAILED_PRECONDITION"


class AlreadyExists(OrderError):
    """The ``request_id`` was already used for a different request."""

    code = "ALREADY_EXISTS"


class OutOfRange(OrderError):
    """``after_sequence`` lies outside the retained event log."""

    code = "OUT_OF_RANGE"


class Unavailable(OrderError):
    """The server is draining or cannot use its database, or the connection to it failed: retry later or on
    another server. A call that was under way may have taken effect (the message says so): retry a create
    with the same ``request_id``, a status change with its ``expected_version``."""

    code = "UNAVAILABLE"


class Unauthenticated(OrderError):
    """A bearer token is missing or wrong."""

    code = "UNAUTHENTICATED"


class DeadlineExceeded(OrderError):
    """The call did not finish before its deadline."""

    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(OrderError):
    """A size or concurrency limit was hit."""

    code = "RESOURCE_EXHAUSTED"


class DataLoss(OrderError):
    """The database is corrupt where the call had to read or write: restore it from a backup; retrying
    the same call will not help."""

    code = "DATA_LOSS"


class Internal(OrderError):
    """A server-side fault; the server log has the details under the request id."""

    code = "INTERNAL"


ERRORS_BY_CODE: dict[str, type[OrderError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Aborted,
        FailedPrecondition,
        AlreadyExists,
        OutOfRange,
        Unavailable,
        Unauthenticated,
        DeadlineExceeded,
        ResourceExhausted,
        DataLoss,
        Internal,
    )
}


def error_for(code: str, message: str) -> OrderError:
    """Build the exception of the family that matches a gRPC status name."""
    error = ERRORS_BY_CODE.get(code, OrderError)(message)
    if type(error) is OrderError:
        error.code = code
    return error
