"""[MS-GPIPSEC] policies in a real Active Directory (a throwaway Samba AD DC, tests/samba.py).

Windows' own sample policies, which every new domain holds, import and are the objects our defaults
stand for; the three defaults published into `CN=IP Security,CN=System` read back identical and,
imported into a fresh store, give the same objects; a GPO assignment is written the way Windows
writes it (pointer object, client-side extension, version) and read back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ldap3 import BASE
from samba import SambaDc, samba_unavailable, start_samba

from policyagent.directory import adstore
from policyagent.model.defaults import default_contents
from policyagent.model.exportfmt import export_file
from policyagent.pb import admin_pb, pb
from policyagent.server.admin import import_policies
from policyagent.store.sqlite import SqliteStore

_why = samba_unavailable()
pytestmark = [
    pytest.mark.skipif(_why is not None, reason=_why or ""),
    # ldap3 2.9.1 checks valid_names with ssl.match_hostname, which Python 3.7+ deprecates
    pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning"),
]

SERVER = "{72385230-70FA-11D1-864C-14A300000000}"
SECURE = "{7238523C-70FA-11D1-864C-14A300000000}"
IPSEC_CSE_PAIR = "[{E437BC1C-AA7D-11D2-A382-00C04F991E27}{DEA8AFA0-CC85-11D0-9CE2-0080C7221EBD}]"


@pytest.fixture(scope="module")
def dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDc]:
    server = start_samba(tmp_path_factory.mktemp("samba"))
    yield server
    server.stop()


@pytest.fixture
def conn(dc: SambaDc) -> Iterator[Any]:
    c = dc.connection()
    yield c
    c.unbind()


def _by_name(c: pb.StoreContents) -> pb.StoreContents:
    """Store order aside: the same objects, each list sorted by name then id, without store bookkeeping."""
    out = pb.StoreContents()
    for field in ("policies", "filter_lists", "filter_actions"):
        for obj in sorted(getattr(c, field), key=lambda o: (o.name.casefold(), o.id)):
            copy = getattr(out, field).add()
            copy.CopyFrom(obj)
            copy.ClearField("revision")
            copy.ClearField("modified_unix_ms")
            if field == "policies":
                copy.ClearField("assigned")
    return out


def _shape(c: pb.StoreContents) -> dict[str, object]:
    """Which object is which: names by id, and each policy's rules as (filter list, filter action) ids."""
    return {
        "policies": {p.id: p.name for p in c.policies},
        "rules": {p.id: sorted((r.filter_list_id, r.filter_action_id) for r in p.rules) for p in c.policies},
        "default rules": {p.id: p.default_response_rule.id for p in c.policies},
        "filter lists": {f.id: f.name for f in c.filter_lists},
        "filter actions": {f.id: f.name for f in c.filter_actions},
    }


def test_the_defaults_published_to_ad_read_back_identical_and_import_identically(
    conn: Any, dc: SambaDc, tmp_path: Path
) -> None:
    defaults = default_contents()
    # A new domain already holds Windows' own three sample policies (Samba's provision copies them, with
    # the Windows 2000 ipsecDataType 598): they import, and they are the objects our defaults stand for.
    builtin = adstore.read_policies(conn, dc.base_dn)
    assert _shape(builtin) == _shape(defaults)

    result = adstore.publish(conn, dc.base_dn, defaults, None)
    assert result.modified and not result.deleted, result  # the built-ins, replaced by ours
    # Published again unchanged: nothing to do.
    assert str(adstore.publish(conn, dc.base_dn, defaults, None)) == "0 added, 0 modified, 0 deleted"

    read = adstore.read_policies(conn, dc.base_dn, [p.id for p in defaults.policies])
    assert _by_name(read) == _by_name(defaults)

    store = SqliteStore(tmp_path / "fresh.db")
    try:
        assert not store.snapshot()[0].policies  # a fresh store is empty until seeded
        import_policies(store, admin_pb.ImportRequest(file=export_file(read)), "test")
        imported, _ = store.snapshot()
    finally:
        store.close()
    assert _by_name(imported) == _by_name(defaults)


def test_a_gpo_assignment_is_written_as_windows_writes_it(conn: Any, dc: SambaDc) -> None:
    defaults = default_contents()
    adstore.publish(conn, dc.base_dn, defaults, None)
    gpo = dc.create_gpo("IPsec servers")
    gpo_dn = dc.gpo_dn(gpo)
    assert adstore.gpo_assignment(conn, dc.base_dn, gpo) is None

    server = next(p for p in defaults.policies if p.id == SERVER)
    adstore.assign_gpo(conn, dc.base_dn, gpo, server)
    assert adstore.gpo_assignment(conn, dc.base_dn, gpo) == SERVER
    assert conn.search(gpo_dn, "(objectClass=*)", BASE, attributes=["gPCMachineExtensionNames", "versionNumber"])
    attrs = conn.response[0]["attributes"]
    assert IPSEC_CSE_PAIR in str(attrs["gPCMachineExtensionNames"])
    version = int(attrs["versionNumber"])
    assert version & 0xFFFF == 1 and version >> 16 == 0  # the machine half bumped, the user half kept
    pointer = f"CN=IPSEC,CN=Windows,CN=Microsoft,CN=Machine,{gpo_dn}"
    assert conn.search(pointer, "(objectClass=ipsecPolicy)", BASE, attributes=["ipsecOwnersReference", "ipsecName"])
    assert conn.response[0]["attributes"]["ipsecName"] == "Server (Request Security)"

    secure = next(p for p in defaults.policies if p.id == SECURE)
    adstore.assign_gpo(conn, dc.base_dn, gpo, secure)
    assert adstore.gpo_assignment(conn, dc.base_dn, gpo) == SECURE
    adstore.assign_gpo(conn, dc.base_dn, gpo, None)
    assert adstore.gpo_assignment(conn, dc.base_dn, gpo) is None
    assert conn.search(gpo_dn, "(objectClass=*)", BASE, attributes=["gPCMachineExtensionNames", "versionNumber"])
    attrs = conn.response[0]["attributes"]
    assert IPSEC_CSE_PAIR not in str(attrs.get("gPCMachineExtensionNames") or "")
    assert int(attrs["versionNumber"]) & 0xFFFF == 3
