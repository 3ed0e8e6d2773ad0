"""`policyagent audit`: the audit events 541-547 the agents forwarded, by computer, id and time (admin certificate)."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from google.protobuf import json_format

from policyagent.pb import agent_pb, fleet_pb
from policyagent.server.fleetcmd import channel, connection_options, rpc_error

# Windows' IPsec audit events (reference/windows-ipsec.md §6.2): id → short symbolic name.
EVENT_NAMES = {
    541: "sa-established",
    542: "qm-sa-ended",
    543: "mm-sa-ended",
    544: "auth-failed-cert-trust",
    545: "auth-failed",
    546: "invalid-proposal",
    547: "negotiation-failed",
}
# The fields shown in the table, in this order (all of them with --json).
KEY_FIELDS = (
    "Peer Identity",
    "Failure Point",
    "Failure Reason",
    "Attribute",
    "Expected value",
    "Received value",
    "Filter",
    "Inbound SPI",
    "Outbound SPI",
)
_RELATIVE = re.compile(r"^-?(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> int:
    """Unix ms from `-10m` / `2h` (that long ago: s, m, h, d) or ISO 8601 (local time unless it says)."""
    value = text.strip()
    relative = _RELATIVE.match(value)
    if relative:
        now = time.time() if now is None else now
        return int((now - int(relative.group(1)) * _UNITS[relative.group(2)]) * 1000)
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give ISO 8601 (2024-05-01T10:00:00Z) or how long ago (-10m, -2h, -1d)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return int(when.timestamp() * 1000)


def _event_ids(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        try:
            event_id = int(part.strip())
        except ValueError:
            event_id = 0
        if event_id not in EVENT_NAMES:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not an audit event id (541-547)")
        out.append(event_id)
    return out


def add_audit(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="audit events 541-547 of one computer or the whole fleet",
        description=(
            "The IPsec audit events (541-547) the agents recorded and forwarded to the server, oldest first: "
            "time, computer, id, what happened and its key fields. Without --since, the newest --limit events."
        ),
    )
    # `--since -10m` is a value, not an unknown option (argparse's test for a negative number, widened).
    parser._negative_number_matcher = re.compile(r"^-\d+[smhd]?$|^-\d*\.\d+$")
    parser.add_argument(
        "--computer", action="append", default=[], metavar="NAME", help="only this computer (repeatable)"
    )
    parser.add_argument(
        "--id", action="append", default=[], type=_event_ids, metavar="ID", help="only this id, e.g. 545 (repeatable)"
    )
    parser.add_argument("--since", type=parse_time, default=0, metavar="ISO|-10m", help="from this time on")
    parser.add_argument("--until", type=parse_time, default=0, metavar="ISO|-10m", help="before this time")
    parser.add_argument("--limit", type=int, default=1000, help="at most this many, the newest (default: %(default)s)")
    connection_options(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output (every field)")
    parser.set_defaults(handler=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    import grpc

    from policyagent.pb import fleet_grpc

    ids = sorted({i for group in args.id for i in group})
    request = fleet_pb.FleetAuditRequest(
        computers=args.computer,
        ids=ids,
        since_unix_ms=args.since,
        until_unix_ms=args.until,
        limit=max(args.limit, 1),
    )
    with channel(args) as chan:
        try:
            events = fleet_grpc.FleetStub(chan).ListAuditEvents(request, timeout=30)
        except grpc.RpcError as exc:
            raise rpc_error("audit events", args, exc) from None
    if args.json:
        print(json.dumps(json_format.MessageToDict(events), indent=2, ensure_ascii=False))
    else:
        render(events, sys.stdout)
    return 0


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def details(event: agent_pb.AuditEvent) -> str:
    """The event's key fields on one line (its message when it has none of them)."""
    parts = [f"{name}: {event.fields[name]}" for name in KEY_FIELDS if event.fields.get(name)]
    return "; ".join(parts) if parts else event.message


def render(events: fleet_pb.FleetAuditEvents, out: TextIO) -> None:
    if not events.events:
        print("no audit events", file=out)
        return
    rows: list[Sequence[str]] = [("TIME", "COMPUTER", "ID", "EVENT", "DETAILS")]
    for event in events.events:
        rows.append(
            (_iso(event.time_unix_ms), event.computer, str(event.id), EVENT_NAMES.get(event.id, "?"), details(event))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4], file=out)
    if events.truncated:
        shown = len(events.events)
        print(f"(only the newest {shown} shown: narrow with --since, --id, --computer or raise --limit)", file=out)
