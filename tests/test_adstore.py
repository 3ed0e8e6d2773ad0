"""[MS-GPIPSEC] Active Directory layout: model ↔ entries, LDIF, and publish / read / assign against slapd."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from gpipsec_vectors import SET_A, W2K_FILTER
from slapd import Slapd, slapd_unavailable, start_slapd

from policyagent.directory import adstore as a
from policyagent.directory import gpipsec as g
from policyagent.model.defaults import default_contents
from policyagent.pb import pb

BASE = "DC=example,DC=test"
CONTAINER = f"CN=IP Security,CN=System,{BASE}"
SERVER = "{72385230-70FA-11D1-864C-14A300000000}"  # Server (Request Security)
SECURE = "{7238523C-70FA-11D1-864C-14A300000000}"  # Secure Server (Require Security)
CLIENT = "{72385236-70FA-11D1-864C-14A300000000}"  # Client (Respond Only)
ALL_IP = "{7238523A-70FA-11D1-864C-14A300000000}"
PSK = "correct horse battery staple"


class ByDn(dict[str, a.Entry]):
    """Entries by DN, looked up case-insensitively (slapd returns "cn=..." for "CN=...")."""

    def __getitem__(self, dn: str) -> a.Entry:
        return super().__getitem__(a.dn_key(dn))

    def __contains__(self, dn: object) -> bool:
        return super().__contains__(a.dn_key(str(dn)))


def by_dn(entries: list[a.Entry]) -> ByDn:
    return ByDn({a.dn_key(e.dn): e for e in entries})


def data(e: a.Entry) -> bytes:
    (value,) = e.get("ipsecData")
    assert isinstance(value, bytes)
    return value


def keys(dns: Any) -> list[str]:
    return [a.dn_key(str(d)) for d in dns]


def dn(cls: str, guid: str) -> str:
    return f"CN={cls}{guid},{CONTAINER}"


def sorted_contents(c: pb.StoreContents) -> pb.StoreContents:
    out = pb.StoreContents()
    for field in ("policies", "filter_lists", "filter_actions"):
        getattr(out, field).extend(sorted(getattr(c, field), key=lambda o: (o.name.casefold(), o.id)))
    return out


def custom_contents() -> pb.StoreContents:
    """PSK, certificate and Kerberos auth; transport and IPv4/IPv6 tunnel rules; permit, block, negotiate with
    PFS and fallback; non-GUID and lower-case ids; host/subnet/server-keyword filters."""
    c = pb.StoreContents()
    web = c.filter_lists.add(id="web-servers", name="Web servers", description="to the web farm")
    web.filters.add(
        id="{11111111-2222-3333-4444-555555555555}",
        description="https",
        mirrored=False,
        source=pb.Address(kind=pb.ADDRESS_KIND_ME),
        destination=pb.Address(kind=pb.ADDRESS_KIND_SUBNET, ip="192.0.2.0", mask="255.255.255.0"),
        protocol=6,
        destination_port=443,
    )
    web.filters.add(
        id="{11111111-2222-3333-4444-555555555556}",
        mirrored=False,
        source=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip="198.51.100.7", dns_name="app.example.test"),
        destination=pb.Address(kind=pb.ADDRESS_KIND_DNS_SERVERS),
        protocol=17,
        source_port=53,
    )
    c.filter_actions.add(id="{aaaaaaaa-0000-0000-0000-000000000001}", name="Let through", action=pb.ACTION_TYPE_PERMIT)
    c.filter_actions.add(id="drop", name="Drop", action=pb.ACTION_TYPE_BLOCK)
    neg = c.filter_actions.add(
        id="{AAAAAAAA-0000-0000-0000-000000000003}",
        name="Strong",
        description="AH+ESP with PFS",
        action=pb.ACTION_TYPE_NEGOTIATE,
        inbound_passthrough=True,
        fallback_to_clear=True,
        session_key_pfs=True,
    )
    neg.methods.add(
        ah=pb.AhTransform(integrity=pb.INTEGRITY_SHA1),
        esp=pb.EspTransform(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1),
        lifetime_kb=50000,
        lifetime_seconds=900,
    )
    neg.methods.add(esp=pb.EspTransform(encryption=pb.CIPHER_DES, integrity=pb.INTEGRITY_NONE))
    p = c.policies.add(id="branch-policy", name="Branch", description="tunnels", polling_interval_minutes=45)
    p.isakmp.lifetime_minutes = 60
    p.isakmp.qm_per_mm = 1
    p.isakmp.master_key_pfs = True
    p.isakmp.methods.add(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1, dh_group=pb.DH_GROUP_MODP2048)
    p.isakmp.methods.add(encryption=pb.CIPHER_DES, integrity=pb.INTEGRITY_MD5, dh_group=pb.DH_GROUP_MODP768)
    auth = [
        pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key=PSK)),
        pb.AuthMethod(
            certificate=pb.CertificateAuth(
                root_ca="CN=Corp Root CA,O=Example", cert_to_account_mapping=True, exclude_ca_name=True
            )
        ),
        pb.AuthMethod(certificate=pb.CertificateAuth(root_ca="CN=Other Root")),
        pb.AuthMethod(kerberos=pb.KerberosAuth()),
    ]
    p.rules.add(
        id="{bbbbbbbb-0000-0000-0000-000000000001}",
        name="To the farm",
        description="IPv4 tunnel",
        filter_list_id="web-servers",
        filter_action_id="{AAAAAAAA-0000-0000-0000-000000000003}",
        auth_methods=auth,
        tunnel_endpoint="203.0.113.9",
        connection_type=pb.CONNECTION_TYPE_LAN,
        active=True,
    )
    p.rules.add(
        id="rule-v6-tunnel",
        name="IPv6 tunnel",
        filter_list_id="web-servers",
        filter_action_id="drop",
        tunnel_endpoint="2001:db8::9",
        connection_type=pb.CONNECTION_TYPE_REMOTE_ACCESS,
        active=False,
    )
    p.rules.add(
        id="{BBBBBBBB-0000-0000-0000-000000000003}",
        name="Permit",
        filter_list_id="web-servers",
        filter_action_id="{aaaaaaaa-0000-0000-0000-000000000001}",
        auth_methods=[pb.AuthMethod(kerberos=pb.KerberosAuth())],
        connection_type=pb.CONNECTION_TYPE_ALL,
        active=True,
    )
    drr = p.default_response_rule
    drr.id = "branch-default"
    drr.active = False
    drr.session_key_pfs = True
    drr.methods.add(esp=pb.EspTransform(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_MD5), lifetime_seconds=300)
    drr.auth_methods.append(pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key=PSK)))
    return c


# ============================================================================= pure mapping


def test_defaults_round_trip_and_layout() -> None:
    contents = default_contents()
    entries = a.policy_entries(contents, None, BASE)
    assert a.contents_from_entries(entries) == contents
    assert all(e.dn.endswith("," + CONTAINER) for e in entries)
    assert [a._ipsec_class(e) for e in entries] == sorted(
        (a._ipsec_class(e) for e in entries), key=lambda c: a._RANK[c or ""]
    )
    d = by_dn(entries)
    server = d[dn("ipsecPolicy", SERVER)]
    assert server.get("ipsecID") == (SERVER,) and server.get("ipsecDataType") == ("256",)
    assert server.get("ipsecName") == ("Server (Request Security)",)
    assert g.decode_policy(data(server)).polling_interval == 10800
    assert server.get("ipsecNFAReference") == (
        dn("ipsecNFA", "{72385232-70FA-11D1-864C-14A300000000}"),
        dn("ipsecNFA", "{594272E2-071D-11D3-AD22-0060B0ECCA17}"),
        dn("ipsecNFA", "{59319BE2-5EE3-11D2-ACE8-0060B0ECCA17}"),  # the default response rule, last
    )
    (isakmp,) = server.get("ipsecISAKMPReference")
    assert d[str(isakmp)].get("ipsecOwnersReference") == (server.dn,)
    # the filter list shared by the Server and Secure Server rules: once, owned by both NFAs
    all_ip = d[dn("ipsecFilter", ALL_IP)]
    assert set(all_ip.get("ipsecOwnersReference")) == {
        dn("ipsecNFA", "{72385232-70FA-11D1-864C-14A300000000}"),
        dn("ipsecNFA", "{7238523E-70FA-11D1-864C-14A300000000}"),
    }
    drr = d[dn("ipsecNFA", "{59319BE2-5EE3-11D2-ACE8-0060B0ECCA17}")]
    assert drr.get("ipsecFilterReference") == ()
    (drr_negpol,) = drr.get("ipsecNegotiationPolicyReference")
    assert d[str(drr_negpol)].get("iPSECNegotiationPolicyType") == ("{62F49E13-6C37-11D1-864C-14A300000000}",)
    assert d[str(drr_negpol)].get("iPSECNegotiationPolicyAction") == ("{8A171DD3-77E3-11D1-8659-A04F00000000}",)
    permit = d[dn("ipsecNegotiationPolicy", "{7238523B-70FA-11D1-864C-14A300000000}")]
    assert permit.get("iPSECNegotiationPolicyType") == ("{62F49E10-6C37-11D1-864C-14A300000000}",)
    assert permit.get("iPSECNegotiationPolicyAction") == ("{8A171DD2-77E3-11D1-8659-A04F00000000}",)
    # "Request Security (Optional)": inbound pass-through + the soft (fallback) offer after the six methods
    optional = d[dn("ipsecNegotiationPolicy", "{72385233-70FA-11D1-864C-14A300000000}")]
    assert optional.get("iPSECNegotiationPolicyAction") == ("{3F91A81A-7647-11D1-864D-D46A00000000}",)
    offers = g.decode_negotiation_policy(data(optional)).security_offers
    assert len(offers) == 7 and offers[-1].algorithms == ()


def test_selected_policies_only_and_the_objects_they_use() -> None:
    entries = a.policy_entries(default_contents(), [CLIENT], BASE)
    classes = [a._ipsec_class(e) for e in entries]
    assert classes == ["ipsecPolicy", "ipsecISAKMPPolicy", "ipsecNFA", "ipsecNegotiationPolicy"]
    back = a.contents_from_entries(entries)
    assert [p.id for p in back.policies] == [CLIENT] and not back.filter_lists and not back.filter_actions
    with pytest.raises(a.DirectoryPolicyError, match="not in the contents"):
        a.policy_entries(default_contents(), ["{00000000-0000-0000-0000-000000000000}"], BASE)


def test_custom_policy_round_trip() -> None:
    contents = custom_contents()
    entries = a.policy_entries(contents, None, BASE)
    assert a.contents_from_entries(entries) == contents
    d = by_dn(entries)
    # non-GUID ids: derived GUIDs in the RDN, the model id in ipsecID; GUID ids kept as they are
    derived = a.object_guid("branch-policy")
    assert derived == uuid.uuid5(a._NAMESPACE, "branch-policy")
    assert d[a.object_dn("ipsecPolicy", derived, BASE)].get("ipsecID") == ("branch-policy",)
    lower = dn("ipsecNFA", "{BBBBBBBB-0000-0000-0000-000000000001}")
    assert d[lower].get("ipsecID") == ("{bbbbbbbb-0000-0000-0000-000000000001}",)
    nfa = g.decode_nfa(data(d[lower]))
    assert [m.auth_type for m in nfa.auth_methods] == [g.AUTH_PSK, g.AUTH_CERTIFICATE, g.AUTH_CERTIFICATE, 5]
    assert nfa.auth_methods[0].text == PSK
    assert nfa.alt_auth is not None and nfa.alt_auth.flags == (0, 3, 0, 0)
    assert (str(nfa.tunnel_address), nfa.is_tunnel_specifier, nfa.interface_type) == ("203.0.113.9", 1, g.INTERFACE_LAN)
    v6 = g.decode_nfa(data(d[a.object_dn("ipsecNFA", a.object_guid("rule-v6-tunnel"), BASE)]))
    assert str(v6.ipv6_tunnel_mode_address) == "2001:db8::9" and v6.is_active_specifier == 0
    # the pre-shared key is in the blob (as Windows stores it) but never in a repr or an error
    assert PSK not in repr(entries) and PSK.encode("utf-16-le") not in repr(entries).encode()


def test_equivalent_spellings_read_back_canonically() -> None:
    contents = custom_contents()
    contents.policies[0].isakmp.ike_version = 1
    contents.filter_lists[0].filters[0].destination.mask = "24"
    contents.filter_lists[0].filters[1].source.mask = "255.255.255.255"
    back = a.contents_from_entries(a.policy_entries(contents, None, BASE))
    assert back.policies[0].isakmp.ike_version == 0
    assert back.filter_lists[0].filters[0].destination.mask == "255.255.255.0"
    assert back.filter_lists[0].filters[1].source.mask == ""


def _refused(contents: pb.StoreContents, *fragments: str) -> str:
    with pytest.raises(a.DirectoryPolicyError) as info:
        a.policy_entries(contents, None, BASE)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert PSK not in message
    return message


def test_what_the_blobs_cannot_carry_is_refused() -> None:
    c = default_contents()
    c.policies[1].isakmp.ike_version = 2
    _refused(c, 'policy "Server (Request Security)"', SERVER, "isakmp", "IKEv2")

    c = custom_contents()
    c.filter_lists[0].filters[0].destination.ip = "2001:db8::"
    c.filter_lists[0].filters[0].destination.mask = "32"
    _refused(c, 'filter list "Web servers" web-servers', "IPv4")

    c = custom_contents()
    c.filter_actions[2].methods[1].esp.encryption = pb.CIPHER_AES256
    _refused(c, 'filter action "Strong"', "ESP")

    c = custom_contents()
    c.filter_actions[1].session_key_pfs = True  # on a block action: nowhere to store it
    _refused(c, 'filter action "Drop"', "session_key_pfs")

    c = custom_contents()
    c.policies[0].rules[2].connection_type = pb.CONNECTION_TYPE_UNSPECIFIED
    _refused(c, 'policy "Branch" branch-policy/rule 3 "Permit"', "connection type")

    c = custom_contents()
    c.policies[0].rules[0].tunnel_endpoint = "gw.example.test"
    _refused(c, 'rule 1 "To the farm"', "not an IP address")

    c = custom_contents()
    c.policies[0].isakmp.methods[0].dh_group = pb.DH_GROUP_ECP256
    _refused(c, "branch-policy/isakmp", "main-mode method 0")

    c = custom_contents()
    c.policies[0].polling_interval_minutes = 0
    _refused(c, "polling interval 0")

    # caught by reading the entries back: a /32 subnet would come back as a host
    c = custom_contents()
    c.filter_lists[0].filters[0].destination.mask = "255.255.255.255"
    _refused(c, 'filter list "Web servers"', "without loss", "filters[0].destination.kind")

    c = custom_contents()
    c.policies[0].rules[1].filter_list_id = "nowhere"
    _refused(c, "rule 2", "filter list nowhere is not in the contents")

    c = custom_contents()
    c.policies[0].rules[2].id = "rule-v6-tunnel"
    _refused(c, "duplicate id")

    c = custom_contents()
    c.filter_lists[0].filters[1].id = ""
    _refused(c, "filter 2", "no id")


def _entries_with(entries: list[a.Entry], target: str, **attrs: tuple[Any, ...]) -> list[a.Entry]:
    out = []
    for e in entries:
        if e.dn == target:
            new = dict(e.attributes)
            for k, v in attrs.items():
                if v:
                    new[k] = v
                else:
                    new.pop(k, None)
            e = a.Entry(e.dn, new)
        out.append(e)
    return out


def test_corrupt_directory_data_is_an_error_naming_the_dn() -> None:
    entries = a.policy_entries(default_contents(), None, BASE)
    nfa = dn("ipsecNFA", "{72385232-70FA-11D1-864C-14A300000000}")
    blob = data(by_dn(entries)[nfa])
    with pytest.raises(a.DirectoryPolicyError, match=r"ipsecNFA\{72385232.*ipsecData.*truncated"):
        a.contents_from_entries(_entries_with(entries, nfa, ipsecData=(blob[:40],)))
    with pytest.raises(a.DirectoryPolicyError, match=r"ipsecNFA\{72385232.*ipsecNegotiationPolicyReference"):
        a.contents_from_entries(_entries_with(entries, nfa, ipsecNegotiationPolicyReference=(f"CN=nowhere,{BASE}",)))
    with pytest.raises(a.DirectoryPolicyError, match="Interface-Type"):
        bad = g.encode_nfa(g.IpsecNfaData((), interface_type=7))
        a.contents_from_entries(_entries_with(entries, nfa, ipsecData=(bad,)))


def test_other_data_types_are_read_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Windows 2000's built-in objects (and Samba's copies) carry ipsecDataType 598; readers go by the blob."""
    entries = a.policy_entries(default_contents(), None, BASE)
    w2k = [a.Entry(e.dn, {**e.attributes, "ipsecDataType": ("598",)}) for e in entries]
    assert a.contents_from_entries(w2k) == default_contents()
    assert not caplog.records
    odd = _entries_with(entries, dn("ipsecPolicy", SERVER), ipsecDataType=("1",))
    assert a.contents_from_entries(odd) == default_contents()
    assert "ipsecPolicy{72385230" in caplog.text and "ipsecDataType is 1" in caplog.text


def test_stray_objects_and_windows_2000_blobs_are_read() -> None:
    entries = a.policy_entries(default_contents(), None, BASE)
    stray = a.Entry(
        dn("ipsecNFA", "{6A1F5C6F-72B7-11D2-ACF0-0060B0ECCA17}"),
        {"objectClass": ("top", "ipsecBase", "ipsecNFA"), "ipsecData": (b"garbage",)},
    )
    pointer = a.Entry(f"CN=IPSEC,CN=Windows,{BASE}", {"objectClass": ("ipsecPolicy",)})
    container = a.Entry(CONTAINER, {"objectClass": ("container",)})
    assert a.contents_from_entries([container, stray, *entries, pointer]) == default_contents()

    # an AD-style entry in mixed case with the spec's stray spaces in DNs, Windows 2000 filter framing and an
    # NFA without the Alt-Auth extension
    nfa_blob = bytes.fromhex(SET_A["ipsecNFA{78e7557c-d821-4f61-9144-f089c30899f6}"])[:62] + b"\x00"
    w2k = [
        a.Entry(
            "cn=ipsecpolicy{e514e247-80c3-429a-8d69-74bd54feb31e}, CN=IP Security, CN=System, " + BASE,
            {
                "objectclass": ("top", "ipsecBase", "ipsecPolicy"),
                "IPSECID": ("{E514E247-80C3-429A-8D69-74BD54FEB31E}",),
                "ipsecname": ("Domain Isolation Policy",),
                "ipsecData": (bytes.fromhex(SET_A["ipsecPolicy{c0ccd3b2-2871-436c-be91-4e919c8b5aa0}"]),),
                "ipsecISAKMPReference": ("CN= ipsecISAKMPPolicy{12A63239-DFB6-4f7A-9E84-FEA90E81202A},CN=IP Security,"
                                         "CN=System," + BASE,),
                "ipsecNFAReference": (dn("ipsecNFA", "{116CA92D-D536-4A44-BDCE-17D8363ED949}"),),
            },
        ),
        a.Entry(
            dn("ipsecISAKMPPolicy", "{12A63239-DFB6-4F7A-9E84-FEA90E81202A}"),
            {
                "objectClass": ("ipsecISAKMPPolicy",),
                "ipsecData": (bytes.fromhex(SET_A["ipsecISAKMPPolicy{e627a7fc-634a-466b-bd85-4b84ffa02dee}"]),),
            },
        ),
        a.Entry(
            dn("ipsecNFA", "{116CA92D-D536-4A44-BDCE-17D8363ED949}"),
            {
                "objectClass": ("ipsecNFA",),
                "ipsecName": ("All Traffic Filters",),
                "ipsecData": (nfa_blob,),
                "ipsecFilterReference": (dn("ipsecFilter", "{2FE2FD79-0389-4D6C-8794-55C4D444DB31}"),),
                "ipsecNegotiationPolicyReference": (dn("ipsecNegotiationPolicy", "{72385233-70FA-11D1-864C-14A300000000}"),),
            },
        ),
        a.Entry(
            dn("ipsecNegotiationPolicy", "{72385233-70FA-11D1-864C-14A300000000}"),
            {
                "objectClass": ("ipsecNegotiationPolicy",),
                "iPSECNegotiationPolicyAction": ("{3f91a819-7647-11d1-864d-d46a00000000}",),
                "iPSECNegotiationPolicyType": ("{62f49e10-6c37-11d1-864c-14a300000000}",),
                "ipsecData": (bytes.fromhex(SET_A["ipsecNegotiationPolicy{c4b410bf-dd4c-4275-bedc-abd92cca3f19}"]),),
            },
        ),
        a.Entry(
            dn("ipsecFilter", "{2FE2FD79-0389-4D6C-8794-55C4D444DB31}"),
            {"objectClass": ("ipsecFilter",), "ipsecData": (bytes.fromhex(W2K_FILTER),)},
        ),
    ]
    got = a.contents_from_entries(w2k)
    (p,) = got.policies
    assert (p.id, p.name, p.polling_interval_minutes) == ("{E514E247-80C3-429A-8D69-74BD54FEB31E}", "Domain Isolation Policy", 180)
    (rule,) = p.rules
    assert rule.id == "{116CA92D-D536-4A44-BDCE-17D8363ED949}"  # no ipsecID: the RDN's GUID
    assert rule.connection_type == pb.CONNECTION_TYPE_REMOTE_ACCESS and rule.auth_methods[0].HasField("kerberos")
    assert rule.filter_list_id == "{2FE2FD79-0389-4D6C-8794-55C4D444DB31}"
    assert got.filter_lists[0].filters[0].destination.ip == "10.0.0.1"
    assert got.filter_actions[0].action == pb.ACTION_TYPE_BLOCK
    assert not p.HasField("default_response_rule")


# ============================================================================= LDIF


def test_ldif_round_trip() -> None:
    for contents in (default_contents(), custom_contents()):
        entries = a.policy_entries(contents, None, BASE)
        text = a.dump_ldif(entries)
        assert all(len(line) <= 76 for line in text.splitlines())
        assert a.load_ldif(text) == entries
        assert a.contents_from_entries(a.load_ldif(text, "x.ldif")) == contents
    odd = [
        a.Entry("CN=Ünïcode,DC=x", {"description": ("ends with space ", ":colon", "<lt", " lead", "ok", "é" * 80),
                                    "objectGUID": (b"\x00\x01",), "ipsecName": ("",)}),
    ]
    text = a.dump_ldif(odd)
    assert "dn:: " in text and "description: ok\n" in text and "ipsecName:\n" in text
    assert a.load_ldif(text) == odd


def test_ldif_parser_reads_comments_folding_and_base64() -> None:
    value = base64.b64encode(b"\x01\x02binary").decode()
    text = (
        "# a comment\n"
        "#  that is\n folded\n"
        "version: 1\n"
        "\n"
        "dn: CN=ipsecFilter{X},CN=IP Secu\n"
        " rity,DC=x\n"
        "objectClass: ipsecFilter\n"
        f"ipsecData:: {value}\n"
        "DESCRIPTION:   spaces before\n"
        "description:: " + base64.b64encode("zwei é".encode()).decode() + "\n"
        "\n\n"
        "dn:: " + base64.b64encode(b"CN=b,DC=x").decode() + "\r\n"
        "cn: b\r\n"
    )
    e1, e2 = a.load_ldif(text)
    assert e1.dn == "CN=ipsecFilter{X},CN=IP Security,DC=x"
    assert e1.get("ipsecData") == (b"\x01\x02binary",)
    assert e1.attributes["DESCRIPTION"] == ("spaces before", "zwei é")
    assert (e2.dn, e2.get("CN")) == ("CN=b,DC=x", ("b",))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("dn: CN=a,DC=x\nipsecData:: not*base64\n", "f.ldif:2:"),
        (" continued\n", "f.ldif:1:"),
        ("dn: CN=a,DC=x\nchangetype: modify\n", "f.ldif:2:"),
        ("cn: a\n", "f.ldif:1:"),
        ("dn: CN=a,DC=x\nno colon here\n", "f.ldif:2:"),
        ("dn: CN=a,DC=x\n\ndn: cn=A, dc=x\n", "f.ldif:3:"),
        ("version: 2\n\ndn: CN=a,DC=x\n", "f.ldif:1:"),
        ("dn: CN=a,DC=x\njpegPhoto:< file:///etc/passwd\n", "f.ldif:2:"),
        ("dn: CN=a,DC=x\ncn;lang-de: a\n", "f.ldif:2:"),
    ],
)
def test_ldif_errors_name_source_and_line(text: str, where: str) -> None:
    with pytest.raises(a.DirectoryPolicyError, match=f"^{where}"):
        a.load_ldif(text, "f.ldif")


# ============================================================================= pure planning


def test_publish_plan_adds_in_the_spec_order_with_references_set_afterwards() -> None:
    wanted = a.policy_entries(default_contents(), [SERVER], BASE)
    ops = a._plan_publish([], wanted)
    adds = [op for op in ops if op.kind == "add"]
    assert [a._ipsec_class(a.Entry(op.dn, op.attributes)) for op in adds] == [
        "ipsecPolicy", "ipsecISAKMPPolicy", "ipsecNFA", "ipsecNFA", "ipsecNFA",
        "ipsecNegotiationPolicy", "ipsecNegotiationPolicy", "ipsecNegotiationPolicy", "ipsecFilter", "ipsecFilter",
    ]
    for op in adds:
        assert not {"ipsecISAKMPReference", "ipsecNFAReference", "ipsecFilterReference",
                    "ipsecNegotiationPolicyReference"} & set(op.attributes)
    modifies = [op for op in ops if op.kind == "modify"]
    assert modifies[-1].dn == dn("ipsecPolicy", SERVER)
    assert set(modifies[-1].attributes) == {"ipsecISAKMPReference", "ipsecNFAReference"}
    assert a._plan_publish(wanted, wanted) == []


def test_machine_version_and_extension_names() -> None:
    assert a._bump_machine_version(b"0") == 1
    assert a._bump_machine_version(str((3 << 16) | 5).encode()) == (3 << 16) | 6
    assert a._bump_machine_version(str(0xFFFF).encode()) == 1
    assert a._bump_machine_version(str(-65536 + 4).encode()) == -65536 + 5  # user part 0xFFFF, 32-bit signed
    other = "[{35378EAC-683F-11D2-A89A-00C04FBBCFA2}{0F6B957E-509E-11D1-A7CC-0000F87571E3}]"
    groups = a._with_ipsec_extension(a._parse_extensions(other, "x"), True)
    assert "".join("[" + "".join(grp) + "]" for grp in groups) == other + a.IPSEC_CSE_GUID.join("[]")[:-1] + a.IPSEC_TOOL + "]"
    assert a._with_ipsec_extension(groups, True) == groups
    assert a._with_ipsec_extension(groups, False) == a._parse_extensions(other, "x")
    with pytest.raises(a.DirectoryPolicyError, match="does not parse"):
        a._parse_extensions("[{nope}]", "CN=gpo")


# ============================================================================= against slapd

_why = slapd_unavailable()
needs_slapd = pytest.mark.skipif(_why is not None, reason=_why or "")
GPO = "{31B2F340-016D-11D2-945F-00C04FB984F9}"
GPO_DN = f"CN={GPO},CN=Policies,CN=System,{BASE}"
# Two other client-side extensions, one sorting before and one after the IPsec CSE {E437BC1C-...}.
EXT_BEFORE = "[{35378EAC-683F-11D2-A89A-00C04FBBCFA2}{D02B1F72-3407-48AE-BA88-E8213C6761F1}]"
EXT_AFTER = "[{F3CCC681-B74C-4060-9F26-CD84525DCA2A}{0F3F3735-573D-9804-99E4-AB2A69BA5FD4}]"
IPSEC_PAIR = "[{E437BC1C-AA7D-11D2-A382-00C04F991E27}{DEA8AFA0-CC85-11D0-9CE2-0080C7221EBD}]"


@pytest.fixture
def ldap(tmp_path: Any) -> Iterator[Slapd]:
    server = start_slapd(tmp_path / "slapd", suffix=BASE)
    yield server
    server.stop()


@pytest.fixture
def conn(ldap: Slapd) -> Iterator[Any]:
    c = ldap.connection()
    yield c
    c.unbind()


def _dns(conn: Any) -> set[str]:
    return {e.dn.lower() for e in a.read_entries(conn, BASE)}


@needs_slapd
def test_publish_defaults_and_read_back(conn: Any) -> None:
    contents = default_contents()
    result = a.publish(conn, BASE, contents, None)
    assert len(result.added) == 2 + 21 and not result.deleted  # CN=System, CN=IP Security + 21 objects
    assert a.read_policies(conn, BASE) == sorted_contents(contents)
    assert all(isinstance(data(e), bytes) for e in a.read_entries(conn, BASE))
    assert str(a.publish(conn, BASE, contents, None)) == "0 added, 0 modified, 0 deleted"
    only = a.read_policies(conn, BASE, [SECURE])
    assert [p.id for p in only.policies] == [SECURE]
    assert {x.id for x in only.filter_lists} == {ALL_IP, "{72385235-70FA-11D1-864C-14A300000000}"}
    with pytest.raises(a.DirectoryPolicyError, match="not found in the directory"):
        a.read_policies(conn, BASE, ["{00000000-0000-0000-0000-000000000001}"])


@needs_slapd
def test_republish_after_deleting_a_rule_removes_exactly_that_nfa(conn: Any) -> None:
    contents = default_contents()
    a.publish(conn, BASE, contents, None)
    stray = dn("ipsecNFA", "{6A1F5C6F-72B7-11D2-ACF0-0060B0ECCA17}")
    assert conn.add(stray, ["ipsecNFA"], {"cn": "ipsecNFA{6A1F5C6F-72B7-11D2-ACF0-0060B0ECCA17}",
                                           "ipsecOwnersReference": [dn("ipsecPolicy", SERVER)]}), conn.result
    before = _dns(conn)
    server = next(p for p in contents.policies if p.id == SERVER)
    icmp_rule = server.rules.pop(1)  # "All ICMP Traffic" → Permit
    result = a.publish(conn, BASE, contents, [SERVER])
    removed = dn("ipsecNFA", icmp_rule.id)
    assert keys(result.deleted) == keys([removed]) and not result.added
    assert _dns(conn) == before - {removed.lower()}
    assert a.dn_key(dn("ipsecPolicy", SERVER)) in keys(result.modified)
    d = by_dn(a.read_entries(conn, BASE))
    # the shared ICMP filter list and the Permit action stay, owned only by Secure Server's ICMP rule
    secure_icmp = dn("ipsecNFA", "{594272FD-071D-11D3-AD22-0060B0ECCA17}")
    icmp = d[dn("ipsecFilter", "{72385235-70FA-11D1-864C-14A300000000}")]
    assert keys(icmp.get("ipsecOwnersReference")) == keys([secure_icmp])
    permit = d[dn("ipsecNegotiationPolicy", "{7238523B-70FA-11D1-864C-14A300000000}")]
    assert keys(permit.get("ipsecOwnersReference")) == keys([secure_icmp])
    assert a.read_policies(conn, BASE) == sorted_contents(contents)
    assert stray in d  # foreign objects are never touched


@needs_slapd
def test_delete_policy_keeps_shared_filters_while_referenced(conn: Any) -> None:
    contents = default_contents()
    a.publish(conn, BASE, contents, None)
    entries = by_dn(a.read_entries(conn, BASE))
    server = entries[dn("ipsecPolicy", SERVER)]
    (isakmp,) = server.get("ipsecISAKMPReference")
    drr_negpol = entries[dn("ipsecNFA", "{59319BE2-5EE3-11D2-ACE8-0060B0ECCA17}")].get("ipsecNegotiationPolicyReference")
    result = a.delete_policy(conn, BASE, SERVER)
    assert set(keys(result.deleted)) == set(
        keys([server.dn, isakmp, drr_negpol[0], *server.get("ipsecNFAReference")])
    )
    assert keys(result.deleted[-2:]) == keys([server.dn, isakmp])  # the policy after its NFAs, then its ISAKMP
    left = by_dn(a.read_entries(conn, BASE))
    all_ip = left[dn("ipsecFilter", ALL_IP)]  # still used by Secure Server
    assert keys(all_ip.get("ipsecOwnersReference")) == keys([dn("ipsecNFA", "{7238523E-70FA-11D1-864C-14A300000000}")])
    optional = left[dn("ipsecNegotiationPolicy", "{72385233-70FA-11D1-864C-14A300000000}")]
    assert optional.get("ipsecOwnersReference") == ()  # a filter action is first-class: kept, unowned
    expected = default_contents()
    del expected.policies[[p.id for p in expected.policies].index(SERVER)]
    assert a.read_policies(conn, BASE) == sorted_contents(expected)
    with pytest.raises(a.DirectoryPolicyError, match="not found"):
        a.delete_policy(conn, BASE, SERVER)


@needs_slapd
def test_custom_policy_through_the_directory_and_refusal_before_writing(conn: Any) -> None:
    contents = custom_contents()
    a.publish(conn, BASE, contents, None)
    assert a.read_policies(conn, BASE) == sorted_contents(contents)
    before = _dns(conn)
    bad = custom_contents()
    bad.policies[0].isakmp.ike_version = 2
    bad.policies[0].name = "Changed"
    with pytest.raises(a.DirectoryPolicyError, match="IKEv2"):
        a.publish(conn, BASE, bad, None)
    assert _dns(conn) == before and a.read_policies(conn, BASE).policies[0].name == "Branch"
    # a changed PSK only rewrites that NFA (and touches the policy so clients notice)
    contents.policies[0].rules[0].auth_methods[0].preshared_key.key = "another secret"
    result = a.publish(conn, BASE, contents, None)
    rule_dn = dn("ipsecNFA", "{BBBBBBBB-0000-0000-0000-000000000001}")
    assert set(keys(result.modified)) == set(keys([rule_dn, a.object_dn("ipsecPolicy", a.object_guid("branch-policy"), BASE)]))
    assert a.read_policies(conn, BASE) == sorted_contents(contents)


@needs_slapd
def test_assign_gpo(ldap: Slapd, conn: Any) -> None:
    contents = default_contents()
    a.publish(conn, BASE, contents, None)
    assert conn.add(f"CN=Policies,CN=System,{BASE}", ["container"], {"cn": "Policies"}), conn.result
    assert conn.add(GPO_DN, ["groupPolicyContainer"], {
        "cn": GPO, "displayName": "IPsec", "versionNumber": (3 << 16) | 5,
        "gPCMachineExtensionNames": EXT_AFTER + EXT_BEFORE}), conn.result
    assert a.gpo_assignment(conn, BASE, GPO) is None
    server = next(p for p in contents.policies if p.id == SERVER)
    a.assign_gpo(conn, BASE, GPO.lower(), server)

    def gpo() -> tuple[str, int]:
        assert conn.search(GPO_DN, "(objectClass=*)", attributes=["gPCMachineExtensionNames", "versionNumber"])
        attrs = conn.entries[0].entry_attributes_as_dict
        ext = attrs.get("gPCMachineExtensionNames") or [""]
        return ext[0], int(attrs["versionNumber"][0])

    assert gpo() == (EXT_BEFORE + IPSEC_PAIR + EXT_AFTER, (3 << 16) | 6)
    pointer = f"CN=IPSEC,CN=Windows,CN=Microsoft,CN=Machine,{GPO_DN}"
    assert conn.search(pointer, "(objectClass=ipsecPolicy)", attributes=["*"]), conn.result
    attrs = conn.entries[0].entry_attributes_as_dict
    assert keys(attrs["ipsecOwnersReference"]) == keys([dn("ipsecPolicy", SERVER)])
    assert attrs["ipsecName"] == ["Server (Request Security)"] and "ipsecData" not in attrs
    assert a.gpo_assignment(conn, BASE, GPO) == SERVER

    secure = next(p for p in contents.policies if p.id == SECURE)
    secure.description = ""
    a.assign_gpo(conn, BASE, GPO, secure)
    assert a.gpo_assignment(conn, BASE, GPO) == SECURE
    assert gpo() == (EXT_BEFORE + IPSEC_PAIR + EXT_AFTER, (3 << 16) | 7)
    assert conn.search(pointer, "(objectClass=*)", attributes=["description"])
    assert not conn.entries[0].entry_attributes_as_dict.get("description")

    a.assign_gpo(conn, BASE, GPO, None)
    assert a.gpo_assignment(conn, BASE, GPO) is None
    assert gpo() == (EXT_BEFORE + EXT_AFTER, (3 << 16) | 8)

    unpublished = pb.Policy(id="{00000000-0000-0000-0000-00000000000F}", name="nowhere")
    with pytest.raises(a.DirectoryPolicyError, match="is not published"):
        a.assign_gpo(conn, BASE, GPO, unpublished)
    with pytest.raises(a.DirectoryPolicyError, match="no groupPolicyContainer"):
        a.assign_gpo(conn, BASE, "{00000000-0000-0000-0000-000000000000}", server)


@needs_slapd
def test_publish_keeps_the_directorys_own_isakmp_and_default_response_objects(conn: Any) -> None:
    """Like a Windows domain's built-in objects: other GUIDs for the hidden ISAKMP / default-response negpol."""
    builtin_isakmp = uuid.UUID("72385231-70FA-11D1-864C-14A300000000")
    builtin_negpol = uuid.UUID("59319BDF-5EE3-11D2-ACE8-0060B0ECCA17")
    drr_id = "{59319BE2-5EE3-11D2-ACE8-0060B0ECCA17}"
    seeded = a._build(
        default_contents(), [SERVER], BASE, {("isakmp", SERVER): builtin_isakmp, ("default-response", drr_id): builtin_negpol}
    )
    a._ensure_container(conn, BASE)
    a._execute(conn, a._plan_publish([], seeded), "seed")
    result = a.publish(conn, BASE, default_contents(), [SERVER])
    assert not result.added and not result.deleted and not result.modified
    d = by_dn(a.read_entries(conn, BASE))
    assert keys(d[dn("ipsecPolicy", SERVER)].get("ipsecISAKMPReference")) == keys(
        [a.object_dn("ipsecISAKMPPolicy", builtin_isakmp, BASE)]
    )
    # a new default response rule id: the old NFA and its default-response negotiation policy go
    contents = default_contents()
    server = next(p for p in contents.policies if p.id == SERVER)
    server.default_response_rule.id = "{00000000-0000-0000-0000-0000000000D2}"
    result = a.publish(conn, BASE, contents, [SERVER])
    assert set(keys(result.deleted)) == set(
        keys([dn("ipsecNFA", drr_id), a.object_dn("ipsecNegotiationPolicy", builtin_negpol, BASE)])
    )
    assert len(result.added) == 2  # the new NFA and its negotiation policy
    assert a.read_policies(conn, BASE, [SERVER]).policies[0] == server
