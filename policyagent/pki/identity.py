"""Who the CA has certified: issued and revoked certificates, join tokens, enrolled computers.

One small SQLite file, <data-dir>/identity.sqlite3 (0600), owned by this module
alone. Serials are stored as hex text (they are up to 159 bits; SQLite integers
are 64). Every enrollment is one transaction here: the certificate row, the
join token's use and the computer's row commit together or not at all.

`Revocations` is the in-memory view the server checks on every call and the
hook others subscribe to: when a certificate is revoked, each subscriber is
called with its `Peer`, on the server's event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509

from policyagent.pki.ca import PkiError, Role, cert_pem, check_name, common_name, name_key, role_of

IDENTITY_FILE = "identity.sqlite3"
JOIN_TOKEN_PREFIX = "pajt1."

_log = logging.getLogger("policyagent.pki")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    serial        TEXT    PRIMARY KEY,
    role          TEXT    NOT NULL CHECK (role IN ('agent', 'admin', 'server')),
    name          TEXT    NOT NULL,
    name_key      TEXT    NOT NULL,
    issued_ms     INTEGER NOT NULL,
    not_after_ms  INTEGER NOT NULL,
    revoked_ms    INTEGER,
    revoke_reason TEXT,
    pem           TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_name ON certificates (role, name_key);
CREATE TABLE IF NOT EXISTS join_tokens (
    token_hash   TEXT    PRIMARY KEY,
    computer     TEXT    NOT NULL,
    computer_key TEXT    NOT NULL,
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    used_ms      INTEGER,
    created_by   TEXT    NOT NULL,
    domain       TEXT    NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS computers (
    name_key    TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL,
    membership  TEXT    NOT NULL CHECK (membership IN ('domain', 'workgroup')),
    domain      TEXT    NOT NULL,
    proof       TEXT    NOT NULL,
    serial      TEXT    NOT NULL,
    enrolled_ms INTEGER NOT NULL
);
"""

Membership = Literal["domain", "workgroup"]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def serial_text(serial: int) -> str:
    return format(serial, "x")


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


@dataclass(frozen=True)
class Peer:
    """An authenticated caller, from its certificate: role, name (CN) and serial."""

    role: Literal["agent", "admin"]
    name: str
    serial: int


@dataclass(frozen=True)
class CertRecord:
    """One issued certificate as the identity database keeps it."""

    serial: int
    role: Role
    name: str
    issued_ms: int
    not_after_ms: int
    revoked_ms: int | None
    revoke_reason: str


@dataclass(frozen=True)
class ComputerRecord:
    name: str
    membership: Membership
    domain: str
    proof: str
    serial: int
    enrolled_ms: int


class EnrollmentRefused(PkiError):
    """A proof was refused; the message is the reason, safe to send to the caller."""


class Revocations:
    """Revoked serials in memory, and the subscribers told when a certificate is revoked.

    `is_revoked` is a set lookup (called on every authorized call). `subscribe`
    registers `callback(peer)`, called on the server's event loop for every
    certificate revoked while the server runs (by enrollment replacing a
    computer's certificate, or by `policyagent admin-cert revoke` /
    `computer revoke`, which signal the server). Callbacks must not block; an
    exception in one is logged and the others still run.
    """

    def __init__(self, revoked: set[int] | None = None) -> None:
        self._revoked = set(revoked or ())
        self._subscribers: list[Callable[[Peer], None]] = []

    def is_revoked(self, serial: int) -> bool:
        return serial in self._revoked

    def subscribe(self, callback: Callable[[Peer], None]) -> Callable[[], None]:
        """Call `callback(peer)` for each revocation from now on; returns a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def revoked(self, peers: list[Peer]) -> None:
        """Record these as revoked and tell the subscribers (call on the event loop)."""
        for peer in peers:
            self._revoked.add(peer.serial)
        for peer in peers:
            for callback in list(self._subscribers):
                try:
                    callback(peer)
                except Exception:
                    _log.exception("revocation subscriber failed", extra={"serial": serial_text(peer.serial)})

    def replace(self, serials: set[int]) -> set[int]:
        """Make `serials` the revoked set; returns those that are newly revoked (subscribers not called)."""
        new = serials - self._revoked
        self._revoked = set(serials)
        return new


def _peer_of_row(role: str, name: str, serial: str) -> Peer | None:
    if role not in ("agent", "admin"):
        return None
    return Peer(role="agent" if role == "agent" else "admin", name=name, serial=int(serial, 16))


class IdentityStore:
    """The identity database (<data-dir>/identity.sqlite3). Thread-safe; every method is one transaction."""

    def __init__(self, path: Path, *, clock_ms: Callable[[], int] = _now_ms) -> None:
        self.path = path
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        with self._transaction() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ------------------------------------------------------------ certificates

    @staticmethod
    def _insert_cert(conn: sqlite3.Connection, cert: x509.Certificate, now: int) -> None:
        role = role_of(cert)
        if role is None:
            raise PkiError("the certificate carries no policyagent role")
        name = common_name(cert)
        conn.execute(
            "INSERT INTO certificates (serial, role, name, name_key, issued_ms, not_after_ms, pem)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                serial_text(cert.serial_number),
                role,
                name,
                name_key(name),
                now,
                int(cert.not_valid_after_utc.timestamp() * 1000),
                cert_pem(cert).decode(),
            ),
        )

    def record_issued(self, cert: x509.Certificate) -> None:
        """Remember a certificate the CA just issued (admin and server certificates)."""
        with self._transaction() as conn:
            self._insert_cert(conn, cert, self._clock_ms())

    @staticmethod
    def _revoke_where(conn: sqlite3.Connection, now: int, reason: str, role: str, key: str) -> list[Peer]:
        rows = conn.execute(
            "SELECT role, name, serial FROM certificates WHERE role = ? AND name_key = ? AND revoked_ms IS NULL",
            (role, key),
        ).fetchall()
        conn.execute(
            "UPDATE certificates SET revoked_ms = ?, revoke_reason = ?"
            " WHERE role = ? AND name_key = ? AND revoked_ms IS NULL",
            (now, reason, role, key),
        )
        return [p for p in (_peer_of_row(*row) for row in rows) if p is not None]

    def revoke(
        self, role: Literal["agent", "admin"], name: str, reason: str = "revoked by an administrator"
    ) -> list[Peer]:
        """Revoke every valid certificate of this admin or computer; returns them. PkiError if none."""
        with self._transaction() as conn:
            now = self._clock_ms()
            peers = self._revoke_where(conn, now, reason, role, name_key(name))
            if not peers:
                what = "admin" if role == "admin" else "computer"
                raise PkiError(f"{what} {name!r} has no valid certificate to revoke")
            if role == "agent":
                conn.execute("DELETE FROM computers WHERE name_key = ?", (name_key(name),))
        return peers

    def revoked_serials(self) -> set[int]:
        with self._lock:
            rows = self._conn.execute("SELECT serial FROM certificates WHERE revoked_ms IS NOT NULL").fetchall()
        return {int(row[0], 16) for row in rows}

    def certificates(self, role: Role | None = None) -> list[CertRecord]:
        sql = "SELECT serial, role, name, issued_ms, not_after_ms, revoked_ms, revoke_reason FROM certificates"
        params: tuple[str, ...] = ()
        if role is not None:
            sql += " WHERE role = ?"
            params = (role,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY issued_ms, serial", params).fetchall()
        return [
            CertRecord(int(s, 16), r, n, int(i), int(na), None if rv is None else int(rv), rr or "")
            for s, r, n, i, na, rv, rr in rows
        ]

    # ------------------------------------------------------------ join tokens

    def create_join_token(self, computer: str, ttl_s: float, created_by: str, domain: str = "") -> tuple[str, int]:
        """A one-time token for `computer`, valid `ttl_s` seconds. Returns (token, expires_ms).

        With `domain`, the admin vouches that the computer is a member of that DNS
        domain; without, it enrolls as a workgroup machine. Only the token's SHA-256
        is stored: the token itself is shown once, to the admin.
        """
        check_name("computer", computer)
        if ttl_s <= 0:
            raise PkiError("the join token's lifetime must be positive")
        token = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self._clock_ms()
        expires = now + int(ttl_s * 1000)
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO join_tokens"
                " (token_hash, computer, computer_key, created_ms, expires_ms, created_by, domain)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_hash_token(token), computer, name_key(computer), now, expires, created_by, domain.lower()),
            )
        return token, expires

    # ------------------------------------------------------------ enrollment

    def computer(self, name: str) -> ComputerRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT name, membership, domain, proof, serial, enrolled_ms FROM computers WHERE name_key = ?",
                (name_key(name),),
            ).fetchone()
        if row is None:
            return None
        return ComputerRecord(row[0], row[1], row[2], row[3], int(row[4], 16), int(row[5]))

    def computers(self) -> list[ComputerRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, membership, domain, proof, serial, enrolled_ms FROM computers ORDER BY name_key"
            ).fetchall()
        return [ComputerRecord(r[0], r[1], r[2], r[3], int(r[4], 16), int(r[5])) for r in rows]

    def join_token_domain(self, token: str) -> str | None:
        """The domain a join token vouches for ("" = workgroup), None if there is no such token."""
        with self._lock:
            row = self._conn.execute(
                "SELECT domain FROM join_tokens WHERE token_hash = ?", (_hash_token(token),)
            ).fetchone()
        return None if row is None else str(row[0])

    def enroll(
        self,
        *,
        computer: str,
        membership: Membership,
        domain: str,
        proof: Literal["kerberos", "join-token", "workgroup-secret"],
        issue: Callable[[], x509.Certificate],
        join_token: str | None = None,
        record_computer: Callable[[str, Membership, str], None] | None = None,
    ) -> tuple[x509.Certificate, list[Peer]]:
        """Check the proof's remaining conditions, issue and record, all in one transaction.

        - join token: must exist, be unused, unexpired and bound to `computer`; it is used up here;
        - workgroup secret: refused if `computer` is already enrolled (a secret shared by every
          workgroup machine must not let one take over another's name);
        - Kerberos and join token replace the computer's earlier certificates (revoked; returned).

        `record_computer(name, membership, domain)` (the topology registry's upsert) runs inside
        the transaction: if it raises, nothing is recorded here. Raises EnrollmentRefused.
        """
        check_name("computer", computer)
        key = name_key(computer)
        with self._transaction() as conn:
            now = self._clock_ms()
            if proof == "join-token":
                self._use_join_token(conn, join_token or "", computer, now)
            existing = conn.execute("SELECT membership FROM computers WHERE name_key = ?", (key,)).fetchone()
            if proof == "workgroup-secret" and existing is not None:
                raise EnrollmentRefused(
                    f"computer {computer!r} is already enrolled; the workgroup secret cannot re-enroll it "
                    f"(revoke it first with `policyagent host-cert revoke {computer}`, or use a join token)"
                )
            replaced = self._revoke_where(conn, now, "replaced by a new enrollment", "agent", key)
            cert = issue()
            self._insert_cert(conn, cert, now)
            conn.execute(
                "INSERT OR REPLACE INTO computers (name_key, name, membership, domain, proof, serial, enrolled_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, computer, membership, domain, proof, serial_text(cert.serial_number), now),
            )
            if record_computer is not None:
                record_computer(computer, membership, domain)
        return cert, replaced

    @staticmethod
    def _use_join_token(conn: sqlite3.Connection, token: str, computer: str, now: int) -> None:
        row = conn.execute(
            "SELECT computer, computer_key, expires_ms, used_ms FROM join_tokens WHERE token_hash = ?",
            (_hash_token(token),),
        ).fetchone()
        if row is None:
            raise EnrollmentRefused("unknown join token (mistyped, or not made by this server)")
        bound, bound_key, expires, used = row
        if used is not None:
            raise EnrollmentRefused(f"this join token was already used (at {_iso(int(used))}); ask for a new one")
        if now >= int(expires):
            raise EnrollmentRefused(f"this join token expired at {_iso(int(expires))}; ask for a new one")
        if bound_key != name_key(computer):
            raise EnrollmentRefused(f"this join token is for computer {bound!r}, not {computer!r}")
        conn.execute("UPDATE join_tokens SET used_ms = ? WHERE token_hash = ?", (now, _hash_token(token)))


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
