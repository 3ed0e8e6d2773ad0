"""Directory computers get the site of the address their agent connects from (subnet objects, longest prefix).

A throwaway slapd (tests/slapd.py) laid out like Active Directory, plus AD's `site` and `subnet` object classes
(written here, loaded by restarting slapd with one more schema file): CN=Sites,CN=Configuration,<base> holds
the sites Lab, Branch and Loopback, each with a GPO linked to it, and CN=Subnets under it the subnets
10.1.0.0/16 → Branch, 10.1.2.0/24 → Lab, 2001:db8::/32 → Branch, 127.0.0.0/8 → Loopback and one bad prefix.
No GPO is linked to the domain, so a computer's policy comes from its site's link alone. The server runs in
process (PolicyServer on its own loop thread); the agents' addresses come from the hub's fleet records —
set directly in one test, from a real `policyagent agent` connecting over 127.0.0.1 in the other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import RPC_TIMEOUT_S
from dirkit import DirServer, in_sync, running_agent, wait_until
from slapd import Slapd, slapd_unavailable, start_slapd

from policyagent.directory.sync import DirectorySettings
from policyagent.pb import assign_pb

_why = slapd_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

if _why is None:
    import ldap3


SUFFIX = "DC=example,DC=test"
DOMAIN = "example.test"
COMPUTERS = f"CN=Computers,{SUFFIX}"
WEB = f"OU=Web,{SUFFIX}"
SITES = f"CN=Sites,CN=Configuration,{SUFFIX}"
SUBNETS = f"CN=Subnets,{SITES}"
IPSEC_CSE = "[{E437BC1C-AA7D-11D2-A382-00C04F991E27}{DEA8AFA0-CC85-11D0-9CE2-0080C7221EBD}]"
GPO_LAB = "{5F2C9A10-1B2C-4D3E-8F40-A1B2C3D4E5F6}"
GPO_BRANCH = "{6A3DAB21-2C3D-4E4F-9051-B2C3D4E5F607}"
GPO_LOOPBACK = "{7B4EBC32-3D4E-4F50-A162-C3D4E5F60718}"
SECURE = "{7238523C-70FA-11D1-864C-14A300000000}"  # Secure Server (Require Security)
REQUEST = "{72385230-70FA-11D1-864C-14A300000000}"  # Server (Request Security)
RESPOND = "{72385236-70FA-11D1-864C-14A300000000}"  # Client (Respond Only)

# AD's site and subnet classes (their AD OIDs), with the attributes the sync reads: gPLink/gPOptions
# (tests/ldap/ipsec.schema), siteObject (msuser.schema).
SITES_SCHEMA = """objectclass ( 1.2.840.113556.1.5.31 NAME 'site' SUP top STRUCTURAL
\tMUST cn
\tMAY ( description $ gPLink $ gPOptions ) )

objectclass ( 1.2.840.113556.1.5.96 NAME 'subnet' SUP top STRUCTURAL
\tMUST cn
\tMAY ( description $ siteObject ) )
"""


# ---------------------------------------------------------------------------- the directory


def _ok(conn: Any, done: bool) -> None:
    assert done, conn.result


def _gpo_dn(guid: str) -> str:
    return f"CN={guid},CN=Policies,CN=System,{SUFFIX}"


def add_gpo(conn: Any, guid: str, name: str, policy_id: str) -> None:
    """A groupPolicyContainer and its IPsec pointer object ([MS-GPIPSEC] §2.2.2) naming `policy_id`."""
    dn = _gpo_dn(guid)
    _ok(conn, conn.add(dn, ["groupPolicyContainer"], {
        "cn": guid, "displayName": name, "flags": 0, "versionNumber": 1, "gPCMachineExtensionNames": IPSEC_CSE}))
    for rdn in ("CN=Machine", "CN=Microsoft,CN=Machine", "CN=Windows,CN=Microsoft,CN=Machine"):
        _ok(conn, conn.add(f"{rdn},{dn}", ["container"], {"cn": rdn.split(",")[0][3:]}))
    ref = f"CN=ipsecPolicy{policy_id},CN=IP Security,CN=System,{SUFFIX}"
    _ok(conn, conn.add(f"CN=IPSEC,CN=Windows,CN=Microsoft,CN=Machine,{dn}", ["ipsecPolicy"],
                       {"cn": "IPSEC", "ipsecOwnersReference": ref}))


def gplink(*guids: str) -> str:
    return "".join(f"[LDAP://cn={g.lower()},cn=policies,cn=system,{SUFFIX.lower()};0]" for g in guids)


def site_dn(name: str) -> str:
    return f"CN={name},{SITES}"


def add_subnet(conn: Any, prefix: str, site: str) -> None:
    _ok(conn, conn.add(f"CN={prefix},{SUBNETS}", ["subnet"], {"cn": prefix, "siteObject": site_dn(site)}))


def with_site_classes(ldap: Slapd) -> None:
    """Restart slapd with AD's site and subnet classes loaded (after msuser.schema: siteObject is there)."""
    schema = ldap.dir / "sites.schema"
    schema.write_text(SITES_SCHEMA)
    conf = ldap.dir / "slapd.conf"
    text = conf.read_text()
    assert "\nmodulepath " in text
    conf.write_text(text.replace("\nmodulepath ", f'\ninclude "{schema}"\nmodulepath ', 1))
    ldap.stop()
    ldap.restart()


def build_domain(ldap: Slapd) -> None:
    """CN=Computers with lab1, lab2, far1 and v6host; OU=Web (no GPO); sites Lab (Secure Server), Branch
    (Request Security), Loopback (Respond Only), each linked to its own GPO; the subnets of the module doc."""
    conn = ldap.connection()
    for dn in (f"CN=System,{SUFFIX}", f"CN=Policies,CN=System,{SUFFIX}", COMPUTERS,
               f"CN=Configuration,{SUFFIX}", SITES, SUBNETS):
        _ok(conn, conn.add(dn, ["container"], {"cn": dn.split(",")[0][3:]}))
    for guid, name, policy_id, site in ((GPO_LAB, "Lab IPsec", SECURE, "Lab"),
                                        (GPO_BRANCH, "Branch IPsec", REQUEST, "Branch"),
                                        (GPO_LOOPBACK, "Loopback IPsec", RESPOND, "Loopback")):
        add_gpo(conn, guid, name, policy_id)
        _ok(conn, conn.add(site_dn(site), ["site"], {"cn": site, "gPLink": gplink(guid)}))
    for prefix, site in (("10.1.0.0/16", "Branch"), ("10.1.2.0/24", "Lab"), ("2001:db8::/32", "Branch"),
                         ("127.0.0.0/8", "Loopback")):
        add_subnet(conn, prefix, site)
    _ok(conn, conn.add(f"CN=10.9.9.9/8,{SUBNETS}", ["subnet"], {"cn": "10.9.9.9/8", "siteObject": site_dn("Lab")}))
    ldap.add_ou(WEB)
    for name in ("lab1", "lab2", "far1", "v6host", "loop1"):
        ldap.add_computer(COMPUTERS, name, f"{name}.{DOMAIN}")
    conn.unbind()


@pytest.fixture
def ldap(tmp_path: Path) -> Iterator[Slapd]:
    server = start_slapd(tmp_path / "slapd")
    try:
        with_site_classes(server)
        build_domain(server)
        yield server
    finally:
        server.stop()


def settings_for(ldap: Slapd, tmp_path: Path, **overrides: Any) -> DirectorySettings:
    password = tmp_path / "directory.password"
    password.write_text(ldap.password + "\n", encoding="utf-8")
    password.chmod(0o600)
    values: dict[str, Any] = dict(url=ldap.url, base_dn=SUFFIX, user=ldap.bind_dn, password_file=password,
                                  sites_base=SITES, interval_s=3600.0, full_every=10_000)
    values.update(overrides)
    return DirectorySettings(**values)


# ---------------------------------------------------------------------------- the server, in process


@pytest.fixture
def dir_server(tmp_path: Path) -> Iterator[Callable[..., DirServer]]:
    started: list[DirServer] = []

    def start(settings: DirectorySettings) -> DirServer:
        server = DirServer(tmp_path / "data", settings)
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(Exception):
            server.close()








# ---------------------------------------------------------------------------- tests


def test_read_subnets_maps_prefixes_to_sites_and_skips_bad_ones(
    ldap: Slapd, caplog: pytest.LogCaptureFixture
) -> None:
    from policyagent.directory.connector import DirectoryConfig, connect, read_subnets

    conn = connect(DirectoryConfig(ldap.url, SUFFIX, "simple", ldap.bind_dn, ldap.password))
    try:
        with caplog.at_level(logging.WARNING, logger="policyagent.directory.connector"):
            subnets = read_subnets(conn, SITES)
        assert subnets == {"10.1.0.0/16": "Branch", "10.1.2.0/24": "Lab", "2001:db8::/32": "Branch",
                           "127.0.0.0/8": "Loopback"}
        assert any(f"CN=10.9.9.9/8,{SUBNETS}".lower() in r.getMessage().lower() for r in caplog.records)
        assert read_subnets(conn, f"CN=Nowhere,{SUFFIX}") == {}
    finally:
        conn.unbind()


def test_directory_computers_get_the_site_of_their_agents_address(
    ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    server = dir_server(settings_for(ldap, tmp_path))
    status = wait_until(lambda: in_sync(server), "the first sync")
    assert status.sites == 3 and not status.problems, status
    assert set(server.sites().values()) == {""}  # no agent has connected: no address, no site
    assert server.rsop("lab1").policy_id == ""

    # The agents' last known addresses (the hub's fleet records), then a full read.
    for name, peer in (("lab1", "ipv4:10.1.2.3:40000"), ("lab2", "ipv6:[::ffff:10.1.2.4]:40001"),
                       ("far1", "ipv4:192.0.2.1:40002"), ("v6host", "ipv6:%5B2001:db8:7::5%5D:40003"),
                       ("loop1", "ipv4:10.1.9.9:40004")):
        server.set_peer(name, peer)
    seq = server.last_seq()
    response = server.sync()
    assert response.mutations == 4, response  # far1's site ("" → "") did not change
    assert server.sites() == {"lab1": "Lab", "lab2": "Lab", "far1": "", "v6host": "Branch", "loop1": "Branch"}
    assert sorted((c.kind, c.key, c.principal) for c in server.changes_after(seq)) == [
        ("computer", name, "directory") for name in ("lab1", "lab2", "loop1", "v6host")]
    rsop = server.rsop("lab1")
    assert (rsop.site, rsop.policy_id) == ("Lab", SECURE)
    assert [(s.scope, s.gpo_id, s.outcome) for s in rsop.steps] == [("site:Lab", GPO_LAB, "applied")]
    assert server.rsop("loop1").policy_id == REQUEST and server.rsop("far1").policy_id == ""
    assert server.sync().mutations == 0  # unchanged: nothing written

    # An agent connects from elsewhere: its computer follows without a directory read.
    reads = dict(server.service.sync.reads)
    seq = server.last_seq()
    server.set_peer("far1", "ipv4:10.1.2.77:40005")
    server.on_loop(lambda: server.service.agent_address_changed("far1", "10.1.2.77"))
    wait_until(lambda: server.rsop("far1").policy_id == SECURE, "far1 to get the Lab site's policy")
    assert server.service.sync.reads == reads
    assert [(c.kind, c.key, c.principal) for c in server.changes_after(seq)] == [("computer", "far1", "directory")]
    # The same site from another address: nothing written. A computer the directory does not own: ignored.
    seq = server.last_seq()
    server.set_peer("lab1", "ipv4:10.1.2.99:40006")
    server.on_loop(lambda: server.service.agent_address_changed("lab1", "10.1.2.99"))
    server.on_loop(lambda: server.service.agent_address_changed("stranger", "10.1.2.99"))
    server.set_peer("far1", "ipv4:10.1.9.1:40007")
    server.on_loop(lambda: server.service.agent_address_changed("far1", "10.1.9.1"))
    wait_until(lambda: server.sites()["far1"] == "Branch", "far1 to move to Branch")
    assert [c.key for c in server.changes_after(seq)] == ["far1"]

    # A computer moved in the directory (an incremental read) keeps the site of its address.
    conn = ldap.connection()
    _ok(conn, conn.modify_dn(f"CN=lab1,{COMPUTERS}", "CN=lab1", new_superior=WEB))
    kind, response = server.check()
    assert kind == "incremental" and response.mutations == 1, response
    topology = server.assignment.GetTopology(assign_pb.GetTopologyRequest(), timeout=RPC_TIMEOUT_S)
    assert next((c.ou, c.site) for c in topology.computers if c.name == "lab1") == (WEB, "Lab")

    # A subnet re-assigned to another site in the directory: a full read moves its computers.
    _ok(conn, conn.modify(f"CN=10.1.2.0/24,{SUBNETS}", {"siteObject": [(ldap3.MODIFY_REPLACE, [site_dn("Branch")])]}))
    kind, response = server.check()
    assert kind == "full" and response.mutations == 2, response
    assert server.sites()["lab1"] == "Branch" and server.rsop("lab1").policy_id == REQUEST
    conn.unbind()


# ---------------------------------------------------------------------------- a real agent


def test_agent_connecting_from_loopback_gets_the_loopback_sites_policy(
    ldap: Slapd, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    """A `policyagent agent` for loop1 connects over 127.0.0.1: loop1 is placed in site Loopback (subnet
    127.0.0.0/8) at its Hello and runs the policy of the GPO linked there; reconnecting from the same
    address does not re-place it."""
    server = dir_server(settings_for(ldap, tmp_path))
    wait_until(lambda: in_sync(server), "the first sync")
    assert server.sites()["loop1"] == "" and server.rsop("loop1").policy_id == ""
    hub = server.server.hub
    assert hub is not None and hub.address_listener is not None
    told: list[tuple[str, str]] = []
    listener = hub.address_listener

    def counting(computer: str, address: str) -> None:
        told.append((computer, address))
        listener(computer, address)

    hub.address_listener = counting
    reads = dict(server.service.sync.reads)
    with running_agent(server.address, server.server.enroll_address, server.data_dir, "loop1", DOMAIN, tmp_path) as runs:
        wait_until(runs("Client (Respond Only)"), "the agent to run the Loopback site's policy", 30)
        assert server.sites()["loop1"] == "Loopback" and told == [("loop1", "127.0.0.1")]
        rsop = server.rsop("loop1")
        assert [(s.scope, s.outcome) for s in rsop.steps] == [("site:Loopback", "applied")]
        assert server.service.sync.reads == reads  # placed at the Hello, not by a directory read

        # The stream breaks and the agent reconnects from the same address: no re-placing, no write.
        seq = server.last_seq()
        since = hub.registry.get("loop1").connected_since_unix_ms

        def drop() -> None:
            hub._conns["loop1"].close("test: drop the stream", grpc.StatusCode.UNAVAILABLE)

        server.on_loop(drop)
        wait_until(lambda: hub.registry.get("loop1").online
                   and hub.registry.get("loop1").connected_since_unix_ms > since, "the agent to reconnect", 30)
        wait_until(runs("Client (Respond Only)"), "the agent to be in sync again", 30)
        assert told == [("loop1", "127.0.0.1")] and server.changes_after(seq) == []
