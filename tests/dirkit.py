"""Helpers shared by the directory tests: a PolicyServer with a directory in process, the policyagent CLI
in-process, a real agent process, waiting with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import io
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from conftest import RPC_TIMEOUT_S, START_TIMEOUT_S, admin_channel, seed_pki

from policyagent.cli import main as cli_main
from policyagent.directory.sync import DirectorySettings
from policyagent.pb import (
    agent_grpc,
    agent_pb,
    assign_grpc,
    assign_pb,
    directory_grpc,
    directory_pb,
    fleet_grpc,
    fleet_pb,
)
from policyagent.server.app import PolicyServer, ServerConfig


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    return code, out.getvalue(), err.getvalue()



@contextlib.contextmanager
def running_agent(
    address: str, enroll_address: str, data_dir: Path, computer: str, domain: str, tmp_path: Path
) -> Iterator[Callable[[str], Callable[[], bool]]]:
    """A `policyagent agent` process for `computer` (a domain member by join token, record-only enforcer);
    yields runs(POLICY_NAME): a check that the agent is in sync and runs that policy."""
    code, token, err = run_cli(
        "join-token", "create", computer, "--ttl", "10m", "--data-dir", str(data_dir), "--domain", domain)
    assert code == 0, err
    state = tmp_path / f"agent-{computer}"
    log = tmp_path / f"agent-{computer}.stderr"
    agent = subprocess.Popen(
        [sys.executable, "-m", "policyagent.cli", "agent", "--server", address, "--state-dir", str(state),
         "--backoff-max", "0.5", "--enforcer", "record-only", "--enroll-server", enroll_address,
         "--ca-file", str(data_dir / "pki" / "ca.crt"), "--computer", computer, "--enroll-token", token.strip()],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )
    channel: grpc.Channel | None = None
    try:
        assert agent.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([agent.stdout], [], [], 0.1)
            if ready and agent.stdout.readline().startswith("agent socket "):
                break
            assert agent.poll() is None, log.read_text()
        channel = grpc.insecure_channel(f"unix:{state / 'agent.sock'}")
        local = agent_grpc.AgentLocalStub(channel)

        def runs(policy: str) -> Callable[[], bool]:
            def check() -> bool:
                status = local.GetStatus(agent_pb.LocalStatusRequest(), timeout=RPC_TIMEOUT_S)
                assert status.policy_name == policy and status.connection == "in sync", status.summary
                return True

            return check

        yield runs
    finally:
        if channel is not None:
            channel.close()
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(timeout=15)
        if agent.stdout is not None:
            agent.stdout.close()


WAIT_S = 15.0
T = TypeVar("T")


class DirServer:
    """PolicyServer with a directory on an event loop in a background thread."""

    def __init__(self, data_dir: Path, settings: DirectorySettings) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dir-server", daemon=True)
        self._thread.start()
        seed_pki(data_dir)
        self.data_dir = data_dir
        self.server = PolicyServer(ServerConfig(data_dir=data_dir, listen="127.0.0.1:0", directory=settings))
        self.address = self.run(self.server.start())
        self.channel = admin_channel(self.address)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(START_TIMEOUT_S)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        result: T = self.run(call())
        return result

    @property
    def service(self) -> Any:
        assert self.server.directory is not None
        return self.server.directory

    @property
    def assignment(self) -> assign_grpc.AssignmentAdminStub:
        return assign_grpc.AssignmentAdminStub(self.channel)

    @property
    def directory(self) -> directory_grpc.DirectoryAdminStub:
        return directory_grpc.DirectoryAdminStub(self.channel)

    def fleet(self) -> fleet_pb.FleetStatus:
        return fleet_grpc.FleetStub(self.channel).Status(fleet_pb.FleetStatusRequest(), timeout=RPC_TIMEOUT_S)

    def topology(self) -> assign_pb.Topology:
        return self.assignment.GetTopology(assign_pb.GetTopologyRequest(), timeout=RPC_TIMEOUT_S)

    def policy_of(self, computer: str) -> str:
        return self.rsop(computer).policy_id

    def apply(self, *mutations: assign_pb.TopologyMutation) -> assign_pb.TopologyApplyResponse:
        request = assign_pb.TopologyApplyRequest(mutations=list(mutations), operation="test")
        return self.assignment.Apply(request, timeout=RPC_TIMEOUT_S)

    def status(self) -> directory_pb.DirectoryStatus:
        return directory_grpc.DirectoryAdminStub(self.channel).GetStatus(
            directory_pb.DirectoryStatusRequest(), timeout=RPC_TIMEOUT_S)

    def sync(self) -> directory_pb.DirectorySyncResponse:
        return directory_grpc.DirectoryAdminStub(self.channel).Sync(
            directory_pb.DirectorySyncRequest(), timeout=RPC_TIMEOUT_S)

    def check(self) -> tuple[str, directory_pb.DirectorySyncResponse]:
        """One check as the interval runs it: how the directory was read ("" = not at all) and the response."""
        before = dict(self.service.sync.reads)
        response = self.run(self.service.sync_now(full=False))
        kinds = [kind for kind, count in self.service.sync.reads.items() if count > before[kind]]
        return (kinds[0] if kinds else ""), response

    def sites(self) -> dict[str, str]:
        topology = self.assignment.GetTopology(assign_pb.GetTopologyRequest(), timeout=RPC_TIMEOUT_S)
        return {c.name: c.site for c in topology.computers}

    def rsop(self, computer: str) -> assign_pb.Rsop:
        return self.assignment.GetRsop(assign_pb.RsopRequest(computer=computer), timeout=RPC_TIMEOUT_S)

    def changes_after(self, seq: int) -> list[assign_pb.TopologyChange]:
        request = assign_pb.ListTopologyChangesRequest(after_seq=seq)
        return list(self.assignment.ListTopologyChanges(request, timeout=RPC_TIMEOUT_S).changes)

    def last_seq(self) -> int:
        changes = self.changes_after(0)
        return changes[-1].seq if changes else 0

    def set_peer(self, computer: str, peer: str) -> None:
        """The hub's fleet record of `computer` says its agent connected from `peer` (as after a Hello)."""
        hub = self.server.hub
        assert hub is not None

        def put() -> None:
            hub.registry.get(computer).peer = peer

        self.on_loop(put)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.channel.close()
        try:
            self.run(self.server.stop(grace=0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=START_TIMEOUT_S)
            self.loop.close()


def wait_until(check: Callable[[], T], what: str, timeout: float = WAIT_S) -> T:
    """check() until it returns a truthy value without raising AssertionError; the last failure otherwise."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            result = check()
            if result:
                return result
            last = repr(result)
        except AssertionError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {last}")
        time.sleep(0.05)


def in_sync(server: DirServer) -> directory_pb.DirectoryStatus:
    status = server.status()
    assert status.state == directory_pb.DIRECTORY_STATE_IN_SYNC, status
    return status
