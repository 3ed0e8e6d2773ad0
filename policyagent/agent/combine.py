"""Combine the persistent store's policy with the domain (or local) one (Windows Server 2003 semantics).

The persistent store's assigned policy applies at startup and *in addition to* the local/domain
policy, and stays in force if those fail to apply (reference §3.2, §5.3). `combine` is the pure part
of that: one self-contained `EffectivePolicy` that the enforcer checks and applies as a whole.

- Rules: the persistent policy's first, then the primary's (domain, or local when the domain
  assigns none). Filter lists and filter actions: those both use.
- Clashes: an object of the persistent part whose id is also used by the primary part is kept
  once if both are the same object (same content apart from revision/time stamps); otherwise the
  persistent one gets the id "persistent:ID" (its rules follow). A persistent rule, filter list or
  filter action whose name is also used by the primary part is named "NAME (persistent)".
- ISAKMP/main-mode settings, the default response rule, the polling interval, the policy id, the
  membership and the RSoP come from the primary policy when there is one, else from the persistent one.
- The version is a content hash ("combined:..."); the server's (domain) version is not this one.
  With no persistent policy, the primary policy is returned unchanged (same version).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

from policyagent.pb import dist_pb, pb

PERSISTENT_ID_PREFIX = "persistent:"
PERSISTENT_NAME_SUFFIX = " (persistent)"

_Obj = TypeVar("_Obj", pb.FilterList, pb.FilterAction)


def has_policy(policy: dist_pb.EffectivePolicy | None) -> bool:
    return policy is not None and policy.source != "none" and policy.HasField("policy")


def _same(a: _Obj, b: _Obj) -> bool:
    a2, b2 = type(a)(), type(b)()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    for m in (a2, b2):
        m.revision = 0
        m.modified_unix_ms = 0
    return a2.SerializeToString(deterministic=True) == b2.SerializeToString(deterministic=True)


def _merge_objects(
    persistent: list[_Obj], primary: list[_Obj], make: Callable[[], _Obj]
) -> tuple[list[_Obj], dict[str, str]]:
    """The primary's objects plus the persistent ones (renamed on clash); returns them and the id map."""
    by_id = {o.id: o for o in primary}
    names = {o.name for o in primary}
    out: list[_Obj] = []
    ids: dict[str, str] = {}
    for obj in persistent:
        if obj.id in by_id and _same(obj, by_id[obj.id]):
            ids[obj.id] = obj.id  # the same object in both stores: keep it once
            continue
        copy = make()
        copy.CopyFrom(obj)
        if copy.id in by_id:
            copy.id = PERSISTENT_ID_PREFIX + copy.id
        if copy.name and copy.name in names:
            copy.name += PERSISTENT_NAME_SUFFIX
        ids[obj.id] = copy.id
        out.append(copy)
    out.extend(primary)
    return out, ids


def combine(
    persistent: dist_pb.EffectivePolicy | None, primary: dist_pb.EffectivePolicy | None
) -> dist_pb.EffectivePolicy:
    """One effective policy: the persistent policy's rules plus the primary (domain or local) policy's."""
    if not has_policy(persistent):
        out = dist_pb.EffectivePolicy()
        if primary is not None:
            out.CopyFrom(primary)
        return out
    assert persistent is not None
    if not has_policy(primary):
        out = dist_pb.EffectivePolicy()
        out.CopyFrom(persistent)
        out.nonce = ""
        out.source = "persistent"
        if primary is not None:
            out.computer = primary.computer or out.computer
            out.membership = primary.membership or out.membership
            out.rsop.extend(primary.rsop)
        return _versioned(out)
    assert primary is not None
    out = dist_pb.EffectivePolicy(
        computer=primary.computer or persistent.computer,
        membership=primary.membership or persistent.membership,
        source=f"persistent+{primary.source}",
    )
    out.policy.CopyFrom(primary.policy)
    p, q = persistent.policy, primary.policy
    out.policy.name = f"{q.name} + {p.name}{PERSISTENT_NAME_SUFFIX}"
    lists, list_ids = _merge_objects(list(persistent.filter_lists), list(primary.filter_lists), pb.FilterList)
    actions, action_ids = _merge_objects(
        list(persistent.filter_actions), list(primary.filter_actions), pb.FilterAction
    )
    rule_ids = {r.id for r in q.rules if r.id}
    rule_names = {r.name for r in q.rules if r.name}
    rules: list[pb.Rule] = []
    for rule in p.rules:
        copy = pb.Rule()
        copy.CopyFrom(rule)
        copy.filter_list_id = list_ids.get(rule.filter_list_id, rule.filter_list_id)
        copy.filter_action_id = action_ids.get(rule.filter_action_id, rule.filter_action_id)
        if copy.id and copy.id in rule_ids:
            copy.id = PERSISTENT_ID_PREFIX + copy.id
        if copy.name and copy.name in rule_names:
            copy.name += PERSISTENT_NAME_SUFFIX
        rules.append(copy)
    del out.policy.rules[:]
    out.policy.rules.extend([*rules, *q.rules])
    out.filter_lists.extend(lists)
    out.filter_actions.extend(actions)
    out.rsop.extend(primary.rsop)
    return _versioned(out)


def _versioned(out: dist_pb.EffectivePolicy) -> dist_pb.EffectivePolicy:
    out.version = ""
    out.version = "combined:" + hashlib.sha256(out.SerializeToString(deterministic=True)).hexdigest()
    return out

