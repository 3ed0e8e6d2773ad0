"""EffectivePolicies: per-computer effective policy, versions, and exactly which computers a write changes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import builders as b
import pytest

from policyagent.model.assignment import Computer, Gpo, GpoLink, Group, OrgUnit, Resolution, Scope, Site, resolve
from policyagent.model.errors import InUseError, NotFoundError
from policyagent.model.objects import Kind
from policyagent.model.writes import Delete, Put
from policyagent.pb import pb
from policyagent.server.effective import (
    EffectivePolicies,
    ObservedPolicyStore,
    ObservedTopologyStore,
    observe,
    version_of_message,
)
from policyagent.store.sqlite import SqliteStore
from policyagent.store.topology import GPO, LINK, DeleteObject, PutObject, link_key
from policyagent.store.topology_sqlite import SqliteTopologyStore

DOMAIN = "corp.example"
CORP = "OU=Corp,DC=corp,DC=example"
SERVERS = "OU=Servers,OU=Corp,DC=corp,DC=example"
WEB = "OU=Web,OU=Servers,OU=Corp,DC=corp,DC=example"
WORKSTATIONS = "OU=Workstations,OU=Corp,DC=corp,DC=example"
LABS = "OU=Labs,OU=Corp,DC=corp,DC=example"

WEB_HOSTS = {f"web{i}" for i in range(1, 5)}  # Web, HQ
SRV_HOSTS = {f"srv{i}" for i in range(1, 5)}  # Servers, HQ
WS_HQ = {"ws1", "ws2", "ws3"}  # Workstations, HQ
WS_BRANCH = {"ws4", "ws5", "ws6"}  # Workstations, Branch
LAB_HOSTS = {"lab1", "lab2", "lab3"}  # Labs, Branch
NO_OU = {"dc1"}  # domain member without OU, HQ
KIOSKS = {"kiosk1", "kiosk2"}  # workgroup, no OU, Branch
ALL = WEB_HOSTS | SRV_HOSTS | WS_HQ | WS_BRANCH | LAB_HOSTS | NO_OU | KIOSKS
DOMAIN_HOSTS = ALL - KIOSKS
BRANCH = WS_BRANCH | LAB_HOSTS | KIOSKS


class Counter:
    """The resolver, counting the computers it is asked about."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, topology: Any, computer: Computer | str, **kwargs: Any) -> Resolution:
        self.calls.append(computer if isinstance(computer, str) else computer.name)
        return resolve(topology, computer, **kwargs)


@dataclass
class World:
    policies: ObservedPolicyStore
    topology: ObservedTopologyStore
    effective: EffectivePolicies
    counter: Counter
    ids: dict[str, str]
    seen: list[frozenset[str]]

    def put(self, *objs: Any, upsert: bool = False) -> frozenset[str]:
        self.seen.clear()
        self.topology.write([PutObject(o, upsert=upsert) for o in objs], principal="t")
        return self._changed()

    def delete(self, kind: str, key: str) -> frozenset[str]:
        self.seen.clear()
        self.topology.write([DeleteObject(kind, key)], principal="t")
        return self._changed()

    def edit(self, object_name: str, kind: Kind, **changes: Any) -> frozenset[str]:
        self.seen.clear()
        obj = self.policies.find(kind, object_name)
        assert obj is not None
        for key, value in changes.items():
            setattr(obj, key, value)
        self.policies.write([Put(obj)], principal="t")
        return self._changed()

    def _changed(self) -> frozenset[str]:
        assert len(self.seen) <= 1  # one notification per write
        return self.seen[0] if self.seen else frozenset()

    def gpo_id(self, name: str) -> str:
        topo, _ = self.topology.snapshot()
        return next(g.id for g in topo.gpos.values() if g.name == name)

    def policy_in_force(self, computer: str) -> str:
        message = self.effective.get(computer)
        return message.policy.name if message.source != "none" else ""


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    store = SqliteStore(tmp_path / "store.sqlite3")
    fl1 = b.filter_list("FL1")
    fl2 = b.filter_list("FL2", filters=[b.host_filter(1)])
    fa1 = b.filter_action("FA1")
    fa2 = b.filter_action("FA2", action=pb.ACTION_TYPE_PERMIT)
    written = store.write([Put(fl1), Put(fl2), Put(fa1), Put(fa2)], principal="t").written
    ids = {o.name: o.id for o in written}
    fl1.id, fl2.id, fa1.id, fa2.id = ids["FL1"], ids["FL2"], ids["FA1"], ids["FA2"]
    psk_rule = b.rule(fl1.id, fa1.id, name="psk rule")
    del psk_rule.auth_methods[:]
    psk_rule.auth_methods.append(pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key="s3cret")))
    policies = [
        b.policy("PA", rules=[psk_rule]),
        b.policy_using("PB", fl2, fa1),
        b.policy_using("PC", fl1, fa2),
    ]
    for p in store.write([Put(p) for p in policies], principal="t").written:
        ids[p.name] = p.id
    topo_store = SqliteTopologyStore(tmp_path / "topology.sqlite3", policy_exists=lambda p: store.get(Kind.POLICY, p) is not None)
    puts: list[Any] = [OrgUnit(CORP), OrgUnit(SERVERS), OrgUnit(WEB), OrgUnit(WORKSTATIONS), OrgUnit(LABS)]
    puts += [Site("HQ"), Site("Branch")]
    placement = [
        (WEB_HOSTS, WEB, "HQ"),
        (SRV_HOSTS, SERVERS, "HQ"),
        (WS_HQ, WORKSTATIONS, "HQ"),
        (WS_BRANCH, WORKSTATIONS, "Branch"),
        (LAB_HOSTS, LABS, "Branch"),
        (NO_OU, "", "HQ"),
    ]
    for hosts, ou, site in placement:
        puts += [Computer(h, "domain", DOMAIN, ou=ou, site=site) for h in sorted(hosts)]
    puts += [Computer(h, "workgroup", "WORKGROUP", site="Branch") for h in sorted(KIOSKS)]
    puts += [Gpo("", "Domain GPO", policy_id=ids["PA"])]
    topo_store.write([PutObject(o) for o in puts], principal="t")
    topo_store.write([PutObject(GpoLink("Domain GPO", Scope.domain(DOMAIN)))], principal="t")
    counter = Counter()
    observed_policies, observed_topology, effective = observe(store, topo_store, resolver=counter)
    seen: list[frozenset[str]] = []
    effective.subscribe(seen.append)
    assert len(counter.calls) == len(ALL)  # the start computes everyone once
    counter.calls.clear()
    yield World(observed_policies, observed_topology, effective, counter, ids, seen)
    store.close()
    topo_store.close()


def test_twenty_computers_exactly_the_affected_ones_change(world: World) -> None:
    assert len(ALL) == 20
    assert {c for c in ALL if world.policy_in_force(c) == "PA"} == DOMAIN_HOSTS
    assert {c for c in KIOSKS if world.policy_in_force(c) == ""} == KIOSKS

    # A GPO with a policy but no link reaches nobody.
    assert world.put(Gpo("", "Servers GPO", policy_id=world.ids["PB"])) == set()
    # Link to an OU: that OU's subtree.
    assert world.put(GpoLink("Servers GPO", Scope.ou(SERVERS))) == SRV_HOSTS | WEB_HOSTS
    assert world.policy_in_force("web1") == "PB"
    # Link to a child OU: only its computers.
    world.put(Gpo("", "Web GPO", policy_id=world.ids["PC"]))
    assert world.put(GpoLink("Web GPO", Scope.ou(WEB))) == WEB_HOSTS
    assert world.policy_in_force("web1") == "PC" and world.policy_in_force("srv1") == "PB"
    # Unlink.
    assert world.delete(LINK, link_key(world.gpo_id("Web GPO"), Scope.ou(WEB))) == WEB_HOSTS
    assert world.policy_in_force("web1") == "PB"
    # A filter list edit reaches the computers whose policy in force uses it, nobody else.
    assert world.edit("FL2", Kind.FILTER_LIST, description="edited") == SRV_HOSTS | WEB_HOSTS
    # A policy content edit: the computers running it (PA: everyone in the domain except the Servers subtree).
    assert world.edit("PA", Kind.POLICY, description="v2") == DOMAIN_HOSTS - SRV_HOSTS - WEB_HOSTS
    # Renaming a policy changes the RSoP of everyone whose chain mentions it, also where it is overridden.
    assert world.edit("PA", Kind.POLICY, name="PA renamed") == DOMAIN_HOSTS
    # Saving the same content again changes nothing.
    assert world.edit("PA renamed", Kind.POLICY, description="v2") == set()
    # Enforce the domain link: its step changes for every domain computer.
    domain_gpo = world.gpo_id("Domain GPO")
    assert world.put(GpoLink(domain_gpo, Scope.domain(DOMAIN), enforced=True), upsert=True) == DOMAIN_HOSTS
    assert world.policy_in_force("web1") == "PA renamed"
    # Now PB wins nowhere: its content edit changes nobody.
    assert world.edit("FL2", Kind.FILTER_LIST, description="edited again") == set()
    assert world.put(GpoLink(domain_gpo, Scope.domain(DOMAIN)), upsert=True) == DOMAIN_HOSTS
    # Reorder two links of one OU: only that OU's computers.
    world.put(Gpo("", "WS A", policy_id=world.ids["PA"]), Gpo("", "WS B", policy_id=world.ids["PC"]))
    assert world.put(GpoLink("WS A", Scope.ou(WORKSTATIONS)), GpoLink("WS B", Scope.ou(WORKSTATIONS), order=0)) == (
        WS_HQ | WS_BRANCH
    )
    assert world.policy_in_force("ws1") == "PA renamed"
    assert world.put(GpoLink("WS B", Scope.ou(WORKSTATIONS), order=1), upsert=True) == WS_HQ | WS_BRANCH
    assert world.policy_in_force("ws1") == "PC"
    # A site link: the site's computers, workgroup kiosks included.
    world.put(Gpo("", "Branch GPO", policy_id=world.ids["PB"]))
    assert world.put(GpoLink("Branch GPO", Scope.site("Branch"))) == BRANCH
    assert world.policy_in_force("kiosk1") == "PB"
    # Block inheritance on Labs stops the domain and site links there.
    assert world.put(OrgUnit(LABS, block_inheritance=True), upsert=True) == LAB_HOSTS
    assert world.policy_in_force("lab1") == ""
    # Disable a GPO: the computers in its linked scopes.
    topo, _ = world.topology.snapshot()
    servers_gpo = topo.gpos[world.gpo_id("Servers GPO")]
    assert world.put(Gpo(servers_gpo.id, servers_gpo.name, enabled=False, policy_id=servers_gpo.policy_id), upsert=True) == (
        SRV_HOSTS | WEB_HOSTS
    )
    # Move one computer.
    assert world.put(Computer("ws1", "domain", DOMAIN, ou=LABS, site="HQ"), upsert=True) == {"ws1"}
    assert world.policy_in_force("ws1") == ""
    # Delete a GPO: its links go with it (the Labs computers lose the "blocked" step from their RSoP).
    assert world.delete(GPO, "Branch GPO") == BRANCH
    # Delete a computer: reported, then unknown.
    assert world.delete("computer", "kiosk2") == {"kiosk2"}
    with pytest.raises(NotFoundError):
        world.effective.get("kiosk2")


def test_a_gpo_edit_resolves_only_computers_in_its_scopes(world: World) -> None:
    world.put(Gpo("", "Web GPO", policy_id=world.ids["PC"]))
    assert world.counter.calls == []
    world.put(GpoLink("Web GPO", Scope.ou(WEB)))
    assert sorted(world.counter.calls) == sorted(WEB_HOSTS)
    world.counter.calls.clear()
    topo, _ = world.topology.snapshot()
    gpo = topo.gpos[world.gpo_id("Web GPO")]
    world.put(Gpo(gpo.id, gpo.name, enabled=True, policy_id=world.ids["PB"]), upsert=True)
    assert sorted(world.counter.calls) == sorted(WEB_HOSTS)
    world.counter.calls.clear()
    # Policy edits never resolve: content is recomputed once per policy.
    world.edit("PA", Kind.POLICY, description="x")
    world.edit("FL1", Kind.FILTER_LIST, description="x")
    world.edit("PA", Kind.POLICY, name="PA2")
    assert world.counter.calls == []


def test_effective_policy_is_self_contained_and_hashed(world: World) -> None:
    message = world.effective.get("WEB1")  # any case
    assert message.computer == "web1" and message.membership == "domain" and message.source == "domain"
    assert message.policy.name == "PA" and message.policy.assigned
    assert message.policy.revision == 0 and message.policy.modified_unix_ms == 0
    assert [f.name for f in message.filter_lists] == ["FL1"]
    assert [a.name for a in message.filter_actions] == ["FA1"]
    assert message.policy.rules[0].auth_methods[0].preshared_key.key == "s3cret"  # this computer's own secrets
    assert [(s.gpo_name, s.scope, s.outcome) for s in message.rsop] == [("Domain GPO", f"domain:{DOMAIN}", "applied")]
    assert message.version == world.effective.version_of("web1") == version_of_message(message)
    assert message.nonce == ""
    message.nonce = "mine"  # a copy: changing it changes nothing stored
    assert world.effective.get("web1").nonce == ""
    kiosk = world.effective.get("kiosk1")
    assert kiosk.source == "none" and not kiosk.HasField("policy") and kiosk.membership == "workgroup"
    assert kiosk.version == version_of_message(kiosk)
    with pytest.raises(NotFoundError):
        world.effective.version_of("nobody")


def test_versions_are_stable_across_restarts(world: World, tmp_path: Path) -> None:
    before = {c: world.effective.version_of(c) for c in ALL}
    again = EffectivePolicies(world.policies.inner, world.topology.inner)
    assert {c: again.version_of(c) for c in ALL} == before


def test_deleting_a_policy_a_gpo_assigns_is_refused(world: World) -> None:
    with pytest.raises(InUseError, match='assigned by GPO "Domain GPO"'):
        world.policies.write([Delete(Kind.POLICY, world.ids["PA"])], principal="t")
    world.policies.write([Delete(Kind.POLICY, world.ids["PC"])], principal="t")  # not assigned: fine


def test_planning_mode(world: World) -> None:
    world.put(Gpo("", "Web GPO", policy_id=world.ids["PC"]))
    world.put(GpoLink("Web GPO", Scope.ou(WEB)))
    moved, plan = world.effective.plan("srv1", ou=WEB)
    assert plan.policy_id == world.ids["PC"] and moved.ou == WEB
    assert world.effective.resolution("srv1").policy_id == world.ids["PA"]  # nothing moved
    assert world.effective.plan("kiosk1", ou=CORP)[1].policy_id == world.ids["PA"]


def test_callback_errors_do_not_break_writes(world: World) -> None:
    def boom(_: frozenset[str]) -> None:
        raise RuntimeError("boom")

    unsubscribe = world.effective.subscribe(boom)
    assert world.put(Gpo("", "Web GPO", policy_id=world.ids["PC"]), GpoLink("Web GPO", Scope.ou(WEB))) == WEB_HOSTS
    unsubscribe()


def test_encoded_parts_make_the_same_bytes_as_the_message(world: World) -> None:
    """What the hub sends (pre-serialized parts + version + nonce) is the message get() describes."""
    from policyagent.pb import dist_pb
    from policyagent.server.hub import policy_frame, serialize_server_message

    world.edit("PA", Kind.POLICY, description="x" * 300)  # a content longer than one varint byte
    for computer in sorted(ALL):
        version, parts = world.effective.encoded(computer)
        message = world.effective.get(computer)
        message.nonce = "0123456789abcdef"
        assert version == message.version
        expected = dist_pb.ServerMessage(policy=message)
        frame = policy_frame(version, message.nonce, parts)
        assert frame == expected.SerializeToString(deterministic=True)
        assert dist_pb.ServerMessage.FromString(frame) == expected
        assert serialize_server_message(frame) is frame
    # A content edit shares one serialized content among the computers it is in force on.
    contents = {id(world.effective.encoded(c)[1][1]) for c in sorted(DOMAIN_HOSTS - SRV_HOSTS - WEB_HOSTS)}
    assert len(contents) == 1
    with pytest.raises(NotFoundError):
        world.effective.encoded("nobody")


def test_security_filter_and_group_changes_recompute_exactly_the_affected(world: World) -> None:
    world.put(Group("Web servers"), Group("DB servers"))
    world.put(Computer("web1", "domain", DOMAIN, ou=WEB, site="HQ", groups=frozenset({"Web servers"})), upsert=True)
    world.put(Gpo("", "Web GPO", policy_id=world.ids["PC"]))
    assert world.put(GpoLink("Web GPO", Scope.ou(WEB))) == WEB_HOSTS
    world.counter.calls.clear()

    # Filter the GPO to "Web servers": resolved again are only the computers in its linked scope;
    # changed are those now filtered out (web1, a member, keeps the same RSoP).
    topo, _ = world.topology.snapshot()
    gpo = topo.gpos[world.gpo_id("Web GPO")]
    filtered = Gpo(gpo.id, gpo.name, policy_id=gpo.policy_id, security_filter=("Web servers",), revision=gpo.revision)
    assert world.put(filtered) == WEB_HOSTS - {"web1"}
    assert sorted(world.counter.calls) == sorted(WEB_HOSTS)
    assert world.policy_in_force("web1") == "PC" and world.policy_in_force("web2") == "PA"
    assert "security filtering" in world.effective.get("web2").rsop[0].outcome
    world.counter.calls.clear()

    # Joining a group: only that computer is resolved and changed.
    assert world.put(Computer("web2", "domain", DOMAIN, ou=WEB, site="HQ", groups=frozenset({"web servers"})), upsert=True) == {
        "web2"
    }
    assert world.counter.calls == ["web2"]
    assert world.policy_in_force("web2") == "PC"
    world.counter.calls.clear()
    # A group that filters nothing for it: still only that computer is resolved; nothing changes.
    assert world.put(Computer("srv1", "domain", DOMAIN, ou=SERVERS, site="HQ", groups=frozenset({"DB servers"})), upsert=True) == set()
    assert world.counter.calls == ["srv1"]
    world.counter.calls.clear()
    # Leaving it: only that computer again.
    assert world.put(Computer("web1", "domain", DOMAIN, ou=WEB, site="HQ"), upsert=True) == {"web1"}
    assert world.counter.calls == ["web1"] and world.policy_in_force("web1") == "PA"
    world.counter.calls.clear()
    # Adding a group, or removing the filter: the filter change reaches the linked scope only.
    assert world.put(Group("Kiosks")) == set() and world.counter.calls == []
    topo, _ = world.topology.snapshot()
    gpo = topo.gpos[gpo.id]
    assert world.put(Gpo(gpo.id, gpo.name, policy_id=gpo.policy_id, revision=gpo.revision)) == WEB_HOSTS - {"web2"}
    assert sorted(world.counter.calls) == sorted(WEB_HOSTS)


def test_planning_an_unregistered_computer_in_the_live_view(world: World) -> None:
    world.put(Group("Web servers"))
    world.put(Gpo("", "Web GPO", policy_id=world.ids["PC"], security_filter=("Web servers",)))
    world.put(GpoLink("Web GPO", Scope.ou(WEB)))
    planned, plan = world.effective.plan("new1", ou=WEB, groups=["web servers"])
    assert (planned.name, planned.domain, planned.groups) == ("new1", DOMAIN, frozenset({"Web servers"}))
    assert plan.policy_id == world.ids["PC"]
    assert world.effective.plan("new1", ou=WEB)[1].policy_id == world.ids["PA"]
    assert "new1" not in world.effective.computers()
    with pytest.raises(NotFoundError, match="planning OU or domain"):
        world.effective.plan("new1")
