"""Dynamic mode: `netsh ipsec dynamic add|set|delete mmpolicy|qmpolicy|rule`, kept in memory.

As on Windows, dynamic policy lives only as long as the service: the agent keeps it in memory, enforces
it together with the static (assigned) policy, and forgets it when it stops. `DynamicStore.edit()`
validates an edit against the whole state and returns the new state without changing anything, so the
caller can enforce it first and commit only what was applied (`commit()`).

`pseudo_policies()` turns each dynamic rule into a one-rule policy in the static model (its main mode
policy becomes the policy's IKE settings, its quick mode policy a filter action), which compile() maps
like any other; a rule whose inbound and outbound actions differ becomes two one-direction rules.
"""

from __future__ import annotations

import hashlib

from policyagent.pb import agent_pb, dist_pb, pb

MIRROR_ACTIONS = (pb.ACTION_TYPE_PERMIT, pb.ACTION_TYPE_BLOCK, pb.ACTION_TYPE_NEGOTIATE)
_PFS = {"": None, "1": pb.DH_GROUP_MODP768, "2": pb.DH_GROUP_MODP1024, "3": pb.DH_GROUP_MODP2048, "mm": None}


class DynamicError(ValueError):
    """A refused dynamic-mode edit; the message names the object and the problem."""


def _addr_text(a: pb.Address) -> str:
    kind = pb.AddressKind.Name(a.kind).removeprefix("ADDRESS_KIND_").lower()
    if a.kind == pb.ADDRESS_KIND_HOST:
        return a.ip
    if a.kind == pb.ADDRESS_KIND_SUBNET:
        return f"{a.ip}/{a.mask}"
    return kind


def _addr_key(a: pb.Address) -> tuple[int, str, str]:
    """An address by value (the DNS name it was resolved from does not matter)."""
    return (a.kind, a.ip, a.mask)


def rule_key(rule: agent_pb.DynamicRule) -> tuple[object, ...]:
    """What identifies a dynamic rule (Windows: everything but the policies, actions and auth methods)."""
    return (
        _addr_key(rule.source),
        _addr_key(rule.destination),
        rule.protocol,
        rule.source_port,
        rule.destination_port,
        rule.mirrored,
        rule.connection_type,
        rule.tunnel_endpoint,
    )


def describe_rule(rule: agent_pb.DynamicRule) -> str:
    ports = ""
    if rule.source_port or rule.destination_port:
        ports = f" ports {rule.source_port or 'any'}→{rule.destination_port or 'any'}"
    proto = f" protocol {rule.protocol}" if rule.protocol else ""
    return f"rule {_addr_text(rule.source)}→{_addr_text(rule.destination)}{proto}{ports}"


def _check_rule(rule: agent_pb.DynamicRule, state: agent_pb.DynamicState) -> None:
    what = describe_rule(rule)
    mm = {p.name.lower() for p in state.mm_policies}
    qm = {p.name.lower() for p in state.qm_policies}
    if not rule.mm_policy:
        raise DynamicError(f"{what}: mmpolicy is required")
    if rule.mm_policy.lower() not in mm:
        raise DynamicError(f'{what}: mmpolicy: there is no main mode policy "{rule.mm_policy}"')
    for field, action in (("actioninbound", rule.action_inbound), ("actionoutbound", rule.action_outbound)):
        if action not in MIRROR_ACTIONS:
            raise DynamicError(f"{what}: {field} must be permit, block or negotiate")
    negotiates = pb.ACTION_TYPE_NEGOTIATE in (rule.action_inbound, rule.action_outbound)
    if negotiates and not rule.qm_policy:
        raise DynamicError(f"{what}: qmpolicy is required when an action is negotiate")
    if rule.qm_policy and rule.qm_policy.lower() not in qm:
        raise DynamicError(f'{what}: qmpolicy: there is no quick mode policy "{rule.qm_policy}"')
    if negotiates and not rule.auth_methods:
        raise DynamicError(f"{what}: give an authentication method (kerberos=, psk= or rootca=)")
    if (rule.source_port or rule.destination_port) and rule.protocol not in (6, 17):
        raise DynamicError(f"{what}: ports apply to TCP (6) and UDP (17) only")
    if any(m.HasField("preshared_key") and set(m.preshared_key.key) <= {"*"} for m in rule.auth_methods):
        raise DynamicError(f"{what}: psk: give the key itself, not its masked form")
    if rule.tunnel_endpoint and rule.mirrored:
        raise DynamicError(f"{what}: tunnel rules cannot be mirrored")


def _check_mm(p: agent_pb.DynamicMmPolicy) -> None:
    if not p.name.strip():
        raise DynamicError("mmpolicy: name is required")
    if not p.methods:
        raise DynamicError(f'mmpolicy "{p.name}": mmsecmethods: at least one method is required')


def _check_qm(p: agent_pb.DynamicQmPolicy) -> None:
    if not p.name.strip():
        raise DynamicError("qmpolicy: name is required")
    if p.pfs_group not in _PFS:
        raise DynamicError(
            f'qmpolicy "{p.name}": pfsgroup: "{p.pfs_group}" is not one of GRP1, GRP2, GRP3, GRPMM, NOPFS'
        )
    if not p.methods:
        raise DynamicError(f'qmpolicy "{p.name}": qmsecmethods: at least one method is required')


class DynamicStore:
    """The agent's dynamic-mode policy (in memory)."""

    def __init__(self) -> None:
        self.state = agent_pb.DynamicState()

    def edit(self, request: agent_pb.DynamicEdit) -> agent_pb.DynamicState:
        """The state after `request` (validated); nothing changes until commit()."""
        new = agent_pb.DynamicState()
        new.CopyFrom(self.state)
        op = request.WhichOneof("op")
        if op is None:
            raise DynamicError("empty dynamic-mode request")
        if op in ("add_mm_policy", "set_mm_policy"):
            p = getattr(request, op)
            _check_mm(p)
            self._put(new.mm_policies, p, op.startswith("add"), "main mode policy")
        elif op in ("add_qm_policy", "set_qm_policy"):
            p = getattr(request, op)
            _check_qm(p)
            self._put(new.qm_policies, p, op.startswith("add"), "quick mode policy")
        elif op == "delete_mm_policy":
            self._delete_policy(new, new.mm_policies, request.delete_mm_policy, "mm_policy", "main mode policy")
        elif op == "delete_qm_policy":
            self._delete_policy(new, new.qm_policies, request.delete_qm_policy, "qm_policy", "quick mode policy")
        elif op == "add_rule":
            rule = request.add_rule
            _check_rule(rule, new)
            if any(rule_key(r) == rule_key(rule) for r in new.rules):
                raise DynamicError(f"{describe_rule(rule)}: a rule with these filters exists already (use set rule)")
            new.rules.append(rule)
        elif op == "set_rule":
            rule = request.set_rule
            index = self._find_rule(new, rule)
            merged = agent_pb.DynamicRule()
            merged.CopyFrom(new.rules[index])
            for field in ("mm_policy", "qm_policy"):
                if getattr(rule, field):
                    setattr(merged, field, getattr(rule, field))
            for field in ("action_inbound", "action_outbound"):
                if getattr(rule, field) != pb.ACTION_TYPE_UNSPECIFIED:
                    setattr(merged, field, getattr(rule, field))
            if rule.auth_methods:
                del merged.auth_methods[:]
                merged.auth_methods.extend(rule.auth_methods)
            _check_rule(merged, new)
            new.rules[index].CopyFrom(merged)
        elif op == "delete_rule":
            del new.rules[self._find_rule(new, request.delete_rule)]
        elif op == "delete_all":
            new = agent_pb.DynamicState()
        return new

    def commit(self, state: agent_pb.DynamicState) -> None:
        self.state = state

    @staticmethod
    def _put(items: object, p: object, create: bool, what: str) -> None:
        seq = items  # a repeated field of DynamicMmPolicy or DynamicQmPolicy
        name = p.name  # type: ignore[attr-defined]
        for existing in seq:  # type: ignore[attr-defined]
            if existing.name.lower() == name.lower():
                if create:
                    raise DynamicError(f'{what} "{name}" exists already (use set)')
                existing.CopyFrom(p)
                return
        if not create:
            raise DynamicError(f'there is no {what} "{name}"')
        seq.add().CopyFrom(p)  # type: ignore[attr-defined]

    @staticmethod
    def _delete_policy(state: agent_pb.DynamicState, items: object, name: str, field: str, what: str) -> None:
        seq = list(items)  # type: ignore[call-overload]
        used = {getattr(r, field).lower() for r in state.rules}
        if name.lower() == "all":
            keep = [p for p in seq if p.name.lower() in used]
        else:
            match = [p for p in seq if p.name.lower() == name.lower()]
            if not match:
                raise DynamicError(f'there is no {what} "{name}"')
            if match[0].name.lower() in used:
                raise DynamicError(f'{what} "{name}" is used by a rule; delete or change the rule first')
            keep = [p for p in seq if p is not match[0]]
        del items[:]  # type: ignore[attr-defined]
        items.extend(keep)  # type: ignore[attr-defined]

    @staticmethod
    def _find_rule(state: agent_pb.DynamicState, rule: agent_pb.DynamicRule) -> int:
        for i, r in enumerate(state.rules):
            if rule_key(r) == rule_key(rule):
                return i
        raise DynamicError(f"{describe_rule(rule)}: no dynamic rule has these filters")


def pseudo_policies(state: agent_pb.DynamicState) -> list[dist_pb.EffectivePolicy]:
    """One effective policy per dynamic rule, in the static model, for compile()."""
    mm = {p.name.lower(): p for p in state.mm_policies}
    qm = {p.name.lower(): p for p in state.qm_policies}
    out = []
    for n, rule in enumerate(state.rules, start=1):
        tag = hashlib.sha256(b"".join(str(k).encode() for k in rule_key(rule))).hexdigest()[:12]
        eff = dist_pb.EffectivePolicy(computer="", membership="", source="dynamic", version=f"dynamic-{tag}")
        policy = eff.policy
        policy.id, policy.name = f"dynamic-{tag}", f"dynamic mode rule {n}"
        mmp = mm.get(rule.mm_policy.lower())
        if mmp is not None:
            policy.isakmp.methods.extend(mmp.methods)
            policy.isakmp.lifetime_minutes = mmp.mm_lifetime_minutes
            policy.isakmp.qm_per_mm = mmp.qm_per_mm
        qmp = qm.get(rule.qm_policy.lower())
        directions: list[tuple[str, pb.Address, pb.Address, int, int, bool, int]]
        if rule.action_inbound == rule.action_outbound:
            directions = [
                ("", rule.source, rule.destination, rule.source_port, rule.destination_port, rule.mirrored,
                 rule.action_outbound)
            ]
        else:
            directions = [
                ("out", rule.source, rule.destination, rule.source_port, rule.destination_port, False,
                 rule.action_outbound)
            ]
            if rule.mirrored:
                directions.append(
                    ("in", rule.destination, rule.source, rule.destination_port, rule.source_port, False,
                     rule.action_inbound)
                )
        for suffix, src, dst, sport, dport, mirrored, action in directions:
            rid = f"dyn{tag}{suffix}"
            fl = eff.filter_lists.add(id=f"{rid}-fl", name=f"dynamic {n}{suffix}")
            fl.filters.add(
                id=f"{rid}-f", mirrored=mirrored, source=src, destination=dst, protocol=rule.protocol,
                source_port=sport, destination_port=dport,
            )
            fa = eff.filter_actions.add(id=f"{rid}-fa", name=f"dynamic {n}{suffix}", action=action)
            if action == pb.ACTION_TYPE_NEGOTIATE and qmp is not None:
                fa.methods.extend(qmp.methods)
                fa.fallback_to_clear = qmp.soft
                fa.session_key_pfs = qmp.pfs_group != ""
            policy.rules.add(
                id=rid, name=f"dynamic {n}{suffix}", filter_list_id=fl.id, filter_action_id=fa.id,
                auth_methods=list(rule.auth_methods), tunnel_endpoint=rule.tunnel_endpoint,
                connection_type=rule.connection_type or pb.CONNECTION_TYPE_ALL, active=True,
            )
        out.append(eff)
    return out


__all__ = ["DynamicError", "DynamicStore", "describe_rule", "pseudo_policies", "rule_key"]
