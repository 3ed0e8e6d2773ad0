"""combine(persistent, primary): the persistent store's policy in addition to the domain/local one."""

from __future__ import annotations

from pathlib import Path

from builders import default_response_rule, filter_action, filter_list, isakmp, kerberos, policy, rule

from policyagent.agent.combine import combine
from policyagent.agent.enforce import HostFacts
from policyagent.agent.enforce.recordonly import RecordOnlyEnforcer
from policyagent.pb import dist_pb, pb


def _effective(
    source: str,
    name: str,
    lists: list[pb.FilterList],
    actions: list[pb.FilterAction],
    rules: list[pb.Rule],
    *,
    policy_id: str = "{P}",
    membership: str = "",
) -> dist_pb.EffectivePolicy:
    p = policy(name, rules=rules, assigned=True)
    p.id = policy_id
    out = dist_pb.EffectivePolicy(computer="pc1", source=source, membership=membership, version=f"{source}-v")
    out.policy.CopyFrom(p)
    out.filter_lists.extend(lists)
    out.filter_actions.extend(actions)
    return out


def _fl(id_: str, name: str, port: int = 0) -> pb.FilterList:
    fl = filter_list(name)
    fl.id = id_
    fl.filters[0].destination_port = port
    fl.filters[0].protocol = 6 if port else 0
    return fl


def _fa(id_: str, name: str, action: pb.ActionType.ValueType = pb.ACTION_TYPE_NEGOTIATE) -> pb.FilterAction:
    fa = filter_action(name, action=action)
    fa.id = id_
    return fa


def _persistent() -> dist_pb.EffectivePolicy:
    r = rule("{L1}", "{A1}", name="Permit management")
    r.id = "{R1}"
    r.auth_methods[0].CopyFrom(pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key="k")))
    p = _effective("persistent", "Boot", [_fl("{L1}", "Management", 22)], [_fa("{A1}", "Permit", pb.ACTION_TYPE_PERMIT)], [r])
    p.policy.isakmp.lifetime_minutes = 60
    p.policy.default_response_rule.active = False
    return p


def _domain(membership: str = "domain") -> dist_pb.EffectivePolicy:
    r = rule("{L2}", "{A2}", name="Secure all")
    r.id = "{R2}"
    return _effective(
        "domain", "Corp", [_fl("{L2}", "All IP Traffic")], [_fa("{A2}", "Require Security")], [r],
        policy_id="{D}", membership=membership,
    )


def test_both_parts_are_in_the_combination_persistent_rules_first() -> None:
    persistent, domain = _persistent(), _domain()
    out = combine(persistent, domain)
    assert out.source == "persistent+domain"
    assert [r.name for r in out.policy.rules] == ["Permit management", "Secure all"]
    assert {fl.id for fl in out.filter_lists} == {"{L1}", "{L2}"}
    assert {fa.id for fa in out.filter_actions} == {"{A1}", "{A2}"}
    assert out.policy.name == "Corp + Boot (persistent)"
    assert out.membership == "domain" and out.computer == "pc1"
    assert out.version.startswith("combined:") and out.version not in (persistent.version, domain.version)
    assert combine(_persistent(), _domain()).version == out.version  # deterministic
    # The inputs are untouched.
    assert persistent == _persistent() and domain == _domain()


def test_isakmp_default_response_rule_and_id_come_from_the_primary() -> None:
    out = combine(_persistent(), _domain())
    assert out.policy.id == "{D}"
    assert out.policy.isakmp == isakmp()
    assert out.policy.default_response_rule == default_response_rule()
    assert out.policy.polling_interval_minutes == 180


def test_without_primary_policy_the_persistent_one_applies_with_its_own_settings() -> None:
    none = dist_pb.EffectivePolicy(computer="pc1", source="none", membership="workgroup", version="none-v")
    for primary in (none, None):
        out = combine(_persistent(), primary)
        assert out.source == "persistent"
        assert [r.name for r in out.policy.rules] == ["Permit management"]
        assert out.policy.isakmp.lifetime_minutes == 60
        assert not out.policy.default_response_rule.active
    assert combine(_persistent(), none).membership == "workgroup"


def test_without_persistent_policy_the_primary_is_unchanged() -> None:
    domain = _domain()
    assert combine(None, domain) == domain
    assert combine(None, None) == dist_pb.EffectivePolicy()


def test_local_store_primary_is_labelled_local() -> None:
    local = _domain()
    local.source = "local"
    assert combine(_persistent(), local).source == "persistent+local"


def test_clashing_ids_and_names_stay_distinguishable() -> None:
    persistent = _persistent()
    # Same ids and names as the domain's objects, different content.
    persistent.filter_lists[0].id = "{L2}"
    persistent.filter_lists[0].name = "All IP Traffic"
    persistent.filter_actions[0].id = "{A2}"
    persistent.filter_actions[0].name = "Require Security"
    persistent.policy.rules[0].filter_list_id = "{L2}"
    persistent.policy.rules[0].filter_action_id = "{A2}"
    persistent.policy.rules[0].id = "{R2}"
    persistent.policy.rules[0].name = "Secure all"
    out = combine(persistent, _domain())
    lists = {fl.id: fl for fl in out.filter_lists}
    actions = {fa.id: fa for fa in out.filter_actions}
    assert set(lists) == {"persistent:{L2}", "{L2}"}
    assert lists["persistent:{L2}"].name == "All IP Traffic (persistent)"
    assert lists["persistent:{L2}"].filters[0].destination_port == 22
    assert actions["persistent:{A2}"].action == pb.ACTION_TYPE_PERMIT
    assert actions["{A2}"].action == pb.ACTION_TYPE_NEGOTIATE
    first, second = out.policy.rules
    assert (first.id, first.name) == ("persistent:{R2}", "Secure all (persistent)")
    assert (first.filter_list_id, first.filter_action_id) == ("persistent:{L2}", "persistent:{A2}")
    assert (second.id, second.name, second.filter_list_id) == ("{R2}", "Secure all", "{L2}")


def test_the_same_object_in_both_stores_is_kept_once() -> None:
    persistent, domain = _persistent(), _domain()
    shared = pb.FilterAction()
    shared.CopyFrom(domain.filter_actions[0])
    shared.revision = 7  # store bookkeeping does not make it a different object
    persistent.filter_actions[0].CopyFrom(shared)
    persistent.policy.rules[0].filter_action_id = shared.id
    out = combine(persistent, domain)
    assert [fa.id for fa in out.filter_actions] == ["{A2}"]
    assert out.policy.rules[0].filter_action_id == "{A2}"


def test_the_enforcer_checks_the_persistent_part_too(tmp_path: Path) -> None:
    persistent = _persistent()
    persistent.policy.rules[0].auth_methods[0].CopyFrom(kerberos())
    persistent.filter_actions[0].action = pb.ACTION_TYPE_NEGOTIATE
    out = combine(persistent, _domain(membership="workgroup"))
    problems = RecordOnlyEnforcer(tmp_path).check(out, HostFacts(membership=""))
    assert any('"Permit management": Kerberos needs domain membership' in p for p in problems)
