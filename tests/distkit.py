"""Helpers for distribution tests: a CA with server/agent/admin certificates, a fake effective-policy source,
a hub on a real grpc.aio mTLS port, and in-process agent daemons. No dependency on the server app wiring."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from policyagent.agent.daemon import CA_FILE, HOST_CERT, HOST_KEY, AgentConfig, AgentDaemon
from policyagent.pb import dist_pb, pb
from policyagent.pki.authz import peer_of
from policyagent.pki.ca import CertificateAuthority, cert_pem, key_pem
from policyagent.server.fleet import FLEET_FILE, FleetRegistry
from policyagent.server.hub import Caller, Hub, add_to_server


class FakeEffective:
    """EffectiveSource in memory: set() a computer's policy, subscribers hear about it."""

    def __init__(self) -> None:
        self.policies: dict[str, dist_pb.EffectivePolicy] = {}
        self.callbacks: list[Callable[[frozenset[str]], None]] = []
        self.gets = 0

    def set(self, computers: list[str], policy: pb.Policy | None, membership: str = "domain", **extra: Any) -> None:
        changed = set()
        for computer in computers:
            out = dist_pb.EffectivePolicy(computer=computer, membership=membership, source="domain" if policy else "none")
            if policy is not None:
                out.policy.CopyFrom(policy)
            for key, value in extra.items():
                getattr(out, key).extend(value)
            out.version = hashlib.sha256(out.SerializeToString(deterministic=True)).hexdigest()
            if computer not in self.policies or self.policies[computer].version != out.version:
                changed.add(computer)
            self.policies[computer] = out
        if changed:
            for cb in self.callbacks:
                cb(frozenset(changed))

    def get(self, computer: str) -> dist_pb.EffectivePolicy:
        from policyagent.model.errors import NotFoundError

        self.gets += 1
        if computer not in self.policies:
            raise NotFoundError(f"no computer {computer}")
        out = dist_pb.EffectivePolicy()
        out.CopyFrom(self.policies[computer])
        return out

    def version_of(self, computer: str) -> str:
        return self.policies[computer].version

    def subscribe(self, callback: Callable[[frozenset[str]], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)


def kerberos_only_policy(name: str = "Kerberos only") -> pb.Policy:
    rule = pb.Rule(name="all", active=True, auth_methods=[pb.AuthMethod(kerberos=pb.KerberosAuth())])
    return pb.Policy(id="{00000000-0000-0000-0000-0000000000k1}", name=name, rules=[rule])


def simple_policy(name: str, polling_minutes: int = 180) -> pb.Policy:
    return pb.Policy(id="{00000000-0000-0000-0000-000000000001}", name=name, polling_interval_minutes=polling_minutes)


@dataclass
class Pki:
    ca: CertificateAuthority
    dir: Path

    @classmethod
    def create(cls, base: Path) -> Pki:
        ca, _ = CertificateAuthority.load_or_create(base / "pki")
        return cls(ca, base)

    def server_credentials(self) -> grpc.ServerCredentials:
        issued = self.ca.issue("server", "localhost", dns_names=["localhost"], ip_addresses=[ipaddress.ip_address("127.0.0.1")])
        assert issued.key is not None
        return grpc.ssl_server_credentials(
            [(key_pem(issued.key), cert_pem(issued.cert) + self.ca.cert_pem)],
            root_certificates=self.ca.cert_pem,
            require_client_auth=True,
        )

    def agent_dir(self, name: str, role: str = "agent") -> tuple[Path, int]:
        """A state dir holding host.crt/host.key/ca.crt for `name`; returns it and the serial."""
        issued = self.ca.issue(role, name)  # type: ignore[arg-type]
        assert issued.key is not None
        state = self.dir / "agents" / name
        state.mkdir(parents=True, exist_ok=True)
        (state / HOST_KEY).write_bytes(key_pem(issued.key))
        (state / HOST_CERT).write_bytes(cert_pem(issued.cert))
        (state / CA_FILE).write_bytes(self.ca.cert_pem)
        return state, issued.serial

    def admin_cert_dir(self, name: str = "admin1") -> Path:
        """An admin certificate directory as `policyagent admin-cert issue` writes it (admin.crt, admin.key, ca.crt)."""
        state, _ = self.agent_dir(name, role="admin")
        out = self.dir / "admin-cli"
        out.mkdir(exist_ok=True)
        (out / "admin.crt").write_bytes((state / HOST_CERT).read_bytes())
        (out / "admin.key").write_bytes((state / HOST_KEY).read_bytes())
        (out / "ca.crt").write_bytes((state / CA_FILE).read_bytes())
        return out


def state_credentials(state: Path, cert: str = HOST_CERT, key: str = HOST_KEY) -> grpc.ChannelCredentials:
    """mTLS channel credentials from a state dir (host.crt, host.key, ca.crt)."""
    return grpc.ssl_channel_credentials(
        (state / CA_FILE).read_bytes(), (state / key).read_bytes(), (state / cert).read_bytes()
    )


async def identify_agent(context: aio.ServicerContext[Any, Any]) -> Caller:
    peer = peer_of(context)
    if peer is None or peer.role != "agent":
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this call needs an agent (host) certificate")
    assert peer is not None
    return Caller(peer.name, peer.serial)


async def authorize_admin(context: aio.ServicerContext[Any, Any]) -> None:
    peer = peer_of(context)
    if peer is None or peer.role != "admin":
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this call needs an admin certificate")


class HubServer:
    def __init__(self, base: Path, effective: FakeEffective, pki: Pki, *, keepalive_s: float = 20.0) -> None:
        self.base = base
        self.effective = effective
        self.pki = pki
        self.keepalive_s = keepalive_s
        self.port = 0
        self.hub: Hub | None = None
        self.server: aio.Server | None = None

    async def start(self, port: int = 0) -> str:
        self.hub = Hub(self.effective, FleetRegistry(self.base / FLEET_FILE), keepalive_s=self.keepalive_s)
        await self.hub.start()
        self.server = aio.server()
        add_to_server(self.hub, self.server, identify_agent, authorize_admin)
        self.port = self.server.add_secure_port(f"127.0.0.1:{port or self.port}", self.pki.server_credentials())
        await self.server.start()
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        assert self.hub is not None and self.server is not None
        await self.hub.stop()
        await self.server.stop(0)


def agent_config(state: Path, address: str, **kw: Any) -> AgentConfig:
    defaults: dict[str, Any] = dict(
        heartbeat_s=5, silence_s=30, keepalive_s=5, backoff_base_s=0.05, backoff_max_s=0.3, connect_timeout_s=1.0
    )
    defaults.update(kw)
    return AgentConfig(server=address, state_dir=state, computer=state.name, **defaults)


async def until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "") -> None:
    """Wait until predicate() holds (tests only: checks on every loop turn with a tiny sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


__all__ = ["AgentDaemon", "FakeEffective", "HubServer", "Pki", "agent_config", "until"]
