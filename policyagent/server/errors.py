"""The error catalog of the admin API: PolicyError code → gRPC status, both ways.

Server side, `abort_with_error` turns a `PolicyError` into a gRPC status and an
`ErrorDetail` carried in the trailing metadata key "policyagent-error-bin"
(admin.proto); anything that is not a `PolicyError` is a bug and becomes
INTERNAL with a fixed message, the traceback only in the server log.

Client side, `error_from_rpc` rebuilds the same `PolicyError` subclass (with
its violations) from a failed call, so the CLI prints what the server meant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from policyagent.model.errors import (
    AlreadyExistsError,
    ConflictError,
    InUseError,
    NotFoundError,
    PolicyError,
    ProtectedError,
    StoreError,
    UnavailableError,
    ValidationError,
    Violation,
)
from policyagent.pb import admin_pb

# Binary metadata keys must end in "-bin" (gRPC over HTTP/2 base64-encodes them).
ERROR_METADATA_KEY = "policyagent-error-bin"
INTERNAL_MESSAGE = "internal error (see server log)"

_log = logging.getLogger("policyagent.server.errors")


@dataclass(frozen=True)
class CatalogEntry:
    """How one error code travels: its gRPC status and whether its message is public.

    Messages of user-caused errors name only what the caller sent (objects, settings),
    so they are shown as they are. A store error may carry paths or driver text, so
    the caller gets `public_message` and the detail stays in the server log.
    """

    error_class: type[PolicyError]
    status: grpc.StatusCode
    public_message: str
    expose_detail: bool = True


CATALOG: dict[str, CatalogEntry] = {
    entry.error_class.code: entry
    for entry in (
        CatalogEntry(
            ValidationError, grpc.StatusCode.INVALID_ARGUMENT, "the request breaks a rule"
        ),
        CatalogEntry(NotFoundError, grpc.StatusCode.NOT_FOUND, "no such object"),
        CatalogEntry(AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS, "the object exists"),
        CatalogEntry(
            ConflictError, grpc.StatusCode.ABORTED, "the object was changed by someone else"
        ),
        CatalogEntry(InUseError, grpc.StatusCode.FAILED_PRECONDITION, "the object is in use"),
        CatalogEntry(
            ProtectedError, grpc.StatusCode.FAILED_PRECONDITION, "the operation is not allowed"
        ),
        CatalogEntry(UnavailableError, grpc.StatusCode.UNAVAILABLE, "a service the request needs is unreachable"),
        CatalogEntry(
            StoreError,
            grpc.StatusCode.UNAVAILABLE,
            "the policy store is unavailable (see server log)",
            expose_detail=False,
        ),
    )
}


class RpcFailure(PolicyError):
    """A call failed without a policyagent error detail: transport trouble or a server bug.

    Kept apart from the catalog's errors so the CLI can tell "you asked for something
    the model refuses" from "the server could not be reached or broke".
    """

    code = "rpc"

    def __init__(self, status: grpc.StatusCode | None, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_detail(error: PolicyError) -> tuple[grpc.StatusCode, admin_pb.ErrorDetail]:
    """The status and the public ErrorDetail for a PolicyError.

    Raises KeyError for a code missing from the catalog (a bug the caller turns into
    INTERNAL).
    """
    entry = CATALOG[error.code]
    message = error.message if entry.expose_detail else entry.public_message
    detail = admin_pb.ErrorDetail(code=error.code, message=message)
    if isinstance(error, ValidationError):
        for violation in error.violations:
            detail.violations.add(
                path=violation.path, field=violation.field, message=violation.message
            )
    return entry.status, detail


async def abort_with_error(context: aio.ServicerContext[Any, Any], error: BaseException) -> NoReturn:
    """End the call with the status for `error`; never returns.

    A PolicyError in the catalog goes out with its status, message and ErrorDetail;
    anything else is logged with its traceback and becomes INTERNAL with a fixed text.
    Must be called from inside an `except` block when `error` is unexpected, so the
    traceback is the current one.
    """
    if isinstance(error, PolicyError) and error.code in CATALOG:
        status, detail = error_detail(error)
        if not CATALOG[error.code].expose_detail:
            _log.error("store error: %s", error.message)
        await context.abort(
            status,
            detail.message,
            trailing_metadata=((ERROR_METADATA_KEY, detail.SerializeToString()),),
        )
    _log.error("unexpected error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def _metadata_items(exc: grpc.RpcError) -> Iterable[tuple[str, str | bytes]]:
    # Sync calls raise an RpcError that is also a grpc.Call (a tuple of pairs);
    # grpc.aio raises AioRpcError (an aio.Metadata, which iterates as pairs too).
    getter = getattr(exc, "trailing_metadata", None)
    if getter is None:
        return ()
    items = getter()
    return items if items is not None else ()


def _status_of(exc: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    status = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    return (status if isinstance(status, grpc.StatusCode) else None), str(details or "")


def error_from_rpc(exc: grpc.RpcError) -> PolicyError:
    """The PolicyError a failed admin call stands for.

    With an ErrorDetail in the trailing metadata this is the same subclass the server
    raised (ValidationError with its violations); without one (the server was not
    reached, or failed) it is an RpcFailure naming the status.
    """
    status, details = _status_of(exc)
    for key, value in _metadata_items(exc):
        if key != ERROR_METADATA_KEY or not isinstance(value, bytes):
            continue
        detail = admin_pb.ErrorDetail()
        try:
            detail.ParseFromString(value)
        except DecodeError:
            break  # a peer that sends garbage here broke the protocol: report the status
        return _from_detail(detail, status, details)
    name = status.name if status is not None else "UNKNOWN"
    return RpcFailure(status, f"{name}: {details}" if details else name)


def _from_detail(
    detail: admin_pb.ErrorDetail, status: grpc.StatusCode | None, details: str
) -> PolicyError:
    message = detail.message or details
    entry = CATALOG.get(detail.code)
    if entry is None:
        # A newer server with a code this client does not know: keep its words.
        return RpcFailure(status, message)
    if entry.error_class is ValidationError:
        violations = [Violation(v.path, v.field, v.message) for v in detail.violations]
        return ValidationError(violations or Violation("", "", message))
    return entry.error_class(message)


def raise_from_rpc(exc: grpc.RpcError) -> NoReturn:
    """`raise error_from_rpc(exc) from exc`, for client code in an `except` block."""
    raise error_from_rpc(exc) from exc
