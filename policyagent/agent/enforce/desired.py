"""The desired enforcement state: what `compile()` produces and the reconciler makes true.

Pure data, no I/O. Two halves:

- **Filtering** (`FilterEntry`, `Exemption`): one nftables ruleset per host, ordered most specific
  first, decides permit / block / "must be protected" for every packet (DESIGN §5, "Filtering
  independent of IKE"). Selectors match a packet's actual addresses and ports, in both the input and
  the output direction; a mirrored Windows filter becomes two entries.
- **Keying** (`Connection`, `Secret`): the strongSwan connections and shared secrets, as the
  dictionaries VICI's `load-conn` / `load-shared` take, each named and content-hashed so the reconciler
  changes only what changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

PERMIT = "permit"
BLOCK = "block"
NEGOTIATE = "negotiate"
VERDICTS = (PERMIT, BLOCK, NEGOTIATE)


@dataclass(frozen=True)
class Selector:
    """A packet match. Address tuples hold CIDR strings ("10.77.0.1/32", "10.0.0.0/8", "fd00::/64");
    an empty tuple means any address. `proto` 0 = any; ports 0 = any (TCP/UDP only)."""

    src: tuple[str, ...] = ()
    dst: tuple[str, ...] = ()
    proto: int = 0
    sport: int = 0
    dport: int = 0


@dataclass(frozen=True)
class FilterEntry:
    """One line of the host's filter table. `index` is its position (0 = most specific); `nft.entry_key()`
    names it in the filter table (rule comments, the acquire log prefix); `id` is stable across recompiles."""

    index: int
    id: str
    label: str  # for humans: 'policy "X"/rule 2 "Y"/filter 1 (mirror)'
    selector: Selector
    verdict: str  # PERMIT | BLOCK | NEGOTIATE
    weight: int  # larger = more specific
    inbound_passthrough: bool = False  # NEGOTIATE: accept clear inbound, answer under IPsec
    fallback_to_clear: bool = False  # NEGOTIATE: soft associations with hosts that do not answer IKE
    connection: str = ""  # NEGOTIATE: the connection (or template) that protects this traffic


@dataclass(frozen=True)
class Exemption:
    """Traffic never filtered: IKE, NAT-T, the Kerberos keying exchange, the policy server, ..."""

    reason: str
    proto: int = 0  # 0 = any
    port: int = 0  # matched as source OR destination port
    addr: str = ""  # CIDR; "" = any peer


def content_hash(value: Any) -> str:
    """Stable SHA-256 over a JSON-able value (dict key order does not matter)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Connection:
    """One strongSwan connection. `body` is the VICI `load-conn` value (without the name).

    `template` connections have a remote of "any": they are not loaded as they are; the agent loads
    one per-peer instance (`instance(peer)`) when traffic to that peer needs protection.
    `initiates` is False for responder-only connections (the default response rule)."""

    name: str
    body: dict[str, Any]
    initiates: bool
    template: bool = False
    label: str = ""
    kerberos: bool = False  # keyed per peer by the Kerberos keying exchange (no static secret)

    @cached_property
    def digest(self) -> str:
        return content_hash({"name": self.name, "body": self.body})


@dataclass(frozen=True)
class Secret:
    """A VICI `load-shared` entry (IKE pre-shared key). `data` is the secret: never log it."""

    name: str
    owners: tuple[str, ...]  # IKE identities; empty = any peer
    data: str = field(repr=False)

    @cached_property
    def digest(self) -> str:
        return content_hash({"name": self.name, "owners": list(self.owners), "data": self.data})


@dataclass(frozen=True)
class Desired:
    """Everything compile() decided for one host. `problems` non-empty means the policy cannot be
    enforced here (the agent NACKs with them); `notes` say how something was mapped (e.g. a transport
    rule enforced as a host-to-host tunnel)."""

    entries: tuple[FilterEntry, ...] = ()
    exemptions: tuple[Exemption, ...] = ()
    connections: tuple[Connection, ...] = ()
    secrets: tuple[Secret, ...] = ()
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def connection(self, name: str) -> Connection | None:
        for conn in self.connections:
            if conn.name == name:
                return conn
        return None
