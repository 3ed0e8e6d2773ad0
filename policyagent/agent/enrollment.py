"""Enrollment glue for `policyagent agent`: pick the proof from the flags, call the enroll client.

The client (policyagent/auth/client.py) writes host.key, host.crt and ca.crt into the
state directory; this module adds identity.json (computer, membership, domain) so the
agent knows, offline too, whether it is a domain or a workgroup member.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path
from typing import Any

from policyagent.agent.files import atomic_write

IDENTITY_FILE = "identity.json"


def load_identity(state_dir: Path) -> dict[str, str]:
    try:
        data: Any = json.loads((state_dir / IDENTITY_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def enroll_from_args(args: argparse.Namespace, state_dir: Path) -> None:
    from policyagent.auth.client import JoinToken, Kerberos, Proof, WorkgroupSecret, enroll

    computer = args.computer or socket.getfqdn()
    proof: Proof
    if args.enroll_token:
        proof = JoinToken(args.enroll_token)
    elif args.enroll_workgroup_secret_file:
        proof = WorkgroupSecret(Path(args.enroll_workgroup_secret_file).read_text().strip())
    else:
        if not args.service_principal:
            raise ValueError(
                "Kerberos enrollment needs --service-principal (the server's, e.g. policyagent/HOST@REALM)"
            )
        proof = Kerberos(
            service_principal=args.service_principal,
            keytab=Path(args.keytab) if args.keytab else None,
            client_principal=args.principal,
        )
    ca_bundle = Path(args.ca_file).read_bytes() if args.ca_file else None
    result = enroll(
        args.enroll_server or args.server,
        computer,
        proof,
        state_dir,
        ca_bundle,
        ca_fingerprint=args.ca_fingerprint,
    )
    identity = {"computer": result.computer, "membership": result.membership, "domain": result.domain}
    atomic_write(state_dir / IDENTITY_FILE, json.dumps(identity).encode())
