"""The AssignmentAdmin connection: netsh's AdminClient (mTLS admin certificate, errors as PolicyErrors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from clients.netsh.client import AdminClient
from policyagent.pb import assign_grpc, assign_pb

R = TypeVar("R", bound=Message)


class AssignmentClient(AdminClient):
    """A synchronous AssignmentAdmin client over the same connection setup as netsh's."""

    _assign_stub: assign_grpc.AssignmentAdminStub | None = None

    @classmethod
    def sharing(cls, admin: AdminClient) -> AssignmentClient:
        """An AssignmentClient on the same server, certificate and connection as `admin` (netsh's)."""
        admin._stub  # noqa: B018 - connects
        out = cls(admin.target, admin._timeout, cert_dir=admin._cert_dir, certificate=admin._certificate)
        out._channel = admin._channel
        out._stub_ = admin._stub_
        return out

    def _assignment(self) -> assign_grpc.AssignmentAdminStub:
        if self._assign_stub is None:
            self._stub  # noqa: B018 - connects: finds the admin certificate, opens the mTLS channel
            assert self._channel is not None
            self._assign_stub = assign_grpc.AssignmentAdminStub(self._channel)
        return self._assign_stub

    def _acall(self, method: Callable[[assign_grpc.AssignmentAdminStub], Callable[..., R]], request: Message) -> R:
        try:
            return method(self._assignment())(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._translate(exc) from exc

    def topology(self) -> assign_pb.Topology:
        return self._acall(lambda s: s.GetTopology, assign_pb.GetTopologyRequest())

    def apply_topology(
        self, mutations: list[assign_pb.TopologyMutation], operation: str
    ) -> assign_pb.TopologyApplyResponse:
        return self._acall(lambda s: s.Apply, assign_pb.TopologyApplyRequest(mutations=mutations, operation=operation))

    def set_gpo_policy(self, gpo: str, policy: str, revision: int = 0) -> assign_pb.Gpo:
        request = assign_pb.SetGpoPolicyRequest(gpo=gpo, policy=policy, revision=revision)
        return self._acall(lambda s: s.SetGpoPolicy, request)

    def rsop(
        self,
        computer: str,
        planning_ou: str | None = None,
        planning_site: str | None = None,
        planning_domain: str | None = None,
        planning_groups: list[str] | None = None,
    ) -> assign_pb.Rsop:
        request = assign_pb.RsopRequest(computer=computer, planning_groups=planning_groups or [])
        if planning_ou is not None:
            request.planning_ou = planning_ou
        if planning_site is not None:
            request.planning_site = planning_site
        if planning_domain is not None:
            request.planning_domain = planning_domain
        return self._acall(lambda s: s.GetRsop, request)
