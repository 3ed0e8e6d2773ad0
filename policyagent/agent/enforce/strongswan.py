"""The strongSwan enforcer: compile() → reconcile charon (over VICI) and the nftables filter table.

- `apply()` compiles the effective policy for this host, refuses it (EnforceError → NACK) when the
  host cannot enforce it, then reconciles: secrets, then connections (by name and content hash:
  unchanged ones are not touched, so their SAs stay up; changed ones are reloaded and their old SAs
  closed; removed ones unloaded and closed), then the filter table in one nft transaction. A journal
  is written before the first change; on any failure everything is put back as it was and the
  error is the NACK reason.
- Negotiation is on demand, as on Windows: a packet that must be protected and has no SA is logged
  by the filter table to an NFLOG group and dropped; the acquire thread then loads the connection
  (per peer, for rules whose filters name no single peer) and initiates it. When IKE gets no answer
  and the filter action allows fallback to clear, the peer gets a *soft association*: clear traffic
  with it passes for five minutes (counted), after which IPsec is tried again.
- charon is supervised: if it dies, it is restarted and the last desired state re-applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policyagent.agent.enforce import EnforceError, HostFacts, nft
from policyagent.agent.enforce.caps import HostCapabilities
from policyagent.agent.enforce.charon import Charon
from policyagent.agent.enforce.compile import (
    CompileInput,
    HostAddresses,
    LocalIdentity,
    Platform,
    compile_policy,
    instantiate,
)
from policyagent.agent.enforce.desired import Connection, Desired, FilterEntry, Secret
from policyagent.agent.enforce.nflog import NflogListener
from policyagent.agent.files import atomic_write
from policyagent.pb import dist_pb

_log = logging.getLogger("policyagent.agent.enforce")

LOG_GROUP = 7
SOFT_SA_SECONDS = 300  # Windows keeps a soft association for 5 minutes of idle time
HOLDDOWN_S = 5.0  # after a failed negotiation without fallback, wait before trying that peer again
JOURNAL = Path("enforcer") / "journal.json"
HOST_CERT, HOST_KEY, CA_FILE, EXTRA_CAS = "host.crt", "host.key", "ca.crt", "ca.d"


def read_identity(state_dir: Path) -> tuple[LocalIdentity | None, bytes]:
    """The host certificate and trusted CAs for IKE (from enrollment, plus STATE_DIR/ca.d/*.pem|*.crt),
    and the private key's PEM (a secret: loaded into charon, never logged)."""
    from cryptography import x509

    try:
        cert = (state_dir / HOST_CERT).read_text()
        key = (state_dir / HOST_KEY).read_bytes()
    except OSError:
        return None, b""
    trusted: list[tuple[str, str]] = []
    paths = [state_dir / CA_FILE]
    if (state_dir / EXTRA_CAS).is_dir():
        paths += sorted(p for p in (state_dir / EXTRA_CAS).iterdir() if p.suffix in (".pem", ".crt"))
    for path in paths:
        try:
            pem = path.read_text()
            subject = x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()
        except (OSError, ValueError):
            _log.warning("ignoring unreadable CA certificate %s", path)
            continue
        trusted.append((subject, pem))
    return LocalIdentity(cert_pem=cert, trusted=tuple(trusted)), key


def host_addresses() -> HostAddresses:
    """This host's addresses (not loopback, not the IPsec TUN), DNS servers and default gateway."""
    addresses: list[str] = []
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=False)
    for link in json.loads(out.stdout or "[]"):
        if link.get("ifname") in ("lo",) or link.get("ifname", "").startswith("ipsec"):
            continue
        for info in link.get("addr_info", []):
            if info.get("scope") == "global":
                addresses.append(info["local"])
    gateways: list[str] = []
    out = subprocess.run(["ip", "-j", "route", "show", "default"], capture_output=True, text=True, check=False)
    for route in json.loads(out.stdout or "[]"):
        if route.get("gateway"):
            gateways.append(route["gateway"])
    dns: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    dns.append(str(ipaddress.ip_address(parts[1])))
    return HostAddresses(addresses=tuple(addresses), dns_servers=tuple(dns), default_gateway=tuple(gateways))


def _close(session: Any) -> None:
    """vici.Session has no close(): close its transport's socket."""
    with contextlib.suppress(Exception):
        session.transport.close()


@dataclass
class Statistics:
    """What the enforcer itself counts (the IP Security Monitor reads these alongside charon's)."""

    negotiations_started: int = 0
    negotiations_succeeded: int = 0
    negotiation_failures: int = 0
    soft_associations: int = 0
    applies: int = 0
    apply_failures: int = 0
    charon_restarts: int = 0
    since_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))


class StrongSwanEnforcer:
    """Implements agent.enforce.Enforcer with charon (VICI) + nftables."""

    name = "strongswan"
    enforces = True

    def __init__(
        self,
        state_dir: Path,
        caps: HostCapabilities,
        *,
        server: tuple[str, int] | None = None,
        addresses: Callable[[], HostAddresses] = host_addresses,
        charon: Charon | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.caps = caps
        self.server = server
        self._addresses = addresses
        self.charon = charon or Charon(state_dir / "charon", backend=caps.backend)
        self.platform = Platform(backend=caps.backend, kernel_ah=caps.kernel_ah, ipcomp=caps.ipcomp)
        self.tun: str | None = "ipsec0" if caps.backend == "kernel-libipsec" else None
        self.stats = Statistics()
        self._lock = threading.RLock()
        self.desired = Desired()
        self.policy: dist_pb.EffectivePolicy | None = None
        self.facts: HostFacts | None = None
        self.conns: dict[str, Connection] = {}  # loaded in charon, by name (instances included)
        self.instances: dict[str, tuple[str, str]] = {}  # instance name → (template name, peer)
        self.secrets: dict[str, Secret] = {}
        self.nft_script = ""
        self._rendered: tuple[object, object, str] | None = None  # (entries, exemptions, script)
        self._inflight: set[tuple[str, str]] = set()
        self._holddown: dict[tuple[str, str], float] = {}
        self._stopping = threading.Event()
        self._acquire: threading.Thread | None = None
        self._listener: NflogListener | None = None
        self.local_addresses = HostAddresses()
        self.identity: LocalIdentity | None = None
        self._key_loaded = ""  # digest of the private key charon holds

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start charon and the acquire thread; an empty filter table until a policy arrives."""
        (self.state_dir / "enforcer").mkdir(parents=True, exist_ok=True)
        self.charon.start()
        self.charon.watch(self._charon_exited)
        self._listener = NflogListener(LOG_GROUP)
        self._acquire = threading.Thread(target=self._acquire_loop, name="enforce-acquire", daemon=True)
        self._acquire.start()

    def close(self) -> None:
        """Stop enforcing: filter table removed, charon stopped (its SAs and dynamic state with it)."""
        self._stopping.set()
        with self._lock:
            with contextlib.suppress(Exception):
                nft.flush()
            self.charon.stop()
        if self._acquire is not None:
            self._acquire.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def capabilities(self) -> dist_pb.Capabilities:
        return self.caps.to_proto()

    def describe(self) -> str:
        return f"strongswan: enforcing with charon ({self.caps.backend}) and nftables"

    # ------------------------------------------------------------------ compile

    def _compile(self, policy: dist_pb.EffectivePolicy, facts: HostFacts) -> Desired:
        self.local_addresses = self._addresses()
        self.identity, _key = read_identity(self.state_dir)
        return compile_policy(
            CompileInput(
                policy=policy,
                membership=facts.membership,
                host=self.local_addresses,
                platform=self.platform,
                server=self.server,
                identity=self.identity,
            )
        )

    def _load_key(self, session: Any) -> None:
        """Give charon this host's private key (again after a restart or a re-enrollment)."""
        _identity, key = read_identity(self.state_dir)
        if not key:
            return
        digest = hashlib.sha256(key).hexdigest()
        if digest != self._key_loaded:
            session.load_key({"type": "any", "data": key.decode()})
            self._key_loaded = digest

    def check(self, policy: dist_pb.EffectivePolicy, facts: HostFacts) -> list[str]:
        return list(self._compile(policy, facts).problems)

    # ------------------------------------------------------------------ apply

    def apply(self, policy: dist_pb.EffectivePolicy, facts: HostFacts) -> None:
        desired = self._compile(policy, facts)
        if desired.problems:
            raise EnforceError("; ".join(desired.problems))
        with self._lock:
            try:
                self._reconcile(desired, policy.version)
            except Exception:
                self.stats.apply_failures += 1
                raise
            self.policy, self.facts, self.desired = policy, facts, desired
            self.stats.applies += 1
        if desired.notes:
            _log.info(
                "policy applied with %d mapping note(s): %s", len(desired.notes), " | ".join(desired.notes[:5]),
                extra={"version": policy.version, "notes": list(desired.notes)},
            )

    def _wanted(self, desired: Desired) -> dict[str, Connection]:
        want = {c.name: c for c in desired.connections if not c.template}
        for name, (template, peer) in list(self.instances.items()):
            conn = desired.connection(template)
            if conn is None or not conn.template:
                continue
            local = self._local_for(peer)
            if local is None:
                continue
            inst = instantiate(conn, peer, local)
            if inst.body.get("children"):
                want[name] = inst
        return want

    def _local_for(self, peer: str) -> str | None:
        fam = ipaddress.ip_address(peer).version
        for a in self.local_addresses.addresses:
            if ipaddress.ip_address(a).version == fam:
                return a
        return None

    def _render(self, desired: Desired) -> str:
        """The nft script for `desired` (not rendered again when the filters did not change)."""
        if self._rendered is not None and self._rendered[:2] == (desired.entries, desired.exemptions):
            return self._rendered[2]
        script = nft.render(desired.entries, desired.exemptions, tun=self.tun, log_group=LOG_GROUP)
        self._rendered = (desired.entries, desired.exemptions, script)
        return script

    def _journal(self, record: dict[str, Any]) -> None:
        atomic_write(self.state_dir / JOURNAL, json.dumps(record, indent=1, sort_keys=True).encode())

    def _reconcile(self, desired: Desired, version: str) -> None:
        prev_conns, prev_secrets, prev_script = dict(self.conns), dict(self.secrets), self.nft_script
        want = self._wanted(desired)
        wanted_secrets = {s.name: s for s in desired.secrets}
        script = self._render(desired)
        plan = {
            "version": version,
            "load_conns": sorted(n for n, c in want.items() if n not in self.conns or self.conns[n].digest != c.digest),
            "unload_conns": sorted(n for n in self.conns if n not in want),
            "load_secrets": sorted(
                n for n, s in wanted_secrets.items() if n not in self.secrets or self.secrets[n].digest != s.digest
            ),
            "unload_secrets": sorted(n for n in self.secrets if n not in wanted_secrets),
            "filters_change": script != self.nft_script,
            "started_unix_ms": int(time.time() * 1000),
            "state": "applying",
        }
        self._journal(plan)
        try:
            self._converge(want, wanted_secrets, script)
        except Exception as exc:
            reason = f"applying version {version[:12]} failed: {exc}"
            _log.error("%s; rolling back", reason)
            try:
                self._converge(prev_conns, prev_secrets, prev_script)
                reason += "; the previous policy is back in force"
            except Exception as again:  # pragma: no cover - charon gone mid-rollback
                reason += f"; rollback also failed: {again}"
            self._journal({**plan, "state": "rolled back", "reason": reason})
            raise EnforceError(reason) from exc
        self.instances = {n: v for n, v in self.instances.items() if n in want}
        self._journal({**plan, "state": "applied", "finished_unix_ms": int(time.time() * 1000)})

    def _converge(self, want: dict[str, Connection], secrets: dict[str, Secret], script: str) -> None:
        """Make charon and nft hold exactly `want`, `secrets` and `script`."""
        session = self.charon.session()
        try:
            self._load_key(session)
            for name, secret in secrets.items():
                if name in self.secrets and self.secrets[name].digest == secret.digest:
                    continue
                session.load_shared({"id": name, "type": "IKE", "data": secret.data, "owners": list(secret.owners)})
                self.secrets[name] = secret
            for name, conn in want.items():
                old = self.conns.get(name)
                if old is not None and old.digest == conn.digest:
                    continue
                session.load_conn({name: conn.body})
                self.conns[name] = conn
                if old is not None:
                    self._terminate(session, name)
            for name in [n for n in self.conns if n not in want]:
                session.unload_conn({"name": name})
                del self.conns[name]
                self._terminate(session, name)
            for name in [n for n in self.secrets if n not in secrets]:
                session.unload_shared({"id": name})
                del self.secrets[name]
            if script != self.nft_script:
                nft.apply(script)
                self.nft_script = script
        finally:
            _close(session)

    @staticmethod
    def _terminate(session: Any, name: str) -> None:
        """Close the SAs of connection `name` (none is fine)."""
        with contextlib.suppress(Exception):
            for _ in session.terminate({"ike": name, "force": "yes", "timeout": "-1"}):
                pass

    # ------------------------------------------------------------------ on-demand negotiation

    def _acquire_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                packets = self._listener.recv(timeout=0.5)
            except OSError:
                if self._stopping.is_set():
                    return
                _log.exception("nflog receive failed")
                time.sleep(0.5)
                continue
            for pkt in packets:
                if pkt.prefix.startswith("pa-acq:"):
                    self._on_acquire(pkt.prefix, pkt.src, pkt.dst)

    def _on_acquire(self, prefix: str, src: str, dst: str) -> None:
        try:
            index = int(prefix.split(":", 1)[1].strip())
        except ValueError:
            return
        with self._lock:
            entries = self.desired.entries
            if index >= len(entries):
                return
            entry = entries[index]
            conn = self.desired.connection(entry.connection)
            if conn is None or not conn.initiates:
                return
            key = (conn.name, dst)
            now = time.monotonic()
            if key in self._inflight or self._holddown.get(key, 0.0) > now:
                return
            self._inflight.add(key)
        threading.Thread(
            target=self._negotiate, args=(conn, entry, dst, src), name=f"negotiate-{dst}", daemon=True
        ).start()

    def _negotiate(self, conn: Connection, entry: FilterEntry, peer: str, local: str) -> None:
        key = (conn.name, peer)
        try:
            with self._lock:
                inst = instantiate(conn, peer, local) if conn.template else conn
                if not inst.body.get("children"):
                    return
                session = self.charon.session()
                try:
                    if self.conns.get(inst.name) is None or self.conns[inst.name].digest != inst.digest:
                        session.load_conn({inst.name: inst.body})
                        self.conns[inst.name] = inst
                        if conn.template:
                            self.instances[inst.name] = (conn.name, peer)
                finally:
                    _close(session)
            child = next(iter(inst.body["children"]))
            self.stats.negotiations_started += 1
            started = time.monotonic()
            session = self.charon.session(timeout=30)
            try:
                for _ in session.initiate({"child": child, "ike": inst.name, "timeout": "15000", "init-limits": "no"}):
                    pass
                self.stats.negotiations_succeeded += 1
                _log.info(
                    "security negotiated with %s", peer,
                    extra={"connection": inst.name, "ms": round((time.monotonic() - started) * 1000)},
                )
            except Exception as exc:
                self._negotiation_failed(entry, inst, peer, str(exc))
            finally:
                _close(session)
        finally:
            with self._lock:
                self._inflight.discard(key)

    def _negotiation_failed(self, entry: FilterEntry, inst: Connection, peer: str, why: str) -> None:
        if entry.fallback_to_clear:
            nft.soft_add(peer, SOFT_SA_SECONDS)
            self.stats.soft_associations += 1
            _log.warning(
                "no IPsec answer from %s: soft association (clear traffic allowed for %d s)", peer, SOFT_SA_SECONDS,
                extra={"connection": inst.name, "reason": why},
            )
        else:
            self.stats.negotiation_failures += 1
            with self._lock:
                self._holddown[(entry.connection, peer)] = time.monotonic() + HOLDDOWN_S
            _log.warning(
                "security negotiation with %s failed; traffic stays blocked", peer,
                extra={"connection": inst.name, "reason": why},
            )

    # ------------------------------------------------------------------ charon supervision

    def _charon_exited(self, returncode: int) -> None:
        if self._stopping.is_set():
            return
        _log.error("charon exited (code %s); restarting it and re-applying the policy", returncode)
        self.stats.charon_restarts += 1
        with self._lock:
            try:
                self.charon.restart()
                self.charon.watch(self._charon_exited)
                self.conns, self.secrets, self.instances, self._key_loaded = {}, {}, {}, ""
                secrets = {s.name: s for s in self.desired.secrets}
                self._converge(self._wanted(self.desired), secrets, self.nft_script)
            except Exception:
                _log.exception("restarting charon failed")


__all__ = ["LOG_GROUP", "Statistics", "StrongSwanEnforcer", "host_addresses"]
