"""compile(): effective policy → desired strongSwan connections and filter entries (pure, no I/O)."""

from __future__ import annotations

from enforcekit import CLIENT, SECURE, SERVER, effective

from policyagent.agent.enforce.compile import (
    LIBIPSEC,
    NETLINK,
    CompileInput,
    HostAddresses,
    Platform,
    compile_policy,
    instantiate,
)
from policyagent.agent.enforce.desired import BLOCK, NEGOTIATE, PERMIT, Exemption
from policyagent.pb import dist_pb, pb

ME = "10.77.1.2"
HOST = HostAddresses(addresses=(ME,))


def run(policy: dist_pb.EffectivePolicy, **kw: object) -> object:
    return compile_policy(CompileInput(policy=policy, host=HOST, **kw))  # type: ignore[arg-type]


def custom(rules: list[tuple[list[pb.Filter], pb.FilterAction]], auth: str = "psk") -> dist_pb.EffectivePolicy:
    out = dist_pb.EffectivePolicy(computer="h", membership="domain", source="domain", version="v")
    out.policy.name = "custom"
    out.policy.isakmp.methods.add(encryption=pb.CIPHER_AES128, integrity=pb.INTEGRITY_SHA256, dh_group=pb.DH_GROUP_MODP2048)
    for n, (filters, action) in enumerate(rules, start=1):
        fl = out.filter_lists.add(id=f"fl{n}", name=f"list {n}")
        fl.filters.extend(filters)
        action.id = action.id or f"fa{n}"
        if action.id not in {a.id for a in out.filter_actions}:
            out.filter_actions.append(action)
        rule = out.policy.rules.add(id=f"rule-{n}", name=f"r{n}", filter_list_id=fl.id, filter_action_id=action.id, active=True)
        if auth == "psk":
            rule.auth_methods.add(preshared_key=pb.PresharedKeyAuth(key="secret-key-1"))
        else:
            rule.auth_methods.add(kerberos=pb.KerberosAuth())
    return out


def me_to(dst: pb.Address, proto: int = 0, dport: int = 0, mirrored: bool = True) -> pb.Filter:
    return pb.Filter(
        id=f"f-{dst.ip or dst.kind}-{proto}-{dport}", mirrored=mirrored, source=pb.Address(kind=pb.ADDRESS_KIND_ME),
        destination=dst, protocol=proto, destination_port=dport,
    )


ANY = pb.Address(kind=pb.ADDRESS_KIND_ANY)
ESP = pb.QuickModeMethod(esp=pb.EspTransform(encryption=pb.CIPHER_AES128, integrity=pb.INTEGRITY_SHA256))
NEG = pb.FilterAction(name="neg", action=pb.ACTION_TYPE_NEGOTIATE, methods=[ESP])
BLK = pb.FilterAction(name="blk", action=pb.ACTION_TYPE_BLOCK)
PRM = pb.FilterAction(name="prm", action=pb.ACTION_TYPE_PERMIT)


def host(ip: str) -> pb.Address:
    return pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=ip)


def test_secure_server_maps_to_icmp_permit_then_required_negotiation_and_a_responder() -> None:
    d = run(effective(SECURE, psk="k" * 20), server=("10.77.1.254", 50051))
    assert d.problems == ()
    verdicts = [(e.verdict, e.selector.proto) for e in d.entries]
    assert verdicts == [(PERMIT, 1), (PERMIT, 1), (NEGOTIATE, 0), (NEGOTIATE, 0)]
    assert [e.index for e in d.entries] == [0, 1, 2, 3]
    neg = d.entries[2]
    assert neg.inbound_passthrough and not neg.fallback_to_clear
    assert neg.selector.src == (f"{ME}/32",) and neg.selector.dst == ()
    assert d.entries[3].selector.dst == (f"{ME}/32",)  # the mirror
    rule_conn = d.connection(neg.connection)
    assert rule_conn is not None and rule_conn.template and rule_conn.initiates
    assert rule_conn.body["version"] == "1" and rule_conn.body["encap"] == "yes"
    child = next(iter(rule_conn.body["children"].values()))
    assert child["mode"] == "tunnel" and child["esp_proposals"][0] == "3des-sha1"
    responder = d.connection("default-response")
    assert responder is not None and not responder.initiates and responder.body["remote_addrs"] == ["%any"]
    assert any("host-to-host tunnel" in n for n in d.notes)
    assert any("policy server" in n for n in d.notes)
    assert Exemption(reason="policy server", proto=6, port=50051, addr="10.77.1.254/32") in d.exemptions
    assert {(x.proto, x.port) for x in d.exemptions} >= {(17, 500), (17, 4500)}
    assert len(d.secrets) == 1 and d.secrets[0].owners == () and "k" * 20 not in repr(d.secrets[0])


def test_request_security_falls_back_and_client_only_responds() -> None:
    server = run(effective(SERVER, psk="k" * 20))
    neg = [e for e in server.entries if e.verdict == NEGOTIATE]
    assert neg and all(e.fallback_to_clear and e.inbound_passthrough for e in neg)
    client = run(effective(CLIENT, psk="k" * 20))
    assert client.entries == () and [c.name for c in client.connections] == ["default-response"]


def test_kerberos_defaults_are_refused_with_the_reason() -> None:
    d = run(effective(SECURE))
    assert d.problems and all("Kerberos" in p for p in d.problems)
    wg = compile_policy(CompileInput(policy=effective(SECURE, membership="workgroup"), host=HOST))
    assert any("workgroup member" in p for p in wg.problems)


def test_most_specific_wins_whatever_the_rule_order() -> None:
    d = run(custom([([me_to(ANY)], BLK), ([me_to(host("10.77.1.9"))], NEG), ([me_to(host("10.77.1.9"), 6, 80)], PRM)]))
    order = [(e.verdict, e.selector.dst, e.selector.proto) for e in d.entries if e.selector.src == (f"{ME}/32",)]
    assert order == [
        (PERMIT, ("10.77.1.9/32",), 6),
        (NEGOTIATE, ("10.77.1.9/32",), 0),
        (BLOCK, (), 0),
    ]


def test_ties_go_block_then_permit_then_negotiate() -> None:
    d = run(custom([([me_to(ANY)], NEG), ([me_to(ANY)], PRM), ([me_to(ANY)], BLK)]))
    assert [e.verdict for e in d.entries][:3:2] == [BLOCK, PERMIT]
    assert [e.verdict for e in d.entries] == [BLOCK, BLOCK, PERMIT, PERMIT, NEGOTIATE, NEGOTIATE]


def test_single_peer_rule_is_a_concrete_connection_with_an_owned_secret() -> None:
    d = run(custom([([me_to(host("10.77.1.9"))], NEG)]))
    conn = d.connections[0]
    assert not conn.template and conn.body["remote_addrs"] == ["10.77.1.9"]
    child = next(iter(conn.body["children"].values()))
    assert child["local_ts"] == [f"{ME}/32"] and child["remote_ts"] == ["10.77.1.9/32"]
    assert child["esp_proposals"] == ["aes128-sha256"]
    assert conn.body["proposals"] == ["aes128-sha256-modp2048"]
    assert d.secrets[0].owners == ("10.77.1.2", "10.77.1.9")


def test_port_specific_negotiation_needs_kernel_esp() -> None:
    policy = custom([([me_to(host("10.77.1.9"), 6, 80)], NEG)])
    d = run(policy)
    assert any("needs kernel ESP" in p for p in d.problems)
    k = run(policy, platform=Platform(backend=NETLINK))
    assert k.problems == ()
    child = next(iter(k.connections[0].body["children"].values()))
    assert child["mode"] == "transport" and child["remote_ts"] == ["10.77.1.9/32[6/80]"]
    assert "encap" not in k.connections[0].body


def test_ah_only_security_methods_are_refused_without_kernel_ah() -> None:
    ah = pb.FilterAction(
        name="ah", action=pb.ACTION_TYPE_NEGOTIATE, methods=[pb.QuickModeMethod(ah=pb.AhTransform(integrity=pb.INTEGRITY_SHA1))]
    )
    d = run(custom([([me_to(host("10.77.1.9"))], ah)]))
    assert any("AH" in p for p in d.problems)


def test_pfs_adds_the_main_mode_group_and_lifetimes_follow_the_methods() -> None:
    action = pb.FilterAction(
        name="pfs", action=pb.ACTION_TYPE_NEGOTIATE, session_key_pfs=True,
        methods=[pb.QuickModeMethod(esp=ESP.esp, lifetime_seconds=900, lifetime_kb=5000)],
    )
    d = run(custom([([me_to(host("10.77.1.9"))], action)]))
    child = next(iter(d.connections[0].body["children"].values()))
    assert child["esp_proposals"] == ["aes128-sha256-modp2048"]
    assert child["life_time"] == "900s" and child["rekey_time"] == "810s" and child["life_bytes"] == str(5000 * 1024)


def test_instantiate_narrows_a_template_to_one_peer() -> None:
    d = run(effective(SECURE, psk="k" * 20))
    template = next(c for c in d.connections if c.template)
    inst = instantiate(template, "10.77.1.1", ME)
    assert inst.name == f"{template.name}@10.77.1.1" and inst.body["remote_addrs"] == ["10.77.1.1"]
    child = next(iter(inst.body["children"].values()))
    assert child["remote_ts"] == ["10.77.1.1/32"] and child["local_ts"] == [f"{ME}/32"]
    assert template.body["children"] != inst.body["children"]  # the template itself is untouched


def test_compile_is_deterministic_and_an_unrelated_edit_keeps_digests() -> None:
    rules = [([me_to(host("10.77.1.9"))], NEG), ([me_to(host("10.77.1.8"))], NEG)]
    a = run(custom(rules))
    b = run(custom(rules))
    assert [c.digest for c in a.connections] == [c.digest for c in b.connections]
    edited = custom(rules)
    edited.filter_lists[1].filters[0].destination.ip = "10.77.1.7"
    c = run(edited)
    assert a.connections[0].digest == c.connections[0].digest
    assert a.connections[1].digest != c.connections[1].digest


def test_no_policy_means_only_exemptions() -> None:
    d = run(dist_pb.EffectivePolicy(source="none"))
    assert d.entries == () and d.connections == () and d.problems == ()
    assert Platform().backend == LIBIPSEC


def test_certificates_chain_to_the_rules_root_ca_default_the_servers() -> None:
    from policyagent.agent.enforce.compile import LocalIdentity, dn_key

    identity = LocalIdentity(
        cert_pem="HOSTCERT", trusted=(("CN=policyagent CA srv1", "SERVERCA"), ("CN=Other Root,O=Example", "OTHERCA"))
    )
    policy = custom([([me_to(host("10.77.1.9"))], NEG)])
    rule = policy.policy.rules[0]
    del rule.auth_methods[:]
    rule.auth_methods.add(certificate=pb.CertificateAuth(root_ca=""))
    d = compile_policy(CompileInput(policy=policy, host=HOST, identity=identity))
    body = d.connections[0].body
    assert body["local-1"] == {"auth": "pubkey", "certs": ["HOSTCERT"]}
    assert body["remote-1"] == {"auth": "pubkey", "id": "%any", "cacerts": ["SERVERCA"], "revocation": "relaxed"}
    strict = compile_policy(CompileInput(policy=policy, host=HOST, identity=identity, crl_check="2"))
    assert strict.connections[0].body["remote-1"]["revocation"] == "strict"  # set config strongcrlcheck 2
    assert d.secrets == ()
    rule.auth_methods[0].certificate.root_ca = "o=example, cn=other root"  # order, case and spaces do not matter
    d = compile_policy(CompileInput(policy=policy, host=HOST, identity=identity))
    assert d.connections[0].body["remote-1"]["cacerts"] == ["OTHERCA"]
    rule.auth_methods[0].certificate.root_ca = "policyagent CA srv1"  # a bare CA name matches its CN
    assert compile_policy(CompileInput(policy=policy, host=HOST, identity=identity)).problems == ()
    rule.auth_methods[0].certificate.root_ca = "CN=Unknown CA"
    d = compile_policy(CompileInput(policy=policy, host=HOST, identity=identity))
    assert any("not among the CAs this host trusts" in p for p in d.problems)
    assert compile_policy(CompileInput(policy=policy, host=HOST)).problems  # no certificate at all
    assert dn_key("CN=a, O=b") == dn_key("o=B,cn=A")
    # the first usable method wins: an unusable certificate method falls through to the pre-shared key
    rule.auth_methods.add(preshared_key=pb.PresharedKeyAuth(key="fallback-key"))
    d = compile_policy(CompileInput(policy=policy, host=HOST, identity=identity))
    assert d.problems == () and d.connections[0].body["local-1"]["auth"] == "psk"
    assert any("not usable here" in n for n in d.notes)


def test_kerberos_keys_the_ike_sa_per_peer_and_exempts_the_keying_exchange() -> None:
    d = compile_policy(CompileInput(policy=effective(SECURE), host=HOST, kerberos=True))
    assert d.problems == ()
    assert d.connections and all(c.kerberos for c in d.connections)
    assert all(c.body["local-1"]["auth"] == "psk" for c in d.connections)
    assert d.secrets == ()  # no static secret: the keying exchange loads one per peer
    ports = {(x.proto, x.port) for x in d.exemptions}
    assert {(6, 4501), (6, 88), (17, 88)} <= ports
    kdc = compile_policy(CompileInput(policy=effective(SECURE), host=HOST, kerberos=True, kdcs=(("10.0.0.9", 18888),)))
    assert [(x.proto, x.port, x.addr) for x in kdc.exemptions if "KDC" in x.reason] == [
        (6, 18888, "10.0.0.9/32"),
        (17, 18888, "10.0.0.9/32"),
    ]
    legacy = compile_policy(CompileInput(policy=effective(SECURE, psk="k" * 20), host=HOST, exempt_level="0"))
    assert {(x.proto, x.port) for x in legacy.exemptions} >= {(6, 88), (17, 88), (46, 0)}  # set config ipsecexempt 0
    without = compile_policy(CompileInput(policy=effective(SECURE), host=HOST))
    assert any("--ike-keytab" in p for p in without.problems)
    wg = compile_policy(CompileInput(policy=effective(SECURE, membership="workgroup"), host=HOST, kerberos=True))
    assert any("workgroup member" in p for p in wg.problems)
    inst = instantiate(next(c for c in d.connections if c.template), "10.77.1.1", ME)
    assert inst.kerberos


def test_tunnel_rules_to_one_gateway_share_its_connection_and_the_inbound_rule_only_filters() -> None:
    def net(ip: str, mask: str = "255.255.255.0") -> pb.Address:
        return pb.Address(kind=pb.ADDRESS_KIND_SUBNET, ip=ip, mask=mask)

    def flt(src: pb.Address, dst: pb.Address) -> pb.Filter:
        return pb.Filter(id=f"{src.ip}-{dst.ip}", source=src, destination=dst)

    policy = custom(
        [
            ([flt(net("10.1.1.0"), net("10.2.1.0"))], NEG),
            ([flt(net("10.1.1.0"), net("10.2.2.0"))], NEG),
            ([flt(net("10.2.1.0"), net("10.1.1.0"))], NEG),  # inbound: its endpoint is this host
        ]
    )
    policy.policy.rules[0].tunnel_endpoint = "10.77.1.9"
    policy.policy.rules[1].tunnel_endpoint = "10.77.1.9"
    policy.policy.rules[2].tunnel_endpoint = ME
    d = run(policy)
    assert d.problems == ()
    # IKEv1: one main mode per peer; a responder looks for a quick mode's selectors only among the children
    # of the connection it chose: every tunnel rule to one gateway is a child of one connection.
    (conn,) = d.connections
    assert conn.name == "tunnel-10-77-1-9" and conn.body["remote_addrs"] == ["10.77.1.9"] and not conn.template
    children = list(conn.body["children"].items())
    assert [name.rsplit("-", 1)[0] for name, _ in children] == ["rule-rule1", "rule-rule2"]  # named after rules
    for (_, child), remote_net in zip(children, ("10.2.1.0/24", "10.2.2.0/24"), strict=True):
        assert child["mode"] == "tunnel" and child["local_ts"] == ["10.1.1.0/24"] and child["remote_ts"] == [remote_net]
    inbound = [e for e in d.entries if e.selector.src == ("10.2.1.0/24",)]
    assert inbound and all(e.verdict == NEGOTIATE for e in inbound)
    assert not any("host-to-host tunnel" in n for n in d.notes)


def test_ikev2_is_a_policy_option_and_the_default_response_rule_answers_either() -> None:
    policy = effective(SECURE, psk="k" * 20)
    v1 = run(policy)
    assert {c.initiates: c.body["version"] for c in v1.connections} == {True: "1", False: "0"}
    policy.policy.isakmp.ike_version = 2
    v2 = run(policy)
    versions = {c.initiates: c.body["version"] for c in v2.connections}
    assert versions == {True: "2", False: "0"}
    rule_conn = next(c for c in v2.connections if c.initiates)
    assert rule_conn.body["reauth_time"] == "0s" and rule_conn.body["rekey_time"] == "28800s"


def test_connection_types_are_mapped_to_all_connections_with_a_note() -> None:
    policy = custom([([me_to(host("10.77.1.9"))], NEG)])
    policy.policy.rules[0].connection_type = pb.CONNECTION_TYPE_REMOTE_ACCESS
    d = run(policy)
    assert d.problems == () and any("remote access is enforced on all network connections" in n for n in d.notes)
