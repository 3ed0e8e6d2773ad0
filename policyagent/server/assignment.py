"""The AssignmentAdmin service, and how the server opens the registry and the effective policies.

`open_assignment(data_dir, policy_store)` (blocking; the server runs it in its
store thread right after opening the policy store) opens
<data-dir>/topology.sqlite3, wraps both stores so every committed write updates
`EffectivePolicies`, and returns them as `AssignmentParts`. The server then uses
`parts.policy_store` in place of the raw policy store (PolicyAdmin writes go
through it) and exposes the parts as `PolicyServer.assignment`:

    server.assignment.effective        EffectivePolicies (the distribution hub's source)
    server.assignment.topology_store   ObservedTopologyStore (enrollment: upsert_computer)
    server.assignment.policy_store     ObservedPolicyStore

The servicer is thin, like PolicyAdmin's: proto ↔ model translation, store calls
in the store thread, errors through the catalog. Admin certificates are enforced
for the whole service by policyagent.pki.authz.AuthzInterceptor (every service
not listed as public or agent-only is admin-only).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from grpc import aio

from policyagent.model.assignment import (
    Computer,
    Gpo,
    GpoLink,
    Group,
    OrgUnit,
    Resolution,
    Scope,
    Site,
    Topology,
)
from policyagent.model.errors import NotFoundError, ProtectedError, ValidationError, Violation
from policyagent.model.objects import Kind, normalize_id
from policyagent.pb import assign_grpc, assign_pb, dist_pb
from policyagent.server.admin import principal_of, run_logged
from policyagent.server.effective import (
    EffectivePolicies,
    ObservedPolicyStore,
    ObservedTopologyStore,
    observe,
    rsop_steps_to_proto,
)
from policyagent.store.base import PolicyStore
from policyagent.store.topology import (
    COMPUTER,
    GPO,
    GROUP,
    LINK,
    OU,
    SITE,
    DeleteObject,
    PutObject,
    TopologyChangeRecord,
    TopologyMutation,
    TopologyObject,
    TopologyWriteResult,
    key_text,
)
from policyagent.store.topology_sqlite import TOPOLOGY_FILE, SqliteTopologyStore

_log = logging.getLogger("policyagent.server.assignment")

T = TypeVar("T")

SERVICE_NAME: str = assign_pb.DESCRIPTOR.services_by_name["AssignmentAdmin"].full_name

_KIND_FROM_PROTO: dict[int, str] = {
    assign_pb.TOPOLOGY_KIND_COMPUTER: COMPUTER,
    assign_pb.TOPOLOGY_KIND_OU: OU,
    assign_pb.TOPOLOGY_KIND_SITE: SITE,
    assign_pb.TOPOLOGY_KIND_GROUP: GROUP,
    assign_pb.TOPOLOGY_KIND_GPO: GPO,
    assign_pb.TOPOLOGY_KIND_LINK: LINK,
}
_KIND_TO_PROTO = {v: k for k, v in _KIND_FROM_PROTO.items()}


# ------------------------------------------------------------------ opening


@dataclass(frozen=True)
class AssignmentParts:
    policy_store: ObservedPolicyStore
    topology_store: ObservedTopologyStore
    effective: EffectivePolicies


def open_assignment(data_dir: Path, policy_store: PolicyStore) -> AssignmentParts:
    """Open the registry next to the policy store and build the effective policies (blocking)."""

    def policy_exists(policy_id: str) -> bool:
        return policy_store.get(Kind.POLICY, policy_id) is not None

    topology = SqliteTopologyStore(data_dir / TOPOLOGY_FILE, policy_exists=policy_exists)
    try:
        observed_policies, observed_topology, effective = observe(policy_store, topology)
    except BaseException:
        topology.close()
        raise
    _log.info(
        "registry open",
        extra={"path": str(topology.path), "computers": len(effective.computers())},
    )
    return AssignmentParts(observed_policies, observed_topology, effective)


# ------------------------------------------------------------------ translation


def computer_to_proto(c: Computer) -> assign_pb.Computer:
    return assign_pb.Computer(
        name=c.name,
        membership=c.membership,
        domain=c.domain,
        ou=c.ou,
        site=c.site,
        groups=sorted(c.groups),
        revision=c.revision,
    )


def topology_to_proto(topology: Topology, revision: int, policy_name: Callable[[str], str]) -> assign_pb.Topology:
    out = assign_pb.Topology(revision=revision)
    objects: list[TopologyObject] = [*topology.computers.values(), *topology.ous.values(), *topology.sites.values()]
    objects += [*topology.groups.values(), *topology.gpos.values(), *topology.links]
    for obj in objects:
        _add(out, obj, policy_name)
    return out


def _add(out: assign_pb.Topology, obj: TopologyObject, policy_name: Callable[[str], str]) -> None:
    if isinstance(obj, Computer):
        out.computers.append(computer_to_proto(obj))
    elif isinstance(obj, OrgUnit):
        out.ous.add(
            dn=obj.dn, block_inheritance=obj.block_inheritance, description=obj.description, revision=obj.revision
        )
    elif isinstance(obj, Site):
        out.sites.add(name=obj.name, description=obj.description, revision=obj.revision)
    elif isinstance(obj, Group):
        out.groups.add(name=obj.name, description=obj.description, revision=obj.revision)
    elif isinstance(obj, Gpo):
        out.gpos.append(gpo_to_proto(obj, policy_name))
    else:
        out.links.add(
            gpo=obj.gpo_id,
            scope=str(obj.scope),
            order=obj.order,
            enforced=obj.enforced,
            enabled=obj.enabled,
            revision=obj.revision,
        )


def gpo_to_proto(gpo: Gpo, policy_name: Callable[[str], str]) -> assign_pb.Gpo:
    return assign_pb.Gpo(
        id=gpo.id,
        name=gpo.name,
        enabled=gpo.enabled,
        policy_id=gpo.policy_id,
        policy_name=policy_name(gpo.policy_id) if gpo.policy_id else "",
        description=gpo.description,
        security_filter=list(gpo.security_filter),
        revision=gpo.revision,
    )


def mutation_from_proto(m: assign_pb.TopologyMutation, index: int) -> TopologyMutation:
    path = f"mutation {index}"
    op = m.WhichOneof("op")
    if op == "put_computer":
        c = m.put_computer
        if c.membership not in ("domain", "workgroup"):
            raise ValidationError(Violation(path, "membership", f'"{c.membership}": give domain or workgroup'))
        membership: Any = c.membership
        return PutObject(
            Computer(c.name, membership, c.domain, c.ou, c.site, frozenset(c.groups), c.revision), m.upsert
        )
    if op == "put_ou":
        return PutObject(
            OrgUnit(m.put_ou.dn, m.put_ou.block_inheritance, m.put_ou.description, m.put_ou.revision), m.upsert
        )
    if op == "put_site":
        return PutObject(Site(m.put_site.name, m.put_site.description, m.put_site.revision), m.upsert)
    if op == "put_group":
        return PutObject(Group(m.put_group.name, m.put_group.description, m.put_group.revision), m.upsert)
    if op == "put_gpo":
        g = m.put_gpo
        gpo = Gpo(
            g.id,
            g.name,
            g.enabled,
            g.policy_id,
            g.description,
            g.revision,
            security_filter=tuple(g.security_filter),
        )
        return PutObject(gpo, m.upsert)
    if op == "put_link":
        lk = m.put_link
        if not lk.gpo.strip():
            raise ValidationError(Violation(path, "gpo", "give the GPO to link (name or id)"))
        scope = Scope.parse(lk.scope, path=path)
        return PutObject(GpoLink(lk.gpo.strip(), scope, lk.order, lk.enforced, lk.enabled, lk.revision), m.upsert)
    if op == "delete":
        kind = _KIND_FROM_PROTO.get(m.delete.kind)
        if kind is None:
            raise ValidationError(Violation(path, "kind", "give the kind: computer, ou, site, group, gpo or link"))
        if not m.delete.key.strip():
            raise ValidationError(Violation(path, "key", f"give the {kind} to delete"))
        return DeleteObject(kind, m.delete.key.strip(), m.delete.revision)
    raise ValidationError(Violation(path, "op", "empty mutation: give a put or a delete"))


def rsop_to_proto(
    resolution: Resolution, computer: Computer, *, planning: bool, version: str, unregistered: bool = False
) -> assign_pb.Rsop:
    winner = resolution.winner
    out = assign_pb.Rsop(
        computer=computer.name,
        membership=computer.membership,
        domain=computer.domain,
        ou=computer.ou,
        site=computer.site,
        planning=planning,
        policy_id=resolution.policy_id,
        policy_name=winner.policy_name if winner else "",
        source=resolution.source,
        version=version,
        unregistered=unregistered,
        groups=sorted(computer.groups, key=str.casefold),
    )
    steps: list[dist_pb.RsopStep] = rsop_steps_to_proto(resolution.steps)
    out.steps.extend(steps)
    return out


def change_to_proto(r: TopologyChangeRecord) -> assign_pb.TopologyChange:
    return assign_pb.TopologyChange(
        seq=r.seq,
        time_unix_ms=r.time_unix_ms,
        principal=r.principal,
        operation=r.operation,
        kind=r.kind,
        key=r.key,
        revision=r.revision,
        context=r.context,
    )


# ------------------------------------------------------------------ operations (blocking)


class DirectoryGuard(Protocol):
    """What the directory sync offers the registry API: refusing local edits of the objects it owns."""

    def check_local_write(self, mutations: Iterable[TopologyMutation]) -> None:
        """Raise ProtectedError naming the object if a mutation changes a directory-owned object."""

    def owns_gpo(self, gpo_id: str) -> bool: ...


class AssignmentOps:
    """The plain functions behind the servicer, over the parts (run in the store thread).

    `directory` (the server's directory sync, when it has one) refuses local edits of objects the
    directory owns: the next sync would silently undo them.
    """

    def __init__(self, parts: AssignmentParts, directory: DirectoryGuard | None = None) -> None:
        self.parts = parts
        self.directory = directory

    def get_topology(self) -> assign_pb.Topology:
        topology, revision = self.parts.topology_store.snapshot()
        return topology_to_proto(topology, revision, self.parts.effective.policy_name)

    def _response(self, result: TopologyWriteResult, changed: frozenset[str]) -> assign_pb.TopologyApplyResponse:
        response = assign_pb.TopologyApplyResponse(revision=result.revision, changed_computers=sorted(changed))
        for change in result.changes:
            if change.after is not None:
                _add(response.written, change.after, self.parts.effective.policy_name)
            elif change.before is not None:
                response.deleted.add(kind=_KIND_TO_PROTO[change.kind], key=key_text(change.before))
        return response

    def _write(
        self, mutations: list[TopologyMutation], principal: str, context: str
    ) -> assign_pb.TopologyApplyResponse:
        result, changed = self.parts.topology_store.write_and_report(mutations, principal=principal, context=context)
        return self._response(result, changed)

    def apply(self, request: assign_pb.TopologyApplyRequest, principal: str) -> assign_pb.TopologyApplyResponse:
        mutations = [mutation_from_proto(m, i) for i, m in enumerate(request.mutations, start=1)]
        if self.directory is not None:
            self.directory.check_local_write(mutations)
        return self._write(mutations, principal, request.operation)

    def set_gpo_policy(self, request: assign_pb.SetGpoPolicyRequest, principal: str) -> assign_pb.Gpo:
        topology, _ = self.parts.topology_store.snapshot()
        gpo = _find_gpo(topology, request.gpo)
        if self.directory is not None and self.directory.owns_gpo(gpo.id):
            raise ProtectedError(
                f'GPO "{gpo.name}" comes from the directory: assign its IPsec policy in the directory '
                "(policyagent directory assign ...); a local assignment would be overwritten by the next sync"
            )
        policy_id = ""
        if request.policy.strip():
            policy_id = self._policy_id(request.policy)
        updated = dataclasses.replace(gpo, policy_id=policy_id, revision=request.revision or gpo.revision)
        response = self._write([PutObject(updated)], principal, "set GPO policy")
        if response.written.gpos:
            return response.written.gpos[0]
        return gpo_to_proto(gpo, self.parts.effective.policy_name)  # unchanged

    def _policy_id(self, ref: str) -> str:
        store = self.parts.policy_store
        try:
            found = store.get(Kind.POLICY, normalize_id(ref))
        except ValueError:
            found = None
        if found is None:
            found = store.find(Kind.POLICY, ref)
        if found is None:
            raise ValidationError(Violation("", "policy", f'there is no IPsec policy "{ref.strip()}"'))
        return found.id

    def rsop(self, request: assign_pb.RsopRequest) -> assign_pb.Rsop:
        effective = self.parts.effective
        if not request.computer.strip():
            raise ValidationError(Violation("", "computer", "give the computer's name"))
        planning = (
            request.HasField("planning_ou")
            or request.HasField("planning_site")
            or request.HasField("planning_domain")
            or bool(request.planning_groups)
        )
        current = self.parts.topology_store.get_computer(request.computer)
        if planning:
            ou = request.planning_ou if request.HasField("planning_ou") else None
            site = request.planning_site if request.HasField("planning_site") else None
            domain = request.planning_domain if request.HasField("planning_domain") else None
            groups = list(request.planning_groups) if request.planning_groups or current is None else None
            name = current.name if current is not None else request.computer
            moved, resolution = effective.plan(name, ou=ou, site=site, domain=domain, groups=groups)
            return rsop_to_proto(resolution, moved, planning=True, version="", unregistered=current is None)
        if current is None:
            raise NotFoundError(
                f'there is no computer "{request.computer.strip()}" in the registry '
                "(to plan a computer that is not registered, give a planning OU or domain)"
            )
        return rsop_to_proto(
            effective.resolution(current.name), current, planning=False, version=effective.version_of(current.name)
        )

    def list_changes(self, request: assign_pb.ListTopologyChangesRequest) -> assign_pb.ListTopologyChangesResponse:
        limit = min(request.limit or 1000, 10000)
        records = self.parts.topology_store.changes(after_seq=request.after_seq, limit=limit)
        return assign_pb.ListTopologyChangesResponse(changes=[change_to_proto(r) for r in records])


def _find_gpo(topology: Topology, ref: str) -> Gpo:
    text = ref.strip()
    if not text:
        raise ValidationError(Violation("", "gpo", "give the GPO's name or id"))
    try:
        found = topology.gpo(normalize_id(text))
    except ValueError:
        found = None
    if found is None:
        found = next((g for g in topology.gpos.values() if g.name.casefold() == text.casefold()), None)
    if found is None:
        raise NotFoundError(f'there is no GPO "{text}"')
    return found


# ------------------------------------------------------------------ servicer


class AssignmentAdminServicer(assign_grpc.AssignmentAdminServicer):
    """grpc.aio servicer for policyagent.v1.AssignmentAdmin; `executor` is the store thread."""

    def __init__(self, parts: AssignmentParts, executor: Executor, directory: DirectoryGuard | None = None) -> None:
        self._ops = AssignmentOps(parts, directory)
        self._executor = executor

    async def _call(self, context: aio.ServicerContext[Any, Any], method: str, work: Callable[..., T], *args: Any) -> T:
        return await run_logged(context, method, self._executor, _log, work, *args)

    async def GetTopology(
        self, request: assign_pb.GetTopologyRequest, context: aio.ServicerContext[Any, Any]
    ) -> assign_pb.Topology:
        return await self._call(context, "GetTopology", self._ops.get_topology)

    async def Apply(
        self, request: assign_pb.TopologyApplyRequest, context: aio.ServicerContext[Any, Any]
    ) -> assign_pb.TopologyApplyResponse:
        return await self._call(context, "Apply", self._ops.apply, request, principal_of(context))

    async def SetGpoPolicy(
        self, request: assign_pb.SetGpoPolicyRequest, context: aio.ServicerContext[Any, Any]
    ) -> assign_pb.Gpo:
        return await self._call(context, "SetGpoPolicy", self._ops.set_gpo_policy, request, principal_of(context))

    async def GetRsop(self, request: assign_pb.RsopRequest, context: aio.ServicerContext[Any, Any]) -> assign_pb.Rsop:
        return await self._call(context, "GetRsop", self._ops.rsop, request)

    async def ListTopologyChanges(
        self, request: assign_pb.ListTopologyChangesRequest, context: aio.ServicerContext[Any, Any]
    ) -> assign_pb.ListTopologyChangesResponse:
        return await self._call(context, "ListTopologyChanges", self._ops.list_changes, request)


def add_assignment_to_server(
    parts: AssignmentParts, server: aio.Server, executor: Executor, directory: DirectoryGuard | None = None
) -> None:
    """Register AssignmentAdmin on a grpc.aio server."""
    assign_grpc.add_AssignmentAdminServicer_to_server(AssignmentAdminServicer(parts, executor, directory), server)
