"""`netsh ipsec dynamic set config` properties: values, validation, persistence, and when they apply.

Windows (reference §3.4) applies some properties at once and others at the next start of the IPsec
services; the agent follows the same rule: a restart-only property is stored as *pending* and takes
effect when the agent next starts. Values persist in STATE_DIR/dynamic-config.json (Windows keeps them
in the registry), so they survive restarts — unlike dynamic-mode policies and statistics.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from policyagent.agent.files import atomic_write

CONFIG_FILE = "dynamic-config.json"


class ConfigError(ValueError):
    """A bad `set config`; the message names the property and the problem."""


@dataclass(frozen=True)
class Property:
    name: str
    default: str
    at_once: bool
    description: str
    check: Callable[[str], str | None]  # the normalised value, or None when invalid
    allowed: str  # for the error message


def _int_range(lo: int, hi: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        try:
            n = int(value, 10)
        except ValueError:
            return None
        return str(n) if lo <= n <= hi else None

    return check


def _choice(*values: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        v = value.strip().lower()
        return v if v in values else None

    return check


PROPERTIES: tuple[Property, ...] = (
    Property(
        "ikelogging", "0", True,
        "1 writes an IKE trace (STATE_DIR/charon/ike-trace.log) at once, 0 stops it; no restart",
        _choice("0", "1"),
        "0 or 1",
    ),
    Property(
        "strongcrlcheck", "1", True,
        "certificate revocation checking: 0 = none (treated as relaxed), 1 = fail only if revoked, "
        "2 = fail on any CRL error (strict)",
        _choice("0", "1", "2"), "0, 1 or 2",
    ),
    Property(
        "ipsecexempt", "3", False,
        "default exemptions: 0 = multicast, broadcast, RSVP, Kerberos and IKE; 1 = Kerberos and RSVP not exempt; "
        "2 = multicast and broadcast not exempt; 3 = only IKE (Server 2003 default). Multicast and broadcast "
        "are not filtered by this agent's selectors in any case. Applies at the next start",
        _int_range(0, 3), "0 to 3",
    ),
    Property(
        "ipsecdiagnostics", "0", False,
        "driver diagnostic event level 0-7; kept for compatibility: this agent records IPsec failures as audit "
        "events and counters whatever the level. Applies at the next start",
        _int_range(0, 7), "0 to 7",
    ),
    Property(
        "ipsecloginterval", "3600", False,
        "interval (s) for flushing diagnostic events; kept for compatibility (audit events are written at once). "
        "Applies at the next start",
        _int_range(60, 86400), "60 to 86400",
    ),
    Property(
        "bootmode", "permit", False,
        "traffic before the first policy is applied: permit (the only mode this agent implements)",
        _choice("permit"), "permit (stateful and block are not implemented by this agent)",
    ),
)
BY_NAME = {p.name: p for p in PROPERTIES}


class DynamicConfig:
    """The properties in force (`value`) and those waiting for the next start (`pending`)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CONFIG_FILE
        stored: dict[str, str] = {}
        try:
            raw = json.loads(self.path.read_text())
            stored = {k: str(v) for k, v in raw.items() if k in BY_NAME and BY_NAME[k].check(str(v)) is not None}
        except (OSError, ValueError, AttributeError):
            pass
        # At start everything stored is in force: pending values become current.
        self.values = {p.name: stored.get(p.name, p.default) for p in PROPERTIES}
        self.pending: dict[str, str] = {}

    def get(self, name: str) -> str:
        return self.values[name]

    def set(self, name: str, value: str) -> bool:
        """Validate and store; True if it takes effect now, False if at the next start."""
        prop = BY_NAME.get(name.strip().lower())
        if prop is None:
            known = ", ".join(BY_NAME)
            raise ConfigError(f'set config: unknown property "{name}" (known: {known})')
        normalised = prop.check(value)
        if normalised is None:
            raise ConfigError(f'set config: {prop.name}: "{value}" is not valid; use {prop.allowed}')
        if prop.at_once:
            self.values[prop.name] = normalised
            self.pending.pop(prop.name, None)
        elif normalised == self.values[prop.name]:
            self.pending.pop(prop.name, None)
        else:
            self.pending[prop.name] = normalised
        self._save()
        return prop.at_once

    def _save(self) -> None:
        merged = {**self.values, **self.pending}
        atomic_write(self.path, json.dumps(merged, indent=1, sort_keys=True).encode())


__all__ = ["BY_NAME", "PROPERTIES", "ConfigError", "DynamicConfig", "Property"]
