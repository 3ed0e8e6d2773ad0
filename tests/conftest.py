"""Shared fixtures: the policy server as a real subprocess, and in-process.

Every server listens on port 0 (or a unix socket in a temp dir) and keeps its
data in a temp dir, so tests can run in parallel (pytest-xdist) on one machine.

Every connection is mTLS. So that tests (and netsh run by them, in-process or
as a subprocess) need no per-server certificate plumbing, each test session
makes one CA and one admin certificate (`test_pki`): a server started through
these fixtures on a new data directory gets that CA copied into <data-dir>/pki,
and $POLICYAGENT_ADMIN_DIR points at the admin certificate.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from policyagent.pb import admin_grpc
from policyagent.pki.ca import CertificateAuthority
from policyagent.pki.identity import IdentityStore
from policyagent.pki.server import PKI_SUBDIR, write_admin_dir
from policyagent.pki.tls import ADMIN_DIR_ENV, ClientCertificate, load_cert_dir, tls_options
from policyagent.server.app import PolicyServer, ServerConfig
from policyagent.store.base import PolicyStore

START_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 10.0
LISTENING_PREFIX = "listening on "
ENROLLMENT_PREFIX = "enrollment on "

# The session's CA template and admin certificate (set by the test_pki fixture).
_pki_template: Path | None = None


def make_pki_template(base: Path, admin: str = "test-admin") -> Path:
    """A CA in base/pki and an admin certificate in base/admin; returns base."""
    ca, _ = CertificateAuthority.load_or_create(base / PKI_SUBDIR)
    identity = IdentityStore(base / "identity.sqlite3")
    try:
        write_admin_dir(base / "admin", ca, identity, admin)
    finally:
        identity.close()
    return base


def seed_pki(data_dir: Path) -> None:
    """Give a new data directory the session's CA (the server then trusts the session's admin certificate)."""
    if _pki_template is not None and not (data_dir / PKI_SUBDIR).exists():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copytree(_pki_template / PKI_SUBDIR, data_dir / PKI_SUBDIR)


def admin_certificate() -> ClientCertificate:
    """The session's admin certificate (trusted by every server these fixtures start)."""
    assert _pki_template is not None, "the test_pki fixture has not run"
    return load_cert_dir(_pki_template / "admin")


def admin_channel(address: str) -> grpc.Channel:
    return grpc.secure_channel(address, admin_certificate().channel_credentials(), options=tls_options(address))


@pytest.fixture(scope="session", autouse=True)
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's CA template; $POLICYAGENT_ADMIN_DIR points at its admin certificate."""
    global _pki_template
    base = make_pki_template(tmp_path_factory.mktemp("pki-template"))
    _pki_template = base
    old = os.environ.get(ADMIN_DIR_ENV)
    os.environ[ADMIN_DIR_ENV] = str(base / "admin")
    yield base
    if old is None:
        os.environ.pop(ADMIN_DIR_ENV, None)
    else:
        os.environ[ADMIN_DIR_ENV] = old
    _pki_template = None


class ServerProcess:
    """A `policyagent server` subprocess and the address it announced on stdout."""

    def __init__(
        self, proc: subprocess.Popen[str], address: str, data_dir: Path, stderr_path: Path, enroll_address: str = ""
    ) -> None:
        self.proc = proc
        self.address = address
        self.enroll_address = enroll_address
        self.data_dir = data_dir
        self.stderr_path = stderr_path
        self._channels: list[grpc.Channel] = []

    def channel(self) -> grpc.Channel:
        """A new (sync) mTLS channel to the server with the admin certificate, closed when the server is stopped."""
        channel = admin_channel(self.address)
        self._channels.append(channel)
        return channel

    def admin(self) -> admin_grpc.PolicyAdminStub:
        return admin_grpc.PolicyAdminStub(self.channel())

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def server_command(data_dir: Path, listen: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "policyagent.cli",
        "server",
        "--data-dir",
        str(data_dir),
        "--listen",
        listen,
        *extra,
    ]


def start_server_process(
    data_dir: Path, listen: str = "127.0.0.1:0", extra: Sequence[str] = (), log_dir: Path | None = None
) -> ServerProcess:
    """Start `python -m policyagent.cli server` and wait for its `listening on` line."""
    log_dir = log_dir or data_dir.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    seed_pki(data_dir)
    stderr_path = log_dir / f"server-{time.monotonic_ns()}.stderr"
    with stderr_path.open("w", encoding="utf-8") as stderr:
        # stderr goes to a file, not a pipe, so a chatty server never blocks on a full pipe.
        proc = subprocess.Popen(
            server_command(data_dir, listen, *extra),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    if not line.startswith(LISTENING_PREFIX):
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=15)
        raise AssertionError(
            f"server did not announce its address (stdout {line!r}, exit {proc.returncode}):\n"
            + stderr_path.read_text(encoding="utf-8", errors="replace")
        )
    # The enrollment address follows at once on the second line.
    second = proc.stdout.readline()
    enroll = second[len(ENROLLMENT_PREFIX) :].strip() if second.startswith(ENROLLMENT_PREFIX) else ""
    return ServerProcess(proc, line[len(LISTENING_PREFIX) :].strip(), data_dir, stderr_path, enroll)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start_server(data_dir=None, listen="127.0.0.1:0") → a running ServerProcess.

    Every server started through it is stopped at the end of the test.
    """
    started: list[ServerProcess] = []

    def start(data_dir: Path | None = None, listen: str = "127.0.0.1:0", extra: Sequence[str] = ()) -> ServerProcess:
        server = start_server_process(data_dir or tmp_path / "data", listen, extra, log_dir=tmp_path)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server subprocess shared by a module's tests (each test uses its own object names)."""
    base = tmp_path_factory.mktemp("server")
    proc = start_server_process(base / "data", log_dir=base)
    yield proc
    proc.close()


class InProcessServer:
    """PolicyServer running on an event loop in a background thread of the test process."""

    def __init__(self, data_dir: Path, store_factory: Callable[[Path], PolicyStore] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="inproc-server", daemon=True)
        self._thread.start()
        seed_pki(data_dir)
        self.server = PolicyServer(ServerConfig(data_dir=data_dir, listen="127.0.0.1:0"), store_factory)
        self.address = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(START_TIMEOUT_S)
        self._channels: list[grpc.Channel] = []

    def admin(self) -> admin_grpc.PolicyAdminStub:
        channel = admin_channel(self.address)
        self._channels.append(channel)
        return admin_grpc.PolicyAdminStub(channel)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace=0), self.loop).result(START_TIMEOUT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=START_TIMEOUT_S)
            self.loop.close()


@pytest.fixture
def inproc_server(tmp_path: Path) -> Iterator[Callable[..., InProcessServer]]:
    """Factory: inproc_server(store_factory=None) → a PolicyServer on a fresh store in tmp_path."""
    started: list[InProcessServer] = []

    def start(store_factory: Callable[[Path], PolicyStore] | None = None) -> InProcessServer:
        server = InProcessServer(tmp_path / f"inproc-{len(started)}", store_factory)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()

