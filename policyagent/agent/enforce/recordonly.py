"""The record-only enforcer: checks a policy against this host, records it, enforces nothing.

Until the enforcement issue lands, this is the agent's only backend, and it says so
plainly in its capabilities (`enforces = false`), its status line and its logs. It
still refuses what this host could never enforce, so the server's fleet view shows
the same NACKs the real backend will give:

- a rule (or the default response rule) whose only authentication method is
  Kerberos, on a workgroup member: Kerberos needs domain membership (DESIGN §3);
- a rule whose filter list or filter action the effective policy does not carry.

AH-only security methods are recorded (the record-only backend has no kernel to
lack AH), with a note in the log that nothing is enforced.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from google.protobuf import json_format

from policyagent.agent.enforce import EnforceError, HostFacts
from policyagent.agent.files import atomic_write
from policyagent.pb import agent_pb, dist_pb, pb

RECORD_FILE = Path("enforcer") / "record-only.json"
DESCRIPTION = "record-only: enforces nothing"

_log = logging.getLogger("policyagent.agent.enforce")


def _only_kerberos(methods: list[pb.AuthMethod]) -> bool:
    kinds = {m.WhichOneof("method") for m in methods}
    return kinds == {"kerberos"}


def _ah_only(action: pb.FilterAction) -> bool:
    return bool(action.methods) and all(m.HasField("ah") and not m.HasField("esp") for m in action.methods)


class RecordOnlyEnforcer:
    """Implements agent.enforce.Enforcer; records each applied policy to STATE_DIR/enforcer/."""

    name = "record-only"
    enforces = False

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / RECORD_FILE

    def capabilities(self) -> dist_pb.Capabilities:
        return dist_pb.Capabilities(enforcer=self.name, enforces=False, features=["record-only"])

    def describe(self) -> str:
        return DESCRIPTION

    def start(self) -> None:
        """Nothing to start: this backend has no data path."""

    def close(self) -> None:
        """Nothing to stop."""

    def statistics(self) -> agent_pb.IpsecStatistics:
        """No IPsec here: no counters, and it says so (ipsec_active = false)."""
        return agent_pb.IpsecStatistics(ipsec_active=False, enforcer=DESCRIPTION, time_unix_ms=int(time.time() * 1000))

    def audit_events(self, since_unix_ms: int, ids: set[int] | None, limit: int) -> list[agent_pb.AuditEvent]:
        return []  # nothing negotiates here, so nothing is audited

    def security_associations(self) -> agent_pb.SecurityAssociations:
        return agent_pb.SecurityAssociations()

    def filters_in_force(self) -> agent_pb.Filters:
        return agent_pb.Filters(notes=[DESCRIPTION])

    def configure(self, values: dict[str, str]) -> None:
        """Stored by the agent; nothing here acts on them."""

    def set_dynamic(self, policies: tuple[dist_pb.EffectivePolicy, ...]) -> None:
        """Checked like static policy and recorded in the log; nothing is enforced."""
        problems = [p for policy in policies for p in self.check(policy, HostFacts(membership=""))]
        if problems:
            raise EnforceError("; ".join(problems))
        _log.warning("dynamic-mode rules recorded (%d); record-only enforcer: nothing is enforced", len(policies))

    def check(self, policy: dist_pb.EffectivePolicy, facts: HostFacts) -> list[str]:
        problems: list[str] = []
        if not policy.HasField("policy"):
            return problems
        p = policy.policy
        lists = {fl.id for fl in policy.filter_lists}
        actions = {fa.id: fa for fa in policy.filter_actions}
        membership = facts.membership or policy.membership
        workgroup = membership == "workgroup"
        for index, rule in enumerate(p.rules, start=1):
            label = f'policy "{p.name}"/rule {index}' + (f' "{rule.name}"' if rule.name else "")
            if not rule.active:
                continue
            if rule.filter_list_id and rule.filter_list_id not in lists:
                problems.append(f"{label}: filter list {rule.filter_list_id} is missing from the effective policy")
            if rule.filter_action_id and rule.filter_action_id not in actions:
                problems.append(f"{label}: filter action {rule.filter_action_id} is missing from the effective policy")
            action = actions.get(rule.filter_action_id)
            negotiates = action is None or action.action == pb.ACTION_TYPE_NEGOTIATE
            if workgroup and negotiates and _only_kerberos(list(rule.auth_methods)):
                problems.append(
                    f"{label}: Kerberos needs domain membership; this computer is a workgroup member"
                )
        drr = p.default_response_rule
        if workgroup and drr.active and _only_kerberos(list(drr.auth_methods)):
            problems.append(
                f'policy "{p.name}"/default response rule: Kerberos needs domain membership; '
                "this computer is a workgroup member"
            )
        return problems

    def apply(self, policy: dist_pb.EffectivePolicy, facts: HostFacts) -> None:
        problems = self.check(policy, facts)
        if problems:
            raise EnforceError("; ".join(problems))
        notes = []
        for action in policy.filter_actions:
            if _ah_only(action):
                notes.append(f'filter action "{action.name}" is AH-only (recorded; nothing is enforced)')
        record = {
            "enforcer": DESCRIPTION,
            "recorded_unix_ms": int(time.time() * 1000),
            "version": policy.version,
            "source": policy.source,
            "policy_name": policy.policy.name if policy.HasField("policy") else "",
            "notes": notes,
            "effective_policy": json_format.MessageToDict(policy),
        }
        atomic_write(self.path, json.dumps(record, indent=1, sort_keys=True).encode())
        _log.warning(
            "policy recorded; record-only enforcer: nothing is enforced",
            extra={"version": policy.version, "policy": record["policy_name"], "notes": notes},
        )
