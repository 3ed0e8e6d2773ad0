"""The IdentityAdmin service: join tokens, revocation and the certificate list, for admins anywhere.

The same operations as the local commands (policyagent.pki.commands:
`create_join_token`, `revoke`, `certificates`), run on the server's store thread
against its open identity database. A revocation is applied at once: the server
reloads its revocation list as SIGHUP does (`PolicyServer.reload_revocations`),
so calls with those certificates are refused and subscribers (the distribution
hub) close their streams. Admin certificate required (AuthzInterceptor).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Literal

from grpc import aio

from policyagent.model.errors import NotFoundError, ValidationError, Violation
from policyagent.pb import identity_grpc, identity_pb
from policyagent.pki import commands
from policyagent.pki.ca import PkiError, Role
from policyagent.pki.identity import CertRecord, IdentityStore, Peer, serial_text
from policyagent.server.admin import principal_of, run_logged

SERVICE_NAME: str = identity_pb.DESCRIPTOR.services_by_name["IdentityAdmin"].full_name
DEFAULT_JOIN_TOKEN_TTL_S = 3600.0

_log = logging.getLogger("policyagent.server.identity")

ROLE_TO_PROTO: dict[Role, identity_pb.CertificateRole.ValueType] = {
    "agent": identity_pb.CERTIFICATE_ROLE_AGENT,
    "admin": identity_pb.CERTIFICATE_ROLE_ADMIN,
    "server": identity_pb.CERTIFICATE_ROLE_SERVER,
}
PROTO_TO_ROLE: dict[identity_pb.CertificateRole.ValueType, Role] = {v: k for k, v in ROLE_TO_PROTO.items()}


def record_to_proto(rec: CertRecord) -> identity_pb.Certificate:
    return identity_pb.Certificate(
        name=rec.name,
        role=ROLE_TO_PROTO[rec.role],
        serial=serial_text(rec.serial),
        issued_unix_ms=rec.issued_ms,
        expires_unix_ms=rec.not_after_ms,
        revoked=rec.revoked_ms is not None,
        revoked_unix_ms=rec.revoked_ms or 0,
        revoke_reason=rec.revoke_reason,
    )


def record_from_proto(cert: identity_pb.Certificate) -> CertRecord:
    return CertRecord(
        serial=int(cert.serial, 16),
        role=PROTO_TO_ROLE.get(cert.role, "agent"),
        name=cert.name,
        issued_ms=cert.issued_unix_ms,
        not_after_ms=cert.expires_unix_ms,
        revoked_ms=cert.revoked_unix_ms if cert.revoked else None,
        revoke_reason=cert.revoke_reason,
    )


# ------------------------------------------------------------ work (on the store thread)


def create_join_token(
    identity: IdentityStore, request: identity_pb.CreateJoinTokenRequest, created_by: str
) -> identity_pb.CreateJoinTokenResponse:
    ttl = request.ttl_seconds or DEFAULT_JOIN_TOKEN_TTL_S
    try:
        created = commands.create_join_token(
            identity, request.computer, ttl, created_by=created_by, domain=request.domain
        )
    except PkiError as exc:
        raise ValidationError(Violation("", "", str(exc))) from None
    return identity_pb.CreateJoinTokenResponse(
        token=created.token, computer=created.computer, expires_unix_ms=created.expires_ms, domain=created.domain
    )


def revoke(identity: IdentityStore, role: Literal["agent", "admin"], name: str) -> list[Peer]:
    what = "computer" if role == "agent" else "admin"
    if not name.strip():
        raise ValidationError(Violation("", what, f"give the {what} name"))
    try:
        return commands.revoke(identity, role, name.strip())
    except PkiError as exc:
        raise NotFoundError(str(exc)) from None


def list_certificates(
    identity: IdentityStore, request: identity_pb.ListCertificatesRequest
) -> identity_pb.ListCertificatesResponse:
    role = PROTO_TO_ROLE.get(request.role)
    if role is None and request.role != identity_pb.CERTIFICATE_ROLE_UNSPECIFIED:
        raise ValidationError(Violation("", "role", f"unknown certificate role {request.role}"))
    records = commands.certificates(identity, role)
    return identity_pb.ListCertificatesResponse(certificates=[record_to_proto(r) for r in records])


# ------------------------------------------------------------ servicer


class IdentityAdminServicer(identity_grpc.IdentityAdminServicer):
    """grpc.aio servicer for policyagent.v1.IdentityAdmin over the server's identity database.

    `executor` is the server's store thread (where the identity database is used);
    `apply_revocations` is the server's reload of its revocation list (what SIGHUP runs).
    """

    def __init__(
        self,
        identity: IdentityStore,
        executor: Executor,
        apply_revocations: Callable[[], Awaitable[list[Peer]]],
    ) -> None:
        self._identity = identity
        self._executor = executor
        self._apply_revocations = apply_revocations

    async def CreateJoinToken(
        self, request: identity_pb.CreateJoinTokenRequest, context: aio.ServicerContext[Any, Any]
    ) -> identity_pb.CreateJoinTokenResponse:
        return await run_logged(
            context, "CreateJoinToken", self._executor, _log,
            create_join_token, self._identity, request, principal_of(context),
        )

    async def _revoke(
        self, method: str, role: Literal["agent", "admin"], name: str, context: aio.ServicerContext[Any, Any]
    ) -> identity_pb.RevokeResponse:
        peers = await run_logged(context, method, self._executor, _log, revoke, self._identity, role, name)
        await self._apply_revocations()
        _log.info("certificates revoked", extra={"revoked": [f"{p.role}:{p.name}" for p in peers],
                                                 "principal": principal_of(context)})
        return identity_pb.RevokeResponse(revoked=len(peers), serials=[serial_text(p.serial) for p in peers])

    async def RevokeHost(
        self, request: identity_pb.RevokeHostRequest, context: aio.ServicerContext[Any, Any]
    ) -> identity_pb.RevokeResponse:
        return await self._revoke("RevokeHost", "agent", request.computer, context)

    async def RevokeAdmin(
        self, request: identity_pb.RevokeAdminRequest, context: aio.ServicerContext[Any, Any]
    ) -> identity_pb.RevokeResponse:
        return await self._revoke("RevokeAdmin", "admin", request.name, context)

    async def ListCertificates(
        self, request: identity_pb.ListCertificatesRequest, context: aio.ServicerContext[Any, Any]
    ) -> identity_pb.ListCertificatesResponse:
        return await run_logged(
            context, "ListCertificates", self._executor, _log, list_certificates, self._identity, request
        )


def add_identity_to_server(servicer: IdentityAdminServicer, server: aio.Server) -> None:
    """Register the servicer on a grpc.aio server."""
    identity_grpc.add_IdentityAdminServicer_to_server(servicer, server)
