"""`policyagent fleet status [--watch]`: where every agent stands; `policyagent fleet stats`: the IP
Security Monitor of every agent and the fleet's totals (admin certificate)."""

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
    connection_options(status)
    status.add_argument("--watch", action="store_true", help="follow the rollout until no agent is pending")
    status.add_argument("--follow", action="store_true", help="with --watch: keep following after convergence")
    status.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS", help="with --watch: give up after")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=run_fleet_status)
    stats = sub.add_parser(
        "stats",
        help="the IP Security Monitor of the whole fleet: totals and each computer's key counters",
        description=(
            "Every counter of the IP Security Monitor (main mode and quick mode) summed over the fleet, then one "
            "line per computer with its key counters, as of each agent's latest heartbeat (every 30 s)."
        ),
    )
    stats.add_argument("computers", nargs="*", help="only these computers")
    connection_options(stats)
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(handler=run_fleet_stats)


def connection_options(parser: argparse.ArgumentParser) -> None:
    """-r/--server, --cert-dir, --server-name: how the admin commands reach the server."""
    parser.add_argument(
        "-r",
        "--server",
        metavar="HOST:PORT",
        default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
        help=f"the policy server (default: ${SERVER_ENV}, else {DEFAULT_SERVER})",
    )
    parser.add_argument("--cert-dir", help="admin certificate directory (admin.crt, admin.key, ca.crt)")
    parser.add_argument("--server-name", default="", help="TLS name of the server when HOST is not in its certificate")


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
    from policyagent.server.directorycmd import summary_line

    print(summary_line(status.directory), file=out)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else "?"


def channel(args: argparse.Namespace) -> Any:
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
    with channel(args) as chan:
        stub = fleet_grpc.FleetStub(chan)
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


def rpc_error(what: str, args: argparse.Namespace, exc: Exception) -> OSError:
    import grpc

    detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return OSError(f"{what} from {args.server}: {detail}")


def run_fleet_stats(args: argparse.Namespace) -> int:
    import grpc

    from policyagent.pb import fleet_grpc

    with channel(args) as chan:
        try:
            stats = fleet_grpc.FleetStub(chan).GetStatistics(
                fleet_pb.FleetStatisticsRequest(computers=args.computers), timeout=30
            )
        except grpc.RpcError as exc:
            raise rpc_error("fleet statistics", args, exc) from None
    if args.json:
        print(json.dumps(json_format.MessageToDict(stats), indent=2))
    else:
        render_stats(stats, sys.stdout)
    return 0


# Per-computer columns of `fleet stats`: (header, "mm"|"qm", counter key).
STATS_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("IKE MM", "mm", "ike_main_modes"),
    ("IKE QM", "mm", "ike_quick_modes"),
    ("ACTIVE QM", "qm", "active_security_associations"),
    ("AUTH FAIL", "mm", "authentication_failures"),
    ("NEG FAIL", "mm", "negotiation_failures"),
    ("BYTES SENT", "qm", "confidential_bytes_sent"),
    ("BYTES RECV", "qm", "confidential_bytes_received"),
)


def _counter_map(stats: Any) -> dict[str, dict[str, int]]:
    return {
        "mm": {c.key: c.value for c in stats.main_mode},
        "qm": {c.key: c.value for c in stats.quick_mode},
    }


def render_stats(stats: fleet_pb.FleetStatistics, out: TextIO) -> None:
    now = stats.server_time_unix_ms
    line = f"fleet: {stats.reporting} computer(s) reporting, {stats.ipsec_active} with IPsec active"
    if stats.not_reporting:
        line += f"; no statistics from {', '.join(stats.not_reporting)}"
    print(line, file=out)
    print(file=out)
    for title, counters in (
        ("IKE Main Mode Statistics (fleet total)", stats.totals.main_mode),
        ("IPSec Quick Mode Statistics (fleet total)", stats.totals.quick_mode),
    ):
        print(title, file=out)
        print("-" * len(title), file=out)
        width = max((len(c.name) for c in counters), default=0)
        for c in counters:
            print(f"{c.name.ljust(width)}  {c.value}", file=out)
        print(file=out)
    header = ("COMPUTER", "IPSEC", *(h for h, _, _ in STATS_COLUMNS), "POLICY", "AS OF")
    rows = [header]
    for entry in stats.computers:
        values = _counter_map(entry.statistics)
        rows.append(
            (
                entry.computer,
                "active" if entry.statistics.ipsec_active else "-",
                *(str(values[block].get(key, 0)) for _, block, key in STATS_COLUMNS),
                entry.statistics.policy_name or "-",
                _ago(now, entry.received_unix_ms) + ("" if entry.online else " (offline)"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip(), file=out)
