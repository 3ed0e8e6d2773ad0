"""The throwaway Samba AD DC fixture (tests/samba.py): LDAPS with CA validation, the [MS-GPIPSEC]
ipsec* schema and IP Security container of a real AD, and policyagent.directory.connector reading
OUs, computers, GPOs, links and uSNChanged-based changes from it."""

from __future__ import annotations

import dataclasses
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from samba import SambaDc, samba_unavailable, start_samba

from policyagent.directory.connector import (
    DirectoryConfig,
    changes_since_usn,
    connect,
    read_gpos,
    read_topology,
)
from policyagent.model.assignment import canonical_dn

_why = samba_unavailable()
pytestmark = [
    pytest.mark.skipif(_why is not None, reason=_why or ""),
    # ldap3 2.9.1 checks valid_names with ssl.match_hostname, which Python 3.7+ deprecates
    pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning"),
]

if _why is None:
    import ldap3  # already imported (warnings silenced) by samba_unavailable()

# Created by `samba-tool domain provision`, as on every AD domain.
DEFAULT_DOMAIN_POLICY = "{31B2F340-016D-11D2-945F-00C04FB984F9}"
DEFAULT_DC_POLICY = "{6AC1786C-016F-11D2-945F-00C04FB984F9}"
# [MS-GPIPSEC]: the ipsecDataType that every ipsec* object carries with its ipsecData blob.
IPSEC_DATA_TYPE = 256


@pytest.fixture(scope="module")
def dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDc]:
    server = start_samba(tmp_path_factory.mktemp("samba"))
    yield server
    server.stop()


def _entry(conn: Any, dn: str, attributes: list[str]) -> dict[str, Any]:
    assert conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=attributes), conn.result
    return dict(conn.response[0]["attributes"])


def test_ldaps_simple_bind_validates_the_ca_and_name(dc: SambaDc) -> None:
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(dc.ca_file), valid_names=[dc.tls_name])
    conn = ldap3.Connection(
        ldap3.Server(dc.url_ldaps, use_ssl=True, tls=tls, get_info=ldap3.DSA), dc.admin_user, dc.admin_password,
        auto_bind=True,
    )
    assert conn.bound
    assert conn.server.info.other["defaultNamingContext"] == [dc.base_dn]
    assert "Samba" in conn.server.info.vendor_name[0]
    conn.unbind()
    # The certificate names the DC, not its address: without valid_names, validation fails.
    bare = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(dc.ca_file))
    with pytest.raises(ldap3.core.exceptions.LDAPSocketOpenError):
        ldap3.Connection(ldap3.Server(dc.url_ldaps, use_ssl=True, tls=bare), dc.admin_user, dc.admin_password,
                         auto_bind=True)
    # Like AD, a plain-text simple bind is refused.
    with pytest.raises(ldap3.core.exceptions.LDAPBindError):
        ldap3.Connection(ldap3.Server(dc.url_ldap), dc.admin_user, dc.admin_password, auto_bind=True)


def test_ip_security_container_and_ipsec_schema(dc: SambaDc) -> None:
    conn = dc.connection()
    container = f"CN=IP Security,CN=System,{dc.base_dn}"
    assert "container" in _entry(conn, container, ["objectClass"])["objectClass"]
    # Samba's AD schema carries the [MS-GPIPSEC] classes.
    schema = f"CN=Schema,CN=Configuration,{dc.base_dn}"
    for name in ("ipsecPolicy", "ipsecISAKMPPolicy", "ipsecNFA", "ipsecFilter", "ipsecNegotiationPolicy"):
        assert conn.search(schema, f"(&(objectClass=classSchema)(lDAPDisplayName={name}))", attributes=["cn"]), name

    guid = "{" + str(uuid.uuid4()) + "}"
    dn = f"CN=ipsecFilter{guid},{container}"
    blob = bytes(range(256)) + b"\x00\xff" * 7  # every byte value, NULs included
    assert conn.add(
        dn,
        ["top", "ipsecBase", "ipsecFilter"],
        {"ipsecData": blob, "ipsecDataType": IPSEC_DATA_TYPE, "ipsecName": "All IP traffic", "ipsecID": guid},
    ), conn.result
    try:
        got = _entry(conn, dn, ["ipsecData", "ipsecDataType", "ipsecName", "ipsecID", "objectClass"])
        data = got["ipsecData"]
        assert (data[0] if isinstance(data, list) else data) == blob
        assert got["ipsecDataType"] == IPSEC_DATA_TYPE
        assert got["ipsecName"] == "All IP traffic"
        assert got["ipsecID"] == guid
        assert "ipsecFilter" in got["objectClass"]
    finally:
        assert conn.delete(dn), conn.result
    assert not conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE)
    conn.unbind()


def test_ous_and_computers(dc: SambaDc) -> None:
    top = dc.add_ou(f"OU=Lab,{dc.base_dn}")
    inner = dc.add_ou(f"OU=Servers,{top}")
    dn = dc.add_computer(inner, "lab1", "lab1.example.test")
    conn = dc.connection()
    got = _entry(conn, dn, ["sAMAccountName", "dNSHostName", "userAccountControl", "objectSid", "objectGUID",
                            "servicePrincipalName"])
    assert got["sAMAccountName"] == "LAB1$"
    assert got["dNSHostName"] == "lab1.example.test"
    assert got["userAccountControl"] == 0x1000
    assert str(got["objectSid"]).startswith("S-1-5-21-")  # assigned by the DC
    assert sorted(got["servicePrincipalName"]) == ["HOST/LAB1", "HOST/lab1.example.test"]
    with pytest.raises(ValueError):
        dc.add_ou(f"CN=NotAnOu,{dc.base_dn}")


def test_read_topology_sees_computers_ous_gpos_and_links(dc: SambaDc) -> None:
    servers = dc.add_ou(f"OU=Servers,{dc.base_dn}")
    desktops = dc.add_ou(f"OU=Desktops,{dc.base_dn}")
    dc.add_computer(servers, "srv1", "srv1.example.test")
    dc.add_computer(desktops, "ws1", "ws1.example.test")
    ipsec = dc.create_gpo("IPsec servers")
    baseline = dc.create_gpo("Server baseline")
    dc.link_gpo(servers, baseline)
    gplink = dc.link_gpo(servers, ipsec, enforced=True)
    assert gplink.startswith(f"[LDAP://cn={ipsec},cn=policies,cn=system,{dc.base_dn};2][LDAP://cn={baseline},")
    # What the GPMC creates, and AD needs, is there.
    conn = dc.connection()
    gpo = _entry(conn, dc.gpo_dn(ipsec), ["displayName", "flags", "versionNumber", "gPCFunctionalityVersion",
                                         "gPCFileSysPath"])
    assert gpo["gPCFileSysPath"] == f"\\\\example.test\\SysVol\\example.test\\Policies\\{ipsec}"
    assert (gpo["flags"], gpo["versionNumber"], gpo["gPCFunctionalityVersion"]) == (0, 0, 2)
    for child in ("User", "Machine"):
        _entry(conn, f"CN={child},{dc.gpo_dn(ipsec)}", ["cn"])

    topology = read_topology(conn, dc.base_dn)
    computers = {c.name: c for c in topology.computers}
    assert computers["srv1"].ou == canonical_dn(servers)
    assert computers["ws1"].ou == canonical_dn(desktops)
    assert computers["srv1"].domain == "example.test"
    assert computers["dc1"].ou == canonical_dn(f"OU=Domain Controllers,{dc.base_dn}")
    assert {canonical_dn(servers), canonical_dn(desktops)} <= {o.dn for o in topology.ous}
    names = {g.id: g.name for g in topology.gpos}
    assert names[ipsec] == "IPsec servers"
    assert names[DEFAULT_DOMAIN_POLICY] == "Default Domain Policy"
    assert all(g.enabled for g in topology.gpos)
    links = {(lk.scope, lk.gpo): lk for lk in topology.links}
    # Linked last, hence prepended: the lowest precedence, link order 2.
    last = links[(f"ou:{canonical_dn(servers)}", ipsec)]
    assert (last.order, last.enforced, last.enabled) == (2, True, True)
    first = links[(f"ou:{canonical_dn(servers)}", baseline)]
    assert (first.order, first.enforced, first.enabled) == (1, False, True)
    assert (f"domain:{dc.domain}", DEFAULT_DOMAIN_POLICY) in links  # linked by provisioning
    assert (f"ou:{canonical_dn(f'OU=Domain Controllers,{dc.base_dn}')}", DEFAULT_DC_POLICY) in links
    assert not any(g.ipsec for g in read_gpos(conn, dc.base_dn) if g.id == ipsec)  # no IPsec CSE yet


def test_disabled_link(dc: SambaDc) -> None:
    ou = dc.add_ou(f"OU=Kiosks,{dc.base_dn}")
    guid = dc.create_gpo("Kiosk lockdown")
    dc.link_gpo(ou, guid, disabled=True)
    links = {(lk.scope, lk.gpo): lk for lk in read_topology(dc.connection(), dc.base_dn).links}
    link = links[(f"ou:{canonical_dn(ou)}", guid)]
    assert (link.order, link.enforced, link.enabled) == (1, False, False)


def test_moving_a_computer_shows_in_changes_since_usn_and_a_reread(dc: SambaDc) -> None:
    old_ou = dc.add_ou(f"OU=Old,{dc.base_dn}")
    new_ou = dc.add_ou(f"OU=New,{dc.base_dn}")
    dn = dc.add_computer(old_ou, "mover", "mover.example.test")
    conn = dc.connection()
    usn, changed = changes_since_usn(conn, dc.base_dn, 0)
    assert usn > 0 and changed == []
    assert changes_since_usn(conn, dc.base_dn, usn) == (usn, [])

    moved = dc.move(dn, new_ou)
    assert moved == f"CN=mover,{new_ou}"
    new_usn, changed = changes_since_usn(conn, dc.base_dn, usn)
    assert new_usn > usn
    assert [d.lower() for d in changed] == [moved.lower()]
    computers = {c.name: c for c in read_topology(conn, dc.base_dn).computers}
    assert computers["mover"].ou == canonical_dn(new_ou)
    assert changes_since_usn(conn, dc.base_dn, new_usn) == (new_usn, [])


def test_changes_since_usn_on_a_connection_with_the_schema(dc: SambaDc) -> None:
    """connect() loads the schema; highestCommittedUSN, a rootDSE attribute, is not in it."""
    conn = dc.connection(schema=True)
    usn, _ = changes_since_usn(conn, dc.base_dn, 0)
    assert usn > 0


def test_connector_connect_over_ldaps_by_address(dc: SambaDc) -> None:
    """The URL gives the DC's address; its certificate names DC1.example.test: tls_name says which to expect."""
    config = DirectoryConfig(dc.url_ldaps, dc.base_dn, "simple", dc.admin_user, dc.admin_password, str(dc.ca_file))
    with pytest.raises(ldap3.core.exceptions.LDAPSocketOpenError):
        connect(config)  # validated against the address: refused
    conn = connect(dataclasses.replace(config, tls_name=dc.tls_name))
    assert conn.bound
    conn.unbind()


# ldap3 parses the server certificate for channel binding; Samba's generated one has serial number 0.
@pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")
def test_kerberos_sasl_gssapi_bind_over_ldaps(dc: SambaDc, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gssapi = pytest.importorskip("gssapi")
    monkeypatch.setenv("KRB5_CONFIG", str(dc.krb5_conf))  # the DC's KDC, no DNS lookups
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{tmp_path / 'ccache'}")
    user = gssapi.Name(f"Administrator@{dc.realm}", gssapi.NameType.kerberos_principal)
    creds = gssapi.raw.acquire_cred_with_password(user, dc.admin_password.encode(), usage="initiate").creds
    conn = ldap3.Connection(
        ldap3.Server(dc.url_ldaps, use_ssl=True, tls=dc.tls()),
        authentication=ldap3.SASL,
        sasl_mechanism=ldap3.KERBEROS,
        sasl_credentials=(dc.tls_name.lower(), None, gssapi.Credentials(creds)),  # target ldap/dc1.example.test
        auto_bind=True,
    )
    assert conn.bound
    assert conn.search(dc.admin_dn, "(objectClass=user)", search_scope=ldap3.BASE, attributes=["cn"])
    conn.unbind()


@pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")
def test_connector_gssapi_bind_with_the_process_credentials(
    dc: SambaDc, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """connect(bind="gssapi") with the ticket cache kinit filled; the DC's address in the URL, its name in
    tls_name (the certificate's name and the service principal's host)."""
    pytest.importorskip("gssapi")
    monkeypatch.setenv("KRB5_CONFIG", str(dc.krb5_conf))
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{tmp_path / 'ccache'}")
    if shutil.which("kinit") is None:
        pytest.skip("kinit (krb5-user) is not installed")
    kinit = subprocess.run(
        ["kinit", f"Administrator@{dc.realm}"], input=dc.admin_password + "\n", capture_output=True, text=True
    )
    assert kinit.returncode == 0, kinit.stderr
    config = DirectoryConfig(dc.url_ldaps, dc.base_dn, "gssapi", ca_file=str(dc.ca_file), tls_name=dc.tls_name)
    conn = connect(config)
    assert conn.bound
    assert {c.name for c in read_topology(conn, dc.base_dn).computers} >= {"dc1"}
    conn.unbind()


def test_stop_removes_processes_and_namespace(tmp_path: Path) -> None:
    server = start_samba(tmp_path / "dc")
    assert server.connection().bound
    assert server.pid in server.processes()
    netns, veth = server.netns, server.veth
    server.stop()
    assert server.processes() == []
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode != 0


def test_connector_starttls_and_sites(dc: SambaDc) -> None:
    """Simple bind after StartTLS on 389 (the DC refuses it in clear), and the sites under
    CN=Sites,CN=Configuration with a GPO linked to one."""
    config = DirectoryConfig(
        dc.url_ldap, dc.base_dn, "simple", dc.admin_user, dc.admin_password, str(dc.ca_file),
        tls_name=dc.tls_name, starttls=True,
    )
    conn = connect(config)
    assert conn.bound and conn.tls_started
    sites_base = f"CN=Sites,CN=Configuration,{dc.base_dn}"
    site = f"CN=Default-First-Site-Name,{sites_base}"
    gpo = dc.create_gpo("Site IPsec")
    dc.link_gpo(site, gpo, enforced=True)
    topology = read_topology(conn, dc.base_dn, sites_base=sites_base)
    assert "Default-First-Site-Name" in {s.name for s in topology.sites}
    (link,) = [lk for lk in topology.links if lk.gpo == gpo]
    assert (link.scope, link.enforced, link.enabled) == ("site:Default-First-Site-Name", True, True)
    conn.unbind()
