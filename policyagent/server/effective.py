"""Effective policies: what each computer must enforce, kept current incrementally.

API for the distribution hub (stable):

    effective = server.effective                     # an EffectivePolicies
    unsubscribe = effective.subscribe(callback)      # callback(frozenset[str]) after each committed write
    effective.version_of("host1.corp.example")      # -> str, the content hash
    effective.get("host1.corp.example")             # -> dist_pb.EffectivePolicy (a copy, nonce "")
    effective.encoded("host1.corp.example")         # -> (version, parts): the same message serialized
    effective.computers()                            # -> frozenset[str], every registered computer

* Computer names are the registry's canonical names (lower-case); the lookups
  accept any case. `get` and `version_of` raise NotFoundError for a computer that
  is not in the registry.
* The callback receives the names of the computers whose effective policy
  *version* changed (or that were deleted from the registry: `get` then raises
  NotFoundError). It is called synchronously in the thread that made the write
  (the server's store thread), after the write committed and after this object
  was updated, so `get()` inside it already returns the new policy. It must be
  quick and must not write to the stores; an asyncio hub hands the set over with
  `loop.call_soon_threadsafe`. An exception in a callback is logged and does not
  undo the write or stop the other callbacks.
* `version` is sha256 (hex) of the deterministic serialization of the
  EffectivePolicy with `version` and `nonce` empty. Store metadata (revisions,
  modification times, the store's `assigned` flag) is left out of the content,
  so re-saving an unchanged policy changes no version. The policy carried is
  that computer's own, pre-shared keys included (send it only to that computer).

Incremental (an edit touching one GPO must not recompute the fleet): the object
keeps a live mirror of both stores with indexes — scope (site, domain, OU) →
computers, GPO → its links' scopes (a GPO edit, its security filter included,
re-resolves only those), filter list/action → policies using them,
policy → computers whose resolution mentions it. A topology write re-resolves
only the computers in the scopes it touched; a policy edit recomputes that
policy's content once and re-hashes the computers that mention it, without
resolving anything.

Writes reach this object through `ObservedPolicyStore` and `ObservedTopologyStore`,
the wrappers the server puts around its two stores: each runs the write and the
update of this object under one lock, so updates arrive in commit order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from policyagent.model.assignment import (
    Computer,
    ComputerOverlay,
    Gpo,
    GpoLink,
    Group,
    KeyedLookups,
    OrgUnit,
    Resolution,
    Scope,
    ScopeKind,
    Site,
    Step,
    Topology,
    key_of,
    planned_computer,
    resolve,
)
from policyagent.model.errors import InUseError, NotFoundError
from policyagent.model.objects import Kind
from policyagent.model.view import StoreView
from policyagent.model.writes import Delete, Mutation, PlanFn
from policyagent.pb import dist_pb, pb
from policyagent.store.base import DelegatingPolicyStore, PolicyStore, WriteResult
from policyagent.store.topology import (
    ObjectChange,
    TopologyChangeRecord,
    TopologyMutation,
    TopologyStore,
    TopologyWriteResult,
)

_log = logging.getLogger("policyagent.server.effective")

Resolver = Callable[..., Resolution]
ChangeCallback = Callable[[frozenset[str]], None]


# ------------------------------------------------------------------ live topology


class LiveTopology(KeyedLookups):
    """A mutable TopologyView with the indexes incremental recomputation needs."""

    def __init__(self, topology: Topology) -> None:
        self.computers: dict[str, Computer] = {}
        self.ous: dict[str, OrgUnit] = {}
        self.sites: dict[str, Site] = {}
        self.gpos: dict[str, Gpo] = {}
        self.groups: dict[str, Group] = {}  # planning checks; membership is on the computers
        self._links: dict[tuple[str, str], dict[str, GpoLink]] = {}  # scope key → gpo id → link
        self._links_of_gpo: dict[str, dict[tuple[str, str], Scope]] = {}
        self._by_site: dict[str, set[str]] = {}
        self._by_domain: dict[str, set[str]] = {}
        self._by_ou: dict[str, set[str]] = {}  # direct members, by DN key
        for computer in topology.computers.values():
            self.put_computer(computer)
        for ou in topology.ous.values():
            self.ous[ou.dn.casefold()] = ou
        for site in topology.sites.values():
            self.sites[key_of(site.name)] = site
        for gpo in topology.gpos.values():
            self.gpos[gpo.id] = gpo
        for group in topology.groups.values():
            self.groups[key_of(group.name)] = group
        for link in topology.links:
            self.put_link(link)

    # TopologyView (the lookups come from KeyedLookups)
    def links_at(self, scope: Scope) -> list[GpoLink]:
        return sorted(self._links.get(scope.key, {}).values(), key=lambda lk: lk.order)

    # updates
    def put_computer(self, computer: Computer) -> None:
        self.remove_computer(computer.name)
        key = key_of(computer.name)
        self.computers[key] = computer
        if computer.site:
            self._by_site.setdefault(key_of(computer.site), set()).add(key)
        domain = computer.directory_domain
        if domain:
            self._by_domain.setdefault(domain, set()).add(key)
        if computer.ou:
            self._by_ou.setdefault(computer.ou.casefold(), set()).add(key)

    def remove_computer(self, name: str) -> None:
        key = key_of(name)
        old = self.computers.pop(key, None)
        if old is None:
            return
        if old.site:
            self._by_site.get(key_of(old.site), set()).discard(key)
        if old.directory_domain:
            self._by_domain.get(old.directory_domain, set()).discard(key)
        if old.ou:
            self._by_ou.get(old.ou.casefold(), set()).discard(key)

    def put_link(self, link: GpoLink) -> None:
        self._links.setdefault(link.scope.key, {})[link.gpo_id] = link
        self._links_of_gpo.setdefault(link.gpo_id, {})[link.scope.key] = link.scope

    def remove_link(self, link: GpoLink) -> None:
        self._links.get(link.scope.key, {}).pop(link.gpo_id, None)
        self._links_of_gpo.get(link.gpo_id, {}).pop(link.scope.key, None)

    # scope → computers
    def scopes_of_gpo(self, gpo_id: str) -> list[Scope]:
        return list(self._links_of_gpo.get(gpo_id, {}).values())

    def computers_in(self, scope: Scope) -> set[str]:
        """Keys of the computers a link at `scope` reaches (before block inheritance)."""
        if scope.kind is ScopeKind.LOCAL:
            return set(self.computers)
        if scope.kind is ScopeKind.SITE:
            return set(self._by_site.get(key_of(scope.name), ()))
        if scope.kind is ScopeKind.DOMAIN:
            return set(self._by_domain.get(key_of(scope.name), ()))
        top = scope.name.casefold()
        suffix = "," + top
        out: set[str] = set()
        for dn_key, members in self._by_ou.items():
            if dn_key == top or dn_key.endswith(suffix):
                out |= members
        return out


# ------------------------------------------------------------------ policy content


_T = TypeVar("_T", pb.Policy, pb.FilterList, pb.FilterAction)


def _clean(obj: _T) -> _T:
    """A copy without store metadata (revision, modification time, the store's assigned flag)."""
    out = type(obj)()
    out.CopyFrom(obj)
    out.revision = 0
    out.modified_unix_ms = 0
    if isinstance(out, pb.Policy):
        out.assigned = True  # the policy in force on the computer
    return out


@dataclass(frozen=True)
class _Content:
    """One policy as computers receive it, serialized once (fields 6–8 of EffectivePolicy)."""

    name: str
    data: bytes


def _content_of(policy: pb.Policy, lists: dict[str, pb.FilterList], actions: dict[str, pb.FilterAction]) -> _Content:
    message = dist_pb.EffectivePolicy()
    message.policy.CopyFrom(_clean(policy))
    seen_lists: list[str] = []
    seen_actions: list[str] = []
    for rule in policy.rules:
        if rule.filter_list_id and rule.filter_list_id not in seen_lists and rule.filter_list_id in lists:
            seen_lists.append(rule.filter_list_id)
        if rule.filter_action_id and rule.filter_action_id not in seen_actions and rule.filter_action_id in actions:
            seen_actions.append(rule.filter_action_id)
    for list_id in sorted(seen_lists):
        message.filter_lists.append(_clean(lists[list_id]))
    for action_id in sorted(seen_actions):
        message.filter_actions.append(_clean(actions[action_id]))
    return _Content(policy.name, message.SerializeToString(deterministic=True))


def rsop_steps_to_proto(steps: Iterable[Step]) -> list[dist_pb.RsopStep]:
    """RsopSteps (distribution.proto) for resolution steps."""
    return [
        dist_pb.RsopStep(
            gpo_id=s.gpo_id,
            gpo_name=s.gpo_name,
            scope=s.scope,
            link_order=s.link_order,
            enforced=s.enforced,
            policy_id=s.policy_id,
            policy_name=s.policy_name,
            outcome=s.reason,
        )
        for s in steps
    ]


@dataclass(frozen=True)
class _State:
    resolution: Resolution
    membership: str
    version: str
    head: bytes  # fields 3–5
    tail: bytes  # field 9


# ------------------------------------------------------------------ effective policies


class EffectivePolicies:
    """Every computer's effective policy and its version, updated incrementally (module docstring)."""

    def __init__(
        self,
        policy_store: PolicyStore,
        topology_store: TopologyStore,
        *,
        resolver: Resolver = resolve,
    ) -> None:
        self._resolver = resolver
        self._lock = threading.RLock()
        self._callbacks: list[ChangeCallback] = []
        contents, _ = policy_store.snapshot()
        topology, _ = topology_store.snapshot()
        self._policies: dict[str, pb.Policy] = {p.id: p for p in contents.policies}
        self._lists: dict[str, pb.FilterList] = {f.id: f for f in contents.filter_lists}
        self._actions: dict[str, pb.FilterAction] = {a.id: a for a in contents.filter_actions}
        self._users: dict[str, set[str]] = {}  # filter list / action id → policy ids
        for policy in self._policies.values():
            self._index_policy(policy)
        self._names: dict[str, str] = {p.id: p.name for p in self._policies.values()}
        self._content: dict[str, _Content] = {pid: self._make_content(pid) for pid in self._policies}
        self._topology = LiveTopology(topology)
        self._state: dict[str, _State] = {}
        self._mentions: dict[str, set[str]] = {}  # policy id → computer keys
        for key in list(self._topology.computers):
            self._recompute(key, resolve_again=True)

    # -------------------------------------------------------------- public API

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call `callback(changed computer names)` after every committed write; returns unsubscribe."""
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def computers(self) -> frozenset[str]:
        with self._lock:
            return frozenset(c.name for c in self._topology.computers.values())

    def version_of(self, computer: str) -> str:
        with self._lock:
            return self._state_of(computer).version

    def get(self, computer: str) -> dist_pb.EffectivePolicy:
        """The computer's effective policy (a new message each call: set the nonce on it)."""
        with self._lock:
            state = self._state_of(computer)
            content = self._content.get(state.resolution.policy_id) if state.resolution.policy_id else None
            data = state.head + (content.data if content else b"") + state.tail
        message = dist_pb.EffectivePolicy()
        message.ParseFromString(data)
        message.version = state.version
        return message

    def encoded(self, computer: str) -> tuple[str, tuple[bytes, ...]]:
        """(version, parts): the computer's EffectivePolicy without version and nonce, serialized, as
        byte strings whose concatenation is the message (its head, its policy's content, its RSoP).

        What the distribution hub sends: nothing is copied or parsed, and the content part is the
        one bytes object shared by every computer that policy is in force on. NotFoundError as get().
        """
        with self._lock:
            state = self._state_of(computer)
            content = self._content.get(state.resolution.policy_id) if state.resolution.policy_id else None
            if content is None:
                return state.version, (state.head, state.tail)
            return state.version, (state.head, content.data, state.tail)

    def resolution(self, computer: str) -> Resolution:
        """The RSoP of a computer as it stands."""
        with self._lock:
            return self._state_of(computer).resolution

    def plan(
        self,
        computer: str,
        *,
        ou: str | None = None,
        site: str | None = None,
        domain: str | None = None,
        groups: Sequence[str] | None = None,
    ) -> tuple[Computer, Resolution]:
        """Planning mode: the computer as if it were in `ou` / `site` (None keeps, "" clears) and its RSoP.

        `groups` (None keeps) replaces its groups. A computer not in the registry is
        planned as a hypothetical domain member of `domain` (default: the OU's domain);
        it needs `ou` or `domain`. Nothing changes; NotFoundError if the computer (with
        neither), OU, site or a group is not in the registry.
        """
        with self._lock:
            moved = planned_computer(
                self._topology,
                computer,
                ou=ou,
                site=site,
                domain=domain,
                groups=groups,
                group_exists=self._topology.group,
            )
            return moved, self._resolver(ComputerOverlay(self._topology, moved), moved, policy_names=dict(self._names))

    def policy_name(self, policy_id: str) -> str:
        with self._lock:
            return self._names.get(policy_id, "")

    def gpos_assigning(self, policy_id: str) -> list[Gpo]:
        with self._lock:
            return sorted(
                (g for g in self._topology.gpos.values() if g.policy_id == policy_id), key=lambda g: key_of(g.name)
            )

    # -------------------------------------------------------------- write hooks

    def policy_store_written(self, result: WriteResult) -> frozenset[str]:
        """Take a committed policy store write into account; notify and return the changed computers."""
        with self._lock:
            changed_content: set[str] = set()
            existence: set[str] = set()
            for obj in result.written:
                if isinstance(obj, pb.Policy):
                    old = self._policies.get(obj.id)
                    if old is None:
                        existence.add(obj.id)
                    else:
                        self._unindex_policy(old)
                    self._policies[obj.id] = obj
                    self._index_policy(obj)
                    changed_content.add(obj.id)
                elif isinstance(obj, pb.FilterList):
                    self._lists[obj.id] = obj
                    changed_content |= self._users.get(obj.id, set())
                else:
                    self._actions[obj.id] = obj
                    changed_content |= self._users.get(obj.id, set())
            for deleted in result.deleted:
                if deleted.kind is Kind.POLICY:
                    old = self._policies.pop(deleted.object_id, None)
                    if old is not None:
                        self._unindex_policy(old)
                    self._content.pop(deleted.object_id, None)
                    self._names.pop(deleted.object_id, None)
                    existence.add(deleted.object_id)
                elif deleted.kind is Kind.FILTER_LIST:
                    self._lists.pop(deleted.object_id, None)
                else:
                    self._actions.pop(deleted.object_id, None)
            renamed: set[str] = set()
            recontent: set[str] = set()
            for policy_id in changed_content - existence:
                if policy_id not in self._policies:
                    continue
                content = self._make_content(policy_id)
                old_content = self._content.get(policy_id)
                if old_content is None or old_content.data != content.data:
                    recontent.add(policy_id)
                if old_content is None or old_content.name != content.name:
                    renamed.add(policy_id)
                self._content[policy_id] = content
                self._names[policy_id] = content.name
            for policy_id in existence:
                if policy_id in self._policies:
                    self._content[policy_id] = self._make_content(policy_id)
                    self._names[policy_id] = self._policies[policy_id].name
            changed: set[str] = set()
            # A policy appearing or disappearing changes which GPO wins: resolve again.
            for key in sorted({k for p in existence for k in self._mentions.get(p, ())}):
                if self._recompute(key, resolve_again=True):
                    changed.add(key)
            for key in sorted({k for p in renamed | recontent for k in self._mentions.get(p, ())}):
                if self._recompute(key, resolve_again=False, renamed=renamed):
                    changed.add(key)
            names = self._names_of(changed)
        self._notify(names)
        return names

    def topology_written(self, result: TopologyWriteResult) -> frozenset[str]:
        """Take a committed topology write into account; notify and return the changed computers."""
        with self._lock:
            affected: set[str] = set()
            deleted: set[str] = set()
            scopes: list[Scope] = []
            live = self._topology
            for change in result.changes:
                before, after = change.before, change.after
                obj = after if after is not None else before
                if isinstance(obj, Computer):
                    if after is None:
                        live.remove_computer(obj.name)
                        deleted.add(obj.name)
                    else:
                        assert isinstance(after, Computer)
                        live.put_computer(after)
                        affected.add(key_of(after.name))
                elif isinstance(obj, OrgUnit):
                    if after is None:
                        live.ous.pop(obj.dn.casefold(), None)
                    else:
                        assert isinstance(after, OrgUnit)
                        live.ous[after.dn.casefold()] = after
                    scopes.append(Scope.ou(obj.dn))
                elif isinstance(obj, Site):
                    if after is None:
                        live.sites.pop(key_of(obj.name), None)
                    else:
                        assert isinstance(after, Site)
                        live.sites[key_of(after.name)] = after
                    scopes.append(Scope.site(obj.name))
                elif isinstance(obj, Gpo):
                    scopes.extend(live.scopes_of_gpo(obj.id))
                    if after is None:
                        live.gpos.pop(obj.id, None)
                    else:
                        assert isinstance(after, Gpo)
                        live.gpos[after.id] = after
                elif isinstance(obj, GpoLink):
                    if before is not None:
                        assert isinstance(before, GpoLink)
                        live.remove_link(before)
                        scopes.append(before.scope)
                    if after is not None:
                        assert isinstance(after, GpoLink)
                        live.put_link(after)
                        scopes.append(after.scope)
                elif isinstance(obj, Group):
                    # Membership is on the computers (a change of it is a computer change) and a
                    # group named in a GPO filter cannot be deleted: nobody's resolution changes.
                    if after is None:
                        live.groups.pop(key_of(obj.name), None)
                    else:
                        assert isinstance(after, Group)
                        live.groups[key_of(after.name)] = after
            seen: set[tuple[str, str]] = set()
            for scope in scopes:
                if scope.key not in seen:
                    seen.add(scope.key)
                    affected |= live.computers_in(scope)
            changed: set[str] = set()
            for name in deleted:
                key = key_of(name)
                if key not in live.computers:
                    self._forget(key)
                    changed.add(name)
            for key in sorted(affected):
                if key in live.computers and self._recompute(key, resolve_again=True):
                    changed.add(live.computers[key].name)
            names = frozenset(changed)
        self._notify(names)
        return names

    # -------------------------------------------------------------- internals

    def _state_of(self, computer: str) -> _State:
        state = self._state.get(key_of(computer))
        if state is None:
            raise NotFoundError(f'there is no computer "{computer.strip()}" in the registry')
        return state

    def _names_of(self, keys: Iterable[str]) -> frozenset[str]:
        return frozenset(self._topology.computers[k].name for k in keys if k in self._topology.computers)

    def _index_policy(self, policy: pb.Policy) -> None:
        for rule in policy.rules:
            for ref in (rule.filter_list_id, rule.filter_action_id):
                if ref:
                    self._users.setdefault(ref, set()).add(policy.id)

    def _unindex_policy(self, policy: pb.Policy) -> None:
        for rule in policy.rules:
            for ref in (rule.filter_list_id, rule.filter_action_id):
                if ref:
                    self._users.get(ref, set()).discard(policy.id)

    def _make_content(self, policy_id: str) -> _Content:
        return _content_of(self._policies[policy_id], self._lists, self._actions)

    def _forget(self, key: str) -> None:
        state = self._state.pop(key, None)
        if state is not None:
            for policy_id in state.resolution.policy_ids():
                self._mentions.get(policy_id, set()).discard(key)

    def _recompute(self, key: str, *, resolve_again: bool, renamed: set[str] | None = None) -> bool:
        """Bring one computer's state up to date; True if its version changed."""
        computer = self._topology.computers[key]
        old = self._state.get(key)
        if resolve_again or old is None:
            resolution = self._resolver(self._topology, computer, policy_names=self._names)
        else:
            resolution = old.resolution
            if renamed and resolution.policy_ids() & renamed:
                steps = tuple(
                    dataclasses.replace(s, policy_name=self._names.get(s.policy_id, s.policy_name))
                    if s.policy_id in renamed
                    else s
                    for s in resolution.steps
                )
                resolution = dataclasses.replace(resolution, steps=steps)
        head = dist_pb.EffectivePolicy(
            computer=computer.name,
            membership=computer.membership,
            source=resolution.source if resolution.policy_id in self._content else "none",
        ).SerializeToString(deterministic=True)
        if old is not None and resolution is old.resolution:
            tail = old.tail  # a content edit: the RSoP is what it was (one policy, 10,000 computers)
        else:
            tail = dist_pb.EffectivePolicy(rsop=rsop_steps_to_proto(resolution.steps)).SerializeToString(
                deterministic=True
            )
        content = self._content.get(resolution.policy_id) if resolution.policy_id else None
        version = hashlib.sha256(head + (content.data if content else b"") + tail).hexdigest()
        if old is not None:
            for policy_id in old.resolution.policy_ids() - resolution.policy_ids():
                self._mentions.get(policy_id, set()).discard(key)
        for policy_id in resolution.policy_ids():
            self._mentions.setdefault(policy_id, set()).add(key)
        self._state[key] = _State(resolution, computer.membership, version, head, tail)
        return old is None or old.version != version

    def _notify(self, names: frozenset[str]) -> None:
        if not names:
            return
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(names)
            except Exception:
                _log.exception("effective-policy change callback failed", extra={"computers": len(names)})


def version_of_message(message: dist_pb.EffectivePolicy) -> str:
    """The version an EffectivePolicy should carry: sha256 of it without version and nonce."""
    copy = dist_pb.EffectivePolicy()
    copy.CopyFrom(message)
    copy.version = ""
    copy.nonce = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


# ------------------------------------------------------------------ observed stores


class ObservedPolicyStore(DelegatingPolicyStore):
    """The server's policy store: every committed write also updates EffectivePolicies.

    It also refuses to delete a policy a GPO assigns (InUseError naming the GPO):
    Windows leaves such a GPO pointing nowhere ([MS-GPIPSEC] note <30>); we would
    rather say so. `lock` is shared with the ObservedTopologyStore, so the check
    and both stores' updates are serialized.
    """

    def __init__(self, inner: PolicyStore, lock: threading.RLock) -> None:
        super().__init__(inner)
        self._lock = lock
        self.effective: EffectivePolicies | None = None

    def _guarded(self, mutations: Sequence[Mutation] | PlanFn) -> Sequence[Mutation] | PlanFn:
        effective = self.effective
        if effective is None:
            return mutations

        def check(requested: Sequence[Mutation]) -> Sequence[Mutation]:
            for mutation in requested:
                if isinstance(mutation, Delete) and mutation.kind is Kind.POLICY:
                    gpos = effective.gpos_assigning(mutation.object_id)
                    if gpos:
                        name = effective.policy_name(mutation.object_id) or mutation.object_id
                        more = f" and {len(gpos) - 1} more" if len(gpos) > 1 else ""
                        raise InUseError(
                            f'policy "{name}" is assigned by GPO "{gpos[0].name}"{more}; '
                            "clear the GPO's IPsec policy first (policyagent gpo set NAME --no-policy)"
                        )
            return requested

        if callable(mutations):
            plan = mutations

            def guarded(view: StoreView) -> Sequence[Mutation]:
                return check(plan(view))

            return guarded
        return check(mutations)

    def write(
        self,
        mutations: Sequence[Mutation] | PlanFn,
        *,
        principal: str,
        context: str = "",
        dry_run: bool = False,
    ) -> WriteResult:
        with self._lock:
            result = self.inner.write(self._guarded(mutations), principal=principal, context=context, dry_run=dry_run)
            if not dry_run and self.effective is not None:
                self.effective.policy_store_written(result)
            return result

    def initialize(self, seed: PlanFn, *, principal: str) -> bool:
        # Runs before EffectivePolicies exists (it reads the seeded store).
        with self._lock:
            return self.inner.initialize(seed, principal=principal)


class ObservedTopologyStore(TopologyStore):
    """The server's topology store: every committed write also updates EffectivePolicies."""

    def __init__(self, inner: TopologyStore, lock: threading.RLock) -> None:
        self.inner = inner
        self._lock = lock
        self.effective: EffectivePolicies | None = None

    def snapshot(self) -> tuple[Topology, int]:
        return self.inner.snapshot()

    def get_computer(self, name: str) -> Computer | None:
        return self.inner.get_computer(name)

    def write(self, mutations: Sequence[TopologyMutation], *, principal: str, context: str = "") -> TopologyWriteResult:
        return self.write_and_report(mutations, principal=principal, context=context)[0]

    def write_and_report(
        self, mutations: Sequence[TopologyMutation], *, principal: str, context: str = ""
    ) -> tuple[TopologyWriteResult, frozenset[str]]:
        """write(), and the computers whose effective policy this write changed."""
        with self._lock:
            result = self.inner.write(mutations, principal=principal, context=context)
            changed: frozenset[str] = frozenset()
            if self.effective is not None and result.changes:
                changed = self.effective.topology_written(result)
            return result, changed

    def changes(self, after_seq: int = 0, limit: int = 1000) -> list[TopologyChangeRecord]:
        return self.inner.changes(after_seq, limit)

    def revision(self) -> int:
        return self.inner.revision()

    def close(self) -> None:
        self.inner.close()


def observe(
    policy_store: PolicyStore, topology_store: TopologyStore, *, resolver: Resolver = resolve
) -> tuple[ObservedPolicyStore, ObservedTopologyStore, EffectivePolicies]:
    """Wrap both stores and build the EffectivePolicies they feed (what the server does at start)."""
    lock = threading.RLock()
    observed_policies = ObservedPolicyStore(policy_store, lock)
    observed_topology = ObservedTopologyStore(topology_store, lock)
    with lock:
        effective = EffectivePolicies(policy_store, topology_store, resolver=resolver)
        observed_policies.effective = effective
        observed_topology.effective = effective
    return observed_policies, observed_topology, effective


__all__ = [
    "ChangeCallback",
    "EffectivePolicies",
    "LiveTopology",
    "ObjectChange",
    "ObservedPolicyStore",
    "ObservedTopologyStore",
    "observe",
    "version_of_message",
]
