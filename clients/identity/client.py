"""The IdentityAdmin connection: netsh's AdminClient (mTLS admin certificate, errors as PolicyErrors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import grpc
from google.protobuf.message import Message

from clients.netsh.client import AdminClient
from policyagent.pb import identity_grpc, identity_pb
from policyagent.pki.ca import Role
from policyagent.pki.commands import JoinToken
from policyagent.pki.identity import CertRecord
from policyagent.server.identity import ROLE_TO_PROTO, record_from_proto

R = TypeVar("R", bound=Message)

class IdentityClient(AdminClient):
    """A synchronous IdentityAdmin client over the same connection setup as netsh's."""

    _identity_stub: identity_grpc.IdentityAdminStub | None = None

    def _identity(self) -> identity_grpc.IdentityAdminStub:
        if self._identity_stub is None:
            self._stub  # noqa: B018 - connects: finds the admin certificate, opens the mTLS channel
            assert self._channel is not None
            self._identity_stub = identity_grpc.IdentityAdminStub(self._channel)
        return self._identity_stub

    def _icall(self, method: Callable[[identity_grpc.IdentityAdminStub], Callable[..., R]], request: Message) -> R:
        try:
            return method(self._identity())(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._translate(exc) from exc

    def create_join_token(self, computer: str, ttl_s: float, domain: str = "") -> JoinToken:
        request = identity_pb.CreateJoinTokenRequest(computer=computer, ttl_seconds=ttl_s, domain=domain)
        response = self._icall(lambda s: s.CreateJoinToken, request)
        return JoinToken(response.token, response.computer, response.expires_unix_ms, response.domain)

    def revoke(self, role: Literal["agent", "admin"], name: str) -> list[str]:
        """Revoke every valid certificate of this computer (agent) or admin; their serials (hex)."""
        if role == "agent":
            response = self._icall(lambda s: s.RevokeHost, identity_pb.RevokeHostRequest(computer=name))
        else:
            response = self._icall(lambda s: s.RevokeAdmin, identity_pb.RevokeAdminRequest(name=name))
        return list(response.serials)

    def certificates(self, role: Role | None = None) -> list[CertRecord]:
        wanted = ROLE_TO_PROTO[role] if role is not None else identity_pb.CERTIFICATE_ROLE_UNSPECIFIED
        response = self._icall(lambda s: s.ListCertificates, identity_pb.ListCertificatesRequest(role=wanted))
        return [record_from_proto(c) for c in response.certificates]
