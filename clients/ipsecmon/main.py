"""`ipsecmon`: the IP Security Monitor of one computer, live in a terminal.

    ipsecmon [--socket PATH | --state-dir DIR] [--interval 15] [--once] [--count N] [--json]
    ipsecmon -r HOST:PORT --computer NAME [--cert-dir DIR] [...]     one computer, through the policy server
    ipsecmon -r HOST:PORT [COMPUTER ...] [--cert-dir DIR] [...]      the fleet view

Reads the computer's agent over its local socket, or with --computer through the policy server
(AgentRelay: the server relays each call on the agent's stream; admin certificate) (AgentLocal:
GetStatus, GetStatistics, ListSecurityAssociations, ListAuditEvents) and shows, like Windows' IP Security Monitor
(windows-ipsec.md §4): the policy in force, the main mode and quick mode statistics side by
side with the change since the last refresh, the current security associations and the last
audit events. It refreshes every --interval seconds (15, Windows' default): on a terminal it
redraws the screen, otherwise each snapshot is appended. --once prints one snapshot and exits;
--json prints snapshots as JSON (one document with --once, one line per refresh otherwise).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from clients.netsh.dynamic import AgentApi, AgentClient, RelayClient, agent_socket, message_dict, when
from policyagent.agent.daemon import SOCKET_FILE
from policyagent.model.errors import PolicyError
from policyagent.pb import agent_pb

DEFAULT_INTERVAL_S = 15.0
LAST_EVENTS = 5
EVENT_PAGE = 1000
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen

Changes = dict[str, int]


@dataclass
class Snapshot:
    """One refresh: what the agent said, and the change of each counter since the previous refresh."""

    time_unix_ms: int
    status: agent_pb.LocalStatus
    stats: agent_pb.IpsecStatistics
    sas: agent_pb.SecurityAssociations | None
    sas_error: str
    events: list[agent_pb.AuditEvent]
    mm_changes: Changes | None = None  # None: no previous refresh (or the agent restarted since)
    qm_changes: Changes | None = None
    restarted: bool = False


def _changes(now: Sequence[agent_pb.Counter], before: Sequence[agent_pb.Counter]) -> Changes:
    old = {c.key: c.value for c in before}
    return {c.key: c.value - old.get(c.key, 0) for c in now}


@dataclass
class Monitor:
    """Polls one agent; remembers the previous statistics and the newest audit events."""

    client: AgentApi
    previous: agent_pb.IpsecStatistics | None = None
    events: collections.deque[agent_pb.AuditEvent] = field(
        default_factory=lambda: collections.deque(maxlen=LAST_EVENTS)
    )
    _since_ms: int = 0
    _seen_at_since: set[bytes] = field(default_factory=set)

    def _new_events(self) -> None:
        """Page through the events after the newest one seen (the agent returns them oldest first)."""
        while True:
            batch = list(self.client.audit_events(self._since_ms, EVENT_PAGE).events)
            for event in batch:
                ident = event.SerializeToString(deterministic=True)
                if event.time_unix_ms == self._since_ms and ident in self._seen_at_since:
                    continue
                if event.time_unix_ms > self._since_ms:
                    self._since_ms, self._seen_at_since = event.time_unix_ms, set()
                self._seen_at_since.add(ident)
                self.events.append(event)
            if len(batch) < EVENT_PAGE:
                return

    def refresh(self) -> Snapshot:
        status = self.client.status()
        stats = self.client.statistics()
        sas: agent_pb.SecurityAssociations | None = None
        sas_error = ""
        try:
            sas = self.client.security_associations()
        except PolicyError as exc:  # the agent answers, its IKE daemon may not
            sas_error = exc.message
        self._new_events()
        snap = Snapshot(int(time.time() * 1000), status, stats, sas, sas_error, list(self.events))
        before = self.previous
        if before is not None and before.since_unix_ms == stats.since_unix_ms:
            snap.mm_changes = _changes(stats.main_mode, before.main_mode)
            snap.qm_changes = _changes(stats.quick_mode, before.quick_mode)
        elif before is not None:
            snap.restarted = True
        self.previous = stats
        return snap


# ------------------------------------------------------------------ rendering


def _change_text(changes: Changes | None, key: str) -> str:
    if changes is None:
        return ""
    n = changes.get(key, 0)
    return f"{n:+d}" if n else ""


def _column(
    title: str, counters: Sequence[agent_pb.Counter], changes: Changes | None
) -> tuple[list[str], int]:
    rows = [(c.name, str(c.value), _change_text(changes, c.key)) for c in counters]
    name_w = max([len(title), *(len(r[0]) for r in rows)])
    value_w = max([len("Value"), *(len(r[1]) for r in rows)])
    change_w = max([len("Change"), *(len(r[2]) for r in rows)])
    lines = [
        f"{title.ljust(name_w)}  {'Value'.rjust(value_w)}  {'Change'.rjust(change_w)}",
        f"{'-' * name_w}  {'-' * value_w}  {'-' * change_w}",
        *(f"{n.ljust(name_w)}  {v.rjust(value_w)}  {c.rjust(change_w)}" for n, v, c in rows),
    ]
    return lines, name_w + value_w + change_w + 4


def side_by_side(snap: Snapshot) -> list[str]:
    left, width = _column("Main Mode", snap.stats.main_mode, snap.mm_changes)
    right, _ = _column("Quick Mode", snap.stats.quick_mode, snap.qm_changes)
    height = max(len(left), len(right))
    left += [""] * (height - len(left))
    right += [""] * (height - len(right))
    return [f"{a.ljust(width)}    {b}".rstrip() for a, b in zip(left, right, strict=True)]


def _event_line(event: agent_pb.AuditEvent) -> str:
    text = event.message or "; ".join(f"{k}: {v}" for k, v in sorted(event.fields.items()))
    return f"  {when(event.time_unix_ms)}  {event.id}  {text}"


def render(snap: Snapshot, *, interval: float | None = None) -> str:
    """The monitor screen for one snapshot; `interval` adds the refresh line of the live view."""
    status, stats = snap.status, snap.stats
    policy = stats.policy_name or status.policy_name
    source = f" (from {status.applied_source})" if policy and status.applied_source not in ("", "none") else ""
    stamp = dt.datetime.fromtimestamp(snap.time_unix_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        f"IP Security Monitor: {status.computer or '?'}    {stamp}",
        "",
        f"  Computer        : {status.computer or '-'}",
        f"  Policy in force : {policy or 'None'}{source}",
        f"  Enforcer        : {stats.enforcer or status.enforcer or '-'}",
        f"  IPsec active    : {'yes' if stats.ipsec_active else 'no'}",
        f"  Since           : {when(stats.since_unix_ms)}" + (" (the agent restarted: counters reset)"
                                                               if snap.restarted else ""),
        "",
    ]
    if stats.main_mode or stats.quick_mode:
        lines += side_by_side(snap)
    else:
        lines.append("No statistics: IPsec is not active on this computer, nothing is negotiated or counted.")
    lines.append("")
    if snap.sas is not None:
        lines.append(
            f"Security associations: {len(snap.sas.main_mode)} main mode, {len(snap.sas.quick_mode)} quick mode"
        )
    else:
        lines.append(f"Security associations: unavailable ({snap.sas_error})")
    lines += ["", f"Last {LAST_EVENTS} audit events:"]
    lines += [_event_line(e) for e in reversed(snap.events)] or ["  (none)"]
    if interval is not None:
        lines += ["", f"Refreshing every {interval:g} s; Ctrl+C quits."]
    return "\n".join(lines) + "\n"


def snapshot_dict(snap: Snapshot) -> dict[str, object]:
    changes: dict[str, Changes] | None = None
    if snap.mm_changes is not None and snap.qm_changes is not None:
        changes = {"main_mode": snap.mm_changes, "quick_mode": snap.qm_changes}
    sas: dict[str, object] = (
        {"main_mode": len(snap.sas.main_mode), "quick_mode": len(snap.sas.quick_mode)}
        if snap.sas is not None
        else {"error": snap.sas_error}
    )
    return {
        "time_unix_ms": snap.time_unix_ms,
        "status": message_dict(snap.status),
        "statistics": message_dict(snap.stats),
        "changes": changes,
        "restarted": snap.restarted,
        "security_associations": sas,
        "audit_events": [message_dict(e) for e in snap.events],
    }


def _fit(text: str, columns: int) -> str:
    """Cut lines to the terminal width, so a redraw never scrolls."""
    return "".join(line[:columns] + "\n" for line in text.splitlines())


# ------------------------------------------------------------------ command line


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not a number of seconds') from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not a whole number') from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipsecmon",
        description="IP Security Monitor: this computer's IPsec statistics, security associations and audit "
        "events, from its agent, refreshed every --interval seconds.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="the agent socket (default: $POLICYAGENT_AGENT_SOCKET, "
                       "else /var/lib/policyagent-agent/agent.sock)")
    where.add_argument("--state-dir", metavar="DIR", help="the agent's state directory (its socket is DIR/agent.sock)")
    where.add_argument(
        "-r", "--server", metavar="HOST:PORT",
        help="the whole fleet: statistics the policy server aggregates from the agents' heartbeats (admin certificate)",
    )
    p.add_argument(
        "--computer", metavar="NAME",
        help="with --server: this computer's IP Security Monitor, from its agent through the policy server",
    )
    p.add_argument("--cert-dir", help="with --server: admin certificate directory (admin.crt, admin.key, ca.crt)")
    p.add_argument("--server-name", default="", help="with --server: TLS name of the server, if not HOST")
    p.add_argument("computers", nargs="*", help="with --server: only these computers")
    p.add_argument("--interval", type=_positive, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                   help="refresh interval (default: %(default)g, as Windows)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--count", type=_count, metavar="N", help="exit after N refreshes")
    p.add_argument("--json", action="store_true", help="print snapshots as JSON")
    return p


def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(Path(args.socket).absolute())
    if args.state_dir:
        return str(Path(args.state_dir).absolute() / SOCKET_FILE)
    return agent_socket(None)


class _Stop(Exception):
    """Raised by a frame function: stop refreshing with this exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def repeat(args: argparse.Namespace, out: TextIO, frame: Callable[[int, bool], str | None]) -> int:
    """Print `frame(done, live)` now and every --interval seconds (once with --once, --count times with
    --count): redrawn in place on a terminal, appended otherwise. A frame of None prints nothing; a frame
    may raise _Stop(code)."""
    count = 1 if args.once else args.count
    live = count != 1
    redraw = out.isatty() and live and not args.json
    done = 0
    try:
        while True:
            try:
                text = frame(done, live)
            except _Stop as stop:
                return stop.code
            if text is not None:
                if redraw:
                    out.write(CLEAR + _fit(text, shutil.get_terminal_size().columns))
                else:
                    out.write(("\n" if done and not args.json else "") + text)
                out.flush()
            done += 1
            if count is not None and done >= count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def run_fleet(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The fleet view: `policyagent fleet stats` refreshed every --interval seconds."""
    import io

    import grpc
    from google.protobuf import json_format

    from policyagent.pb import fleet_grpc, fleet_pb
    from policyagent.server.fleetcmd import channel, render_stats

    with channel(args) as chan:
        stub = fleet_grpc.FleetStub(chan)

        def frame(done: int, live: bool) -> str | None:
            try:
                stats = stub.GetStatistics(fleet_pb.FleetStatisticsRequest(computers=args.computers), timeout=30)
            except grpc.RpcError as exc:
                err.write(f"ipsecmon: fleet statistics from {args.server}: {exc.details() or exc.code().name}\n")
                if done == 0 or not live:
                    raise _Stop(1) from None
                return None
            if args.json:
                return json.dumps(json_format.MessageToDict(stats), indent=None if live else 2) + "\n"
            buf = io.StringIO()
            stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            buf.write(f"IP Security Monitor (fleet, {args.server})    {stamp}\n\n")
            render_stats(stats, buf)
            return buf.getvalue()

        return repeat(args, out, frame)


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client: AgentApi
    if args.server and args.computer:
        client = RelayClient(args.server, args.computer, cert_dir=args.cert_dir, server_name=args.server_name)
    elif args.server:
        return run_fleet(args, out, err)
    else:
        client = AgentClient(socket_path(args))
    monitor = Monitor(client)

    def frame(done: int, live: bool) -> str:
        try:
            snap = monitor.refresh()
        except PolicyError as exc:
            if done == 0 or not live:
                err.write(f"ipsecmon: {' '.join(exc.message.split())}\n")
                raise _Stop(1) from None
            # The agent went away (a restart?): say so and keep trying.
            if args.json:
                return json.dumps({"time_unix_ms": int(time.time() * 1000), "error": exc.message}) + "\n"
            stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            return f"IP Security Monitor    {stamp}\n\nThe agent does not answer: {exc.message}\n"
        if args.json:
            return json.dumps(snapshot_dict(snap), indent=None if live else 2) + "\n"
        return render(snap, interval=args.interval if live else None)

    try:
        return repeat(args, out, frame)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ipsecmon` console script. Returns the exit code."""
    p = parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.computer is not None:
        args.computer = args.computer.strip()
        if not args.server:
            p.error("--computer NAME goes through the policy server: add -r HOST:PORT")
        if not args.computer:
            p.error("--computer needs the computer's name")
        if args.computers:
            p.error("--computer NAME shows one computer; COMPUTER arguments are for the fleet view")
    return run(args, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
