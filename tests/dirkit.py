"""Helpers shared by the directory tests: the policyagent CLI in-process, and a real agent process."""

from __future__ import annotations

import contextlib
import io
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from conftest import RPC_TIMEOUT_S

from policyagent.cli import main as cli_main
from policyagent.pb import agent_grpc, agent_pb


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
