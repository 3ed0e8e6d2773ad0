"""`policyagent admin-cert | host-cert | join-token | ca`: identity commands.

By default they work directly on the server's data directory, on the server host
(issuing needs the CA key, which never leaves it), whether or not the server
runs. A revocation is signalled to a running server (SIGHUP to the pid in its
lock file), which applies it at once: calls with that certificate are refused
and subscribers (the distribution hub) close its streams.

`join-token create`, `host-cert revoke|list` and `admin-cert revoke|list` also
take `-r/--server HOST:PORT` (and `--cert-dir`): they then ask a running server
over mTLS with an admin certificate (the IdentityAdmin service), which runs the
same operations below (`create_join_token`, `revoke`, `certificates`) on its own
identity database and applies a revocation at once.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeAlias

from policyagent.pki.ca import PkiError, Role, check_name, fingerprint
from policyagent.pki.identity import IDENTITY_FILE, CertRecord, IdentityStore, Peer

DEFAULT_DATA_DIR = "./policyagent-data"
LOCK_FILE = "server.lock"  # policyagent.server.app.LOCK_FILE

_TTL_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """'90', '30m', '1h', '7d' → seconds; ValueError otherwise."""
    match = _TTL_RE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"cannot read the lifetime {text!r}: give a number with s, m, h or d (e.g. 1h)")
    return float(match.group(1)) * _TTL_UNITS[match.group(2)]


def _data_dir(args: argparse.Namespace) -> Path:
    path = Path(args.data_dir).absolute()
    if not path.is_dir():
        raise PkiError(f"{path} is not a server data directory (start the server once, or pass --data-dir)")
    return path


def _open_ca(data_dir: Path) -> Any:
    from policyagent.pki.ca import CertificateAuthority
    from policyagent.pki.server import PKI_SUBDIR

    return CertificateAuthority.load_or_create(data_dir / PKI_SUBDIR)[0]


def notify_server(data_dir: Path) -> str:
    """Tell a server running on `data_dir` to reload revocations; what happened, for the user."""
    lock = data_dir / LOCK_FILE
    if not lock.exists():
        return "no server is running on this data directory; it applies this when it starts"
    fd = os.open(lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass  # held: a server runs
        else:
            return "no server is running on this data directory; it applies this when it starts"
        text = os.read(fd, 32).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if not text.isdigit():
        return "a server holds this data directory but its pid is unknown; restart it to apply this"
    os.kill(int(text), signal.SIGHUP)
    return f"the running server (pid {text}) applies it now"


def _admin_issue(args: argparse.Namespace) -> int:
    from policyagent.pki.server import write_admin_dir

    data_dir = _data_dir(args)
    name = check_name("admin", args.name)
    out = Path(args.out) if args.out else Path(f"policyagent-admin-{name}")
    ca = _open_ca(data_dir)
    identity = IdentityStore(data_dir / IDENTITY_FILE)
    try:
        peer = write_admin_dir(out, ca, identity, name)
    finally:
        identity.close()
    print(f"admin certificate for {name} (serial {peer.serial:x}) written to {out}/: admin.crt, admin.key, ca.crt")
    print(f"use it with: netsh --cert-dir {out} -r HOST:PORT ...  (or POLICYAGENT_ADMIN_DIR={out})")
    return 0


# ------------------------------------------------------------ the operations
# Shared by the local commands (on the data directory) and the IdentityAdmin
# service (policyagent/server/identity.py, on the running server's store thread).


class JoinToken(NamedTuple):
    token: str
    computer: str
    expires_ms: int
    domain: str  # "" = a workgroup machine


def create_join_token(
    identity: IdentityStore, computer: str, ttl_s: float, *, created_by: str, domain: str = ""
) -> JoinToken:
    """A one-time join token for `computer` (bound lower case); PkiError for a bad name or lifetime."""
    computer, domain = computer.lower(), domain.lower()
    token, expires = identity.create_join_token(computer, ttl_s, created_by=created_by, domain=domain)
    return JoinToken(token, computer, expires, domain)


def revoke(identity: IdentityStore, role: Literal["agent", "admin"], name: str) -> list[Peer]:
    """Revoke every valid certificate of this computer (agent) or admin; PkiError if it has none.

    Only the database: the caller then makes the running server apply it (SIGHUP, or
    `PolicyServer.reload_revocations` when the server itself runs this).
    """
    return identity.revoke(role, name)


def certificates(identity: IdentityStore, role: Role | None) -> list[CertRecord]:
    """The certificates the CA issued, of one role (None: all)."""
    return identity.certificates(role)


# ------------------------------------------------------------ printing


def _print_revoked(role: str, name: str, serials: list[str], outcome: str) -> None:
    what = "admin" if role == "admin" else "computer"
    print(f"revoked {what} {name}: {len(serials)} certificate(s) ({', '.join(serials)}); {outcome}")


def _print_records(records: list[CertRecord]) -> None:
    for rec in records:
        state = "valid" if rec.revoked_ms is None else f"revoked {_iso(rec.revoked_ms)} ({rec.revoke_reason})"
        issued, expires = _iso(rec.issued_ms), _iso(rec.not_after_ms)
        print(f"{rec.name}\tserial {rec.serial:x}\tissued {issued}\texpires {expires}\t{state}")


def _print_join_token(created: JoinToken) -> None:
    # The token alone on stdout (scripts capture it); the explanation on stderr.
    print(created.token)
    member = f"a member of domain {created.domain}" if created.domain else "a workgroup machine"
    print(
        f"one-time join token for computer {created.computer} ({member}), valid until {_iso(created.expires_ms)}",
        file=sys.stderr,
    )


# ------------------------------------------------------------ handlers


def _remote(args: argparse.Namespace) -> Any:
    """The IdentityAdmin client for -r/--server (None without it: work on the data directory)."""
    if not getattr(args, "server", None):
        return None
    from clients.identity.client import IdentityClient
    from clients.netsh.client import server_target

    return IdentityClient(server_target(args.server), cert_dir=args.cert_dir)


def _revoke(role: Literal["agent", "admin"], args: argparse.Namespace) -> int:
    client = _remote(args)
    if client is not None:
        try:
            serials = client.revoke(role, args.name)
        finally:
            client.close()
        _print_revoked(role, args.name, serials, f"the server at {client.target} applied it at once")
        return 0
    data_dir = _data_dir(args)
    identity = IdentityStore(data_dir / IDENTITY_FILE)
    try:
        peers = revoke(identity, role, args.name)
    finally:
        identity.close()
    _print_revoked(role, args.name, [f"{p.serial:x}" for p in peers], notify_server(data_dir))
    return 0


def _list(role: Literal["agent", "admin"], args: argparse.Namespace) -> int:
    client = _remote(args)
    if client is not None:
        try:
            records = client.certificates(role)
        finally:
            client.close()
    else:
        identity = IdentityStore(_data_dir(args) / IDENTITY_FILE)
        try:
            records = certificates(identity, role)
        finally:
            identity.close()
    _print_records(records)
    return 0


def _join_token(args: argparse.Namespace) -> int:
    ttl = parse_ttl(args.ttl)
    client = _remote(args)
    if client is not None:
        try:
            created = client.create_join_token(args.computer, ttl, args.domain or "")
        finally:
            client.close()
    else:
        identity = IdentityStore(_data_dir(args) / IDENTITY_FILE)
        try:
            created = create_join_token(
                identity, args.computer, ttl, created_by=f"uid{os.getuid()}", domain=args.domain or ""
            )
        finally:
            identity.close()
    _print_join_token(created)
    return 0


def _ca_fingerprint(args: argparse.Namespace) -> int:
    ca = _open_ca(_data_dir(args))
    print(f"SHA256:{fingerprint(ca.cert)}")
    return 0


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, help="the server's data directory (default: %(default)s)"
    )


def _target_args(parser: argparse.ArgumentParser) -> None:
    """--data-dir (on the server host), or -r/--server and --cert-dir (from anywhere, with an admin certificate)."""
    _data_dir_arg(parser)
    parser.add_argument(
        "-r", "--server", metavar="HOST:PORT",
        help="ask this running server over mTLS with an admin certificate, instead of using --data-dir",
    )
    parser.add_argument(
        "--cert-dir",
        metavar="DIR",
        help="with --server: the admin certificate directory (admin.crt, admin.key, ca.crt)",
    )


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_admin_cert(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("admin-cert", help="issue, revoke and list admin certificates")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    issue = sub.add_parser("issue", help="issue an admin certificate (writes admin.crt, admin.key 0600, ca.crt)")
    issue.add_argument("name", metavar="NAME")
    issue.add_argument("--out", metavar="DIR", help="where to write it (default: ./policyagent-admin-NAME)")
    _data_dir_arg(issue)
    issue.set_defaults(handler=_admin_issue)
    revoke = sub.add_parser("revoke", help="revoke every certificate of an admin, at once")
    revoke.add_argument("name", metavar="NAME")
    _target_args(revoke)
    revoke.set_defaults(handler=lambda args: _revoke("admin", args))
    listing = sub.add_parser("list", help="list admin certificates")
    _target_args(listing)
    listing.set_defaults(handler=lambda args: _list("admin", args))


def add_host_cert(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("host-cert", help="revoke and list computers' host certificates")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    revoke = sub.add_parser(
        "revoke", help="revoke a computer's host certificate: its agent is cut off at once and must re-enroll"
    )
    revoke.add_argument("name", metavar="COMPUTER")
    _target_args(revoke)
    revoke.set_defaults(handler=lambda args: _revoke("agent", args))
    listing = sub.add_parser("list", help="list host certificates")
    _target_args(listing)
    listing.set_defaults(handler=lambda args: _list("agent", args))


def add_join_token(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("join-token", help="one-time enrollment tokens")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="make a one-time token bound to a computer name (printed once)")
    create.add_argument("computer", metavar="COMPUTER")
    create.add_argument("--ttl", default="1h", help="how long it is valid: 90s, 30m, 1h, 7d (default: %(default)s)")
    create.add_argument(
        "--domain", metavar="DNSDOMAIN", help="the computer is a member of this domain (default: workgroup machine)"
    )
    _target_args(create)
    create.set_defaults(handler=_join_token)


def add_ca(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("ca", help="the server's certificate authority")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fp = sub.add_parser("fingerprint", help="print the CA certificate's SHA-256 fingerprint (for --ca-fingerprint)")
    _data_dir_arg(fp)
    fp.set_defaults(handler=_ca_fingerprint)


SUBCOMMANDS: list[Callable[[Subparsers], None]] = [add_admin_cert, add_host_cert, add_join_token, add_ca]
