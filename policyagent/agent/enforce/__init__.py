"""Enforcers: what turns an effective policy into protection on this host.

`Enforcer` is the protocol the agent daemon drives. Two backends:
`strongswan.StrongSwanEnforcer` (charon over VICI + an nftables filter table; the default
wherever charon can run) and `recordonly.RecordOnlyEnforcer` (an explicit mode that checks and
records and enforces nothing, and says so). `choose()` picks one and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from policyagent.pb import agent_pb, dist_pb


@dataclass(frozen=True)
class HostFacts:
    """What the enforcer checks a policy against."""

    membership: str  # "domain" | "workgroup"
    computer: str = ""


class Enforcer(Protocol):
    name: str  # e.g. "record-only"
    enforces: bool  # False: protects nothing (say so in status and logs)

    def capabilities(self) -> dist_pb.Capabilities: ...

    def check(self, policy: dist_pb.EffectivePolicy, facts: HostFacts) -> list[str]:
        """Why this policy cannot be applied here (empty = it can)."""
        ...

    def apply(self, policy: dist_pb.EffectivePolicy, facts: HostFacts) -> None:
        """Apply the policy all-or-nothing; raise EnforceError with the NACK reason on failure."""
        ...

    def describe(self) -> str:
        """One line for status and logs, e.g. "record-only: enforces nothing"."""
        ...

    def start(self) -> None:
        """Called once before the first apply (e.g. start charon)."""
        ...

    def close(self) -> None:
        """Stop enforcing (the agent is stopping): dynamic state and statistics go with it."""
        ...

    def statistics(self) -> agent_pb.IpsecStatistics:
        """The IP Security Monitor counters since the agent started (empty when nothing is enforced)."""
        ...

    def audit_events(self, since_unix_ms: int, ids: set[int] | None, limit: int) -> list[agent_pb.AuditEvent]:
        """Audit events 541-547 recorded here, oldest first."""
        ...

    def security_associations(self) -> agent_pb.SecurityAssociations:
        """Main mode and quick mode SAs (empty when nothing negotiates)."""
        ...

    def filters_in_force(self) -> agent_pb.Filters:
        """The filters in force, most specific first, and the negotiation policies."""
        ...

    def configure(self, values: dict[str, str]) -> None:
        """`set config` properties in force (at start, and when one that applies at once changes)."""
        ...

    def set_dynamic(self, policies: tuple[dist_pb.EffectivePolicy, ...]) -> None:
        """Enforce these dynamic-mode rules (one-rule pseudo policies) with the static policy; EnforceError
        (and nothing changed) if they cannot be enforced here."""
        ...


class EnforceError(Exception):
    """The policy could not be applied; the message is the NACK reason."""


__all__ = ["EnforceError", "Enforcer", "HostFacts"]
