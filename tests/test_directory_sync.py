"""Issue 5: the server fed by a real directory (tests/slapd.py), kept in sync, surviving its outages.

Each test gets its own slapd (suffix DC=example,DC=test, rootdn simple bind over ldap://127.0.0.1, or
SASL EXTERNAL over ldapi) laid out like Active Directory: OU=Web and OU=Db with computers, CN=Computers
with one more, GPOs under CN=Policies,CN=System whose IPsec pointer objects
(CN=IPSEC,CN=Windows,CN=Microsoft,CN=Machine,CN={GPO},...) name Windows' default policies, and gPLinks.
The server runs in process (PolicyServer on its own loop thread) with a 0.5 s interval, or as a
subprocess with a real agent for the acceptance test. Everything waits with deadlines, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import RPC_TIMEOUT_S, admin_channel, start_server_process
from dirkit import DirServer, in_sync, run_cli, running_agent, wait_until
from slapd import Slapd, slapd_unavailable, start_slapd

from policyagent.directory.sync import OWNED_FILE, DirectorySettings
from policyagent.pb import (
    assign_grpc,
    assign_pb,
    directory_grpc,
    directory_pb,
    fleet_grpc,
    fleet_pb,
)

_why = slapd_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

if _why is None:
    import ldap3


SUFFIX = "DC=example,DC=test"
DOMAIN = "example.test"
WEB = f"OU=Web,{SUFFIX}"
DB = f"OU=Db,{SUFFIX}"
COMPUTERS = f"CN=Computers,{SUFFIX}"
IPSEC_CSE = "[{E437BC1C-AA7D-11D2-A382-00C04F991E27}{DEA8AFA0-CC85-11D0-9CE2-0080C7221EBD}]"
GPO_WEB = "{5F2C9A10-1B2C-4D3E-8F40-A1B2C3D4E5F6}"
GPO_DB = "{6A3DAB21-2C3D-4E4F-9051-B2C3D4E5F607}"
GPO_DOMAIN = "{7B4EBC32-3D4E-4F50-A162-C3D4E5F60718}"
SECURE = "{7238523C-70FA-11D1-864C-14A300000000}"  # Secure Server (Require Security)
REQUEST = "{72385230-70FA-11D1-864C-14A300000000}"  # Server (Request Security)
RESPOND = "{72385236-70FA-11D1-864C-14A300000000}"  # Client (Respond Only)
INTERVAL_S = 0.5


# ---------------------------------------------------------------------------- the directory


def _gpo_dn(guid: str) -> str:
    return f"CN={guid},CN=Policies,CN=System,{SUFFIX}"


def _ok(conn: Any, done: bool) -> None:
    assert done, conn.result


def add_gpo(conn: Any, guid: str, name: str, policy_id: str = "") -> None:
    """A groupPolicyContainer and, with policy_id, its IPsec pointer object ([MS-GPIPSEC] §2.2.2)."""
    dn = _gpo_dn(guid)
    _ok(conn, conn.add(dn, ["groupPolicyContainer"], {
        "cn": guid, "displayName": name, "flags": 0, "versionNumber": 1, "gPCMachineExtensionNames": IPSEC_CSE}))
    if policy_id:
        for rdn in ("CN=Machine", "CN=Microsoft,CN=Machine", "CN=Windows,CN=Microsoft,CN=Machine"):
            _ok(conn, conn.add(f"{rdn},{dn}", ["container"], {"cn": rdn.split(",")[0][3:]}))
        set_pointer(conn, guid, policy_id, create=True)


def set_pointer(conn: Any, guid: str, policy_id: str, *, create: bool = False) -> None:
    dn = f"CN=IPSEC,CN=Windows,CN=Microsoft,CN=Machine,{_gpo_dn(guid)}"
    ref = f"CN=ipsecPolicy{policy_id},CN=IP Security,CN=System,{SUFFIX}"
    if create:
        _ok(conn, conn.add(dn, ["ipsecPolicy"], {"cn": "IPSEC", "ipsecOwnersReference": ref}))
    else:
        _ok(conn, conn.modify(dn, {"ipsecOwnersReference": [(ldap3.MODIFY_REPLACE, [ref])]}))


def set_links(conn: Any, dn: str, *guids: str) -> None:
    """gPLink of `dn`: the LAST listed is link order 1 (as Group Policy writes it)."""
    value = "".join(f"[LDAP://cn={g.lower()},cn=policies,cn=system,{SUFFIX.lower()};0]" for g in guids)
    change = [(ldap3.MODIFY_REPLACE, [value])] if value else [(ldap3.MODIFY_REPLACE, [])]
    _ok(conn, conn.modify(dn, {"gPLink": change}))


def move(conn: Any, name: str, old_parent: str, new_parent: str) -> None:
    _ok(conn, conn.modify_dn(f"CN={name},{old_parent}", f"CN={name}", new_superior=new_parent))


def build_domain(ldap: Slapd) -> None:
    """OU=Web (web1, web2), OU=Db (db1), CN=Computers (pc1); GPOs for Web (Secure Server), Db (Request
    Security) and the domain (Respond Only), each linked where its name says; group "Web Servers"."""
    conn = ldap.connection()
    for dn, cn in ((f"CN=System,{SUFFIX}", "System"), (f"CN=Policies,CN=System,{SUFFIX}", "Policies"),
                   (COMPUTERS, "Computers")):
        _ok(conn, conn.add(dn, ["container"], {"cn": cn}))
    add_gpo(conn, GPO_WEB, "Web IPsec", SECURE)
    add_gpo(conn, GPO_DB, "Db IPsec", REQUEST)
    add_gpo(conn, GPO_DOMAIN, "Domain IPsec", RESPOND)
    ldap.add_ou(WEB)
    ldap.add_ou(DB)
    for name, parent in (("web1", WEB), ("web2", WEB), ("db1", DB), ("pc1", COMPUTERS)):
        ldap.add_computer(parent, name, f"{name}.{DOMAIN}")
    set_links(conn, WEB, GPO_WEB)
    set_links(conn, DB, GPO_DB)
    set_links(conn, SUFFIX, GPO_DOMAIN)
    _ok(conn, conn.add(f"CN=Web Servers,{SUFFIX}", ["groupOfNames"],
                       {"cn": "Web Servers", "member": [f"CN=web1,{WEB}", f"CN=web2,{WEB}"]}))
    conn.unbind()


@pytest.fixture
def ldap(tmp_path: Path) -> Iterator[Slapd]:
    server = start_slapd(tmp_path / "slapd")
    build_domain(server)
    yield server
    server.stop()


def settings_for(ldap: Slapd, tmp_path: Path, **overrides: Any) -> DirectorySettings:
    password = tmp_path / "directory.password"
    password.write_text(ldap.password + "\n", encoding="utf-8")
    password.chmod(0o600)
    values: dict[str, Any] = dict(
        url=ldap.url, base_dn=SUFFIX, user=ldap.bind_dn, password_file=password, interval_s=INTERVAL_S
    )
    values.update(overrides)
    return DirectorySettings(**values)


# ---------------------------------------------------------------------------- the server, in process


@pytest.fixture
def dir_server(tmp_path: Path) -> Iterator[Callable[..., DirServer]]:
    started: list[DirServer] = []

    def start(settings: DirectorySettings, data_dir: Path | None = None) -> DirServer:
        server = DirServer(data_dir or tmp_path / "data", settings)
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(Exception):
            server.close()








def refused(call: Callable[[], Any]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
    return str(caught.value.details())


# ---------------------------------------------------------------------------- tests


def test_two_ous_with_gpos_and_a_move_within_one_interval(
    ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    server = dir_server(settings_for(ldap, tmp_path))
    status = wait_until(lambda: in_sync(server), "the first sync")
    assert (status.computers, status.ous, status.gpos, status.links, status.groups) == (4, 2, 3, 3, 1)
    assert status.change_marker == "contextCSN" and status.last_sync_unix_ms and not status.problems

    topology = server.topology()
    assert {g.id: g.policy_id for g in topology.gpos} == {GPO_WEB: SECURE, GPO_DB: REQUEST, GPO_DOMAIN: RESPOND}
    computers = {c.name: c for c in topology.computers}
    assert (computers["web1"].ou, computers["web1"].domain, list(computers["web1"].groups)) == (
        WEB, DOMAIN, ["Web Servers"])
    assert computers["pc1"].ou == ""  # CN=Computers is no OU: only the domain's GPOs reach it
    assert {name: server.policy_of(name) for name in computers} == {
        "web1": SECURE, "web2": SECURE, "db1": REQUEST, "pc1": RESPOND}

    # Nothing changed: a forced full read writes nothing.
    assert server.directory.Sync(directory_pb.DirectorySyncRequest(), timeout=RPC_TIMEOUT_S).mutations == 0

    changed: list[frozenset[str]] = []
    server.server.effective.subscribe(changed.append)
    seq = server.last_seq()
    conn = ldap.connection()
    moved_at = time.monotonic()
    move(conn, "web1", WEB, DB)
    wait_until(lambda: server.policy_of("web1") == REQUEST, "web1 to get the Db policy")
    assert time.monotonic() - moved_at < INTERVAL_S + 5  # within the interval (plus a loaded machine's slack)
    assert server.policy_of("web2") == SECURE
    # Only what changed was written, and only web1's effective policy was recomputed.
    assert [(c.kind, c.key, c.principal) for c in server.changes_after(seq)] == [("computer", "web1", "directory")]
    assert changed == [frozenset({"web1"})]
    status = server.status()
    assert status.last_change_unix_ms and status.last_changed_computers == 1

    # A GPO's pointer now names another policy: its OU's computers follow.
    set_pointer(conn, GPO_WEB, RESPOND)
    wait_until(lambda: server.policy_of("web2") == RESPOND, "web2 to follow its GPO's new policy")
    conn.unbind()


def test_deletions_local_objects_and_refused_local_edits(
    ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    server = dir_server(settings_for(ldap, tmp_path))
    wait_until(lambda: in_sync(server), "the first sync")

    # Local objects: an OU of our own, a computer of our own in a directory OU, a local GPO linked there.
    local_ou = f"OU=Lab,{SUFFIX}"
    server.apply(assign_pb.TopologyMutation(put_ou=assign_pb.OrganizationalUnit(dn=local_ou)))
    server.apply(assign_pb.TopologyMutation(
        put_computer=assign_pb.Computer(name="kiosk", membership="domain", domain=DOMAIN, ou=DB)))
    server.apply(assign_pb.TopologyMutation(put_gpo=assign_pb.Gpo(name="Local GPO", enabled=True)))
    server.apply(assign_pb.TopologyMutation(put_link=assign_pb.GpoLink(gpo="Local GPO", scope=f"ou:{WEB}")))

    # Local edits of directory objects are refused, naming the object and where it comes from.
    text = refused(lambda: server.apply(assign_pb.TopologyMutation(
        delete=assign_pb.TopologyDelete(kind=assign_pb.TOPOLOGY_KIND_OU, key=WEB))))
    assert WEB in text and "directory" in text and ldap.url in text
    web1 = next(c for c in server.topology().computers if c.name == "web1")
    web1.ou = DB
    assert "web1" in refused(lambda: server.apply(assign_pb.TopologyMutation(put_computer=web1)))
    assert "Db IPsec" in refused(lambda: server.apply(assign_pb.TopologyMutation(
        delete=assign_pb.TopologyDelete(kind=assign_pb.TOPOLOGY_KIND_GPO, key="Db IPsec"))))
    assert "in the directory" in refused(lambda: server.assignment.SetGpoPolicy(
        assign_pb.SetGpoPolicyRequest(gpo="Web IPsec", policy=RESPOND), timeout=RPC_TIMEOUT_S))
    link_key = f"{GPO_WEB}@ou:{WEB}"
    assert link_key in refused(lambda: server.apply(assign_pb.TopologyMutation(
        delete=assign_pb.TopologyDelete(kind=assign_pb.TOPOLOGY_KIND_LINK, key=link_key))))
    code, _out, err = run_cli("ou", "delete", WEB, "-r", server.address)
    assert code != 0 and "comes from the directory" in err

    # Deletions in the directory: a computer, a link, then an OU emptied of directory computers but
    # still holding the local one (kept, said so), then emptied for real.
    conn = ldap.connection()
    _ok(conn, conn.delete(f"CN=web2,{WEB}"))
    set_links(conn, DB)
    wait_until(lambda: "web2" not in {c.name for c in server.topology().computers}, "web2 to be deleted")
    wait_until(lambda: server.policy_of("db1") == RESPOND, "db1 to fall back to the domain's GPO")
    assert not [lk for lk in server.topology().links if lk.gpo == GPO_DB]
    _ok(conn, conn.delete(f"CN=db1,{DB}"))
    _ok(conn, conn.delete(DB))

    def kept() -> directory_pb.DirectoryStatus:
        status = server.status()
        assert any(DB in p and "kiosk" in p and "kept" in p for p in status.problems), status.problems
        return status

    wait_until(kept, "the Db OU to be kept for the local computer in it")
    assert DB in {o.dn for o in server.topology().ous}
    kiosk = next(c for c in server.topology().computers if c.name == "kiosk")
    kiosk.ou = ""
    server.apply(assign_pb.TopologyMutation(put_computer=kiosk))  # a local computer: allowed
    wait_until(lambda: DB not in {o.dn for o in server.topology().ous}, "the emptied Db OU to be deleted")

    # Local objects survived every sync; the local link at a directory OU too.
    topology = server.topology()
    assert local_ou in {o.dn for o in topology.ous}
    assert "kiosk" in {c.name for c in topology.computers}
    assert any(lk.scope == f"ou:{WEB}" and lk.gpo != GPO_WEB for lk in topology.links)
    # The directory's link is first at its OU, the local one after it.
    at_web = sorted((lk.order, lk.gpo) for lk in topology.links if lk.scope == f"ou:{WEB}")
    assert at_web[0] == (1, GPO_WEB)
    conn.unbind()


def test_directory_down_then_back_and_a_restart_while_down(
    ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    settings = settings_for(ldap, tmp_path)
    server = dir_server(settings)
    wait_until(lambda: in_sync(server), "the first sync")
    before = server.topology()
    last_sync = server.status().last_sync_unix_ms

    ldap.stop()

    def down(srv: DirServer) -> directory_pb.DirectoryStatus:
        status = srv.status()
        assert status.state == directory_pb.DIRECTORY_STATE_DOWN, status
        return status

    status = wait_until(lambda: down(server), "the directory to be reported down")
    assert status.down_since_unix_ms >= last_sync and status.last_error and ldap.password not in status.last_error
    fleet = server.fleet()
    assert fleet.directory.state == directory_pb.DIRECTORY_STATE_DOWN
    assert fleet.directory.down_since_unix_ms == status.down_since_unix_ms
    # The last known topology stays in force.
    assert server.policy_of("web1") == SECURE
    assert list(server.topology().computers) == list(before.computers)
    code, out, _ = run_cli("fleet", "status", "-r", server.address)
    assert code == 0 and f"Directory: {ldap.url} down since" in out and "last known topology" in out
    code, out, _ = run_cli("directory", "status", "-r", server.address)
    assert code == 0 and "down since" in out and "Owned" in out and "4 computer(s)" in out
    code, _, err = run_cli("directory", "sync", "-r", server.address)
    assert code != 0 and ldap.url in err
    with pytest.raises(grpc.RpcError) as caught:
        server.directory.Sync(directory_pb.DirectorySyncRequest(), timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    # A server restart while the directory is down keeps what the directory owns: no mass deletion,
    # no mass re-add, and the objects stay protected.
    seq = server.last_seq()
    server.close()
    assert (tmp_path / "data" / OWNED_FILE).exists()
    server = dir_server(settings, tmp_path / "data")
    status = wait_until(lambda: down(server), "the restarted server to report the directory down")
    assert status.computers == 4 and status.last_sync_unix_ms >= last_sync
    assert [(c.name, c.ou) for c in server.topology().computers] == [(c.name, c.ou) for c in before.computers]
    assert server.policy_of("web1") == SECURE
    assert "web1" in refused(lambda: server.apply(assign_pb.TopologyMutation(
        delete=assign_pb.TopologyDelete(kind=assign_pb.TOPOLOGY_KIND_COMPUTER, key="web1"))))

    # Back on the same data and port: in sync with nothing to write, then changes flow again.
    ldap.restart()
    wait_until(lambda: in_sync(server), "the directory to be back")
    assert server.changes_after(seq) == []
    code, out, _ = run_cli("fleet", "status", "-r", server.address)
    assert f"Directory: {ldap.url} in sync" in out
    conn = ldap.connection()
    move(conn, "db1", DB, WEB)
    wait_until(lambda: server.policy_of("db1") == SECURE, "db1 to move after the outage")
    conn.unbind()


def test_directory_down_is_logged_once(
    ldap: Slapd,
    tmp_path: Path,
    dir_server: Callable[..., DirServer],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = dir_server(settings_for(ldap, tmp_path, interval_s=0.2))
    wait_until(lambda: in_sync(server), "the first sync")
    logger = "policyagent.server.directory"
    monkeypatch.setattr(logging.getLogger("policyagent"), "propagate", True)  # to caplog's root handler
    with caplog.at_level(logging.INFO, logger=logger):
        ldap.stop()
        wait_until(lambda: server.status().state == directory_pb.DIRECTORY_STATE_DOWN, "down")
        first_error = server.status().last_error_unix_ms
        wait_until(lambda: server.status().last_error_unix_ms > first_error, "a retry")
        wait_until(lambda: server.status().last_error_unix_ms > first_error + 300, "more retries")
        ldap.restart()
        wait_until(lambda: in_sync(server), "back")
    messages = [r.getMessage() for r in caplog.records if r.name == logger]
    assert messages.count("directory down: keeping the last known topology") == 1, messages
    assert messages.count("directory back") == 1, messages


def test_ldapi_sasl_external(ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]) -> None:
    settings = DirectorySettings(url=ldap.ldapi_url, base_dn=SUFFIX, bind="external", interval_s=INTERVAL_S)
    server = dir_server(settings)
    status = wait_until(lambda: in_sync(server), "the first sync over ldapi")
    assert status.bind == "external" and status.computers == 4
    assert server.policy_of("db1") == REQUEST


def test_read_computers_maps_as_read_topology(ldap: Slapd) -> None:
    """connector.read_computers (the incremental read) gives each computer what read_topology gives it."""
    from policyagent.directory.connector import (
        DirectoryConfig,
        computer_names,
        connect,
        find_computers,
        read_computers,
        read_group,
        read_topology,
    )

    conn = connect(DirectoryConfig(ldap.url, SUFFIX, "simple", ldap.bind_dn, ldap.password))
    try:
        # memberOf as AD has it (pc1 in "Web Servers" by its own attribute, not the group's member list).
        admin = ldap.connection()
        _ok(admin, admin.modify(f"CN=pc1,{COMPUTERS}", {"memberOf": [(ldap3.MODIFY_ADD, [f"CN=Web Servers,{SUFFIX}"])]}))
        admin.unbind()
        full = {c.name: c for c in read_topology(conn, SUFFIX).computers}
        dns = [f"CN=web1,{WEB}", f"CN=web2,{WEB}", f"CN=db1,{DB}", f"CN=pc1,{COMPUTERS}"]
        reads = read_computers(conn, SUFFIX, [*dns, f"CN=Web Servers,{SUFFIX}", f"CN=gone,{WEB}"],
                               created="createTimestamp")
        assert reads[f"CN=Web Servers,{SUFFIX}"] is None and reads[f"CN=gone,{WEB}"] is None
        for dn in dns:
            read = reads[dn]
            assert read is not None
            expected = full[read.name]
            assert (read.domain, list(read.groups)) == (expected.domain, list(expected.groups))
            assert read.parent.lower() == dn.split(",", 1)[1].lower() and len(read.created) == 14
        assert reads[f"CN=pc1,{COMPUTERS}"].groups == ("Web Servers",)  # type: ignore[union-attr]
        group = read_group(conn, f"CN=Web Servers,{SUFFIX}")
        assert group is not None and group.name == "Web Servers" and len(group.members) == 2
        assert read_group(conn, f"CN=web1,{WEB}") is None
        assert [d.lower() for d in find_computers(conn, SUFFIX, "WEB1")] == [f"CN=web1,{WEB}".lower()]
        assert find_computers(conn, SUFFIX, "x") == []
        assert computer_names(conn, SUFFIX) == {"web1": 1, "web2": 1, "db1": 1, "pc1": 1}
    finally:
        conn.unbind()


def checked_by_hand(ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]) -> tuple[DirServer, Any]:
    """A server whose checks run only when the test says (an hour's interval, no periodic full read)."""
    server = dir_server(settings_for(ldap, tmp_path, interval_s=3600.0, full_every=10_000))
    wait_until(lambda: in_sync(server), "the first sync")
    assert server.server.directory is not None
    return server, server.server.directory


def check(server: DirServer, service: Any) -> tuple[str, directory_pb.DirectorySyncResponse]:
    """One check (as the interval runs it): how the directory was read ("" = not at all) and the response."""
    before = dict(service.sync.reads)
    response = server.run(service.sync_now(full=False))
    kinds = [kind for kind, count in service.sync.reads.items() if count > before[kind]]
    assert len(kinds) <= 1, service.sync.reads
    if kinds:
        assert response.status.last_read_kind == kinds[0]
    return (kinds[0] if kinds else ""), response


def computers_of(server: DirServer) -> dict[str, tuple[str, list[str]]]:
    return {c.name: (c.ou, sorted(c.groups)) for c in server.topology().computers}


def test_computer_changes_are_read_incrementally_and_match_a_full_read(
    ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    """A move, a computer added in a known OU, a move out of and into CN=Computers and group membership
    changes re-read only the computers concerned, write only what changed, and leave the registry as a
    full read leaves it."""
    server, service = checked_by_hand(ldap, tmp_path, dir_server)
    assert check(server, service)[0] == ""  # nothing changed: not even an incremental read
    conn = ldap.connection()

    seq = server.last_seq()
    move(conn, "web1", WEB, DB)
    kind, response = check(server, service)
    assert kind == "incremental" and response.mutations == 1 and list(response.changed_computers) == ["web1"]
    assert [(c.kind, c.key) for c in server.changes_after(seq)] == [("computer", "web1")]
    # slapd has no referential integrity: the group still names web1's old DN, so web1 left it (a full
    # read says the same).
    assert server.policy_of("web1") == REQUEST and computers_of(server)["web1"] == (DB, [])

    ldap.add_computer(WEB, "web3", f"web3.{DOMAIN}")
    move(conn, "pc1", COMPUTERS, DB)
    assert check(server, service)[0] == "incremental"
    assert computers_of(server)["web3"] == (WEB, []) and server.policy_of("web3") == SECURE
    assert computers_of(server)["pc1"] == (DB, []) and server.policy_of("pc1") == REQUEST
    move(conn, "pc1", DB, COMPUTERS)
    assert check(server, service)[0] == "incremental"
    assert computers_of(server)["pc1"] == ("", []) and server.policy_of("pc1") == RESPOND

    # groupOfNames membership: db1 joins "Web Servers", web2 leaves it (the group entry is what changed).
    group = f"CN=Web Servers,{SUFFIX}"
    _ok(conn, conn.modify(group, {"member": [(ldap3.MODIFY_ADD, [f"CN=db1,{DB}"]),
                                             (ldap3.MODIFY_DELETE, [f"CN=web2,{WEB}"])]}))
    seq = server.last_seq()
    kind, response = check(server, service)
    assert kind == "incremental" and response.mutations == 2
    assert {(c.kind, c.key) for c in server.changes_after(seq)} == {("computer", "db1"), ("computer", "web2")}
    assert computers_of(server)["db1"] == (DB, ["Web Servers"]) and computers_of(server)["web2"] == (WEB, [])

    # An unchanged computer attribute: read, nothing written.
    _ok(conn, conn.modify(f"CN=web3,{WEB}", {"dNSHostName": [(ldap3.MODIFY_REPLACE, [f"web3b.{DOMAIN}"])]}))
    kind, response = check(server, service)
    assert kind == "incremental" and response.mutations == 0

    incremental = dict(service.sync.reads)
    full = server.directory.Sync(directory_pb.DirectorySyncRequest(), timeout=RPC_TIMEOUT_S)
    assert full.mutations == 0, full  # a full read finds the registry as the incremental reads left it
    assert full.status.last_read_kind == "full" and service.sync.reads["full"] == incremental["full"] + 1
    assert incremental["full"] == 1 and incremental["incremental"] == 5
    # The owned snapshot on disk is what a restarted server loads: it has the incremental changes.
    from policyagent.directory.sync import load_owned

    owned = load_owned(tmp_path / "data" / OWNED_FILE).topology
    assert owned.computers["web1"].ou == DB and owned.computers["web3"].ou == WEB
    conn.unbind()


def test_other_directory_changes_fall_back_to_a_full_read(
    ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    """What an incremental read cannot map is read in full: a new OU with a computer moved into it, a
    deletion, a GPO's IPsec pointer, a renamed computer, a second object taking an owned name."""
    server, service = checked_by_hand(ldap, tmp_path, dir_server)
    conn = ldap.connection()

    lab = ldap.add_ou(f"OU=Lab,{SUFFIX}")
    move(conn, "db1", DB, lab)
    assert check(server, service)[0] == "full"
    assert computers_of(server)["db1"] == (lab, []) and lab in {o.dn for o in server.topology().ous}

    _ok(conn, conn.delete(f"CN=web2,{WEB}"))
    assert check(server, service)[0] == "full"  # the marker moved and no entry shows why
    assert "web2" not in computers_of(server)

    set_pointer(conn, GPO_WEB, RESPOND)
    assert check(server, service)[0] == "full"
    assert server.policy_of("web1") == RESPOND

    _ok(conn, conn.modify_dn(f"CN=pc1,{COMPUTERS}", "CN=pc9"))
    _ok(conn, conn.modify(f"CN=pc9,{COMPUTERS}", {"sAMAccountName": [(ldap3.MODIFY_REPLACE, ["PC9$"])]}))
    assert check(server, service)[0] == "full"  # pc9 is new and pc1 is gone: a rename, not an add
    assert "pc1" not in computers_of(server) and computers_of(server)["pc9"] == ("", [])

    ldap.add_computer(DB, "web1", f"web1.{DOMAIN}")  # a second web1
    assert check(server, service)[0] == "full"
    assert computers_of(server)["web1"][0] in (WEB, DB)

    response = server.directory.Sync(directory_pb.DirectorySyncRequest(), timeout=RPC_TIMEOUT_S)
    assert response.mutations == 0, response
    assert service.sync.reads["incremental"] == 0
    conn.unbind()


def test_a_gpo_whose_policy_cannot_be_imported_assigns_none_and_says_why(
    ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    missing = "{0D0E0F10-1112-1314-1516-171819202122}"  # no such policy in the store or the directory
    conn = ldap.connection()
    set_pointer(conn, GPO_DB, missing)
    conn.unbind()
    server = dir_server(settings_for(ldap, tmp_path))
    status = wait_until(lambda: in_sync(server), "the first sync")
    problem = next(p for p in status.problems if "Db IPsec" in p)
    assert missing in problem and "assigns none" in problem
    assert {g.id: g.policy_id for g in server.topology().gpos}[GPO_DB] == ""
    assert server.policy_of("db1") == RESPOND  # the domain's GPO, the Db GPO taking no part
    assert server.policy_of("web1") == SECURE


def test_a_gpo_policy_missing_from_the_store_is_imported_from_the_directory(
    ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    """A policy published in the [MS-GPIPSEC] layout (policyagent.directory.adstore) and assigned to the
    Db GPO, unknown to the store: the sync imports it (with what it uses) and the GPO assigns it."""
    from policyagent.directory import adstore
    from policyagent.model.defaults import default_contents

    contents = default_contents()
    source = next(p for p in contents.policies if p.id == SECURE)
    imported_id = "{8C5FCD43-4E5F-4061-B273-D4E5F6071829}"
    policy = type(source)()
    policy.CopyFrom(source)
    policy.id, policy.name = imported_id, "Db servers from AD"
    contents.policies.append(policy)
    conn = ldap.connection()
    adstore.publish(conn, SUFFIX, contents, [imported_id])
    set_pointer(conn, GPO_DB, imported_id)
    conn.unbind()

    server = dir_server(settings_for(ldap, tmp_path))
    status = wait_until(lambda: in_sync(server), "the first sync")
    assert not status.problems, status.problems
    assert {g.id: g.policy_id for g in server.topology().gpos}[GPO_DB] == imported_id
    rsop = server.assignment.GetRsop(assign_pb.RsopRequest(computer="db1"), timeout=RPC_TIMEOUT_S)
    assert (rsop.policy_id, rsop.policy_name) == (imported_id, "Db servers from AD")


@pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")  # ldap3 2.9.1's valid_names check
def test_active_directory_samba_dc(tmp_path: Path, dir_server: Callable[..., DirServer]) -> None:
    """The same sync against a real AD (Samba DC, tests/samba.py): LDAPS validated against the DC's
    certificate name, highestCommittedUSN as the marker, computers in two OUs with GPOs linked → the
    right policies, also on a real agent; uSNChanged for a move (the agent follows), the periodic full
    read for a deletion (AD hides deletions from USN searches)."""
    from samba import samba_unavailable, start_samba

    why = samba_unavailable()
    if why is not None:
        pytest.skip(why)
    from policyagent.directory import adstore
    from policyagent.model.defaults import default_contents

    dc = start_samba(tmp_path / "samba")
    try:
        web, db = dc.add_ou(f"OU=Web,{dc.base_dn}"), dc.add_ou(f"OU=Db,{dc.base_dn}")
        dc.add_computer(web, "web1", f"web1.{dc.domain}")
        dc.add_computer(db, "db1", f"db1.{dc.domain}")
        conn = dc.connection()
        contents = default_contents()
        policies = {p.id: p for p in contents.policies}
        adstore.publish(conn, dc.base_dn, contents, [SECURE, REQUEST])
        for ou, policy_id, name in ((web, SECURE, "Web IPsec"), (db, REQUEST, "Db IPsec")):
            guid = dc.create_gpo(name)
            adstore.assign_gpo(conn, dc.base_dn, guid, policies[policy_id])
            dc.link_gpo(ou, guid)
        conn.unbind()
        password = tmp_path / "ad.password"
        password.write_text(dc.admin_password + "\n", encoding="utf-8")
        settings = DirectorySettings(
            url=dc.url_ldaps, base_dn=dc.base_dn, user=dc.admin_user, password_file=password,
            ca_file=dc.ca_file, tls_name=dc.tls_name, interval_s=INTERVAL_S,
        )
        server = dir_server(settings)
        status = wait_until(lambda: in_sync(server), "the first sync with the DC", 30)
        assert status.change_marker == "highestCommittedUSN", status
        assert (server.policy_of("web1"), server.policy_of("db1")) == (SECURE, REQUEST)
        assert next(c for c in server.topology().computers if c.name == "web1").ou == web

        # A real agent for web1 gets the Web OU's policy, then the Db OU's once web1 is moved on the DC.
        data_dir = server.data_dir
        with running_agent(server.address, server.server.enroll_address, data_dir, "web1", dc.domain, tmp_path) as runs:
            wait_until(runs("Secure Server (Require Security)"), "the agent to run the Web OU's policy", 30)
            dc.move(f"CN=web1,{web}", db)
            wait_until(lambda: server.policy_of("web1") == REQUEST, "web1 to move on the DC", INTERVAL_S + 10)
            wait_until(runs("Server (Request Security)"), "the agent to run the Db OU's policy", 10)
        dc.delete(f"CN=db1,{db}")
        wait_until(lambda: "db1" not in {c.name for c in server.topology().computers},
                   "db1's deletion to be seen by a full read", 10 * INTERVAL_S + 15)
    finally:
        dc.stop()


def test_server_without_directory_says_not_configured(inproc_server: Callable[..., Any]) -> None:
    server = inproc_server()
    channel = admin_channel(server.address)
    try:
        status = directory_grpc.DirectoryAdminStub(channel).GetStatus(
            directory_pb.DirectoryStatusRequest(), timeout=RPC_TIMEOUT_S)
        assert status.state == directory_pb.DIRECTORY_STATE_NOT_CONFIGURED
        fleet = fleet_grpc.FleetStub(channel).Status(fleet_pb.FleetStatusRequest(), timeout=RPC_TIMEOUT_S)
        assert fleet.directory.state == directory_pb.DIRECTORY_STATE_NOT_CONFIGURED
        with pytest.raises(grpc.RpcError) as caught:
            directory_grpc.DirectoryAdminStub(channel).Sync(directory_pb.DirectorySyncRequest(), timeout=RPC_TIMEOUT_S)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        channel.close()
    code, out, _ = run_cli("directory", "status", "-r", server.address)
    assert code == 0 and out.strip() == "Directory: not configured"
    code, out, _ = run_cli("fleet", "status", "-r", server.address)
    assert code == 0 and "Directory: not configured" in out


# ---------------------------------------------------------------------------- acceptance: a real agent


def test_agent_follows_its_computer_moved_in_the_directory(ldap: Slapd, tmp_path: Path) -> None:
    """A `policyagent agent` process for web1 (domain member by join token) runs the Web OU's policy;
    web1 moved to OU=Db in the directory → the agent runs the Db policy within the interval."""
    settings = settings_for(ldap, tmp_path)
    assert settings.password_file is not None
    server = start_server_process(
        tmp_path / "data",
        extra=[
            "--directory", ldap.url, "--directory-base", SUFFIX, "--directory-user", ldap.bind_dn,
            "--directory-password-file", str(settings.password_file), "--directory-interval", str(INTERVAL_S),
        ],
        log_dir=tmp_path,
    )
    channel = admin_channel(server.address)
    try:
        directory = directory_grpc.DirectoryAdminStub(channel)

        def synced() -> bool:
            state = directory.GetStatus(directory_pb.DirectoryStatusRequest(), timeout=RPC_TIMEOUT_S).state
            return state == directory_pb.DIRECTORY_STATE_IN_SYNC

        wait_until(synced, "the server's first sync")
        assert ldap.password not in server.stderr()
        with running_agent(server.address, server.enroll_address, server.data_dir, "web1", DOMAIN, tmp_path) as runs:
            wait_until(runs("Secure Server (Require Security)"), "the agent to run the Web OU's policy", 30)
            # Enrolling did not move web1 out of the OU the directory put it in.
            topology = assign_grpc.AssignmentAdminStub(channel).GetTopology(
                assign_pb.GetTopologyRequest(), timeout=RPC_TIMEOUT_S)
            assert next(c.ou for c in topology.computers if c.name == "web1") == WEB

            conn = ldap.connection()
            move(conn, "web1", WEB, DB)
            conn.unbind()
            wait_until(runs("Server (Request Security)"), "the agent to run the Db OU's policy", INTERVAL_S + 10)
    finally:
        channel.close()
        server.close()
