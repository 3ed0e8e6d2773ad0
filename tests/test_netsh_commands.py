"""Every `netsh ipsec static` command end to end against a real server (one per module).

netsh runs in-process (main(argv) with capsys) for speed; tests share the module's
server, so each uses its own object names (`unique()`).
"""

from __future__ import annotations

import json
import re
import socket
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess
from google.protobuf import json_format

from clients.netsh import commands
from clients.netsh.main import main
from policyagent.pb import pb


@dataclass
class Run:
    code: int
    out: str
    err: str


Netsh = Callable[..., Run]


@pytest.fixture
def netsh(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> Iterator[Netsh]:
    def run(*words: str, json_output: bool = False) -> Run:
        capsys.readouterr()
        options = ["--json"] if json_output else []
        code = main(["-r", server.address, *options, "ipsec", "static", *words])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    yield run


def ok(result: Run) -> Run:
    assert result.code == 0, result.err
    assert result.err == ""
    return result


def fails(result: Run, message: str, code: int = 1) -> Run:
    assert result.code == code, (result.out, result.err)
    assert result.err.count("\n") == 1, result.err
    assert message in result.err, result.err
    return result


def has(out: str, label: str, value: str, indent: int = 0) -> bool:
    """Whether a "Label : value" line is in show output (labels are padded to a column)."""
    pattern = rf"^ {{{indent}}}{re.escape(label)} *: {re.escape(value)}$"
    return re.search(pattern, out, re.MULTILINE) is not None


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def policy_json(netsh: Netsh, name: str) -> dict[str, Any]:
    data = json.loads(ok(netsh("show", "policy", f"name={name}", json_output=True)).out)
    (policy,) = data["policies"]
    assert isinstance(policy, dict)
    return policy


def list_json(netsh: Netsh, name: str) -> dict[str, Any]:
    (fl,) = json.loads(ok(netsh("show", "filterlist", f"name={name}", json_output=True)).out)["filter_lists"]
    assert isinstance(fl, dict)
    return fl


def action_json(netsh: Netsh, name: str) -> dict[str, Any]:
    (fa,) = json.loads(ok(netsh("show", "filteraction", f"name={name}", json_output=True)).out)["filter_actions"]
    assert isinstance(fa, dict)
    return fa


# ------------------------------------------------------------ policies


def test_add_policy_with_defaults_and_default_response_rule(netsh: Netsh) -> None:
    name = unique("Corp")
    ok(netsh("add", "policy", f"name={name}", "description=the corp"))
    p = policy_json(netsh, name)
    assert p["description"] == "the corp"
    assert p["polling_interval_minutes"] == 180
    assert p["isakmp"]["lifetime_minutes"] == 480
    assert [(m["encryption"], m["integrity"], m["dh_group"]) for m in p["isakmp"]["methods"]] == [
        ("CIPHER_3DES", "INTEGRITY_SHA1", "DH_GROUP_MODP1024"),
        ("CIPHER_3DES", "INTEGRITY_MD5", "DH_GROUP_MODP1024"),
        ("CIPHER_DES", "INTEGRITY_SHA1", "DH_GROUP_MODP768"),
        ("CIPHER_DES", "INTEGRITY_MD5", "DH_GROUP_MODP768"),
    ]
    rule = p["default_response_rule"]
    assert rule["active"] is True
    assert rule["auth_methods"] == [{"kerberos": {}}]
    methods = [
        ("esp", m["esp"]["encryption"], m["esp"]["integrity"]) if "esp" in m else ("ah", m["ah"]["integrity"])
        for m in rule["methods"]
    ]
    assert methods == [
        ("esp", "CIPHER_3DES", "INTEGRITY_SHA1"),
        ("esp", "CIPHER_3DES", "INTEGRITY_MD5"),
        ("esp", "CIPHER_DES", "INTEGRITY_SHA1"),
        ("esp", "CIPHER_DES", "INTEGRITY_MD5"),
        ("ah", "INTEGRITY_SHA1"),
        ("ah", "INTEGRITY_MD5"),
    ]
    assert all((m["lifetime_kb"], m["lifetime_seconds"]) == (100000, 3600) for m in rule["methods"])


def test_add_policy_isakmp_settings_and_mmpfs_forces_one_qm(netsh: Netsh) -> None:
    name = unique("Pfs")
    ok(
        netsh(
            "add",
            "policy",
            name,
            "mmsec=3DES-SHA1-3 AES256-SHA256-14",
            "mmlife=240",
            "qmpermm=7",
            "mmpfs=yes",
            "activatedefaultrule=no",
            "pollinginterval=30",
        )
    )
    p = policy_json(netsh, name)
    isakmp = p["isakmp"]
    assert [m["dh_group"] for m in isakmp["methods"]] == ["DH_GROUP_MODP2048", "DH_GROUP_MODP2048"]
    assert (isakmp["lifetime_minutes"], isakmp["qm_per_mm"], isakmp["master_key_pfs"]) == (240, 1, True)
    assert p["default_response_rule"]["active"] is False
    assert p["polling_interval_minutes"] == 30
    # netsh's group "3" is shown and dumped as 3 (MODP-2048, IKE group 14)
    shown = ok(netsh("show", "policy", name)).out
    assert has(shown, "Main Mode Security Methods", "3DES-SHA1-3 AES256-SHA256-3")
    assert "3 = High (2048), IKE group 14" in ok(netsh("show", "policy", name, "level=verbose")).out
    # with master key PFS on, qmpermm other than 1 is refused by the validator
    fails(netsh("set", "policy", name, "qmpermm=5"), f'policy "{name}": qmpermm: must be 1 when master key PFS')


def test_set_policy_rename_and_settings(netsh: Netsh) -> None:
    name, new = unique("Old"), unique("New")
    ok(netsh("add", "policy", name))
    ok(
        netsh(
            "set",
            "policy",
            f"name={name.upper()}",
            f"newname={new}",
            "description=d2",
            "mmlifetime=60",
            "activatedefaultrule=no",
        )
    )
    fails(netsh("show", "policy", f"name={name}"), f'there is no policy named "{name}"')
    p = policy_json(netsh, new)
    assert (p["description"], p["isakmp"]["lifetime_minutes"], p["default_response_rule"]["active"]) == (
        "d2",
        60,
        False,
    )
    ok(netsh("set", "policy", f"guid={p['id'].strip('{}').lower()}", "pollinginterval=5"))
    assert policy_json(netsh, new)["polling_interval_minutes"] == 5
    fails(netsh("set", "policy", "guid=nonsense", "description=x"), 'guid: "nonsense" is not a GUID')


def test_assign_moves_from_one_policy_to_another(netsh: Netsh) -> None:
    a, b = unique("A"), unique("B")
    ok(netsh("add", "policy", a, "assign=yes"))
    assert policy_json(netsh, a)["assigned"] is True
    ok(netsh("add", "policy", b))
    ok(netsh("set", "policy", b, "assign=yes"))
    assert policy_json(netsh, a)["assigned"] is False
    assert policy_json(netsh, b)["assigned"] is True
    fails(netsh("delete", "policy", b), f'policy "{b}" is assigned; unassign it before deleting it')
    ok(netsh("set", "policy", b, "assign=no"))
    ok(netsh("delete", "policy", b))


def test_gponame_is_refused_honestly(netsh: Netsh) -> None:
    name = unique("Gpo")
    ok(netsh("add", "policy", name))
    fails(netsh("set", "policy", name, "gponame=Default Domain Policy"), "gponame: assigning a policy to a Group")


def test_delete_policy_keeps_its_filter_lists_and_actions(netsh: Netsh) -> None:
    name, fl, fa = unique("P"), unique("FL"), unique("FA")
    ok(netsh("add", "filterlist", fl))
    ok(netsh("add", "filteraction", fa, "action=permit"))
    ok(netsh("add", "policy", name))
    ok(netsh("add", "rule", "name=r", f"policy={name}", f"filterlist={fl}", f"filteraction={fa}"))
    ok(netsh("delete", "policy", f"name={name}"))
    assert list_json(netsh, fl)["name"] == fl
    assert action_json(netsh, fa)["name"] == fa


# ------------------------------------------------------------ filter lists and filters


def test_filterlist_add_set_delete(netsh: Netsh) -> None:
    name, new = unique("List"), unique("Renamed")
    ok(netsh("add", "filterlist", f"name={name}", "description=first"))
    fails(netsh("add", "filterlist", name.lower()), f'filter list "{name.lower()}": name: another filter list is')
    ok(netsh("set", "filterlist", name, f"newname={new}", "description="))
    fl = list_json(netsh, new)
    assert fl["description"] == ""
    ok(netsh("delete", "filterlist", new))
    fails(netsh("delete", "filterlist", new), f'there is no filter list named "{new}"')


def test_add_filter_addresses_masks_protocols_ports(netsh: Netsh) -> None:
    fl = unique("Filters")
    ok(netsh("add", "filterlist", fl))
    ok(
        netsh(
            "add",
            "filter",
            f"filterlist={fl}",
            "srcaddr=me",
            "dstaddr=192.0.2.7",
            "proto=TCP",
            "dstport=443",
            "description=web",
        )
    )
    ok(netsh("add", "filter", f"filterlist={fl}", "srcaddr=me", "dstaddr=10.0.0.0", "dstmask=8", "mirrored=no"))
    ok(netsh("add", "filter", f"filterlist={fl}", "srcaddr=me", "dstaddr=10.9.9.9", "dstmask=255.255.255.255"))
    ok(
        netsh(
            "add",
            "filter",
            f"filterlist={fl}",
            "srcaddr=2001:db8::1",
            "dstaddr=2001:db8:1::",
            "dstmask=48",
            "protocol=17",
            "srcport=500",
            "dstport=4500",
        )
    )
    ok(netsh("add", "filter", f"filterlist={fl}", "srcaddr=dhcp", "dstaddr=me", "protocol=udp", "srcport=67"))
    filters = list_json(netsh, fl)["filters"]
    assert filters[0]["destination"] == {"kind": "ADDRESS_KIND_HOST", "ip": "192.0.2.7", "mask": "", "dns_name": ""}
    assert (filters[0]["protocol"], filters[0]["destination_port"], filters[0]["mirrored"]) == (6, 443, True)
    assert filters[1]["destination"]["kind"] == "ADDRESS_KIND_SUBNET"
    assert (filters[1]["destination"]["ip"], filters[1]["destination"]["mask"]) == ("10.0.0.0", "255.0.0.0")
    assert filters[1]["mirrored"] is False
    assert filters[2]["destination"]["kind"] == "ADDRESS_KIND_HOST"
    assert (filters[3]["destination"]["ip"], filters[3]["destination"]["mask"]) == ("2001:db8:1::", "48")
    assert filters[4]["source"]["kind"] == "ADDRESS_KIND_DHCP_SERVER"
    shown = ok(netsh("show", "filterlist", fl, "level=verbose")).out
    assert has(shown, "Source IP Address", "<My IP Address>", 2)
    assert has(shown, "Destination Mask", "255.0.0.0", 2)
    assert has(shown, "Source IP Address", "<DHCP Server>", 2)


def test_add_filter_refusals_name_the_setting(netsh: Netsh) -> None:
    fl = unique("Bad")
    ok(netsh("add", "filterlist", fl))
    base = (f"filterlist={fl}", "srcaddr=me")
    fails(netsh("add", "filter", *base, "dstaddr=10.0.0.300"), 'dstaddr: "10.0.0.300" is not a valid IPv4 address')
    fails(
        netsh("add", "filter", *base, "dstaddr=10.0.0.0", "dstmask=255.0.255.0"), 'dstmask: mask "255.0.255.0" is not'
    )
    fails(
        netsh("add", "filter", *base, "dstaddr=10.0.0.1", "dstmask=255.0.0.0"),
        f'filter list "{fl}"/filter 1: dstmask: address 10.0.0.1 has bits set outside the mask',
    )
    fails(
        netsh("add", "filter", *base, "dstaddr=any", "protocol=icmp", "dstport=80"),
        f'filter list "{fl}"/filter 1: dstport: ports can only be given with protocol TCP or UDP',
    )
    fails(netsh("add", "filter", *base, "dstaddr=any", "protocol=300"), "protocol: protocol number 300 is out of range")
    fails(netsh("add", "filter", *base, "dstaddr=any", "dstmask=8"), "dstmask: a mask applies only to an IP address")
    fails(
        netsh("add", "filter", f"filterlist={fl}", "srcaddr=10.0.0.1", "dstaddr=2001:db8::1"),
        "dstaddr: source and destination must both be IPv4 or both IPv6",
    )
    fails(
        netsh("add", "filter", "filterlist=nope-list", "srcaddr=me", "dstaddr=any"), 'no filter list named "nope-list"'
    )
    ok(netsh("add", "filter", *base, "dstaddr=any"))
    fails(netsh("add", "filter", *base, "dstaddr=any"), f'filter list "{fl}"/filter 2: is the same as filter 1')
    assert len(list_json(netsh, fl)["filters"]) == 1


def test_add_filter_resolves_a_dns_name_once_into_one_filter_per_address(
    netsh: Netsh, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_getaddrinfo(host: str, *args: object, **kwargs: object) -> list[Any]:
        assert host == "web.example.test"
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::80", 0, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.81", 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.80", 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.80", 0)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    fl = unique("Dns")
    ok(netsh("add", "filterlist", fl))
    out = ok(netsh("add", "filter", f"filterlist={fl}", "srcaddr=me", "dstaddr=web.example.test")).out
    assert "Resolved web.example.test: added 3 filter(s)" in out
    dests = [f["destination"] for f in list_json(netsh, fl)["filters"]]
    assert [(d["kind"], d["ip"], d["dns_name"]) for d in dests] == [
        ("ADDRESS_KIND_HOST", "192.0.2.80", "web.example.test"),
        ("ADDRESS_KIND_HOST", "192.0.2.81", "web.example.test"),
        ("ADDRESS_KIND_HOST", "2001:db8::80", "web.example.test"),
    ]
    # with an IPv4 source, only the IPv4 addresses pair up
    fl2 = unique("Dns4")
    ok(netsh("add", "filterlist", fl2))
    ok(netsh("add", "filter", f"filterlist={fl2}", "srcaddr=192.0.2.1", "dstaddr=web.example.test"))
    assert len(list_json(netsh, fl2)["filters"]) == 2
    assert "Destination DNS Name" in ok(netsh("show", "filterlist", fl, "level=verbose")).out
    # delete filter by the DNS name removes every filter made from it
    out = ok(netsh("delete", "filter", f"filterlist={fl}", "srcaddr=me", "dstaddr=web.example.test")).out
    assert "Deleted 3 filter(s)" in out


def test_unresolvable_dns_name(netsh: Netsh, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    fl = unique("NoDns")
    ok(netsh("add", "filterlist", fl))
    fails(
        netsh("add", "filter", f"filterlist={fl}", "srcaddr=me", "dstaddr=nowhere.invalid"),
        'dstaddr: cannot resolve "nowhere.invalid": Name or service not known',
    )


def test_delete_filter_matches_given_fields_and_counts(netsh: Netsh) -> None:
    fl = unique("Del")
    ok(netsh("add", "filterlist", fl))
    for args in (
        ("dstaddr=192.0.2.1", "protocol=tcp", "dstport=80"),
        ("dstaddr=192.0.2.1", "protocol=tcp", "dstport=443"),
        ("dstaddr=192.0.2.1", "protocol=udp", "dstport=53"),
        ("dstaddr=198.51.100.0", "dstmask=24"),
        ("dstaddr=198.51.100.0",),
        ("dstaddr=192.0.2.2",),
    ):
        ok(netsh("add", "filter", f"filterlist={fl}", "srcaddr=me", *args))
    base = (f"filterlist={fl}", "srcaddr=me")
    fails(netsh("delete", "filter", *base, "dstaddr=192.0.2.9"), f'no filter in filter list "{fl}" matches')
    out = ok(netsh("delete", "filter", *base, "dstaddr=192.0.2.1", "protocol=tcp")).out
    assert out == f'Deleted 2 filter(s) from filter list "{fl}".\n'
    assert "Deleted 1 filter(s)" in ok(netsh("delete", "filter", *base, "dstaddr=192.0.2.1", "mirrored=yes")).out
    # without a mask the host and the subnet with that address both match; with one, only that one
    assert "Deleted 1 filter(s)" in ok(netsh("delete", "filter", *base, "dstaddr=198.51.100.0", "dstmask=24")).out
    ok(netsh("add", "filter", *base, "dstaddr=198.51.100.0", "dstmask=255.255.255.0"))
    assert "Deleted 2 filter(s)" in ok(netsh("delete", "filter", *base, "dstaddr=198.51.100.0")).out
    assert [f["destination"]["ip"] for f in list_json(netsh, fl)["filters"]] == ["192.0.2.2"]


# ------------------------------------------------------------ filter actions


def test_filteraction_add_set_and_action_changes(netsh: Netsh) -> None:
    name = unique("Act")
    ok(
        netsh(
            "add",
            "filteraction",
            name,
            "qmsec=ESP[AES256,SHA256]:50000k/1800s AH[SHA1]+ESP[3DES,SHA1]",
            "qmpfs=yes",
            "inpass=yes",
            "soft=yes",
        )
    )
    fa = action_json(netsh, name)
    assert fa["action"] == "ACTION_TYPE_NEGOTIATE"
    assert (fa["session_key_pfs"], fa["inbound_passthrough"], fa["fallback_to_clear"]) == (True, True, True)
    assert fa["methods"][0] == {
        "esp": {"encryption": "CIPHER_AES256", "integrity": "INTEGRITY_SHA256"},
        "lifetime_kb": 50000,
        "lifetime_seconds": 1800,
    }
    assert set(fa["methods"][1]) == {"ah", "esp", "lifetime_kb", "lifetime_seconds"}
    # switching to permit drops the negotiation settings; back to negotiate starts from the table's methods
    ok(netsh("set", "filteraction", name, "action=permit"))
    fa = action_json(netsh, name)
    assert (fa["action"], fa["methods"], fa["inbound_passthrough"]) == ("ACTION_TYPE_PERMIT", [], False)
    ok(netsh("set", "filteraction", name, "action=negotiate"))
    assert len(action_json(netsh, name)["methods"]) == 4
    fails(
        netsh("set", "filteraction", name, "action=block", "inpass=yes"),
        f'filter action "{name}": inpass: applies only to negotiate actions, not block',
    )
    fails(
        netsh("add", "filteraction", unique("x"), "action=permit", "qmsecmethods=ESP[3DES,SHA1]"),
        "qmsecmethods: only negotiate actions have security methods, not permit",
    )
    fails(
        netsh("add", "filteraction", unique("x"), "qmsecmethods=ESP[3DES,SHA1]:100k/3600s"),
        "qmsecmethods: lifetime 100 KB is out of range",
    )
    fails(
        netsh("add", "filteraction", unique("x"), "qmsecmethods=ESP[RC4,SHA1]"),
        'qmsecmethods: "ESP[RC4,SHA1]": unknown encryption algorithm "RC4"',
    )
    shown = ok(netsh("show", "filteraction", name, "level=verbose")).out
    assert "ESP[3DES,SHA1]:100000k/3600s" in shown


def test_delete_filteraction_in_use_is_refused(netsh: Netsh) -> None:
    policy, fl, fa = unique("P"), unique("FL"), unique("FA")
    ok(netsh("add", "filterlist", fl))
    ok(netsh("add", "filteraction", fa))
    ok(netsh("add", "policy", policy))
    ok(netsh("add", "rule", "name=r", f"policy={policy}", f"filterlist={fl}", f"filteraction={fa}"))
    fails(netsh("delete", "filteraction", fa), f'filter action "{fa}" is used by policy "{policy}"/rule 1 ("r")')
    fails(netsh("delete", "filterlist", fl), f'filter list "{fl}" is used by policy "{policy}"/rule 1 ("r")')


# ------------------------------------------------------------ rules


@pytest.fixture
def policy_with_objects(netsh: Netsh) -> tuple[str, str, str]:
    policy, fl, fa = unique("RP"), unique("RFL"), unique("RFA")
    ok(netsh("add", "filterlist", fl))
    ok(
        netsh(
            "add",
            "filter",
            f"filterlist={fl}",
            "srcaddr=10.1.0.0",
            "srcmask=16",
            "dstaddr=10.2.0.0",
            "dstmask=16",
            "mirrored=no",
        )
    )
    ok(netsh("add", "filteraction", fa))
    ok(netsh("add", "policy", policy))
    return policy, fl, fa


def test_add_rule_defaults_to_kerberos_and_keeps_auth_order(netsh: Netsh, policy_with_objects: tuple[str, ...]) -> None:
    policy, fl, fa = policy_with_objects
    ok(netsh("add", "rule", "name=plain", f"policy={policy}", f"filterl={fl}", f"filtera={fa}"))
    ok(
        netsh(
            "add",
            "rule",
            "name=mixed",
            f"policy={policy}",
            f"filterl={fl}",
            f"filtera={fa}",
            "psk=s3cret",
            "rootca=CN=Root CA, O=Example certmap:yes excludecaname:yes",
            "kerberos=yes",
            "rootca=CN=Second",
            "tunnel=198.51.100.7",
            "conntype=lan",
            "activate=no",
            "description=tunnelled",
        )
    )
    rules = policy_json(netsh, policy)["rules"]
    assert rules[0]["auth_methods"] == [{"kerberos": {}}]
    assert (rules[0]["connection_type"], rules[0]["active"]) == ("CONNECTION_TYPE_ALL", True)
    assert rules[1]["auth_methods"] == [
        {"preshared_key": {"key": "********"}},
        {"certificate": {"root_ca": "CN=Root CA, O=Example", "cert_to_account_mapping": True, "exclude_ca_name": True}},
        {"kerberos": {}},
        {"certificate": {"root_ca": "CN=Second", "cert_to_account_mapping": False, "exclude_ca_name": False}},
    ]
    assert (rules[1]["tunnel_endpoint"], rules[1]["connection_type"], rules[1]["active"]) == (
        "198.51.100.7",
        "CONNECTION_TYPE_LAN",
        False,
    )
    shown = ok(netsh("show", "rule", "all", f"policy={policy}")).out
    assert "Preshared Key: ********" in shown and "s3cret" not in shown
    assert has(shown, "Rule ID", f"3, GUID = {policy_json(netsh, policy)['default_response_rule']['id']}")
    assert has(shown, "Filter List", "<Dynamic>") and has(shown, "Filter Action", "Default Response")
    tunnels = ok(netsh("show", "rule", f"policy={policy}", "type=tunnel")).out
    assert has(tunnels, "Rule Name", "mixed") and "plain" not in tunnels


def test_set_rule_by_id_replaces_auth_and_tunnel(netsh: Netsh, policy_with_objects: tuple[str, ...]) -> None:
    policy, fl, fa = policy_with_objects
    other = unique("Other FA")
    ok(netsh("add", "filteraction", other, "action=permit"))
    for n in ("one", "two"):
        ok(
            netsh(
                "add",
                "rule",
                f"name={n}",
                f"policy={policy}",
                f"filterlist={fl}",
                f"filteraction={fa}",
                "tunnel=192.0.2.99",
            )
        )
    ok(netsh("set", "rule", "id=2", f"policy={policy}", "psk=k1", "kerberos=yes", "newname=second"))
    ok(netsh("set", "rule", "name=ONE", f"policy={policy}", "tunnel=none", f"filteraction={other}", "kerberos=no"))
    rules = policy_json(netsh, policy)["rules"]
    assert rules[1]["name"] == "second"
    assert rules[1]["auth_methods"] == [{"preshared_key": {"key": "********"}}, {"kerberos": {}}]
    assert (rules[0]["tunnel_endpoint"], rules[0]["auth_methods"]) == ("", [])
    assert rules[0]["filter_action_id"] == action_json(netsh, other)["id"]
    fails(netsh("set", "rule", "id=9", f"policy={policy}", "activate=no"), f'policy "{policy}" has no rule 9')
    fails(netsh("set", "rule", "id=3", f"policy={policy}", "activate=no"), "use set defaultrule")
    fails(netsh("set", "rule", "name=one", f"policy={policy}", "rootca=CN=A", "rootca=CN=A"), "rootca: is listed twice")
    fails(
        netsh("add", "rule", "name=x", f"policy={policy}", "filterlist=no such list", f"filteraction={fa}"),
        'there is no filter list named "no such list"',
    )
    fails(
        netsh("add", "rule", "name=Second", f"policy={policy}", f"filterlist={fl}", f"filteraction={fa}"),
        f'policy "{policy}"/rule 3: name: rule 2 is already named "Second"',
    )


def test_delete_rule_and_the_default_rule_is_protected(netsh: Netsh, policy_with_objects: tuple[str, ...]) -> None:
    policy, fl, fa = policy_with_objects
    for n in ("a", "b", "c"):
        ok(netsh("add", "rule", f"name={n}", f"policy={policy}", f"filterlist={fl}", f"filteraction={fa}"))
    fails(
        netsh("delete", "rule", "name=Default Response", f"policy={policy}"),
        "the default response rule is not a rule you can delete",
    )
    fails(netsh("delete", "rule", "id=4", f"policy={policy}"), f'use set defaultrule policy="{policy}"')
    ok(netsh("delete", "rule", "id=2", f"policy={policy}"))
    assert [r["name"] for r in policy_json(netsh, policy)["rules"]] == ["a", "c"]
    ok(netsh("delete", "rule", "all", f"policy={policy}"))
    p = policy_json(netsh, policy)
    assert p["rules"] == [] and p["default_response_rule"]["active"] is True


def test_set_defaultrule(netsh: Netsh) -> None:
    policy = unique("DR")
    ok(netsh("add", "policy", policy))
    ok(
        netsh(
            "set",
            "defaultrule",
            f"policy={policy}",
            "activate=no",
            "qmpfs=yes",
            "qmsec=ESP[3DES,SHA1]",
            "psk=abc",
            "kerberos=yes",
        )
    )
    rule = policy_json(netsh, policy)["default_response_rule"]
    assert rule["active"] is False and rule["session_key_pfs"] is True
    assert len(rule["methods"]) == 1
    assert rule["auth_methods"] == [{"preshared_key": {"key": "********"}}, {"kerberos": {}}]
    fails(
        netsh("set", "defaultrule", f"policy={policy}", "kerberos=no"),
        f'policy "{policy}"/default response rule: kerberos: needs at least one authentication method',
    )


# ------------------------------------------------------------ show


def test_show_formats(netsh: Netsh) -> None:
    policy = unique("Show")
    ok(netsh("add", "policy", policy, "description=a long description that goes on and on and on"))
    ok(
        netsh(
            "add",
            "rule",
            "name=icmp",
            f"policy={policy}",
            "filterlist=All ICMP Traffic",
            "filteraction=Permit",
            "psk=hidden-key",
        )
    )
    listed = ok(netsh("show", "policy", policy)).out
    for label in (
        "Policy Name",
        "Description",
        "Store",
        "Last Modified",
        "GUID",
        "Master PFS",
        "Polling Interval",
        "Main Mode Life Time",
        "Main Mode Security Methods",
        "Assigned",
        "Rule ID",
        "Filter List",
        "Filter Action",
        "Authentication Methods",
        "Tunnel Setting",
        "Connection Type",
        "Active",
    ):
        assert f"\n{label}" in "\n" + listed, label
    assert "hidden-key" not in listed and "********" in listed
    normal = ok(netsh("show", "policy", policy, "level=normal")).out
    assert normal.replace(normal.split("Last Modified")[1].split("\n")[0], "") == listed.replace(
        listed.split("Last Modified")[1].split("\n")[0], ""
    )
    table = ok(netsh("show", "policy", policy, "format=table", "level=verbose")).out
    lines = table.splitlines()
    assert lines[0].split() == ["Policy", "Name", "Assigned", "Rules", "Last", "Modified"]
    assert set(lines[1]) <= {"-", " "}
    assert any(line.startswith("1   icmp") for line in lines)
    narrow = ok(netsh("show", "all", "format=table", "wide=no")).out
    assert "..." in narrow
    data = json.loads(ok(netsh("show", "rule", "name=icmp", f"policy={policy}", json_output=True)).out)
    assert data["policies"][0]["rules"][0]["auth_methods"] == [{"preshared_key": {"key": "********"}}]
    assert "default_response_rule" not in data["policies"][0]  # a message field: printed only when set
    everything = ok(netsh("show", "all", "level=verbose")).out
    assert "hidden-key" not in everything
    assert has(everything, "FilterList Name", "All ICMP Traffic")
    assert has(everything, "FilterAction Name", "Permit")
    assert "hidden-key" not in ok(netsh("show", "all", json_output=True)).out


# ------------------------------------------------------------ files and errors


def test_exportpolicy_writes_a_private_file(netsh: Netsh, tmp_path: Path) -> None:
    policy = unique("Exp")
    ok(netsh("add", "policy", policy))
    ok(
        netsh(
            "add",
            "rule",
            "name=r",
            f"policy={policy}",
            "filterlist=All IP Traffic",
            "filteraction=Require Security",
            "psk=exported secret",
        )
    )
    path = tmp_path / "out.ipsec"
    path.write_text("old")
    path.chmod(0o644)
    ok(netsh("exportpolicy", f"file={path}"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["format"] == "policyagent-ipsec-export"
    assert "exported secret" in path.read_text()  # a full backup, like Windows' .ipsec files


def test_importpolicy_errors(netsh: Netsh, tmp_path: Path) -> None:
    fails(netsh("importpolicy", f"file={tmp_path / 'missing.ipsec'}"), "No such file or directory")
    bad = tmp_path / "bad.ipsec"
    bad.write_text('{"format": "something else"}')
    fails(netsh("importpolicy", str(bad)), "is not a policyagent export file")


def test_local_validation_reports_what_the_server_would(netsh: Netsh, monkeypatch: pytest.MonkeyPatch) -> None:
    fl = unique("Same")
    ok(netsh("add", "filterlist", fl))
    bad = ("add", "filter", f"filterlist={fl}", "srcaddr=me", "dstaddr=any", "protocol=icmp", "dstport=7")
    local = fails(netsh(*bad), "ports can only be given")
    # Without the client's check the server refuses with the same one-line message.
    monkeypatch.setattr(commands, "plan_writes", lambda view, mutations: None)
    remote = fails(netsh(*bad), "ports can only be given")
    assert local.err == remote.err
    policy = unique("Dup")
    ok(netsh("add", "policy", policy))
    assert netsh("add", "policy", policy.lower()).err.endswith(f'another policy is already named "{policy.lower()}"\n')


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    assert main(["-r", f"127.0.0.1:{port}", "ipsec", "static", "show", "all"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"netsh: cannot reach the policy server at 127.0.0.1:{port}")
    assert "policyagent server" in err and err.count("\n") == 1


def test_debug_shows_a_traceback(netsh: Netsh, server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-r", server.address, "--debug", "ipsec", "static", "show", "policy", "name=no such"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith('netsh: there is no policy named "no such"')


def test_server_from_environment(
    netsh: Netsh, server: ServerProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POLICYAGENT_SERVER", server.address)
    assert main(["ipsec", "static", "show", "policy", "name=Client (Respond Only)"]) == 0
    assert "Client (Respond Only)" in capsys.readouterr().out


def test_json_output_parses_as_store_contents(netsh: Netsh) -> None:
    contents = json_format.Parse(ok(netsh("show", "all", json_output=True)).out, pb.StoreContents())
    assert {p.name for p in contents.policies} >= {"Client (Respond Only)", "Server (Request Security)"}
    assert {fl.name for fl in contents.filter_lists} >= {"All IP Traffic", "All ICMP Traffic"}
