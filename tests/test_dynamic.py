"""Dynamic mode: the in-memory store (validation, add/set/delete) and how its rules compile."""

from __future__ import annotations

import pytest

from policyagent.agent.enforce.compile import CompileInput, HostAddresses, compile_policy
from policyagent.agent.enforce.desired import BLOCK, NEGOTIATE, PERMIT
from policyagent.agent.enforce.dynamic import DynamicError, DynamicStore, pseudo_policies
from policyagent.pb import agent_pb, dist_pb, pb

ME = "10.77.1.2"
HOST = HostAddresses(addresses=(ME,))
MM = agent_pb.DynamicMmPolicy(
    name="mm1", methods=[pb.MainModeMethod(encryption=pb.CIPHER_AES128, integrity=pb.INTEGRITY_SHA256, dh_group=pb.DH_GROUP_MODP2048)]
)
QM = agent_pb.DynamicQmPolicy(
    name="qm1", soft=True, pfs_group="mm",
    methods=[pb.QuickModeMethod(esp=pb.EspTransform(encryption=pb.CIPHER_AES256, integrity=pb.INTEGRITY_SHA1))],
)
ME_ADDR = pb.Address(kind=pb.ADDRESS_KIND_ME)


def host(ip: str) -> pb.Address:
    return pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=ip)


def rule(dst: str, inbound: int, outbound: int, **kw: object) -> agent_pb.DynamicRule:
    fields: dict[str, object] = {"mm_policy": "mm1", **kw}
    r = agent_pb.DynamicRule(
        source=ME_ADDR, destination=host(dst), mirrored=True, action_inbound=inbound, action_outbound=outbound,
        **fields,  # type: ignore[arg-type]
    )
    if pb.ACTION_TYPE_NEGOTIATE in (inbound, outbound):
        r.qm_policy = "qm1"
        r.auth_methods.add(preshared_key=pb.PresharedKeyAuth(key="dynamic-key-123"))
    return r


def edit(store: DynamicStore, **op: object) -> agent_pb.DynamicState:
    state = store.edit(agent_pb.DynamicEdit(**op))  # type: ignore[arg-type]
    store.commit(state)
    return state


@pytest.fixture
def store() -> DynamicStore:
    s = DynamicStore()
    edit(s, add_mm_policy=MM)
    edit(s, add_qm_policy=QM)
    return s


def test_add_set_delete_with_clear_errors(store: DynamicStore) -> None:
    block = rule("10.77.1.9", pb.ACTION_TYPE_BLOCK, pb.ACTION_TYPE_BLOCK)
    edit(store, add_rule=block)
    with pytest.raises(DynamicError, match="exists already"):
        store.edit(agent_pb.DynamicEdit(add_rule=block))
    with pytest.raises(DynamicError, match="used by a rule"):
        store.edit(agent_pb.DynamicEdit(delete_mm_policy="mm1"))
    with pytest.raises(DynamicError, match='no main mode policy "nope"'):
        store.edit(agent_pb.DynamicEdit(add_rule=rule("10.77.1.8", 2, 2, mm_policy="nope")))
    bad = rule("10.77.1.8", pb.ACTION_TYPE_NEGOTIATE, pb.ACTION_TYPE_NEGOTIATE)
    bad.qm_policy = ""
    with pytest.raises(DynamicError, match="qmpolicy is required"):
        store.edit(agent_pb.DynamicEdit(add_rule=bad))
    with pytest.raises(DynamicError, match="ports apply to TCP"):
        store.edit(agent_pb.DynamicEdit(add_rule=rule("10.77.1.8", 2, 2, destination_port=80)))
    # set: only the settable fields change; the filters identify the rule
    change = agent_pb.DynamicRule(source=ME_ADDR, destination=host("10.77.1.9"), mirrored=True,
                                  action_inbound=pb.ACTION_TYPE_PERMIT, action_outbound=pb.ACTION_TYPE_PERMIT)
    state = edit(store, set_rule=change)
    assert state.rules[0].action_inbound == pb.ACTION_TYPE_PERMIT and state.rules[0].mm_policy == "mm1"
    with pytest.raises(DynamicError, match="no dynamic rule has these filters"):
        store.edit(agent_pb.DynamicEdit(delete_rule=rule("10.77.1.7", 2, 2)))
    before = store.state.SerializeToString()
    with pytest.raises(DynamicError):
        store.edit(agent_pb.DynamicEdit(add_qm_policy=agent_pb.DynamicQmPolicy(name="x", pfs_group="9")))
    assert store.state.SerializeToString() == before  # a refused edit changes nothing
    state = edit(store, delete_rule=change)
    assert not state.rules
    state = edit(store, delete_mm_policy="all")
    assert not state.mm_policies and state.qm_policies
    assert not edit(store, delete_all=True).qm_policies


def test_dynamic_rules_compile_with_the_static_policy_most_specific_first(store: DynamicStore) -> None:
    edit(store, add_rule=rule("10.77.1.9", pb.ACTION_TYPE_BLOCK, pb.ACTION_TYPE_BLOCK))
    edit(store, add_rule=rule("10.77.1.8", pb.ACTION_TYPE_PERMIT, pb.ACTION_TYPE_NEGOTIATE))  # inbound pass-through
    static = dist_pb.EffectivePolicy(source="domain", membership="domain")
    static.policy.name = "static"
    fl = static.filter_lists.add(id="fl", name="any")
    fl.filters.add(id="f", mirrored=True, source=ME_ADDR, destination=pb.Address(kind=pb.ADDRESS_KIND_ANY))
    static.filter_actions.add(id="fa", name="permit", action=pb.ACTION_TYPE_PERMIT)
    static.policy.rules.add(id="r", filter_list_id="fl", filter_action_id="fa", active=True)
    d = compile_policy(CompileInput(policy=static, host=HOST, dynamic=tuple(pseudo_policies(store.state))))
    assert d.problems == ()
    order = [(e.verdict, e.selector.src, e.selector.dst) for e in d.entries]
    me = (f"{ME}/32",)
    assert order[-2:] == [(PERMIT, me, ()), (PERMIT, (), me)]  # the static "any" filters are least specific
    assert (BLOCK, me, ("10.77.1.9/32",)) in order
    out = [e for e in d.entries if e.selector.dst == ("10.77.1.8/32",)]
    back = [e for e in d.entries if e.selector.src == ("10.77.1.8/32",)]
    assert [e.verdict for e in out] == [NEGOTIATE] and [e.verdict for e in back] == [PERMIT]
    (conn,) = [c for c in d.connections if c.initiates]
    assert conn.body["remote_addrs"] == ["10.77.1.8"] and conn.body["proposals"] == ["aes128-sha256-modp2048"]
    child = next(iter(conn.body["children"].values()))
    assert child["esp_proposals"] == ["aes256-sha1-modp2048"]  # PFS with the main mode group
    assert [e.fallback_to_clear for e in out] == [True]  # soft=yes
    assert [e.index for e in d.entries] == list(range(len(d.entries)))
