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
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policyagent.agent.enforce import EnforceError, HostFacts, nft, views
from policyagent.agent.enforce.caps import HostCapabilities
from policyagent.agent.enforce.charon import Charon, CharonError, ExternalCharon
from policyagent.agent.enforce.compile import (
    CompileInput,
    HostAddresses,
    LocalIdentity,
    Platform,
    compile_policy,
    instantiate,
)
from policyagent.agent.enforce.desired import Connection, Desired, FilterEntry, Secret
from policyagent.agent.enforce.kerbkey import (
    DEFAULT_PORT as KEYING_PORT,
)
from policyagent.agent.enforce.kerbkey import (
    KeyingService,
    PairKey,
    PairKeyTable,
    discover_principal,
    negotiate_key,
)
from policyagent.agent.enforce.monitor import MAIN_MODE_FIELDS, QUICK_MODE_FIELDS, Monitor
from policyagent.agent.enforce.nflog import NflogListener
from policyagent.agent.files import atomic_write
from policyagent.pb import agent_pb, dist_pb

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


def _child_for(conn: Connection, local: str, peer: str) -> str:
    """The child of `conn` whose traffic selectors hold local → peer (its first child when none does)."""
    children: dict[str, Any] = conn.body["children"]

    def holds(selectors: list[str], address: str) -> bool:
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(address)
            return any(ip in ipaddress.ip_network(ts.split("[")[0], strict=False) for ts in selectors
                       if ts not in ("dynamic", "%peer%"))
        return False

    for name, child in children.items():
        if holds(child.get("local_ts", []), local) and holds(child.get("remote_ts", []), peer):
            return name
    return next(iter(children))


@dataclass(frozen=True)
class KerberosSetup:
    """What the Kerberos keying exchange needs: this host's keytab and host principal (host/FQDN[@REALM]),
    and optionally the Kerberos environment (KRB5_CONFIG, ...) when it is not the system's."""

    keytab: Path
    principal: str
    krb5_env: dict[str, str] | None = None

    def usable(self) -> bool:
        return self.keytab.is_file()

    def kdcs(self) -> tuple[tuple[str, int], ...]:
        """The KDCs krb5.conf names (`kdc = HOST[:PORT]` in [realms]): their traffic must never need IPsec,
        or the keying exchange could not get its tickets."""
        path = Path((self.krb5_env or {}).get("KRB5_CONFIG") or os.environ.get("KRB5_CONFIG") or "/etc/krb5.conf")
        found: list[tuple[str, int]] = []
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return ()
        for line in lines:
            key, sep, value = line.partition("=")
            if not sep or key.strip() != "kdc":
                continue
            host, port = value.strip(), 88
            if host.startswith("["):  # [v6]:port
                host, _, rest = host[1:].partition("]")
                port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else 88
            elif host.count(":") == 1:
                host, _, p = host.partition(":")
                port = int(p) if p.isdigit() else 88
            try:
                addr = str(ipaddress.ip_address(host))
            except ValueError:
                try:
                    addr = str(socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)[0][4][0])
                except OSError:
                    continue
            found.append((str(addr), port))
        return tuple(dict.fromkeys(found))


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
        charon: Charon | ExternalCharon | None = None,
        kerberos: KerberosSetup | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.kerberos = kerberos if kerberos is not None and kerberos.usable() else None
        self._pair_keys = PairKeyTable()
        self._keying: KeyingService | None = None
        self.caps = caps
        self.server = server
        self._addresses = addresses
        self.charon: Charon | ExternalCharon = charon or Charon(state_dir / "charon", backend=caps.backend)
        self.monitor = Monitor(self.charon, state_dir)  # IP Security Monitor counters and audit events
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
        self.filters = nft.NftTable(tun=self.tun, log_group=LOG_GROUP)  # the nft filter table, applied by difference
        self.nft_filters: nft.Filters | None = None  # (entries, exemptions) the filter table holds
        self._inflight: set[tuple[str, str]] = set()
        self._holddown: dict[tuple[str, str], float] = {}
        self._stopping = threading.Event()
        self._acquire: threading.Thread | None = None
        self._listener: NflogListener | None = None
        self.local_addresses = HostAddresses()
        self.identity: LocalIdentity | None = None
        self.dynamic: tuple[dist_pb.EffectivePolicy, ...] = ()  # dynamic-mode rules, as pseudo policies
        self.crl_check = "1"  # netsh ipsec dynamic set config strongcrlcheck
        self.exempt_level = "3"  # netsh ipsec dynamic set config ipsecexempt
        self._key_pem = b""  # this host's private key as the last compile read it (a secret: never logged)
        self._key_loaded = ""  # digest of the private key charon holds

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start charon and the acquire thread; an empty filter table until a policy arrives."""
        (self.state_dir / "enforcer").mkdir(parents=True, exist_ok=True)
        self.charon.start()
        self.charon.watch(self._charon_exited)
        self.monitor.start()
        if self.kerberos is not None:
            self._keying = KeyingService(
                bind=("0.0.0.0", KEYING_PORT),
                keytab=self.kerberos.keytab,
                principal=self.kerberos.principal,
                on_key=self._pair_key,
                krb5_env=self.kerberos.krb5_env,
            )
            self._keying.start()
        self._listener = NflogListener(LOG_GROUP)
        self._acquire = threading.Thread(target=self._acquire_loop, name="enforce-acquire", daemon=True)
        self._acquire.start()

    def close(self) -> None:
        """Stop enforcing: filter table removed, charon stopped (its SAs and dynamic state with it)."""
        self._stopping.set()
        with self._lock:
            with contextlib.suppress(Exception):
                self.filters.flush()
            self.charon.stop()
        self.monitor.stop()
        if self._keying is not None:
            self._keying.stop()
        if self._acquire is not None:
            self._acquire.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def capabilities(self) -> dist_pb.Capabilities:
        return self.caps.to_proto()

    def describe(self) -> str:
        return f"strongswan: enforcing with charon ({self.caps.backend}) and nftables"

    # ------------------------------------------------------------------ monitoring

    def statistics(self) -> agent_pb.IpsecStatistics:
        snap = self.monitor.snapshot()
        out = agent_pb.IpsecStatistics(
            ipsec_active=(self.policy is not None and self.policy.HasField("policy")) or bool(self.dynamic),
            policy_name=self.policy.policy.name if self.policy is not None else "",
            enforcer=self.describe(),
            since_unix_ms=self.stats.since_unix_ms,
            time_unix_ms=int(time.time() * 1000),
        )
        for key, name in MAIN_MODE_FIELDS:
            out.main_mode.add(key=key, name=name, value=max(0, snap["main_mode"].get(key, 0)))
        for key, name in QUICK_MODE_FIELDS:
            out.quick_mode.add(key=key, name=name, value=max(0, snap["quick_mode"].get(key, 0)))
        return out

    def audit_events(self, since_unix_ms: int, ids: set[int] | None, limit: int) -> list[agent_pb.AuditEvent]:
        return [
            agent_pb.AuditEvent(id=e.id, time_unix_ms=e.time_unix_ms, fields=dict(e.fields), message=e.message)
            for e in self.monitor.events(since_unix_ms, ids, limit)
        ]

    def security_associations(self) -> agent_pb.SecurityAssociations:
        with self.charon.session() as session:
            out = views.security_associations(session.list_sas())
        for sa in out.main_mode:  # how this host authenticates the connection (list-sas does not say)
            conn = self.conns.get(sa.connection)
            if conn is not None:
                sa.auth = "kerberos" if conn.kerberos else str(conn.body.get("local-1", {}).get("auth", ""))
        return out

    def filters_in_force(self) -> agent_pb.Filters:
        desired = self.desired
        keys = {e.index: nft.entry_key(e) for e in desired.entries}
        try:
            counters = nft.entry_counters()
        except Exception:  # the table may be gone (stopping); the filters are still worth showing
            counters = {}
        return views.filters(desired, keys, counters)

    def set_dynamic(self, policies: tuple[dist_pb.EffectivePolicy, ...]) -> None:
        with self._lock:
            old = self.dynamic
            self.dynamic = policies
            policy = self.policy or dist_pb.EffectivePolicy(source="none")
            try:
                self.apply(policy, self.facts or HostFacts(membership=""))
            except Exception:
                self.dynamic = old
                raise

    def configure(self, values: dict[str, str]) -> None:
        """ikelogging (at once), strongcrlcheck (at once: re-applies the policy), ipsecexempt (given at start)."""
        trace = values.get("ikelogging", "0") == "1"
        if trace != (self.charon.ike_trace is not None):
            try:
                self.charon.set_ike_trace(self.charon.run_dir / "ike-trace.log" if trace else None)
            except CharonError as exc:
                _log.warning("set config ikelogging: %s", exc)
        crl = values.get("strongcrlcheck", self.crl_check)
        exempt = values.get("ipsecexempt", self.exempt_level)
        changed = (crl, exempt) != (self.crl_check, self.exempt_level)
        self.crl_check, self.exempt_level = crl, exempt
        if changed and self.policy is not None and self.facts is not None:
            self.apply(self.policy, self.facts)

    # ------------------------------------------------------------------ compile

    def _compile(self, policy: dist_pb.EffectivePolicy, facts: HostFacts) -> Desired:
        self.local_addresses = self._addresses()
        self.identity, self._key_pem = read_identity(self.state_dir)
        return compile_policy(
            CompileInput(
                policy=policy,
                membership=facts.membership,
                host=self.local_addresses,
                platform=self.platform,
                server=self.server,
                identity=self.identity,
                kerberos=self.kerberos is not None,
                kdcs=self.kerberos.kdcs() if self.kerberos is not None else (),
                crl_check=self.crl_check,
                exempt_level=self.exempt_level,
                dynamic=self.dynamic,
            )
        )

    def _load_key(self, session: Any) -> None:
        """Give charon this host's private key, as the last compile read it (again after a restart or a
        re-enrollment)."""
        if not self._key_pem:
            return
        digest = hashlib.sha256(self._key_pem).hexdigest()
        if digest != self._key_loaded:
            session.load_key({"type": "any", "data": self._key_pem.decode()})
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

    def _journal(self, record: dict[str, Any]) -> None:
        atomic_write(self.state_dir / JOURNAL, json.dumps(record, indent=1, sort_keys=True).encode())

    def _reconcile(self, desired: Desired, version: str) -> None:
        prev_conns, prev_secrets, prev_filters = dict(self.conns), dict(self.secrets), self.nft_filters
        want = self._wanted(desired)
        wanted_secrets = {s.name: s for s in desired.secrets}
        filters: nft.Filters = (desired.entries, desired.exemptions)
        plan = {
            "version": version,
            "load_conns": sorted(n for n, c in want.items() if n not in self.conns or self.conns[n].digest != c.digest),
            "unload_conns": sorted(n for n in self.conns if n not in want),
            "load_secrets": sorted(
                n for n, s in wanted_secrets.items() if n not in self.secrets or self.secrets[n].digest != s.digest
            ),
            "unload_secrets": sorted(n for n in self.secrets if n not in wanted_secrets),
            "filters_change": filters != self.nft_filters,
            "started_unix_ms": int(time.time() * 1000),
            "state": "applying",
        }
        self._journal(plan)
        try:
            self._converge(want, wanted_secrets, filters)
        except Exception as exc:
            reason = f"applying version {version[:12]} failed: {exc}"
            _log.error("%s; rolling back", reason)
            try:
                self._converge(prev_conns, prev_secrets, prev_filters)
                reason += "; the previous policy is back in force"
            except Exception as again:  # pragma: no cover - charon gone mid-rollback
                reason += f"; rollback also failed: {again}"
            self._journal({**plan, "state": "rolled back", "reason": reason})
            raise EnforceError(reason) from exc
        self.instances = {n: v for n, v in self.instances.items() if n in want}
        self._journal({**plan, "state": "applied", "finished_unix_ms": int(time.time() * 1000)})

    def _converge(self, want: dict[str, Connection], secrets: dict[str, Secret], filters: nft.Filters | None) -> None:
        """Make charon and nft hold exactly `want`, `secrets` and `filters` (None: leave the filter table as it is)."""
        with self.charon.session() as session:
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
                    self._close_changed(session, old, conn)
            for name in [n for n in self.conns if n not in want]:
                session.unload_conn({"name": name})
                del self.conns[name]
                self._terminate(session, name)
            for name in [n for n in self.secrets if n not in secrets]:
                session.unload_shared({"id": name})
                del self.secrets[name]
            if filters is not None and filters != self.nft_filters:
                self.filters.apply(*filters)
                self.nft_filters = filters

    @staticmethod
    def _terminate(session: Any, name: str, child: str = "") -> None:
        """Close the SAs of connection `name` (only those of `child` if given; none is fine)."""
        request = {"ike": name, "force": "yes", "timeout": "-1"}
        if child:
            request["child"] = child
        with contextlib.suppress(Exception):
            for _ in session.terminate(request):
                pass

    def _close_changed(self, session: Any, old: Connection, new: Connection) -> None:
        """After reloading a changed connection: close what no longer matches its configuration. When only
        some children changed (e.g. one of several tunnel rules to a gateway), only their SAs go; the IKE SA
        and the other children's SAs stay up."""
        same_ike = {k: v for k, v in old.body.items() if k != "children"} == {
            k: v for k, v in new.body.items() if k != "children"
        }
        if not same_ike:
            self._terminate(session, old.name)
            return
        new_children = new.body.get("children", {})
        for child, config in old.body.get("children", {}).items():
            if new_children.get(child) != config:
                self._terminate(session, old.name, child)

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
        tag = prefix[len(nft.ACQUIRE_PREFIX) :].strip()  # "pa-acq:<entry key> "
        with self._lock:
            entry = self.filters.keys().get(tag)
            if entry is None:
                return
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

    def _negotiate(self, conn: Connection, entry: FilterEntry | None, peer: str, local: str) -> None:
        key = (conn.name, peer)
        try:
            with self._lock:
                inst = instantiate(conn, peer, local) if conn.template else conn
                if not inst.body.get("children"):
                    return
                if self.conns.get(inst.name) is None or self.conns[inst.name].digest != inst.digest:
                    with self.charon.session() as session:
                        session.load_conn({inst.name: inst.body})
                    self.conns[inst.name] = inst
                    if conn.template:
                        self.instances[inst.name] = (conn.name, peer)
            child = _child_for(inst, local, peer)
            self.stats.negotiations_started += 1
            self.monitor.acquire_started()
            started = time.monotonic()
            try:
                if inst.kerberos:
                    self._ensure_pair_key(peer, local)
                with self.charon.session(timeout=30) as session:
                    request = {"child": child, "ike": inst.name, "timeout": "15000", "init-limits": "no"}
                    for _ in session.initiate(request):
                        pass
                self.stats.negotiations_succeeded += 1
                self.monitor.acquire_finished(True)
                _log.info(
                    "security negotiated with %s", peer,
                    extra={"connection": inst.name, "ms": round((time.monotonic() - started) * 1000)},
                )
            except Exception as exc:
                self.monitor.acquire_finished(False)
                self._negotiation_failed(entry, inst, peer, str(exc))
        finally:
            with self._lock:
                self._inflight.discard(key)

    # ------------------------------------------------------------------ Kerberos keying

    def _ensure_pair_key(self, peer: str, local: str) -> None:
        """Key the IKE SA with `peer` through the Kerberos keying exchange unless a fresh key is at hand."""
        assert self.kerberos is not None
        current = self._pair_keys.get(local, peer)
        if current is not None and current.renew_at() > time.time():
            return
        target = discover_principal(peer)
        pair = negotiate_key(
            peer,
            KEYING_PORT,
            local_principal=self.kerberos.principal,
            keytab=self.kerberos.keytab,
            target_principal=target,
            krb5_env=self.kerberos.krb5_env,
            source_ip=local,
        )
        self._pair_key(pair)

    def _pair_key(self, pair: PairKey) -> None:
        """A new Kerberos-derived key for a pair (ours or the peer's initiative): give it to charon."""
        if not self._pair_keys.offer(pair):
            return
        with self._lock:
            self._load_pair_key(pair)

    def _load_pair_key(self, pair: PairKey) -> None:
        with self.charon.session() as session:
            session.load_shared(
                {
                    "id": f"kerberos-{pair.peer_ip}",
                    "type": "IKE",
                    "data": pair.psk.hex(),
                    "owners": [pair.local_ip, pair.peer_ip],
                }
            )
        _log.info(
            "Kerberos-keyed IKE secret loaded for %s (%s), key %s", pair.peer_ip, pair.peer_principal, pair.key_id
        )

    def _negotiation_failed(self, entry: FilterEntry | None, inst: Connection, peer: str, why: str) -> None:
        if entry is None:
            _log.warning("re-negotiation with %s failed", peer, extra={"connection": inst.name, "reason": why})
            return
        if entry.fallback_to_clear:
            nft.soft_add(peer, SOFT_SA_SECONDS)
            self.stats.soft_associations += 1
            self.monitor.soft_association(peer)
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
                self.charon.restart()  # the watch carries over
                self.conns, self.secrets, self._key_loaded = {}, {}, ""
                secrets = {s.name: s for s in self.desired.secrets}
                # self.instances is kept: the per-peer connections are loaded again with the rest
                self._converge(self._wanted(self.desired), secrets, self.nft_filters)
                for pair in self._pair_keys.valid(time.time()):
                    self._load_pair_key(pair)
                again = [(self.conns[n], peer) for n, (_t, peer) in self.instances.items() if n in self.conns]
            except Exception:
                _log.exception("restarting charon failed")
                return
        # Peers still hold SAs with the charon that died; negotiating afresh replaces them at once
        # (IKEv1 INITIAL-CONTACT), rather than when dead peer detection notices.
        for conn, peer in again:
            local = self._local_for(peer)
            if local is not None:
                threading.Thread(
                    target=self._negotiate, args=(conn, None, peer, local), name=f"renegotiate-{peer}", daemon=True
                ).start()


__all__ = ["LOG_GROUP", "Statistics", "StrongSwanEnforcer", "host_addresses"]
