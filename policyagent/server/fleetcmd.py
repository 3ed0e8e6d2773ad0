"""`policyagent fleet status [--watch]`: where every agent stands (admin certificate)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

from google.protobuf import json_format

from policyagent.pb import fleet_pb

DEFAULT_SERVER = "127.0.0.1:50051"
SERVER_ENV = "POLICYAGENT_SERVER"

_STATE_WORDS = {
    fleet_pb.AGENT_STATE_IN_SYNC: "in sync",
    fleet_pb.AGENT_STATE_PENDING: "pending",
    fleet_pb.AGENT_STATE_REJECTED: "rejected",
    fleet_pb.AGENT_STATE_STALE: "stale",
    fleet_pb.AGENT_STATE_OFFLINE: "offline",
    fleet_pb.AGENT_STATE_REVOKED: "revoked",
}


def add_fleet(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("fleet", help="fleet status: who runs which policy version")
    sub = parser.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND", required=True)
    status = sub.add_parser(
        "status",
        help="who is on which version, who rejected it and why, who is stale or offline",
        description=(
            "Every agent the server knows: its state (in sync, pending, rejected, stale, offline, revoked), the "
            "desired and applied versions, the last NACK and its reason, last seen, running on cache. "
            "--watch follows a rollout with a progress line until no agent is pending."
        ),
    )
    status.add_argument("computers", nargs="*", help="only these computers")
    status.add_argument(
        "--server", default=os.environ.get(SERVER_ENV, DEFAULT_SERVER), help=f"HOST:PORT (default: ${SERVER_ENV})"
    )
    status.add_argument("--cert-dir", help="admin certificate directory (admin.crt, admin.key, ca.crt)")
    status.add_argument("--server-name", default="", help="TLS name of the server when HOST is not in its certificate")
    status.add_argument("--watch", action="store_true", help="follow the rollout until no agent is pending")
    status.add_argument("--follow", action="store_true", help="with --watch: keep following after convergence")
    status.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS", help="with --watch: give up after")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=run_fleet_status)


def _ago(now_ms: int, then_ms: int) -> str:
    if not then_ms:
        return "never"
    seconds = max(0, (now_ms - then_ms) // 1000)
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def progress_line(status: fleet_pb.FleetStatus) -> str:
    """ "rollout: N of M on the desired version (p pending, r rejected, s stale, o offline)"."""
    return (
        f"rollout: {status.in_sync} of {status.total} on the desired version "
        f"({status.pending} pending, {status.rejected} rejected, {status.stale} stale, {status.offline} offline"
        + (f", {status.revoked} revoked" if status.revoked else "")
        + (f"; {status.on_cache} running on cached policy" if status.on_cache else "")
        + ")"
    )


def render(status: fleet_pb.FleetStatus, out: TextIO) -> None:
    now = status.server_time_unix_ms
    rows = [("COMPUTER", "STATE", "APPLIED", "DESIRED", "LAST SEEN", "NOTE")]
    for agent in status.agents:
        notes = []
        if agent.last_nack_version:
            earlier = "" if agent.last_nack_version == agent.desired_version else "earlier "
            notes.append(f"{earlier}rejected {agent.last_nack_version[:12]}: {agent.last_nack_reason}")
        if agent.running_on_cache:
            notes.append(f"running on cached policy since {_iso(agent.cache_since_unix_ms)}")
        if agent.capabilities.enforcer and not agent.capabilities.enforces:
            notes.append(f"{agent.capabilities.enforcer}: enforces nothing")
        rows.append(
            (
                agent.computer,
                _STATE_WORDS.get(agent.state, "?"),
                agent.applied_version[:12] or "-",
                agent.desired_version[:12] or "-",
                _ago(now, agent.last_seen_unix_ms),
                "; ".join(notes),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5], file=out)
    print(progress_line(status), file=out)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else "?"


def _channel(args: argparse.Namespace) -> Any:
    import grpc

    from policyagent.pki.tls import find_admin_certificate

    cert = find_admin_certificate(args.cert_dir)
    options: list[tuple[str, Any]] = []
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    return grpc.secure_channel(args.server, cert.channel_credentials(), options=options)


def run_fleet_status(args: argparse.Namespace) -> int:
    import grpc

    from policyagent.pb import fleet_grpc

    request = fleet_pb.FleetStatusRequest(computers=args.computers)
    with _channel(args) as channel:
        stub = fleet_grpc.FleetStub(channel)
        try:
            if not args.watch:
                status = stub.Status(request, timeout=30)
            else:
                status = _watch(stub, request, args)
        except grpc.RpcError as exc:
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise OSError(f"fleet status from {args.server}: {detail}") from None
    if args.json:
        print(json.dumps(json_format.MessageToDict(status), indent=2))
    else:
        render(status, sys.stdout)
    return 0


def _watch(stub: Any, request: fleet_pb.FleetStatusRequest, args: argparse.Namespace) -> fleet_pb.FleetStatus:
    tty = sys.stderr.isatty()
    last: fleet_pb.FleetStatus | None = None
    call = stub.Watch(request, timeout=args.timeout or None)
    try:
        for status in call:
            last = status
            line = progress_line(status)
            if tty:
                print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)
            if not args.follow and status.pending == 0 and status.stale == 0:
                break
    except Exception as exc:
        import grpc

        if not (isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and last is not None):
            raise
    finally:
        call.cancel()
        if tty:
            print(file=sys.stderr)
    assert last is not None
    return last
