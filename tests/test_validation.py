"""Every validation rule, table-driven: one bad input each, the error naming path and field.

The planner runs over a view of a store holding the Windows defaults, as the
server and the CLI do; a refused write must leave that view untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from policyagent.model import settings as S
from policyagent.model.defaults import default_contents
from policyagent.model.errors import (
    AlreadyExistsError,
    ConflictError,
    InUseError,
    NotFoundError,
    PolicyError,
    ProtectedError,
    ValidationError,
)
from policyagent.model.objects import Kind
from policyagent.model.view import ContentsView
from policyagent.model.writes import Delete, Mutation, Put, plan_writes
from policyagent.pb import pb

ALL_IP = "{7238523A-70FA-11D1-864C-14A300000000}"
ICMP = "{72385235-70FA-11D1-864C-14A300000000}"
PERMIT = "{7238523B-70FA-11D1-864C-14A300000000}"
REQUIRE = "{7238523F-70FA-11D1-864C-14A300000000}"
SECURE_SERVER = "{7238523C-70FA-11D1-864C-14A300000000}"


def store() -> ContentsView:
    contents = default_contents()
    for i, obj in enumerate([*contents.filter_lists, *contents.filter_actions, *contents.policies], start=1):
        obj.revision = i
    return ContentsView(contents)


def host(ip: str) -> pb.Address:
    return pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=ip)


def subnet(ip: str, mask: str) -> pb.Address:
    return pb.Address(kind=pb.ADDRESS_KIND_SUBNET, ip=ip, mask=mask)


ME = pb.Address(kind=pb.ADDRESS_KIND_ME)
ANY = pb.Address(kind=pb.ADDRESS_KIND_ANY)


def flist(*filters: pb.Filter, name: str = "Web") -> pb.FilterList:
    return pb.FilterList(name=name, filters=list(filters))


def flt(src: pb.Address = ME, dst: pb.Address | None = None, **kw: object) -> pb.Filter:
    return pb.Filter(source=src, destination=dst or host("10.0.0.1"), mirrored=True, **kw)  # type: ignore[arg-type]


def esp(c: int = pb.CIPHER_3DES, i: int = pb.INTEGRITY_SHA1, kb: int = 100_000, s: int = 3_600) -> pb.QuickModeMethod:
    return pb.QuickModeMethod(esp=pb.EspTransform(encryption=c, integrity=i), lifetime_kb=kb, lifetime_seconds=s)  # type: ignore[arg-type]


def action(**kw: object) -> pb.FilterAction:
    base: dict[str, object] = {"name": "Encrypt", "action": pb.ACTION_TYPE_NEGOTIATE, "methods": [esp()]}
    base.update(kw)
    return pb.FilterAction(**base)  # type: ignore[arg-type]


KERBEROS = pb.AuthMethod(kerberos=pb.KerberosAuth())


def rule(**kw: object) -> pb.Rule:
    base: dict[str, object] = {
        "name": "r1",
        "filter_list_id": ALL_IP,
        "filter_action_id": REQUIRE,
        "auth_methods": [KERBEROS],
        "connection_type": pb.CONNECTION_TYPE_ALL,
        "active": True,
    }
    base.update(kw)
    return pb.Rule(**base)  # type: ignore[arg-type]


def policy(*rules: pb.Rule, **kw: object) -> pb.Policy:
    base: dict[str, object] = {
        "name": "Corp",
        "polling_interval_minutes": 180,
        "isakmp": pb.IsakmpSettings(
            methods=[pb.MainModeMethod(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1, dh_group=pb.DH_GROUP_MODP2048)],
            lifetime_minutes=480,
        ),
        "rules": list(rules),
        "default_response_rule": pb.DefaultResponseRule(active=True, methods=[esp()], auth_methods=[KERBEROS]),
    }
    base.update(kw)
    return pb.Policy(**base)  # type: ignore[arg-type]


def modified_policy(edit: Callable[[pb.Policy], None]) -> pb.Policy:
    view = store()
    current = view.get(Kind.POLICY, SECURE_SERVER)
    assert isinstance(current, pb.Policy)
    copy = pb.Policy()
    copy.CopyFrom(current)
    edit(copy)
    return copy


@dataclass(frozen=True)
class Case:
    id: str
    mutations: Callable[[], list[Mutation]]
    error: type[PolicyError]
    field: str  # the setting the violation names ("" = any)
    text: str  # a fragment of the message
    path: str = ""  # a fragment of the path


def put(obj_factory: Callable[[], object]) -> Callable[[], list[Mutation]]:
    return lambda: [Put(obj_factory())]  # type: ignore[arg-type]


def _cert(root: str) -> pb.AuthMethod:
    return pb.AuthMethod(certificate=pb.CertificateAuth(root_ca=root))


def _psk(key: str) -> pb.AuthMethod:
    return pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key=key))


def _no_default_rule(p: pb.Policy) -> None:
    p.ClearField("default_response_rule")


CASES = [
    # names
    Case("empty name", put(lambda: flist(flt(), name=" ")), ValidationError, "name", "must not be empty"),
    Case("name with spaces around", put(lambda: flist(flt(), name=" Web ")), ValidationError, "name", "spaces"),
    Case("duplicate filter list name", put(lambda: flist(flt(), name="all ip traffic")), ValidationError, "name", "already named"),
    Case("duplicate filter action name", put(lambda: action(name="PERMIT")), ValidationError, "name", "already named"),
    Case("duplicate policy name", put(lambda: policy(name="client (respond only)")), ValidationError, "name", "already named"),
    Case("name too long", put(lambda: flist(flt(), name="x" * 256)), ValidationError, "name", "longer than 255"),
    # addresses, subnets, masks
    Case("no source address", put(lambda: flist(flt(src=pb.Address()))), ValidationError, "srcaddr", "no address given", 'filter list "Web"/filter 1'),
    Case("bad IP", put(lambda: flist(flt(dst=host("10.0.0.300")))), ValidationError, "dstaddr", "not a valid IP address"),
    Case("non-contiguous mask", put(lambda: flist(flt(dst=subnet("10.0.0.0", "255.0.255.0")))), ValidationError, "dstmask", "not contiguous"),
    Case("mask not a mask", put(lambda: flist(flt(dst=subnet("10.0.0.0", "banana")))), ValidationError, "dstmask", "is not a mask"),
    Case("host bits outside mask", put(lambda: flist(flt(dst=subnet("10.0.0.1", "255.255.255.0")))), ValidationError, "dstmask", "bits set outside the mask"),
    Case("prefix too long", put(lambda: flist(flt(dst=subnet("10.0.0.0", "33")))), ValidationError, "dstmask", "out of range"),
    Case("IPv6 subnet with dotted mask", put(lambda: flist(flt(dst=subnet("2001:db8::", "255.255.0.0")))), ValidationError, "dstmask", "prefix length"),
    Case("mixed families", put(lambda: flist(flt(src=host("10.0.0.2"), dst=host("2001:db8::1")))), ValidationError, "dstaddr", "both be IPv4 or both IPv6"),
    Case("me takes no address", put(lambda: flist(flt(src=pb.Address(kind=pb.ADDRESS_KIND_ME, ip="1.2.3.4")))), ValidationError, "srcaddr", "take no address"),
    Case("host with a mask", put(lambda: flist(flt(dst=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip="10.0.0.1", mask="255.0.0.0")))), ValidationError, "dstaddr", "no mask"),
    Case("source equals destination", put(lambda: flist(flt(src=host("10.0.0.1"), dst=host("10.0.0.1")))), ValidationError, "dstaddr", "the same"),
    Case("me to me", put(lambda: flist(flt(src=ME, dst=ME))), ValidationError, "dstaddr", "the same"),
    # protocols and ports
    Case("protocol out of range", put(lambda: flist(flt(protocol=300))), ValidationError, "protocol", "out of range (0–255)"),
    Case("ports with ICMP", put(lambda: flist(flt(protocol=1, destination_port=80))), ValidationError, "dstport", "only be given with protocol TCP or UDP"),
    Case("ports with any protocol", put(lambda: flist(flt(source_port=80))), ValidationError, "srcport", "TCP or UDP"),
    Case("port out of range", put(lambda: flist(flt(protocol=6, destination_port=70000))), ValidationError, "dstport", "out of range"),
    # mirrored semantics
    Case("duplicate filter", put(lambda: flist(flt(), flt())), ValidationError, "", "same as filter 1", 'filter list "Web"/filter 2'),
    Case(
        "tunnel rule with mirrored filters",
        put(lambda: policy(rule(tunnel_endpoint="192.0.2.1"))),
        ValidationError, "mirrored", "tunnel rules need one-way filters", 'policy "Corp"/rule 1/filter list',
    ),
    # filter actions, methods, lifetimes, algorithms
    Case("negotiate without methods", put(lambda: action(methods=[])), ValidationError, "qmsecmethods", "at least one security method"),
    Case("method without AH or ESP", put(lambda: action(methods=[pb.QuickModeMethod(lifetime_kb=100000, lifetime_seconds=3600)])), ValidationError, "qmsecmethods", "AH, ESP or both"),
    Case("ESP none/none", put(lambda: action(methods=[esp(pb.CIPHER_NONE, pb.INTEGRITY_NONE)])), ValidationError, "qmsecmethods", "protects nothing"),
    Case("unknown cipher", put(lambda: action(methods=[esp(c=99)])), ValidationError, "qmsecmethods", "unknown ESP encryption"),
    Case("unknown AH integrity", put(lambda: action(methods=[pb.QuickModeMethod(ah=pb.AhTransform(integrity=pb.INTEGRITY_NONE), lifetime_kb=100000, lifetime_seconds=3600)])), ValidationError, "qmsecmethods", "unknown AH integrity"),
    Case("QM lifetime seconds too short", put(lambda: action(methods=[esp(s=299)])), ValidationError, "qmsecmethods", "299 seconds is out of range", 'filter action "Encrypt"/security method 1'),
    Case("QM lifetime seconds too long", put(lambda: action(methods=[esp(s=172_801)])), ValidationError, "qmsecmethods", "out of range"),
    Case("QM lifetime KB too small", put(lambda: action(methods=[esp(kb=20_479)])), ValidationError, "qmsecmethods", "KB is out of range"),
    Case("permit with methods", put(lambda: action(action=pb.ACTION_TYPE_PERMIT)), ValidationError, "qmsecmethods", "only negotiate"),
    Case("block with inpass", put(lambda: action(action=pb.ACTION_TYPE_BLOCK, methods=[], inbound_passthrough=True)), ValidationError, "inpass", "only to negotiate"),
    Case("permit with soft", put(lambda: action(action=pb.ACTION_TYPE_PERMIT, methods=[], fallback_to_clear=True)), ValidationError, "soft", "only to negotiate"),
    Case("no action type", put(lambda: action(action=pb.ACTION_TYPE_UNSPECIFIED)), ValidationError, "action", "permit, block or negotiate"),
    # main mode
    Case("no MM methods", put(lambda: policy(isakmp=pb.IsakmpSettings(lifetime_minutes=480))), ValidationError, "mmsecmethods", "at least one main mode"),
    Case(
        "MM cipher none",
        put(lambda: policy(isakmp=pb.IsakmpSettings(methods=[pb.MainModeMethod(encryption=pb.CIPHER_NONE, integrity=pb.INTEGRITY_SHA1, dh_group=pb.DH_GROUP_MODP1024)], lifetime_minutes=480))),
        ValidationError, "mmsecmethods", "unknown encryption",
    ),
    Case(
        "MM unknown DH group (IKE group 3 is not MODP-2048)",
        put(lambda: policy(isakmp=pb.IsakmpSettings(methods=[pb.MainModeMethod(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1, dh_group=3)], lifetime_minutes=480))),  # type: ignore[arg-type]
        ValidationError, "mmsecmethods", "unknown DH group 3",
    ),
    Case("MM lifetime too short", put(lambda: policy(isakmp=pb.IsakmpSettings(methods=[pb.MainModeMethod(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1, dh_group=pb.DH_GROUP_MODP1024)], lifetime_minutes=4))), ValidationError, "mmlifetime", "out of range (5–2 880 minutes)"),
    Case("MM PFS with qmpermm != 1", put(lambda: policy(isakmp=pb.IsakmpSettings(methods=[pb.MainModeMethod(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1, dh_group=pb.DH_GROUP_MODP1024)], lifetime_minutes=480, master_key_pfs=True))), ValidationError, "qmpermm", "must be 1"),
    Case("polling interval zero", put(lambda: policy(polling_interval_minutes=0)), ValidationError, "pollinginterval", "out of range"),
    # authentication
    Case("empty PSK", put(lambda: policy(rule(auth_methods=[_psk("")]))), ValidationError, "psk", "must not be empty", 'policy "Corp"/rule 1/authentication method 1'),
    Case("masked PSK written back", put(lambda: policy(rule(auth_methods=[_psk("********")]))), ValidationError, "psk", "masked placeholder"),
    Case("NUL in PSK", put(lambda: policy(rule(auth_methods=[_psk("a\x00b")]))), ValidationError, "psk", "NUL"),
    Case("empty root CA", put(lambda: policy(rule(auth_methods=[_cert("")]))), ValidationError, "rootca", "needs the root CA"),
    Case("bad root CA syntax", put(lambda: policy(rule(auth_methods=[_cert("Example Root")]))), ValidationError, "rootca", "not an X.500 name"),
    Case("bad root CA attribute", put(lambda: policy(rule(auth_methods=[_cert("C N=x")]))), ValidationError, "rootca", "not an attribute name"),
    Case("auth listed twice", put(lambda: policy(rule(auth_methods=[KERBEROS, KERBEROS]))), ValidationError, "kerberos", "listed twice"),
    Case("negotiate rule without auth", put(lambda: policy(rule(auth_methods=[]))), ValidationError, "kerberos", "at least one authentication"),
    Case("empty auth method", put(lambda: policy(rule(auth_methods=[pb.AuthMethod()]))), ValidationError, "", "no method given"),
    Case("default rule without auth", put(lambda: policy(default_response_rule=pb.DefaultResponseRule(methods=[esp()]))), ValidationError, "kerberos", "at least one", 'policy "Corp"/default response rule'),
    # rules and references
    Case("missing filter list", put(lambda: policy(rule(filter_list_id="{00000000-0000-0000-0000-000000000001}"))), ValidationError, "filterlist", "no filter list with id", 'policy "Corp"/rule 1/filter list'),
    Case("missing filter action", put(lambda: policy(rule(filter_action_id=""))), ValidationError, "filteraction", "no filter action given", 'policy "Corp"/rule 1/filter action'),
    Case("rule without name", put(lambda: policy(rule(name=""))), ValidationError, "name", "must not be empty"),
    Case("duplicate rule names", put(lambda: policy(rule(name="a"), rule(name="A", filter_list_id=ICMP))), ValidationError, "name", "already named", 'policy "Corp"/rule 2'),
    Case("bad tunnel endpoint", put(lambda: policy(rule(tunnel_endpoint="300.1.1.1"))), ValidationError, "tunnel", "not a valid IP"),
    Case("multicast tunnel endpoint", put(lambda: policy(rule(tunnel_endpoint="224.0.0.1"))), ValidationError, "tunnel", "cannot be a tunnel endpoint"),
    Case("no connection type", put(lambda: policy(rule(connection_type=pb.CONNECTION_TYPE_UNSPECIFIED))), ValidationError, "conntype", "all, lan or dialup"),
    # the default response rule
    Case("deleting the default response rule", put(lambda: modified_policy(_no_default_rule)), ValidationError, "", "cannot be deleted; deactivate it", "default response rule"),
    # store-level rules
    Case("delete filter list in use", lambda: [Delete(Kind.FILTER_LIST, ALL_IP)], InUseError, "", 'is used by policy "Server (Request Security)"/rule 1'),
    Case("delete filter action in use", lambda: [Delete(Kind.FILTER_ACTION, PERMIT)], InUseError, "", "is used by"),
    Case("stale revision", lambda: [Put(modified_policy(lambda p: setattr(p, "revision", 1)))], ConflictError, "", 'policy "Secure Server (Require Security)" was changed by someone else'),
    Case("create with existing id", put(lambda: flist(flt(), name="X").__class__(id=ALL_IP, name="X")), AlreadyExistsError, "", "exists"),
    Case("update of a missing object", put(lambda: pb.FilterList(id="{00000000-0000-0000-0000-000000000009}", name="X", revision=4)), NotFoundError, "", "does not exist"),
    Case("delete of a missing object", lambda: [Delete(Kind.POLICY, "{00000000-0000-0000-0000-000000000009}")], NotFoundError, "", "does not exist"),
    Case("two policies assigned at once", lambda: [Put(policy(assigned=True)), Put(policy(name="Other", assigned=True))], ValidationError, "assign", "only one policy"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_validation_rule(case: Case) -> None:
    view = store()
    before = view.contents().SerializeToString(deterministic=True)
    with pytest.raises(case.error) as info:
        plan_writes(view, case.mutations())
    message = str(info.value)
    assert case.text in message
    if isinstance(info.value, ValidationError):
        matching = [v for v in info.value.violations if case.text in str(v)]
        assert matching, info.value.violations
        if case.field:
            assert matching[0].field == case.field, matching[0]
        if case.path:
            assert case.path in matching[0].path, matching[0]
    elif case.path:
        assert case.path in message
    assert view.contents().SerializeToString(deterministic=True) == before


def test_all_violations_are_reported_together() -> None:
    bad = flist(flt(protocol=300), flt(dst=subnet("10.0.0.1", "255.0.255.0")))
    with pytest.raises(ValidationError) as info:
        plan_writes(store(), [Put(bad)])
    fields = {v.field for v in info.value.violations}
    assert {"protocol", "dstmask"} <= fields
    assert "(and 1 more)" in str(info.value)


def test_error_message_names_path_and_field() -> None:
    with pytest.raises(ValidationError) as info:
        plan_writes(store(), [Put(action(methods=[esp(s=10)]))])
    assert str(info.value) == (
        'filter action "Encrypt"/security method 1: qmsecmethods: lifetime 10 seconds is out of range (300–172 800 seconds)'
    )


def test_a_valid_policy_passes_and_gets_ids() -> None:
    fl = flist(flt(dst=subnet("10.1.0.0", "255.255.0.0"), protocol=6, destination_port=443))
    fl.id = "{11111111-1111-1111-1111-111111111111}"
    p = policy(
        rule(filter_list_id=fl.id, auth_methods=[_cert('CN=Example Root, O="Example, Inc."'), _psk("s3cret"), KERBEROS]),
        rule(name="icmp", filter_list_id=ICMP, filter_action_id=PERMIT, auth_methods=[]),
    )
    plan = plan_writes(store(), [Put(fl), Put(p)])
    assert [pp.operation for pp in plan.puts] == ["create", "create"]
    stored = plan.puts[1].obj
    assert isinstance(stored, pb.Policy)
    assert all(r.id.startswith("{") for r in stored.rules)
    assert stored.default_response_rule.id
    assert plan.puts[0].obj.filters[0].id  # type: ignore[union-attr]


def test_deleting_a_policy_and_its_filter_list_together_is_allowed() -> None:
    fl = flist(flt(), name="Only")
    fl.id = "{22222222-2222-2222-2222-222222222222}"
    p = policy(rule(filter_list_id=fl.id))
    p.id = "{33333333-3333-3333-3333-333333333333}"
    view = store()
    plan = plan_writes(view, [Put(fl), Put(p)])
    for planned in plan.puts:
        planned.obj.revision = 99
        view.add(planned.obj)
    with pytest.raises(InUseError):
        plan_writes(view, [Delete(Kind.FILTER_LIST, fl.id)])
    plan = plan_writes(view, [Delete(Kind.POLICY, p.id), Delete(Kind.FILTER_LIST, fl.id)])
    assert len(plan.deletes) == 2


def test_assigning_unassigns_the_other_policy() -> None:
    view = store()
    first = modified_policy(lambda p: setattr(p, "assigned", True))
    view.add(first)
    client = view.get(Kind.POLICY, "{72385236-70FA-11D1-864C-14A300000000}")
    assert isinstance(client, pb.Policy)
    second = pb.Policy()
    second.CopyFrom(client)
    second.assigned = True
    plan = plan_writes(view, [Put(second)])
    ops = {p.obj.name: p.operation for p in plan.puts}
    assert ops == {"Client (Respond Only)": "assign", "Secure Server (Require Security)": "unassign"}


def test_deleting_an_assigned_policy_is_refused() -> None:
    view = store()
    view.add(modified_policy(lambda p: setattr(p, "assigned", True)))
    with pytest.raises(ProtectedError, match="unassign it before deleting"):
        plan_writes(view, [Delete(Kind.POLICY, SECURE_SERVER)])


def test_deactivating_the_default_rule_is_allowed() -> None:
    p = modified_policy(lambda p: setattr(p.default_response_rule, "active", False))
    plan = plan_writes(store(), [Put(p)])
    assert plan.puts[0].operation == "update"


# ------------------------------------------------- netsh value parsing (same table)

PARSE_CASES = [
    (S.MMSECMETHODS, "3DES-SHA1-3", None),
    (S.MMSECMETHODS, "3DES-SHA1-9", 'unknown DH group "9"'),
    (S.MMSECMETHODS, "3DES-SHA9-2", 'unknown integrity algorithm "SHA9"'),
    (S.MMSECMETHODS, "RC4-SHA1-2", 'unknown encryption algorithm "RC4"'),
    (S.MMSECMETHODS, "3DES-SHA1", "ConfAlg-HashAlg-GroupNum"),
    (S.QMSECMETHODS, "ESP[3DES,SHA1]:50000k/600s AH[MD5]+ESP[DES,None]", None),
    (S.QMSECMETHODS, "ESP[3DES]", "encryption and an integrity"),
    (S.QMSECMETHODS, "ESP[3DES,SHA1]:fast", "is not like 100000k/3600s"),
    (S.QMSECMETHODS, "GRE[x]", "is not AH[Hash]"),
    (S.SRCADDR, "10.0.0.256", "not a valid IPv4 address"),
    (S.SRCADDR, "bad_name!", "is not an IP address, a DNS name"),
    (S.SRCMASK, "255.255.0.255", "not contiguous"),
    (S.SRCMASK, "24", None),
    (S.PROTOCOL, "300", "out of range (0–255)"),
    (S.PROTOCOL, "tcp", None),
    (S.MMLIFETIME, "4", "out of range"),
    (S.MMLIFETIME, "ten", "not a whole number"),
    (S.MIRRORED, "maybe", "is not yes or no"),
    (S.ACTION, "neg", None),
    (S.ACTION, "allow", "is not one of permit, block, negotiate"),
    (S.PSK, "", "must not be empty"),
    (S.ROOTCA, "CN=Root CA certmap:yes excludecaname:no", None),
    (S.ROOTCA, "certmap:yes", "needs the root CA"),
    (S.ROOTCA, "Root CA", "not an X.500 name"),
    (S.ROOTCA, "CN=x certmap:perhaps", "is not yes or no"),
]


@pytest.mark.parametrize(("setting", "raw", "error"), PARSE_CASES, ids=[f"{s.name}={r}" for s, r, _ in PARSE_CASES])
def test_netsh_value_parsing(setting: S.Setting, raw: str, error: str | None) -> None:
    if error is None:
        setting.parse(raw)
        return
    with pytest.raises(ValidationError) as info:
        setting.parse(raw)
    assert info.value.violations[0].field == setting.name
    assert error in str(info.value)


def test_dh_group_3_is_modp2048_ike_14() -> None:
    (method,) = S.MMSECMETHODS.parse("3DES-SHA1-3")  # type: ignore[misc]
    assert method.dh_group == pb.DH_GROUP_MODP2048 == 14
    assert S.format_mmsecmethods([method]) == "3DES-SHA1-3"
    (same,) = S.MMSECMETHODS.parse("3des-sha1-14")  # type: ignore[misc]
    assert same == method


def test_qmsecmethods_round_trip() -> None:
    text = "ESP[3DES,SHA1]:50000k/600s AH[MD5]+ESP[DES,NONE]:100000k/3600s AH[SHA1]:100000k/3600s"
    methods = S.QMSECMETHODS.parse(text)
    assert S.format_qmsecmethods(methods) == text  # type: ignore[arg-type]


def test_rootca_options_and_quotes() -> None:
    value = S.ROOTCA.parse("CN=Root, O=\\'Example, Inc.\\' certmap:yes excludecaname:yes")
    assert value == S.RootCa('CN=Root, O="Example, Inc."', True, True)
