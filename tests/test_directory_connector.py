"""policyagent.directory.connector against the throwaway slapd (tests/slapd.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from slapd import Slapd, slapd_unavailable, start_slapd

from policyagent.directory.connector import (
    DirectoryConfig,
    DirectoryError,
    changes_since,
    connect,
    parse_gplink,
    read_gpos,
    read_topology,
)

_why = slapd_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

if _why is None:
    import ldap3

IPSEC_CSE = "[{E437BC1C-AA7D-11D2-A382-00C04F991E27}{DEA8AFA0-CC85-11D0-9CE2-0080C7221EBD}]"
GPO_A = "{31B2F340-016D-11D2-945F-00C04FB984F9}"  # linked to OU=Servers, enforced; IPsec
GPO_B = "{6AC1786C-016F-11D2-945F-00C04FB984F9}"  # linked to the domain, second in gPLink (order 1)
GPO_C = "{0F3A1E52-7C4B-4E0D-9B8A-2D1C3B4A5E6F}"  # linked to the domain first (order 2), disabled link
SUFFIX = "DC=example,DC=test"
SERVERS = f"OU=Servers,{SUFFIX}"
DESKTOPS = f"OU=Desktops,{SUFFIX}"


def _gpo_dn(guid: str, base: str = SUFFIX) -> str:
    return f"CN={guid},CN=Policies,CN=System,{base}"


def _link(guid: str, flags: int) -> str:
    return f"[LDAP://cn={guid.lower()},cn=policies,cn=system,{SUFFIX.lower()};{flags}]"


def _set(conn: Any, dn: str, **attrs: Any) -> None:
    assert conn.modify(dn, {k: [(ldap3.MODIFY_REPLACE, [v])] for k, v in attrs.items()}), conn.result


@pytest.fixture(scope="module")
def ldap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    server = start_slapd(tmp_path_factory.mktemp("slapd"))
    conn = server.connection()
    assert conn.add(f"CN=System,{SUFFIX}", ["container"], {"cn": "System"})
    assert conn.add(f"CN=Policies,CN=System,{SUFFIX}", ["container"], {"cn": "Policies"})
    for guid, name, ext, flags in ((GPO_A, "IPsec servers", IPSEC_CSE, 0), (GPO_B, "Domain baseline", "", 0),
                                   (GPO_C, "Computer off", IPSEC_CSE, 2)):
        attrs: dict[str, Any] = {"cn": guid, "displayName": name, "flags": flags, "versionNumber": 1}
        if ext:
            attrs["gPCMachineExtensionNames"] = ext
        assert conn.add(_gpo_dn(guid), ["groupPolicyContainer"], attrs), conn.result
    server.add_ou(SERVERS)
    server.add_ou(DESKTOPS)
    server.add_computer(SERVERS, "web1", "web1.example.test")
    server.add_computer(SERVERS, "db1", "db1.example.test")
    server.add_computer(DESKTOPS, "pc1", "pc1.example.test")
    _set(conn, SERVERS, gPLink=_link(GPO_A, 2), gPOptions=0)
    _set(conn, DESKTOPS, gPOptions=1)
    _set(conn, SUFFIX, gPLink=_link(GPO_C, 1) + _link(GPO_B, 0))
    assert conn.add(f"CN=DB Servers,{SUFFIX}", ["groupOfNames"],
                    {"cn": "DB Servers", "member": [f"CN=db1,{SERVERS}"]}), conn.result
    conn.unbind()
    yield server
    server.stop()


def test_parse_gplink_order_and_flags() -> None:
    links = parse_gplink(_link(GPO_C, 1) + " " + _link(GPO_B, 0) + _link(GPO_A, 3))
    assert [(lk.gpo_id, lk.order, lk.enforced, lk.enabled) for lk in links] == [
        (GPO_C, 3, False, False), (GPO_B, 2, False, True), (GPO_A, 1, True, False)]
    assert parse_gplink("") == []
    for bad in ("[LDAP://cn=x,cn=policies;0]", "garbage", _link(GPO_A, 0) + "[LDAP://cn={nope};0", "[LDAP://x]"):
        with pytest.raises(ValueError):
            parse_gplink(bad)


def test_read_topology(ldap: Slapd) -> None:
    conn = connect(DirectoryConfig(ldap.url, SUFFIX, "simple", user=ldap.bind_dn, password=ldap.password))
    topo = read_topology(conn, SUFFIX)
    assert [(c.name, c.membership, c.domain, c.ou, list(c.groups)) for c in topo.computers] == [
        ("db1", "domain", "example.test", "OU=Servers,DC=example,DC=test", ["DB Servers"]),
        ("pc1", "domain", "example.test", "OU=Desktops,DC=example,DC=test", []),
        ("web1", "domain", "example.test", "OU=Servers,DC=example,DC=test", []),
    ]
    assert [(o.dn, o.block_inheritance) for o in topo.ous] == [
        ("OU=Desktops,DC=example,DC=test", True), ("OU=Servers,DC=example,DC=test", False)]
    assert [g.name for g in topo.groups] == ["DB Servers"]
    assert list(topo.sites) == []
    assert sorted((g.id, g.name, g.enabled) for g in topo.gpos) == sorted([
        (GPO_A, "IPsec servers", True), (GPO_B, "Domain baseline", True), (GPO_C, "Computer off", False)])
    assert [(lk.gpo, lk.scope, lk.order, lk.enforced, lk.enabled) for lk in topo.links] == [
        (GPO_B, "domain:example.test", 1, False, True),
        (GPO_C, "domain:example.test", 2, False, False),
        (GPO_A, "ou:OU=Servers,DC=example,DC=test", 1, True, True),
    ]
    gpos = {g.id: g for g in read_gpos(conn, SUFFIX)}
    assert gpos[GPO_A].ipsec and not gpos[GPO_B].ipsec and gpos[GPO_C].ipsec
    conn.unbind()


def test_move_is_detected(ldap: Slapd) -> None:
    conn = ldap.connection()
    csn, changed = changes_since(conn, SUFFIX, "")
    assert csn and changed == []
    assert changes_since(conn, SUFFIX, csn) == (csn, [])
    time.sleep(0.01)
    assert conn.modify_dn(f"CN=web1,{SERVERS}", "CN=web1", new_superior=DESKTOPS), conn.result
    try:
        new_csn, changed = changes_since(conn, SUFFIX, csn)
        assert new_csn > csn
        assert [d.lower() for d in changed] == [f"cn=web1,{DESKTOPS}".lower()]
        assert changes_since(conn, SUFFIX, new_csn) == (new_csn, [])
        web1 = next(c for c in read_topology(conn, SUFFIX).computers if c.name == "web1")
        assert web1.ou == "OU=Desktops,DC=example,DC=test"
    finally:
        assert conn.modify_dn(f"CN=web1,{DESKTOPS}", "CN=web1", new_superior=SERVERS), conn.result
        conn.unbind()


def test_malformed_gplink_is_skipped(ldap: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    conn = ldap.connection()
    bad_ou = ldap.add_ou(f"OU=Broken,{SUFFIX}")
    missing = "{11111111-2222-3333-4444-555555555555}"
    _set(conn, bad_ou, gPLink="[LDAP://cn=not-a-guid,cn=policies;0]")
    _set(conn, DESKTOPS, gPLink=_link(missing, 0) + _link(GPO_B, 0))
    try:
        with caplog.at_level(logging.WARNING, logger="policyagent.directory.connector"):
            topo = read_topology(conn, SUFFIX)
        assert "OU=Broken,DC=example,DC=test" in [o.dn for o in topo.ous]
        assert not [lk for lk in topo.links if lk.scope == "ou:OU=Broken,DC=example,DC=test"]
        assert [(lk.gpo, lk.order) for lk in topo.links if lk.scope == f"ou:{DESKTOPS}"] == [(GPO_B, 1)]
        text = caplog.text.lower()
        assert bad_ou.lower() in text and "gplink" in text
        assert missing.lower() in text and DESKTOPS.lower() in text
    finally:
        assert conn.delete(bad_ou), conn.result
        assert conn.modify(DESKTOPS, {"gPLink": [(ldap3.MODIFY_DELETE, [])]}), conn.result
        conn.unbind()


def test_paged_read_of_1500_computers(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_slapd(tmp_path_factory.mktemp("slapd-big"), suffix="DC=big,DC=test")
    try:
        ou = server.add_ou("OU=Fleet,DC=big,DC=test")
        for i in range(1500):
            server.add_computer(ou, f"h{i:04d}", f"h{i:04d}.big.test")
        # Not the rootdn: the 1000-entry size limit applies, so only paging gets them all.
        conn = connect(DirectoryConfig(server.ldapi_url, "DC=big,DC=test", "external", page_size=400))
        conn.search("DC=big,DC=test", "(objectClass=computer)", attributes=["cn"])
        assert conn.result["result"] == 4 and len(conn.entries) == 1000  # sizeLimitExceeded
        topo = read_topology(conn, "DC=big,DC=test")
        assert len(topo.computers) == 1500
        assert {c.ou for c in topo.computers} == {"OU=Fleet,DC=big,DC=test"}
        assert topo.computers[0].name == "h0000" and topo.computers[0].domain == "big.test"
        conn.unbind()
    finally:
        server.stop()


class _FailingConn:
    """A connection whose searches end in insufficientAccessRights (ldap3 without raise_exceptions)."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}
        outer = self

        class _Standard:
            def paged_search(self, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
                outer.result = {"result": 50, "description": "insufficientAccessRights", "message": "no"}
                yield from ()

        class _Extend:
            standard = _Standard()

        self.extend = _Extend()


def test_failed_search_raises_instead_of_a_partial_topology() -> None:
    with pytest.raises(DirectoryError, match="insufficientAccessRights"):
        read_topology(_FailingConn(), SUFFIX)
