"""Shared fixtures: the policy server as a real subprocess, and in-process.

Every server listens on port 0 (or a unix socket in a temp dir) and keeps its
data in a temp dir, so tests can run in parallel (pytest-xdist) on one machine.
"""

from __future__ import annotations

import asyncio
import select
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
from policyagent.server.app import PolicyServer, ServerConfig
from policyagent.store.base import PolicyStore

START_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 10.0
LISTENING_PREFIX = "listening on "


class ServerProcess:
    """A `policyagent server` subprocess and the address it announced on stdout."""

    def __init__(self, proc: subprocess.Popen[str], address: str, data_dir: Path, stderr_path: Path) -> None:
        self.proc = proc
        self.address = address
        self.data_dir = data_dir
        self.stderr_path = stderr_path
        self._channels: list[grpc.Channel] = []

    def channel(self) -> grpc.Channel:
        """A new (sync) channel to the server, closed when the server is stopped."""
        channel = grpc.insecure_channel(self.address)
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
    return ServerProcess(proc, line[len(LISTENING_PREFIX) :].strip(), data_dir, stderr_path)


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
        self.server = PolicyServer(ServerConfig(data_dir=data_dir, listen="127.0.0.1:0"), store_factory)
        self.address = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(START_TIMEOUT_S)
        self._channels: list[grpc.Channel] = []

    def admin(self) -> admin_grpc.PolicyAdminStub:
        channel = grpc.insecure_channel(self.address)
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

