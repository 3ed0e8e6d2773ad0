"""The throwaway OpenLDAP fixture (tests/slapd.py): AD-like computers, GPO links and the
[MS-GPIPSEC] ipsec* objects round-trip through a real slapd with ldap3."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from slapd import Slapd, slapd_unavailable, start_slapd

_why = slapd_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

if _why is None:
    import ldap3  # already imported (warnings silenced) by slapd_unavailable()

IPSEC_CSE = "[{E437BC1C-AA7D-11D2-A382-00C04F991E27}{DEA8AFA0-CC85-11D0-9CE2-0080C7221EBD}]"
GPO_GUID = "{31B2F340-016D-11D2-945F-00C04FB984F9}"


@pytest.fixture(scope="module")
def ldap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    server = start_slapd(tmp_path_factory.mktemp("slapd"))
    yield server
    server.stop()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def _external(ldap: Slapd) -> Any:
    return ldap3.Connection(
        ldap3.Server(ldap.ldapi_url),
        authentication=ldap3.SASL,
        sasl_mechanism=ldap3.EXTERNAL,
        sasl_credentials="",  # without it ldap3 stops at saslBindInProgress
        auto_bind=True,
    )


def test_ou_tree_computers_and_gpo_link(ldap: Slapd) -> None:
    sites = ldap.add_ou(f"OU=Sites,{ldap.suffix}")
    servers = ldap.add_ou(f"OU=Servers,{sites}")
    workstations = ldap.add_ou(f"OU=Workstations,{sites}")
    ldap.add_computer(servers, "srv1", "srv1.example.test")
    ldap.add_computer(servers, "srv2", "srv2.example.test")
    ldap.add_computer(workstations, "ws1", "ws1.example.test")

    conn = ldap.connection()
    policies = f"CN=Policies,CN=System,{ldap.suffix}"
    assert conn.add(f"CN=System,{ldap.suffix}", ["container"], {"cn": "System"})
    assert conn.add(policies, ["container"], {"cn": "Policies"})
    gpo_dn = f"CN={GPO_GUID},{policies}"
    assert conn.add(
        gpo_dn,
        ["groupPolicyContainer"],
        {
            "displayName": "IPsec servers",
            "versionNumber": 1,
            "flags": 0,
            "gPCFunctionalityVersion": 2,
            "gPCFileSysPath": rf"\\example.test\SysVol\example.test\Policies\{GPO_GUID}",
            "gPCMachineExtensionNames": IPSEC_CSE,
        },
    ), conn.result
    link = f"[LDAP://{gpo_dn};0]"
    assert conn.modify(servers, {"gPLink": [(ldap3.MODIFY_REPLACE, [link])], "gPOptions": [(ldap3.MODIFY_REPLACE, [0])]})

    # sAMAccountName has an EQUALITY rule (msuser.schema's alone has none) and is case-insensitive
    conn.search(ldap.suffix, "(&(objectClass=computer)(sAMAccountName=srv1$))", attributes=["dNSHostName", "objectSid"])
    assert len(conn.entries) == 1
    assert conn.entries[0].dNSHostName.value == "srv1.example.test"
    assert conn.entries[0].entry_dn.lower() == f"cn=srv1,{servers}".lower()
    # one level under the OU, and the "not disabled" bit filter AD clients use
    conn.search(servers, "(&(objectClass=computer)(!(userAccountControl:1.2.840.113556.1.4.803:=2)))",
                search_scope=ldap3.LEVEL, attributes=["sAMAccountName"])
    assert sorted(e.sAMAccountName.value for e in conn.entries) == ["SRV1$", "SRV2$"]
    conn.search(ldap.suffix, "(dNSHostName=ws1.example.test)", attributes=["servicePrincipalName"])
    assert sorted(conn.entries[0].servicePrincipalName.values) == ["HOST/WS1", "HOST/ws1.example.test"]

    # the OU carrying a link to the GPO, found by GUID substring as a connector would
    conn.search(ldap.suffix, f"(gPLink=*{GPO_GUID.lower()}*)", attributes=["gPLink", "gPOptions"])
    assert [e.entry_dn.lower() for e in conn.entries] == [servers.lower()]
    assert conn.entries[0].gPLink.value == link and conn.entries[0].gPOptions.value == 0
    conn.search(policies, "(&(objectClass=groupPolicyContainer)(gPCMachineExtensionNames=*E437BC1C-AA7D-11D2*))",
                attributes=["versionNumber", "gPCMachineExtensionNames", "modifyTimestamp", "entryCSN"])
    assert len(conn.entries) == 1
    gpo = conn.entries[0]
    assert gpo.versionNumber.value == 1 and gpo.gPCMachineExtensionNames.value == IPSEC_CSE
    assert gpo.entryCSN.value  # change detection uses entryCSN / modifyTimestamp (no uSNChanged here)
    conn.unbind()


def test_sasl_external_over_ldapi(ldap: Slapd) -> None:
    conn = _external(ldap)
    assert conn.extend.standard.who_am_i() == f"dn:gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth"
    conn.search(ldap.suffix, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["objectClass", "contextCSN"])
    assert len(conn.entries) == 1
    if ldap.syncprov:
        assert conn.entries[0].contextCSN.values  # syncprov keeps the suffix's contextCSN
    # the peercred identity may write (manage access)
    ou = f"OU=ExternalWrites,{ldap.suffix}"
    assert conn.add(ou, ["organizationalUnit", "gPLinkAux"], {"ou": "ExternalWrites"}), conn.result
    assert conn.delete(ou)
    conn.unbind()


def test_ipsec_objects_round_trip(ldap: Slapd) -> None:
    conn = ldap.connection()
    container = f"CN=IP Security,CN=System,{ldap.suffix}"
    if not conn.search(f"CN=System,{ldap.suffix}", "(objectClass=*)", search_scope=ldap3.BASE):
        assert conn.add(f"CN=System,{ldap.suffix}", ["container"], {"cn": "System"})
    assert conn.add(container, ["container"], {"cn": "IP Security"}), conn.result

    guids = {
        "ipsecPolicy": "{11111111-0000-4000-8000-000000000001}",
        "ipsecISAKMPPolicy": "{11111111-0000-4000-8000-000000000002}",
        "ipsecNFA": "{11111111-0000-4000-8000-000000000003}",
        "ipsecNegotiationPolicy": "{11111111-0000-4000-8000-000000000004}",
        "ipsecFilter": "{11111111-0000-4000-8000-000000000005}",
    }
    dn = {cls: f"CN={cls}{guid},{container}" for cls, guid in guids.items()}
    # every byte value, NULs and a blob larger than typical policies
    data = {cls: bytes(range(256)) * (i + 1) + cls.encode() + b"\x00" for i, cls in enumerate(guids)}
    refs: dict[str, dict[str, Any]] = {
        "ipsecPolicy": {"ipsecISAKMPReference": dn["ipsecISAKMPPolicy"], "ipsecNFAReference": [dn["ipsecNFA"]]},
        "ipsecISAKMPPolicy": {"ipsecOwnersReference": [dn["ipsecPolicy"]]},
        "ipsecNFA": {
            "ipsecOwnersReference": [dn["ipsecPolicy"]],
            "ipsecNegotiationPolicyReference": dn["ipsecNegotiationPolicy"],
            "ipsecFilterReference": [dn["ipsecFilter"]],
        },
        "ipsecNegotiationPolicy": {
            "ipsecOwnersReference": [dn["ipsecNFA"]],
            "iPSECNegotiationPolicyType": "{62f49e10-6c37-11d1-864c-14a300000000}",
            "iPSECNegotiationPolicyAction": "{3f91a819-7647-11d1-864d-d46a00000000}",
        },
        "ipsecFilter": {"ipsecOwnersReference": [dn["ipsecNFA"]]},
    }
    for cls, guid in guids.items():
        attrs = {
            "cn": f"{cls}{guid}",
            "ipsecName": f"test {cls}",
            "description": f"a {cls}",
            "ipsecID": guid,
            "ipsecDataType": 256,
            "ipsecData": data[cls],
            **refs[cls],
        }
        assert conn.add(dn[cls], [cls], attrs), (cls, conn.result)

    for cls in guids:
        conn.search(container, f"(&(objectClass={cls})(ipsecID={guids[cls].upper()}))",
                    attributes=["ipsecData", "ipsecDataType", "ipsecName"])
        assert len(conn.entries) == 1, cls
        entry = conn.entries[0]
        assert entry.entry_raw_attributes["ipsecData"] == [data[cls]], cls
        assert entry.ipsecDataType.value == 256 and entry.ipsecName.value == f"test {cls}"

    # references are DNs with distinguishedNameMatch: find the NFAs owned by the policy, in any case spelling
    conn.search(container, f"(&(objectClass=ipsecNFA)(ipsecOwnersReference={dn['ipsecPolicy'].lower()}))",
                attributes=["ipsecFilterReference", "ipsecNegotiationPolicyReference"])
    assert len(conn.entries) == 1
    # slapd returns DN values in its pretty form (attribute types in lower case): compare case-insensitively
    assert [v.lower() for v in conn.entries[0].ipsecFilterReference.values] == [dn["ipsecFilter"].lower()]
    assert conn.entries[0].ipsecNegotiationPolicyReference.value.lower() == dn["ipsecNegotiationPolicy"].lower()
    conn.search(container, "(iPSECNegotiationPolicyType={62F49E10-6C37-11D1-864C-14A300000000})", attributes=["cn"])
    assert len(conn.entries) == 1
    # ipsecData is single-valued, as in AD
    assert not conn.modify(dn["ipsecFilter"], {"ipsecData": [(ldap3.MODIFY_ADD, [b"second"])]})
    conn.unbind()


@pytest.mark.slow
def test_paged_search_of_2000_computers(ldap: Slapd) -> None:
    fleet = ldap.add_ou(f"OU=Fleet,{ldap.suffix}")
    t = time.monotonic()
    for i in range(2000):
        ldap.add_computer(fleet, f"pc{i:04d}", f"pc{i:04d}.example.test")
    added = time.monotonic() - t

    # not the rootdn: subject to the AD-like 1000-entry limit without paging
    conn = _external(ldap)
    conn.search(fleet, "(objectClass=computer)", attributes=["cn"])
    assert conn.result["description"] == "sizeLimitExceeded" and len(conn.entries) == 1000
    t = time.monotonic()
    entries = list(conn.extend.standard.paged_search(
        fleet, "(objectClass=computer)", attributes=["sAMAccountName", "dNSHostName"], paged_size=500, generator=True))
    searched = time.monotonic() - t
    names = sorted(e["attributes"]["sAMAccountName"] for e in entries if e["type"] == "searchResEntry")
    assert len(names) == 2000 and names[0] == "PC0000$" and names[-1] == "PC1999$"
    conn.unbind()
    print(f"2000 adds {added:.2f}s, paged search {searched:.2f}s")


def test_start_is_fast_and_stop_leaves_no_process(tmp_path: Path) -> None:
    t = time.monotonic()
    server = start_slapd(tmp_path / "one", suffix="DC=other,DC=test")
    conn = server.connection()
    conn.search(server.suffix, "(objectClass=*)", search_scope=ldap3.BASE)
    elapsed = time.monotonic() - t
    assert len(conn.entries) == 1 and conn.entries[0].entry_dn.lower() == "dc=other,dc=test"
    conn.unbind()
    assert _alive(server.pid)
    server.stop()
    assert not _alive(server.pid)
    assert not [p for p in _pids() if _alive(p) and str(tmp_path) in _cmdline(p)]
    print(f"start to first search {elapsed:.3f}s")
    assert elapsed < 5  # ~0.1 s here; generous for loaded CI machines
