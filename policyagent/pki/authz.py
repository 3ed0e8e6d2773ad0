"""Who may call what: the caller's certificate → `Peer`, and the checks every service relies on.

The server's port takes TLS with an optional client certificate (verified
against the CA by the TLS layer when one is presented), so enrollment and
health work before a machine has a certificate. `AuthzInterceptor` then
enforces, for every call, before the servicer runs:

    policyagent.v1.Enrollment, grpc.health.v1.Health, reflection   anyone
    policyagent.v1.Distribution                                   a valid, unrevoked agent certificate
    every other service (PolicyAdmin, fleet, assignment, ...)     a valid, unrevoked admin certificate

New services are admin-only unless added to the tables below: failing closed.
Servicers call `await require_agent(context)` / `await require_admin(context)` to
get the caller's `Peer` (the computer name comes only from the certificate).

On the main port the TLS is the front's (policyagent/server/front.py): it relays calls
to the grpc.aio server over a private unix socket with the certificate it verified, and
`peer_of` believes that certificate only with the token of a front running in this
process (`trust_front`).
"""

from __future__ import annotations

import contextvars
import functools
import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, NoReturn

import grpc
from cryptography import x509
from grpc import aio

from policyagent.pki.ca import common_name, role_of
from policyagent.pki.identity import Peer, Revocations

__all__ = [
    "ADMIN_MESSAGE",
    "AGENT_MESSAGE",
    "REVOKED_MESSAGE",
    "AuthError",
    "AuthzInterceptor",
    "Peer",
    "check_peer",
    "current_peer",
    "forget_front",
    "peer_address",
    "peer_of",
    "peer_of_der",
    "require_admin",
    "require_agent",
    "required_role",
    "trust_front",
]

PUBLIC_SERVICES = frozenset(
    {
        "policyagent.v1.Enrollment",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
AGENT_SERVICES = frozenset({"policyagent.v1.Distribution"})

ADMIN_MESSAGE = "this call needs an admin certificate"
AGENT_MESSAGE = "this call needs an agent (host) certificate"
REVOKED_MESSAGE = "certificate revoked"

# The main port's front (policyagent/server/front.py) relays calls to the grpc.aio server with the
# certificate it verified: believed only with the token of a front running in this process.
FRONT_METADATA_PREFIX = "policyagent-front-"
FRONT_TOKEN_KEY = FRONT_METADATA_PREFIX + "token"
FRONT_PEER_KEY = FRONT_METADATA_PREFIX + "peer"
FRONT_CERT_KEY = FRONT_METADATA_PREFIX + "certificate-bin"
_front_tokens: set[str] = set()

# Set by the interceptor for the duration of each call.
_revocations: contextvars.ContextVar[Revocations | None] = contextvars.ContextVar("pa_revocations", default=None)
_peer: contextvars.ContextVar[Peer | None] = contextvars.ContextVar("pa_peer", default=None)


class AuthError(Exception):
    """A call is refused: `status` (UNAUTHENTICATED or PERMISSION_DENIED) and the reason."""

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def required_role(service: str) -> Literal["agent", "admin"] | None:
    """The certificate role a service needs (None: anyone may call it)."""
    if service in PUBLIC_SERVICES:
        return None
    if service in AGENT_SERVICES:
        return "agent"
    return "admin"


@functools.lru_cache(maxsize=4096)
def _peer_of_pem(pem: bytes) -> Peer | None:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return _peer_of_cert(cert)


def _peer_of_cert(cert: x509.Certificate) -> Peer | None:
    role = role_of(cert)
    if role not in ("agent", "admin"):
        return None
    return Peer(role="agent" if role == "agent" else "admin", name=common_name(cert), serial=cert.serial_number)


@functools.lru_cache(maxsize=4096)
def peer_of_der(der: bytes) -> Peer | None:
    """A verified certificate (DER) as a Peer; None if it is not an agent's or an admin's."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return _peer_of_cert(cert)


def trust_front(token: str) -> None:
    """Believe the certificates relayed with `token` (a Front of this process starts)."""
    _front_tokens.add(token)


def forget_front(token: str) -> None:
    _front_tokens.discard(token)


def _relayed(context: Any) -> dict[str, Any] | None:
    """The front's metadata on a call it relayed (token checked); None on any other call."""
    if not _front_tokens:
        return None
    fields = {k: v for k, v in (context.invocation_metadata() or ()) if k.startswith(FRONT_METADATA_PREFIX)}
    token = fields.get(FRONT_TOKEN_KEY)
    if not isinstance(token, str) or not any(hmac.compare_digest(token, t) for t in list(_front_tokens)):
        return None
    return fields


def peer_address(context: Any) -> str:
    """Where the call came from, as gRPC writes it (ipv4:1.2.3.4:5): the front's client on a relayed call."""
    relayed = _relayed(context)
    if relayed is not None:
        return str(relayed.get(FRONT_PEER_KEY, ""))
    return str(context.peer() or "")


def peer_of(context: Any) -> Peer | None:
    """The caller's certificate as a Peer, or None without one (or with one that is not ours to use).

    The TLS layer (gRPC's, or the front's on a relayed call) has already checked the
    chain to our CA; this reads role (the EKU role OID), name (subject CN) and serial.
    It does not check revocation: `check_peer` / `require_*` do.
    """
    relayed = _relayed(context)
    if relayed is not None:
        der = relayed.get(FRONT_CERT_KEY)
        return peer_of_der(der) if isinstance(der, bytes) else None
    auth = context.auth_context() or {}
    certs = auth.get("x509_pem_cert") or []
    if not certs:
        return None
    pem = certs[0]
    return _peer_of_pem(pem if isinstance(pem, bytes) else str(pem).encode())


def check_peer(peer: Peer | None, role: Literal["agent", "admin"], revocations: Revocations | None) -> Peer:
    """`peer` if it may make a call that needs `role`; AuthError with the reason otherwise."""
    needed = ADMIN_MESSAGE if role == "admin" else AGENT_MESSAGE
    if peer is None:
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"{needed} (none was presented)")
    if revocations is None:
        # No revocation list means nothing was configured: refuse rather than trust.
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"{needed}; this server has no certificate checks")
    if revocations.is_revoked(peer.serial):
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED, f"{REVOKED_MESSAGE}: the {peer.role} certificate of {peer.name!r}"
        )
    if peer.role != role:
        raise AuthError(
            grpc.StatusCode.PERMISSION_DENIED, f"{needed}; {peer.name!r} presented an {peer.role} certificate"
        )
    return peer


async def _abort(context: Any, error: AuthError) -> NoReturn:
    await context.abort(error.status, error.message)
    raise AssertionError("context.abort returned")  # pragma: no cover


async def _require(context: Any, role: Literal["agent", "admin"]) -> Peer:
    try:
        return check_peer(peer_of(context), role, _revocations.get())
    except AuthError as exc:
        await _abort(context, exc)


async def require_admin(context: Any) -> Peer:
    """The calling admin; aborts the call (UNAUTHENTICATED / PERMISSION_DENIED) otherwise."""
    return await _require(context, "admin")


async def require_agent(context: Any) -> Peer:
    """The calling agent (its computer name is `.name`); aborts the call otherwise."""
    return await _require(context, "agent")


def current_peer() -> Peer | None:
    """The Peer the interceptor verified for the running call (None on public services)."""
    return _peer.get()


Behavior = Callable[..., Any]


class AuthzInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Enforces `required_role` on every call and makes the revocation list available to `require_*`."""

    def __init__(self, revocations: Revocations) -> None:
        self._revocations = revocations

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method or ""
        service = method.lstrip("/").split("/", 1)[0]
        role = required_role(service)
        revocations = self._revocations

        async def check(context: Any) -> None:
            _revocations.set(revocations)
            if role is not None:
                try:
                    _peer.set(check_peer(peer_of(context), role, revocations))
                except AuthError as exc:
                    await _abort(context, exc)

        streaming = bool(handler.response_streaming)
        fields = ("stream_stream" if handler.request_streaming else "unary_stream") if streaming else (
            "stream_unary" if handler.request_streaming else "unary_unary"
        )
        behavior: Behavior = getattr(handler, fields)
        return handler._replace(**{fields: _guarded(behavior, check, streaming)})  # type: ignore[attr-defined, no-any-return]


def _guarded(behavior: Behavior, check: Callable[[Any], Awaitable[None]], streaming: bool) -> Behavior:
    if streaming and inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
            await check(context)
            async for item in behavior(request, context):
                yield item

        return generator

    async def call(request: Any, context: Any) -> Any:
        await check(context)
        result = behavior(request, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    return call
