"""policyagent.directory.sync's pure parts: the diff (plan_sync), refusing local edits, the owned snapshot file."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyagent.directory.sync import (
    OwnedState,
    Subnets,
    check_local_write,
    created_after,
    keys_of,
    load_owned,
    plan_computers,
    plan_sync,
    safe_error,
    same_topology,
    save_owned,
    with_sites,
)
from policyagent.model.assignment import Computer, Gpo, GpoLink, Group, OrgUnit, Scope, Site, Topology
from policyagent.model.errors import ProtectedError
from policyagent.server.fleet import peer_address
from policyagent.store.topology import DeleteObject, PutObject, UpsertComputer

WEB = "OU=Web,DC=corp,DC=example"
DB = "OU=Db,DC=corp,DC=example"
G1 = "{11111111-1111-1111-1111-111111111111}"
G2 = "{22222222-2222-2222-2222-222222222222}"
URL = "ldaps://dc1.corp.example"


def directory(**changes: object) -> Topology:
    values: dict[str, object] = dict(
        computers=[Computer("web1", "domain", "corp.example", WEB, groups=frozenset({"Web"})),
                   Computer("db1", "domain", "corp.example", DB)],
        ous=[OrgUnit(WEB), OrgUnit(DB)],
        groups=[Group("Web")],
        gpos=[Gpo(G1, "Web GPO", True, "{AAAAAAAA-0000-0000-0000-000000000001}"), Gpo(G2, "Db GPO")],
        links=[GpoLink(G1, Scope.ou(WEB), 1), GpoLink(G2, Scope.ou(DB), 1)],
    )
    values.update(changes)
    return Topology.build(**values)  # type: ignore[arg-type]


def with_revisions(topology: Topology) -> Topology:
    """The registry's copy: the same objects, each with a revision."""
    return Topology.build(
        [c.__class__(**{**c.__dict__, "revision": 3}) for c in topology.computers.values()],
        [OrgUnit(o.dn, o.block_inheritance, o.description, 3) for o in topology.ous.values()],
        topology.sites.values(),
        [Group(g.name, g.description, 3) for g in topology.groups.values()],
        [Gpo(g.id, g.name, g.enabled, g.policy_id, g.description, 3) for g in topology.gpos.values()],
        [GpoLink(lk.gpo_id, lk.scope, lk.order, lk.enforced, lk.enabled, 3) for lk in topology.links],
    )


def test_first_sync_puts_everything_in_reference_order() -> None:
    plan = plan_sync(directory(), frozenset(), Topology())
    kinds = [type(m.obj).__name__ for m in plan.mutations if isinstance(m, PutObject)]
    assert kinds == ["OrgUnit", "OrgUnit", "Group", "Gpo", "Gpo", "Computer", "Computer", "GpoLink", "GpoLink"]
    assert keys_of(plan.owned) == keys_of(directory()) and plan.problems == ()


def test_unchanged_directory_writes_nothing_and_a_move_writes_one_computer() -> None:
    current = directory()
    registry = with_revisions(current)
    owned = keys_of(current)
    assert plan_sync(current, owned, registry).mutations == ()
    moved = directory(computers=[Computer("web1", "domain", "corp.example", DB, groups=frozenset({"web"})),
                                 Computer("db1", "domain", "corp.example", DB)])
    plan = plan_sync(moved, owned, registry)
    assert [(type(m).__name__, getattr(m, "obj", None)) for m in plan.mutations] == [
        ("PutObject", Computer("web1", "domain", "corp.example", DB, groups=frozenset({"web"})))]


def test_deletions_keep_what_local_objects_still_use() -> None:
    current = directory()
    owned = keys_of(current)
    registry = with_revisions(current)
    # A local computer sits in OU=Db and a local GPO filters on the group "Web".
    registry = Topology.build(
        [*registry.computers.values(), Computer("kiosk", "domain", "corp.example", DB)],
        registry.ous.values(),
        (),
        registry.groups.values(),
        [*registry.gpos.values(), Gpo("{33333333-3333-3333-3333-333333333333}", "Local", security_filter=("Web",))],
        registry.links,
    )
    gone = directory(computers=[Computer("web1", "domain", "corp.example", WEB)], ous=[OrgUnit(WEB)], groups=[],
                     gpos=[Gpo(G1, "Web GPO", True, "{AAAAAAAA-0000-0000-0000-000000000001}")],
                     links=[GpoLink(G1, Scope.ou(WEB), 1)])
    plan = plan_sync(gone, owned, registry)
    deletes = [(m.kind, m.key) for m in plan.mutations if isinstance(m, DeleteObject)]
    assert deletes == [("gpo", G2), ("computer", "db1")]  # G2's link goes with it; OU and group kept
    assert any(DB in p and "kiosk" in p for p in plan.problems)
    assert any('group "Web"' in p and '"Local"' in p for p in plan.problems)
    assert DB.casefold() in plan.owned.ous and "web" in plan.owned.groups  # still owned: retried next time


def test_gpo_name_taken_by_a_local_gpo_is_renamed_and_link_gaps_closed() -> None:
    registry = Topology.build(gpos=[Gpo("{44444444-4444-4444-4444-444444444444}", "Web GPO", revision=1)])
    read = directory(links=[GpoLink(G1, Scope.ou(WEB), 2), GpoLink(G2, Scope.ou(DB), 1)])
    plan = plan_sync(read, frozenset(), registry)
    gpos = {m.obj.id: m.obj.name for m in plan.mutations if isinstance(m, PutObject) and isinstance(m.obj, Gpo)}
    assert gpos[G1] == f"Web GPO ({G1})"
    orders = {m.obj.gpo_id: m.obj.order for m in plan.mutations
              if isinstance(m, PutObject) and isinstance(m.obj, GpoLink)}
    assert orders == {G1: 1, G2: 1}


def test_invalid_directory_objects_are_skipped_and_named() -> None:
    read = directory(computers=[Computer("bad name!", "domain", "corp.example", WEB),
                                Computer("db1", "domain", "corp.example", "OU=Gone,DC=corp,DC=example")])
    plan = plan_sync(read, frozenset(), Topology())
    names = {m.obj.name: m.obj.ou for m in plan.mutations if isinstance(m, PutObject) and isinstance(m.obj, Computer)}
    assert names == {"db1": ""}  # its OU is not in the read: no OU rather than a failed write
    assert any("bad name!" in p for p in plan.problems)


def test_local_writes_to_owned_objects_are_refused() -> None:
    owned = keys_of(directory())
    registry = directory

    def refused(*mutations: object) -> str:
        with pytest.raises(ProtectedError) as caught:
            check_local_write(mutations, owned, registry, URL)  # type: ignore[arg-type]
        assert URL in str(caught.value)
        return str(caught.value)

    assert f'OU "{WEB}"'.casefold() in refused(DeleteObject("ou", "ou=web, dc=corp, dc=example")).casefold()
    assert "web1" in refused(PutObject(Computer("WEB1", "domain", "corp.example", DB)))
    assert "Db GPO" in refused(DeleteObject("gpo", "db gpo"))
    refused(DeleteObject("link", f"Web GPO@ou:{WEB}"))
    refused(UpsertComputer("db1", "domain", "corp.example"))
    # Local objects next to, in or linked at directory ones are fine.
    check_local_write(
        [PutObject(OrgUnit("OU=Lab,DC=corp,DC=example")), PutObject(Computer("kiosk", "domain", "corp.example", WEB)),
         PutObject(GpoLink("Local", Scope.ou(WEB))), DeleteObject("computer", "kiosk")],
        owned, registry, URL,
    )


def test_owned_snapshot_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "owned.json"
    assert load_owned(path) == OwnedState()
    state = OwnedState(directory(), URL, "DC=corp,DC=example", 1234, 1200)
    save_owned(path, state)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load_owned(path)
    assert keys_of(loaded.topology) == keys_of(state.topology) and same_topology(loaded.topology, state.topology)
    assert (loaded.url, loaded.last_sync_unix_ms, loaded.last_change_unix_ms) == (URL, 1234, 1200)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a policyagent directory snapshot"):
        load_owned(path)


def test_incremental_plan_compares_only_the_changed_computers() -> None:
    current = directory()
    registry = with_revisions(current)
    owned = plan_sync(current, frozenset(), Topology()).owned
    looked_up: list[str] = []

    def lookup(name: str) -> Computer | None:
        looked_up.append(name)
        return registry.computer(name)

    moved = Computer("web1", "domain", "corp.example", DB, groups=frozenset({"WEB"}))
    added = Computer("web2", "domain", "corp.example", WEB, groups=frozenset({"Unknown"}))
    plan, given_up = plan_computers([moved, added], owned, lookup)
    assert looked_up == ["web1", "web2"]  # db1 is not compared
    assert [m.obj for m in plan.mutations if isinstance(m, PutObject)] == [
        moved, Computer("web2", "domain", "corp.example", WEB)]  # a group the directory does not own is dropped
    assert plan.owned.computers["web1"] == moved and "db1" in plan.owned.computers and given_up == frozenset()
    # The same as the full diff of the directory with those computers replaced.
    full = plan_sync(directory(computers=[moved, added, current.computers["db1"]]), keys_of(owned), registry)
    assert list(full.mutations) == list(plan.mutations)
    assert plan_computers([current.computers["web1"]], owned, registry.computer)[0].mutations == ()

    # A computer the model refuses is skipped, said so, and deleted when the directory owned it.
    bad = Computer("db1", "domain", "other.example", DB)
    plan, given_up = plan_computers([bad], owned, registry.computer)
    assert [(m.kind, m.key) for m in plan.mutations if isinstance(m, DeleteObject)] == [("computer", "db1")]
    assert given_up == {("computer", "db1")} and "db1" not in plan.owned.computers
    assert any('computer "db1"' in p for p in plan.problems)


def test_owned_snapshot_written_by_json_format_still_loads(tmp_path: Path) -> None:
    """Version 1 files written with json_format (before the compact writer) read the same."""
    import json

    from google.protobuf import json_format

    from policyagent.pb import assign_pb

    path = tmp_path / "owned.json"
    state = OwnedState(directory(), URL, "DC=corp,DC=example", 1234, 1200)
    save_owned(path, state)
    data = json.loads(path.read_text())
    message = assign_pb.Topology()
    json_format.ParseDict(data["topology"], message)
    data["topology"] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    assert same_topology(load_owned(path).topology, state.topology)


def test_created_after_the_marker() -> None:
    csn = "20261127213756.093850Z#000000#000#000000"
    assert created_after("contextCSN", csn, "20261127213757")
    assert not created_after("contextCSN", csn, "20261127213756")  # the same second: no proof
    assert not created_after("contextCSN", csn, "") and not created_after("contextCSN", "", "20261127213757")
    assert created_after("highestCommittedUSN", "4100", "4101") and not created_after("highestCommittedUSN", "4100", "17")
    assert not created_after("none", "", "4101")


def test_errors_never_carry_the_password() -> None:
    assert safe_error(RuntimeError("bind as x with s3cret failed"), ["s3cret"]) == "bind as x with *** failed"


# ---------------------------------------------------------------------------- sites from subnets


def test_subnets_longest_prefix_wins_ipv4_and_ipv6() -> None:
    subnets = Subnets({"10.1.0.0/16": "Branch", "10.1.2.0/24": "Lab", "0.0.0.0/0": "Anywhere",
                       "2001:db8::/32": "Branch", "2001:db8:1::/48": "Lab", "10.1.2.128/25": "Rack"})
    assert subnets.site_of("10.1.2.3") == "Lab"
    assert subnets.site_of("10.1.2.200") == "Rack"  # /25 beats /24
    assert subnets.site_of("10.1.9.9") == "Branch"
    assert subnets.site_of("192.0.2.1") == "Anywhere"
    assert subnets.site_of("2001:db8:1::5") == "Lab" and subnets.site_of("2001:db8:2::5") == "Branch"
    assert subnets.site_of("2001:db9::1") == ""  # no IPv6 catch-all: an IPv4 prefix never matches IPv6
    assert subnets.site_of("::ffff:10.1.2.3") == "Lab"  # a dual-stack listener's view of an IPv4 client
    assert subnets.site_of("") == "" and subnets.site_of("not an address") == ""
    without_default = Subnets({"10.1.0.0/16": "Branch"})
    assert without_default.site_of("192.0.2.1") == "" and not Subnets() and Subnets().site_of("10.1.2.3") == ""


def test_bad_subnet_prefixes_are_skipped_and_named() -> None:
    subnets = Subnets({"10.1.0.0/16": "Branch", "10.1.2.3/24": "HostBits", "10.1.0.0": "NoLength",
                       "bogus": "X", "10.1.0.0/33": "TooLong", "172.16.0.0/12": "", "2001:DB8:0::/32": "V6"})
    assert subnets.prefixes == {"10.1.0.0/16": "Branch", "2001:db8::/32": "V6"}  # canonical prefix text
    assert len(subnets.skipped) == 5
    assert any("10.1.2.3/24" in why and "host bits" in why for why in subnets.skipped)
    assert any("'10.1.0.0' is not a prefix" in why for why in subnets.skipped)
    assert subnets.site_of("10.1.2.3") == "Branch" and subnets == Subnets({"10.1.0.0/16": "Branch",
                                                                            "2001:db8::/32": "V6"})


def test_peer_address_of_grpc_peer_strings() -> None:
    assert peer_address("ipv4:10.1.2.3:4567") == "10.1.2.3"
    assert peer_address("ipv6:[2001:db8::5]:4567") == "2001:db8::5"
    assert peer_address("ipv6:%5B2001:db8::5%5D:4567") == "2001:db8::5"
    assert peer_address("ipv6:[fe80::1%eth0]:4567") == "fe80::1"
    assert peer_address("ipv6:[::ffff:10.1.2.3]:4567") == "::ffff:10.1.2.3"
    assert peer_address("unix:/run/policyagent.sock") == "" and peer_address("") == ""


def test_sites_follow_addresses_and_only_moved_computers_are_written() -> None:
    subnets = Subnets({"10.1.0.0/16": "Branch", "10.1.2.0/24": "Lab"})
    read = directory(sites=[Site("Branch"), Site("Lab")], links=[GpoLink(G1, Scope.site("Lab"), 1)])
    addresses = {"web1": "10.1.2.3", "db1": "192.0.2.1"}
    placed_read = with_sites(read, subnets, lambda name: addresses.get(name, ""))
    assert {c.name: c.site for c in placed_read.computers.values()} == {"web1": "Lab", "db1": ""}
    plan = plan_sync(placed_read, frozenset(), Topology())
    registry = with_revisions(plan.owned)
    assert plan_sync(with_sites(read, subnets, lambda name: addresses.get(name, "")), keys_of(plan.owned),
                     registry).mutations == ()
    addresses.update(web1="10.1.9.9", db1="10.1.2.7")
    moved = plan_sync(with_sites(read, subnets, lambda name: addresses.get(name, "")), keys_of(plan.owned), registry)
    assert sorted((m.obj.name, m.obj.site) for m in moved.mutations if isinstance(m, PutObject)
                  and isinstance(m.obj, Computer)) == [("db1", "Lab"), ("web1", "Branch")]
    assert len(moved.mutations) == 2
    # No subnets: no site, and no address is asked for.
    asked: list[str] = []
    assert all(not c.site for c in with_sites(placed_read, Subnets(), lambda n: asked.append(n) or "").computers.values())
    assert asked == []
    # A subnet naming a site the directory read does not have places no one there.
    lost = plan_sync(with_sites(read, Subnets({"10.0.0.0/8": "Gone"}), lambda _n: "10.1.2.3"), frozenset(), Topology())
    assert all(c.site == "" for c in lost.owned.computers.values())
