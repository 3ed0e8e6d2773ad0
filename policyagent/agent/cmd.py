"""Command-line parts of the agent: `policyagent agent` and `policyagent agent-status`.

Registered by policyagent/cli.py; handlers return exit codes and raise on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from google.protobuf import json_format

DEFAULT_STATE_DIR = "/var/lib/policyagent-agent"


def add_agent(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="run the agent (enroll first if needed)",
        description=(
            "Run the policyagent agent: keep one mTLS stream to the policy server, apply the effective "
            "policy it pushes (with strongSwan and nftables, or the explicit record-only enforcer), ACK or "
            "NACK each version, cache the last good policy, and serve the local admin API on STATE_DIR/agent.sock."
        ),
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="the policy server")
    parser.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help="keys, cache, local stores (default: %(default)s)"
    )
    parser.add_argument("--ca-file", help="the CA certificate to trust (default: STATE_DIR/ca.crt, set by enrollment)")
    parser.add_argument("--computer", default="", help="this computer's name for enrollment (default: the hostname)")
    enroll = parser.add_argument_group("enrollment (only when STATE_DIR has no host certificate yet)")
    enroll.add_argument("--enroll-kerberos", action="store_true", help="prove domain membership with Kerberos")
    enroll.add_argument("--keytab", help="keytab with the host principal (Kerberos enrollment)")
    enroll.add_argument("--principal", help="the host principal (Kerberos enrollment)")
    enroll.add_argument("--service-principal", help="the server's principal (Kerberos enrollment)")
    enroll.add_argument("--enroll-token", metavar="TOKEN", help="a one-time join token made by an admin")
    enroll.add_argument(
        "--enroll-workgroup-secret-file", metavar="FILE", help="file holding the workgroup's enrollment secret"
    )
    enroll.add_argument("--ca-fingerprint", help="the server CA's SHA-256, when no --ca-file is at hand")
    enroll.add_argument("--enroll-server", metavar="HOST:PORT", help="the enrollment address (default: --server)")
    tuning = parser.add_argument_group("tuning")
    tuning.add_argument("--heartbeat", type=float, default=30.0, metavar="SECONDS", help="default: %(default)s")
    tuning.add_argument("--keepalive", type=float, default=20.0, metavar="SECONDS", help="gRPC keepalive pings")
    tuning.add_argument("--backoff-max", type=float, default=60.0, metavar="SECONDS", help="reconnect backoff cap")
    tuning.add_argument(
        "--poll-interval", type=float, metavar="SECONDS", help="polling fallback (default: the policy's interval)"
    )
    tuning.add_argument("--server-name", default="", help="TLS name of the server when HOST is not in its certificate")
    parser.add_argument(
        "--enforcer",
        choices=("auto", "strongswan", "record-only"),
        default="auto",
        help="auto (default): strongSwan + nftables where this host can run them, else record-only (and say why); "
        "strongswan: refuse to start without it; record-only: check and record, enforce nothing",
    )
    parser.add_argument(
        "--charon-vici",
        metavar="SOCKET",
        help="use the system's strongSwan over this VICI socket (e.g. /var/run/charon.vici) instead of the "
        "agent's own charon; its strongswan.conf must suit this host",
    )
    kerb = parser.add_argument_group("Kerberos authentication in IKE (domain members)")
    kerb.add_argument(
        "--ike-keytab", metavar="FILE", help="keytab with this computer's host principal (e.g. /etc/krb5.keytab)"
    )
    kerb.add_argument("--ike-principal", metavar="PRINCIPAL", help="this computer's host principal, host/FQDN@REALM")
    kerb.add_argument("--krb5-config", metavar="FILE", help="krb5.conf to use (default: the system's)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.set_defaults(handler=run_agent_command)


def _enroll_if_needed(args: argparse.Namespace, state_dir: Path) -> None:
    from policyagent.agent.daemon import HOST_CERT, AgentError

    proofs = [bool(args.enroll_kerberos), bool(args.enroll_token), bool(args.enroll_workgroup_secret_file)]
    if (state_dir / HOST_CERT).is_file():
        return
    if sum(proofs) != 1:
        raise AgentError(
            f"{state_dir} holds no host certificate: enroll with exactly one of --enroll-kerberos, "
            "--enroll-token TOKEN, --enroll-workgroup-secret-file FILE"
        )
    from policyagent.agent.enrollment import enroll_from_args

    enroll_from_args(args, state_dir)


def run_agent_command(args: argparse.Namespace) -> int:
    from policyagent.agent.daemon import AgentConfig, run_agent
    from policyagent.server.app import configure_logging

    configure_logging(args.log_level)
    state_dir = Path(args.state_dir).absolute()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _enroll_if_needed(args, state_dir)
    from policyagent.agent.enrollment import load_identity

    identity = load_identity(state_dir)
    config = AgentConfig(
        server=args.server,
        state_dir=state_dir,
        ca_file=Path(args.ca_file) if args.ca_file else None,
        computer=identity.get("computer", args.computer),
        membership=identity.get("membership", ""),
        heartbeat_s=args.heartbeat,
        keepalive_s=args.keepalive,
        backoff_max_s=args.backoff_max,
        poll_interval_s=args.poll_interval,
        server_name_override=args.server_name,
        enforcer=args.enforcer,
        ike_keytab=Path(args.ike_keytab).absolute() if args.ike_keytab else None,
        ike_principal=args.ike_principal or "",
        krb5_config=str(Path(args.krb5_config).absolute()) if args.krb5_config else "",
        charon_vici=Path(args.charon_vici).absolute() if args.charon_vici else None,
    )
    if bool(args.ike_keytab) != bool(args.ike_principal):
        from policyagent.agent.daemon import AgentError

        raise AgentError("--ike-keytab and --ike-principal go together (the keytab must hold that principal)")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_agent(config, stop)

    asyncio.run(main())
    return 0


# ---------------------------------------------------------------- agent-status


def add_agent_status(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "agent-status",
        help="show this computer's agent: connection, applied policy, cache, enforcer",
        description="Ask the local agent (over its unix socket) where it stands.",
    )
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the agent's state directory")
    parser.add_argument("--socket", help="the agent socket (default: STATE_DIR/agent.sock)")
    parser.add_argument("--policy", action="store_true", help="also print the effective policy in force")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run_agent_status)


def run_agent_status(args: argparse.Namespace) -> int:
    import grpc

    from policyagent.agent.daemon import SOCKET_FILE
    from policyagent.pb import agent_grpc, agent_pb

    path = args.socket or str(Path(args.state_dir) / SOCKET_FILE)
    with grpc.insecure_channel(f"unix:{path}") as channel:
        stub = agent_grpc.AgentLocalStub(channel)
        try:
            status = stub.GetStatus(agent_pb.LocalStatusRequest(), timeout=10)
            policy = stub.GetEffectivePolicy(agent_pb.LocalPolicyRequest(), timeout=10) if args.policy else None
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise OSError(f"no agent answers on {path} (is `policyagent agent` running?)") from None
            raise
    if args.json:
        out: dict[str, Any] = {"status": json_format.MessageToDict(status)}
        if policy is not None:
            out["effective_policy"] = json_format.MessageToDict(policy)
        print(json.dumps(out, indent=2))
        return 0
    print(status.summary)
    rejected = (
        f"{status.last_nack_version[:12]}: {status.last_nack_reason}" if status.last_nack_reason else "-"
    )
    rows = [
        ("computer", status.computer),
        ("server", f"{status.server} ({status.connection})"),
        ("applied version", status.applied_version or "none"),
        ("policy in force", f"{status.policy_name or '-'} (from {status.applied_source})"),
        ("running on cache", "yes" if status.running_on_cache else "no"),
        ("last rejected", rejected),
        ("enforcer", status.enforcer),
    ]
    for key, value in rows:
        print(f"  {key:<17} {value}")
    if policy is not None:
        print(json.dumps(json_format.MessageToDict(policy), indent=2))
    return 0
