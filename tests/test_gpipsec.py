"""[MS-GPIPSEC] ipsecData codec: real Windows-written vectors, truncation, fuzzing, model mapping."""

from __future__ import annotations

import ipaddress
import struct
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from gpipsec_vectors import SET_A, W2K_FILTER, W2K_ISAKMP_HEAD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyagent.directory import gpipsec as g
from policyagent.pb import pb

Decoder = Callable[[bytes], Any]
CODECS: dict[str, tuple[Decoder, Callable[[Any], bytes]]] = {
    "ipsecPolicy": (g.decode_policy, g.encode_policy),
    "ipsecISAKMPPolicy": (g.decode_isakmp_policy, g.encode_isakmp_policy),
    "ipsecNFA": (g.decode_nfa, g.encode_nfa),
    "ipsecNegotiationPolicy": (g.decode_negotiation_policy, g.encode_negotiation_policy),
    "ipsecFilter": (g.decode_filter, g.encode_filter),
}
DECODERS = [c[0] for c in CODECS.values()]


def blob(rdn: str) -> bytes:
    return bytes.fromhex(SET_A[rdn])


def codec(rdn: str) -> tuple[Decoder, Callable[[Any], bytes]]:
    return CODECS[rdn.split("{")[0]]


def w2k_isakmp() -> bytes:
    """The reference's Windows 2000 ISAKMP head, cut to its first method and framed (count 1, length, trailer)."""
    head = bytearray(bytes.fromhex(W2K_ISAKMP_HEAD))
    head[80:84] = struct.pack("<I", 1)
    head[16:20] = struct.pack("<I", len(head) + 1 - 21)
    return bytes(head) + b"\x00"


def w2k_nfa() -> bytes:
    """A Set A NFA without the Alt-Auth extension: the Windows 2000 shape (counted part + trailer)."""
    b = blob("ipsecNFA{78e7557c-d821-4f61-9144-f089c30899f6}")
    return b[:62] + b"\x00"


ALL_VECTORS: dict[str, tuple[Decoder, bytes]] = {
    **{rdn: (codec(rdn)[0], blob(rdn)) for rdn in SET_A},
    "w2k-filter": (g.decode_filter, bytes.fromhex(W2K_FILTER)),
    "w2k-isakmp": (g.decode_isakmp_policy, w2k_isakmp()),
    "w2k-nfa": (g.decode_nfa, w2k_nfa()),
}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("rdn", sorted(SET_A))
def test_modern_vectors_round_trip_byte_for_byte(rdn: str) -> None:
    decode, encode = codec(rdn)
    data = blob(rdn)
    assert encode(decode(data)) == data


def test_w2k_filter_decodes_and_keeps_its_framing() -> None:
    data = bytes.fromhex(W2K_FILTER)
    f = g.decode_filter(data)
    assert f.legacy_framing is True
    (s,) = f.filter_specs
    assert s.filter_specification_id == uuid.UUID("2aa93c48-1ce1-463f-aaa1-60d818ab6878")
    assert s.legacy_destination_address == ipaddress.IPv4Address("10.0.0.1")
    assert s.legacy_destination_mask == ipaddress.IPv4Address("255.255.255.255")
    assert (s.legacy_protocol, s.legacy_source_port, s.legacy_destination_port) == (17, 1701, 0)
    assert g.encode_filter(f) == data
    modern = g.encode_filter(f.__class__(f.filter_specs))
    assert len(modern) == 94 and modern[16:20] == struct.pack("<I", 70)
    assert g.decode_filter(modern).filter_specs == f.filter_specs


def test_w2k_isakmp_garbage_is_ignored_and_reencodes_modern() -> None:
    data = w2k_isakmp()
    x = g.decode_isakmp_policy(data)
    assert x.isakmp_policy_instance == uuid.UUID("f9f9e6ff-187c-451c-9af5-180384290492")
    assert x.mm_lifetime == 0
    (m,) = x.security_methods
    assert (m.encryption_algorithm_id, m.hash_algorithm_id, m.oakley_group) == (3, 2, 2)
    assert m.oakley_lifetime_secs == 28800
    assert m.pfs_identity_required == 0x00340001  # kept as read: a real field, garbage on Windows 2000
    out = g.encode_isakmp_policy(x)
    assert len(out) == len(data) and out != data
    assert out[88:100] == bytes.fromhex("030000000000000000000000")  # high u32 and Zero4 zeroed
    assert g.decode_isakmp_policy(out) == x


def test_w2k_nfa_without_extension() -> None:
    x = g.decode_nfa(w2k_nfa())
    assert x.alt_auth is None
    assert g.encode_nfa(x) == w2k_nfa()


# ----------------------------------------------------------------------------- field values (ref §4)


def test_policy_fields() -> None:
    assert g.decode_policy(blob("ipsecPolicy{c0ccd3b2-2871-436c-be91-4e919c8b5aa0}")).polling_interval == 10800


def test_isakmp_fields() -> None:
    x = g.decode_isakmp_policy(blob("ipsecISAKMPPolicy{e627a7fc-634a-466b-bd85-4b84ffa02dee}"))
    assert x.isakmp_policy_instance == uuid.UUID(int=0)
    assert (x.master_pfs_required, x.isakmp_options, x.new_dh, x.qm_limit, x.mm_lifetime) == (
        0,
        0,
        (0, 0, 0, 0),
        0,
        28800,
    )
    assert x.security_methods == (g.SecurityMethod(3, 2, 2, oakley_lifetime_secs=28800),)


def test_negotiation_policy_fields() -> None:
    x = g.decode_negotiation_policy(blob("ipsecNegotiationPolicy{ab61c8e1-10e8-4207-b84d-681caa72b848}"))
    assert x.security_offers == (
        g.SecurityOffer((g.AlgorithmOffer(3, 2, 2),)),
        g.SecurityOffer((g.AlgorithmOffer(2, 0, 1),)),
    )
    block = g.decode_negotiation_policy(blob("ipsecNegotiationPolicy{c4b410bf-dd4c-4275-bedc-abd92cca3f19}"))
    assert block.security_offers == ()


def test_nfa_fields() -> None:
    dialup = g.decode_nfa(blob("ipsecNFA{78e7557c-d821-4f61-9144-f089c30899f6}"))
    assert dialup.auth_methods == (g.AuthMethodEntry(5, b"\x00\x00"),)
    assert dialup.interface_type == g.INTERFACE_DIALUP
    assert (dialup.interface_name, dialup.tunnel_end_point_name) == ("", "")
    assert (dialup.is_tunnel_specifier, dialup.is_active_specifier) == (0, 1)
    assert dialup.alt_auth == g.AltAuth((g.AuthMethodEntry(5, b""),), (0,))
    assert dialup.ipv6_tunnel_mode_address is None
    default = g.decode_nfa(blob("ipsecNFA{57c1533e-02ee-4ca2-9bc2-69e4b6aaaba2}"))
    assert (default.interface_type, default.is_active_specifier) == (g.INTERFACE_ALL, 0)


def test_filter_fields() -> None:
    one = g.decode_filter(blob("ipsecFilter{45f48cfc-241d-42f7-bcd4-927054db1b67}"))
    assert one.legacy_framing is False and one.v2 is None
    assert one.filter_specs == (g.FilterSpec1(uuid.UUID("5cfa2551-ba69-4be6-9f1c-d192432c2fee")),)
    many = g.decode_filter(blob("ipsecFilter{641c767c-fe15-40d4-831d-bd9a5d4fb9cf}"))
    assert len(many.filter_specs) == 32
    assert all(s.legacy_mirror_options == 1 for s in many.filter_specs)
    first = many.filter_specs[0]
    assert (first.legacy_protocol, first.legacy_source_port, first.legacy_destination_port) == (6, 22, 0)
    hosts = [
        (str(s.legacy_source_address), str(s.legacy_destination_address), str(s.legacy_destination_mask))
        for s in many.filter_specs
        if s.legacy_protocol == 0
    ]
    assert hosts == [
        ("192.168.0.255", "0.0.0.0", "0.0.0.0"),
        ("192.168.1.255", "0.0.0.0", "0.0.0.0"),
        ("0.0.0.0", "192.168.0.255", "255.255.255.255"),
        ("0.0.0.0", "192.168.1.255", "255.255.255.255"),
    ]


# ----------------------------------------------------------------------------- corrupt input


@pytest.mark.parametrize("name", sorted(ALL_VECTORS))
def test_every_truncation_raises(name: str) -> None:
    decode, data = ALL_VECTORS[name]
    for n in range(len(data)):
        with pytest.raises(g.GpIpsecError):
            decode(data[:n])


def test_error_names_blob_field_and_offset() -> None:
    data = blob("ipsecISAKMPPolicy{e627a7fc-634a-466b-bd85-4b84ffa02dee}")
    with pytest.raises(g.GpIpsecError, match=r"^ipsecISAKMPPolicy blob: Security-Method-Count at offset 80: "):
        g.decode_isakmp_policy(data[:100])
    with pytest.raises(g.GpIpsecError, match=r"^ipsecISAKMPPolicy blob: MM-Lifetime at offset 56: truncated"):
        g.decode_isakmp_policy(data[:58])
    nfa = blob("ipsecNFA{78e7557c-d821-4f61-9144-f089c30899f6}")
    with pytest.raises(g.GpIpsecError, match=r"^ipsecNFA blob: Interface-Name length at offset 38: truncated"):
        g.decode_nfa(nfa[:40])
    with pytest.raises(g.GpIpsecError, match=r"^ipsecNFA blob: trailer at offset 114: not 0x00"):
        g.decode_nfa(nfa[:-1] + b"\x01")
    with pytest.raises(g.GpIpsecError, match="ipsecPolicy blob: type GUID at offset 0"):
        g.decode_policy(data)
    with pytest.raises(g.GpIpsecError, match="Data-Length"):
        g.decode_policy(bytes.fromhex("632120224c4fd111863b00a0248d302105000000302a000000"))
    with pytest.raises(g.GpIpsecError, match="trailing"):
        g.decode_policy(blob("ipsecPolicy{c0ccd3b2-2871-436c-be91-4e919c8b5aa0}") + b"\x00")


def _check_decode(decode: Decoder, data: bytes) -> None:
    try:
        x = decode(data)
    except g.GpIpsecError:
        return
    # whatever decodes must re-encode, and the re-encoding must decode to the same value
    encode = {d: e for d, e in CODECS.values()}[decode]
    assert decode(encode(x)) == x


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(sorted(CODECS)))
def test_fuzz_random_bytes_with_type_guid(tail: bytes, kind: str) -> None:
    decode = CODECS[kind][0]
    guid = g.TYPE_GUIDS[g.BlobType(kind)].bytes_le
    _check_decode(decode, guid + tail)
    _check_decode(decode, tail)


@FUZZ
@given(st.sampled_from(sorted(ALL_VECTORS)), st.data())
def test_fuzz_mutated_vectors(name: str, data: st.DataObject) -> None:
    decode, raw = ALL_VECTORS[name]
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(b)))
        b[cut:cut] = data.draw(st.binary(max_size=20))
    _check_decode(decode, bytes(b))


# ----------------------------------------------------------------------------- V2 filter section (spec only)


def test_filter_v2_section_round_trip() -> None:
    v1 = g.FilterSpec1(uuid.uuid4(), filter_description="v1")
    v2 = g.FilterSpec2(
        uuid.uuid4(),
        filter_description="range",
        source_address_data=g.AddressData(0x08, 3),
        destination_address_data=g.AddressData(
            0x02, 1, bytes([10, 0, 0, 1]) + bytes(12), bytes([10, 0, 0, 9]) + bytes(12)
        ),
        destination_port_data=g.PortData(2, 1000, 2000),
        filter_protocol=6,
        filter_flags=8,
    )
    for legacy in (False, True):
        x = g.IpsecFilterData((v1,), g.FilterV2Section((v2,), 1), legacy_framing=legacy)
        data = g.encode_filter(x)
        assert g.decode_filter(data) == x
        boundary = 24 + len(g.encode_filter(g.IpsecFilterData((v1,)))) - 24
        for n in range(len(data)):
            if n == boundary and not legacy:
                # modern framing has no trailer: cutting exactly before the V2 section leaves a valid V1-only blob
                assert g.decode_filter(data[:n]) == g.IpsecFilterData((v1,))
                continue
            with pytest.raises(g.GpIpsecError):
                g.decode_filter(data[:n])


# ----------------------------------------------------------------------------- encoder validation


def test_encoders_reject_out_of_range_values() -> None:
    with pytest.raises(g.GpIpsecError, match="Polling-Interval"):
        g.encode_policy(g.IpsecPolicyData(-1))
    with pytest.raises(g.GpIpsecError, match="Legacy-Source-Port"):
        g.encode_filter(g.IpsecFilterData((g.FilterSpec1(uuid.uuid4(), legacy_source_port=70000),)))
    with pytest.raises(g.GpIpsecError, match="at most 3"):
        g.encode_negotiation_policy(g.IpsecNegotiationPolicyData((g.SecurityOffer((g.AlgorithmOffer(1, 0, 1),) * 4),)))


def test_nfa_psk_and_certificate_entries() -> None:
    x = g.IpsecNfaData(
        auth_methods=(
            g.AuthMethodEntry(g.AUTH_PSK, "s3cret\x00".encode("utf-16-le")),
            g.AuthMethodEntry(g.AUTH_CERTIFICATE, "CN=Root\x00".encode("utf-16-le")),
        ),
        tunnel_address=ipaddress.IPv4Address("192.0.2.1"),
        is_tunnel_specifier=1,
        tunnel_end_point_name="gw.example",
        alt_auth=g.AltAuth((g.AuthMethodEntry(1, b""), g.AuthMethodEntry(3, b"")), (0, 3)),
        ipv6_tunnel_mode_address=ipaddress.IPv6Address("2001:db8::1"),
    )
    data = g.encode_nfa(x)
    assert len(data) % 2 == 1
    back = g.decode_nfa(data)
    assert back == x
    assert [m.text for m in back.auth_methods] == ["s3cret", "CN=Root"]


# ----------------------------------------------------------------------------- model mapping


def test_filter_list_to_model_and_back_byte_exact() -> None:
    for rdn in (
        "ipsecFilter{45f48cfc-241d-42f7-bcd4-927054db1b67}",
        "ipsecFilter{641c767c-fe15-40d4-831d-bd9a5d4fb9cf}",
    ):
        data = blob(rdn)
        fl = g.to_model_filter_list(g.decode_filter(data), id="{X}", name="n")
        assert g.encode_filter(g.from_model_filter_list(fl)) == data
    fl = g.to_model_filter_list(g.decode_filter(blob("ipsecFilter{641c767c-fe15-40d4-831d-bd9a5d4fb9cf}")))
    f0 = fl.filters[0]
    assert f0.id == "{A1257975-305F-4153-8149-A2C497624CA2}"
    assert f0.mirrored and f0.protocol == 6 and f0.source_port == 22
    assert f0.source.kind == pb.ADDRESS_KIND_ANY and f0.destination.kind == pb.ADDRESS_KIND_ANY
    hosts = [f for f in fl.filters if f.destination.kind == pb.ADDRESS_KIND_HOST]
    assert [h.destination.ip for h in hosts] == ["192.168.0.255", "192.168.1.255"]


def test_filter_model_address_kinds_round_trip() -> None:
    kinds = [
        pb.Address(kind=pb.ADDRESS_KIND_ME),
        pb.Address(kind=pb.ADDRESS_KIND_ANY),
        pb.Address(kind=pb.ADDRESS_KIND_HOST, ip="10.1.2.3", dns_name="host.example"),
        pb.Address(kind=pb.ADDRESS_KIND_SUBNET, ip="10.1.0.0", mask="255.255.0.0"),
        pb.Address(kind=pb.ADDRESS_KIND_DNS_SERVERS),
        pb.Address(kind=pb.ADDRESS_KIND_DEFAULT_GATEWAY),
    ]
    fl = pb.FilterList()
    for i, src in enumerate(kinds):
        dst = pb.Address(kind=pb.ADDRESS_KIND_WINS_SERVERS) if i < 4 else pb.Address(kind=pb.ADDRESS_KIND_ANY)
        fl.filters.add(
            id="{" + str(uuid.uuid4()).upper() + "}",
            description=f"f{i}",
            mirrored=bool(i % 2),
            source=src,
            destination=dst,
            protocol=17,
            source_port=500,
            destination_port=4500,
        )
    data = g.encode_filter(g.from_model_filter_list(fl))
    assert g.to_model_filter_list(g.decode_filter(data)) == fl
    me = g.from_model_filter(fl.filters[0])
    assert (str(me.legacy_source_address), str(me.legacy_source_mask)) == ("0.0.0.0", "255.255.255.255")
    assert me.legacy_special_filter == 0x82  # destination WINS


def test_filter_model_rejects_what_legacy_cannot_hold() -> None:
    v6 = pb.Filter(
        source=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip="2001:db8::1"), destination=pb.Address(kind=pb.ADDRESS_KIND_ANY)
    )
    with pytest.raises(g.GpIpsecError, match="IPv4"):
        g.from_model_filter(v6)
    both = pb.Filter(
        source=pb.Address(kind=pb.ADDRESS_KIND_DNS_SERVERS), destination=pb.Address(kind=pb.ADDRESS_KIND_WINS_SERVERS)
    )
    with pytest.raises(g.GpIpsecError, match="special"):
        g.from_model_filter(both)


def test_filter_action_mapping() -> None:
    rdn = "ipsecNegotiationPolicy{ab61c8e1-10e8-4207-b84d-681caa72b848}"
    fa = g.to_model_filter_action(g.decode_negotiation_policy(blob(rdn)), g.ACTION_SECURE, name="x")
    assert fa.action == pb.ACTION_TYPE_NEGOTIATE and not fa.session_key_pfs
    assert fa.methods[0].esp.encryption == pb.CIPHER_3DES and fa.methods[0].esp.integrity == pb.INTEGRITY_SHA1
    assert not fa.methods[0].HasField("ah")
    assert fa.methods[1].ah.integrity == pb.INTEGRITY_SHA1 and not fa.methods[1].HasField("esp")
    back, action = g.from_model_filter_action(fa)
    assert action == g.ACTION_SECURE and g.encode_negotiation_policy(back) == blob(rdn)

    block_rdn = "ipsecNegotiationPolicy{c4b410bf-dd4c-4275-bedc-abd92cca3f19}"
    block = g.to_model_filter_action(g.decode_negotiation_policy(blob(block_rdn)), g.ACTION_BLOCK)
    assert block.action == pb.ACTION_TYPE_BLOCK
    data, action = g.from_model_filter_action(block)
    assert action == g.ACTION_BLOCK and g.encode_negotiation_policy(data) == blob(block_rdn)

    combined = pb.FilterAction(action=pb.ACTION_TYPE_NEGOTIATE, inbound_passthrough=True, session_key_pfs=True)
    combined.methods.add(
        ah=pb.AhTransform(integrity=pb.INTEGRITY_MD5),
        esp=pb.EspTransform(encryption=pb.CIPHER_DES, integrity=pb.INTEGRITY_NONE),
        lifetime_seconds=300,
        lifetime_kb=50000,
    )
    data, action = g.from_model_filter_action(combined)
    assert action == g.ACTION_INBOUND_PASSTHROUGH
    assert data.security_offers[0].algorithms == (g.AlgorithmOffer(1, 0, 1), g.AlgorithmOffer(1, 0, 2))
    decoded = g.decode_negotiation_policy(g.encode_negotiation_policy(data))
    assert g.to_model_filter_action(decoded, action) == combined

    # fallback to clear ("soft"): a last offer without algorithms (ref §2.4 [OPEN]; our hypothesis, [INF])
    soft = pb.FilterAction(action=pb.ACTION_TYPE_NEGOTIATE, fallback_to_clear=True)
    soft.methods.add(esp=pb.EspTransform(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1))
    data, action = g.from_model_filter_action(soft)
    assert action == g.ACTION_SECURE and data.security_offers[-1] == g.SecurityOffer(())
    encoded = g.encode_negotiation_policy(data)
    assert len(encoded) == 24 + 2 * 80 + 1
    assert g.to_model_filter_action(g.decode_negotiation_policy(encoded), action) == soft
    misplaced = g.IpsecNegotiationPolicyData((g.SecurityOffer(()), *data.security_offers[:1]))
    with pytest.raises(g.GpIpsecError, match="must be the last one"):
        g.to_model_filter_action(misplaced, g.ACTION_SECURE)
    for flag in ("inbound_passthrough", "fallback_to_clear", "session_key_pfs"):
        with pytest.raises(g.GpIpsecError, match=flag):
            g.from_model_filter_action(pb.FilterAction(action=pb.ACTION_TYPE_BLOCK, **{flag: True}))
    with pytest.raises(g.GpIpsecError, match="session_key_pfs needs"):
        g.from_model_filter_action(pb.FilterAction(action=pb.ACTION_TYPE_NEGOTIATE, session_key_pfs=True))
    aes = pb.FilterAction(action=pb.ACTION_TYPE_NEGOTIATE)
    aes.methods.add(esp=pb.EspTransform(encryption=pb.CIPHER_AES128, integrity=pb.INTEGRITY_SHA1))
    with pytest.raises(g.GpIpsecError, match="ESP"):
        g.from_model_filter_action(aes)


def test_isakmp_mapping() -> None:
    rdn = "ipsecISAKMPPolicy{e627a7fc-634a-466b-bd85-4b84ffa02dee}"
    s = g.to_model_isakmp(g.decode_isakmp_policy(blob(rdn)))
    assert s.lifetime_minutes == 480 and s.qm_per_mm == 0 and not s.master_key_pfs
    assert list(s.methods) == [
        pb.MainModeMethod(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1, dh_group=pb.DH_GROUP_MODP1024)
    ]
    assert g.encode_isakmp_policy(g.from_model_isakmp(s)) == blob(rdn)

    s2 = pb.IsakmpSettings(lifetime_minutes=60, qm_per_mm=1, master_key_pfs=True)
    s2.methods.add(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1, dh_group=pb.DH_GROUP_MODP2048)
    s2.methods.add(encryption=pb.CIPHER_DES, integrity=pb.INTEGRITY_MD5, dh_group=pb.DH_GROUP_MODP768)
    x = g.from_model_isakmp(s2)
    assert x.security_methods[0].oakley_group == g.OAKLEY_GROUP_14 == 0x10000001
    assert g.to_model_isakmp(g.decode_isakmp_policy(g.encode_isakmp_policy(x))) == s2

    new_dh = g.IpsecIsakmpPolicyData((), new_dh=(4, 1, 0, 0))
    assert [(m.encryption, m.integrity, m.dh_group) for m in g.to_model_isakmp(new_dh).methods] == [
        (pb.CIPHER_3DES, pb.INTEGRITY_SHA1, pb.DH_GROUP_MODP2048),
        (pb.CIPHER_DES, pb.INTEGRITY_MD5, pb.DH_GROUP_MODP2048),
    ]
    aes = pb.IsakmpSettings()
    aes.methods.add(encryption=pb.CIPHER_AES256, integrity=pb.INTEGRITY_SHA1, dh_group=pb.DH_GROUP_MODP2048)
    with pytest.raises(g.GpIpsecError):
        g.from_model_isakmp(aes)


def test_rule_mapping() -> None:
    rule = pb.Rule(
        id="{X}",
        name="r",
        auth_methods=[
            pb.AuthMethod(kerberos=pb.KerberosAuth()),
            pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key="k\u00e9y")),
            pb.AuthMethod(certificate=pb.CertificateAuth(root_ca="CN=Root", exclude_ca_name=True)),
        ],
        tunnel_endpoint="192.0.2.1",
        connection_type=pb.CONNECTION_TYPE_REMOTE_ACCESS,
        active=True,
    )
    nfa = g.from_model_rule(rule)
    assert [(m.auth_type, m.data) for m in nfa.auth_methods] == [
        (5, b"\x00\x00"),
        (1, "k\u00e9y\x00".encode("utf-16-le")),
        (3, "CN=Root\x00".encode("utf-16-le")),
    ]
    assert nfa.alt_auth == g.AltAuth(
        (g.AuthMethodEntry(5, b""), nfa.auth_methods[1], nfa.auth_methods[2]), (0, 0, g.CERT_FLAG_EXCLUDE_CA_NAME)
    )
    assert (nfa.interface_type, str(nfa.tunnel_address), nfa.is_tunnel_specifier) == (0xFFFFFFFF, "192.0.2.1", 1)
    back = g.to_model_rule(g.decode_nfa(g.encode_nfa(nfa)), id="{X}", name="r")
    assert back == rule
    # the Set A Kerberos NFA: all connections, inactive default-response shape
    kerberos = g.decode_nfa(blob("ipsecNFA{57c1533e-02ee-4ca2-9bc2-69e4b6aaaba2}"))
    r = g.to_model_rule(kerberos)
    assert r.connection_type == pb.CONNECTION_TYPE_ALL and not r.active and r.auth_methods[0].HasField("kerberos")
    assert g.encode_nfa(g.from_model_rule(r)) == blob("ipsecNFA{57c1533e-02ee-4ca2-9bc2-69e4b6aaaba2}")
    with pytest.raises(g.GpIpsecError, match="Tunnel-End-Point-Name"):
        g.to_model_rule(g.IpsecNfaData((), tunnel_end_point_name="gw.example"))
    with pytest.raises(g.GpIpsecError, match="unknown Auth-Type 9"):
        g.to_model_rule(g.IpsecNfaData((g.AuthMethodEntry(9, b""),)))
    with pytest.raises(g.GpIpsecError, match=r"0\.0\.0\.0"):
        g.from_model_rule(pb.Rule(tunnel_endpoint="0.0.0.0", connection_type=pb.CONNECTION_TYPE_ALL))


def test_default_response_rule_and_policy_mapping() -> None:
    negpol_rdn = "ipsecNegotiationPolicy{ab61c8e1-10e8-4207-b84d-681caa72b848}"
    nfa = g.decode_nfa(blob("ipsecNFA{57c1533e-02ee-4ca2-9bc2-69e4b6aaaba2}"))
    negpol = g.decode_negotiation_policy(blob(negpol_rdn))
    drr = g.to_model_default_response_rule(nfa, negpol, g.ACTION_SECURE, id="{D}")
    assert not drr.active and len(drr.methods) == 2 and drr.auth_methods[0].HasField("kerberos")
    nfa2, negpol2 = g.from_model_default_response_rule(drr)
    assert g.encode_nfa(nfa2) == blob("ipsecNFA{57c1533e-02ee-4ca2-9bc2-69e4b6aaaba2}")
    assert g.encode_negotiation_policy(negpol2) == blob(negpol_rdn)
    with pytest.raises(g.GpIpsecError, match="must be Secure"):
        g.to_model_default_response_rule(nfa, negpol, g.ACTION_BLOCK)

    data = g.decode_policy(blob("ipsecPolicy{c0ccd3b2-2871-436c-be91-4e919c8b5aa0}"))
    assert g.to_model_polling_minutes(data) == 180
    assert g.to_model_polling_minutes(g.IpsecPolicyData(0)) == 180  # 0 means 10,800 s
    assert g.to_model_polling_minutes(g.IpsecPolicyData(61)) == 2
    assert g.from_model_policy(pb.Policy(polling_interval_minutes=180)) == data
    with pytest.raises(g.GpIpsecError, match="polling interval 0"):
        g.from_model_policy(pb.Policy())
    for bad in (pb.IsakmpSettings(ike_version=3, lifetime_minutes=480), pb.IsakmpSettings(lifetime_minutes=0)):
        with pytest.raises(g.GpIpsecError):
            g.from_model_isakmp(bad)
