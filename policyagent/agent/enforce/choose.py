"""Which enforcer an agent runs: `--enforcer auto|strongswan|record-only`.

`auto` takes strongSwan wherever it can run (charon, a kernel ESP or kernel-libipsec data path,
nftables, root) and otherwise falls back to the record-only backend, logging exactly why, so a
machine that cannot enforce never pretends to. `strongswan` refuses to start without it.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from policyagent.agent.enforce import Enforcer

if TYPE_CHECKING:
    from policyagent.agent.daemon import AgentConfig

_log = logging.getLogger("policyagent.agent.enforce")

CHOICES = ("auto", "strongswan", "record-only")


class EnforcerUnavailable(Exception):
    """`--enforcer strongswan` on a host that cannot run it; the message says why."""


def server_address(server: str) -> tuple[str, int] | None:
    """HOST:PORT of the policy server → (IP, port), resolved once, for the filter exemption."""
    host, _, port = server.rpartition(":")
    host = host.strip("[]")
    try:
        info = socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)
    except (OSError, ValueError):
        return None
    return (str(info[0][4][0]), int(port)) if info else None


def choose(config: AgentConfig) -> Enforcer:
    from policyagent.agent.enforce.recordonly import RecordOnlyEnforcer

    kind, state_dir, server = config.enforcer, config.state_dir, config.server
    if kind == "record-only":
        return RecordOnlyEnforcer(state_dir)
    from policyagent.agent.enforce.caps import probe

    caps = probe()
    problems = caps.problems()
    if problems:
        why = "; ".join(problems)
        if kind == "strongswan":
            raise EnforcerUnavailable(f"the strongswan enforcer cannot run on this host: {why}")
        _log.error("strongSwan enforcement unavailable here (%s); running the record-only enforcer", why)
        return RecordOnlyEnforcer(state_dir)
    from policyagent.agent.enforce.strongswan import KerberosSetup, StrongSwanEnforcer

    kerberos = None
    if config.ike_keytab is not None and config.membership != "workgroup":
        env = {"KRB5_CONFIG": config.krb5_config} if config.krb5_config else None
        kerberos = KerberosSetup(config.ike_keytab, config.ike_principal, env)
        if not kerberos.usable():
            _log.error("Kerberos in IKE unavailable: no keytab at %s", config.ike_keytab)
    charon = None
    if config.charon_vici is not None:
        from policyagent.agent.enforce.charon import ExternalCharon

        charon = ExternalCharon(config.charon_vici, state_dir / "charon")
        _log.warning("using the system's charon at %s (not supervised by this agent)", config.charon_vici)
    return StrongSwanEnforcer(state_dir, caps, server=server_address(server), kerberos=kerberos, charon=charon)
