"""Issue 3 acceptance, end to end: the real server and 20 real agent processes.

The server is `python -m policyagent.cli server` (conftest.start_server_process: port 0,
temp data dir, the session's CA). Every agent is its own `python -m policyagent.cli agent`
process with its own state directory, enrolled for real on the server's enrollment port:
one-time join tokens made with `policyagent join-token create` (domain members when the
token vouches for a domain, workgroup machines otherwise) and the workgroup's enrollment
secret. Policies are made with netsh (-f script), the registry (OUs, a site, GPOs, links)
with the `policyagent ou|site|gpo` commands, and the enrolled computers are placed with
one AssignmentAdmin call made with an admin certificate.

What is asserted goes through the Fleet API (desired / applied versions, states, NACK
reasons, last ACK), `policyagent fleet status`, and each agent's own status on its
agent.sock (`policyagent agent-status`):

1. linking, adding a second link, reordering, unlinking, enforcing a domain link over a
   block-inheritance OU, and editing a policy (and a filter list) change exactly the
   affected agents' desired versions (the others keep desired, applied and last ACK),
   and every affected agent ACKs within CONVERGE_S;
2. a Kerberos-only policy given to workgroup members is NACKed with the reason, which the
   fleet view shows; domain members given the same policy ACK it;
3. with its own certificate an agent gets only its own effective policy (and only its own
   pre-shared keys) and no admin API answers it;
4. a revoked agent is cut off at once and cannot reconnect;
5. (separate server) the server is SIGKILLed: agents keep their policy; an agent restarted
   meanwhile runs on its cached policy and says so; the server restarted on the same data
   directory and port: every agent converges.

Everything polls with deadlines (POLL_S); nothing sleeps a fixed time. The 20-agent fleet
is module-scoped and its tests run in file order (the revocation last); each test leaves the
registry as it found it. The kill/restart test has its own server and 8 agents. Under
pytest-xdist (-n 2) the module's consecutive tests normally go to one worker; should they be
split, each worker starts its own fleet (ports 0, temp dirs: correct, only slower).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from conftest import RPC_TIMEOUT_S, ServerProcess, admin_channel, start_server_process

from clients.netsh.main import main as netsh_main
from policyagent.cli import main as cli_main
from policyagent.pb import (
    admin_grpc,
    admin_pb,
    agent_grpc,
    agent_pb,
    assign_grpc,
    assign_pb,
    dist_grpc,
    dist_pb,
    fleet_grpc,
    fleet_pb,
)

pytestmark = pytest.mark.slow

T = TypeVar("T")

# How long an affected agent may take to ACK a change (the issue asks for "within a second";
# this leaves room for a loaded 2-core CI machine running other tests next to it).
CONVERGE_S = 5.0
# Server restart → every agent back in sync (includes the agents' reconnect backoff).
RECONVERGE_S = 10.0
START_S = 60.0
POLL_S = 0.05

DOMAIN = "corp.example"
BRANCH_DOMAIN = "branch.example"
CORP = "OU=Corp,DC=corp,DC=example"
WEB = "OU=Web,OU=Corp,DC=corp,DC=example"
DB = "OU=Db,OU=Corp,DC=corp,DC=example"
LABS = "OU=Labs,OU=Corp,DC=corp,DC=example"
KIOSKS = "OU=Kiosks,DC=corp,DC=example"
BRANCH = "OU=Branch,DC=branch,DC=example"
SITE = "HQ"

DB_PSK = "db-only-psk-4d1c2e9a77"
SITE_PSK = "site-hq-psk-91b7e0c3d5"
WORKGROUP_SECRET = "workgroup-enrollment-secret-5f0e2b"
KERBEROS_ONLY = "Secure Server (Require Security)"  # a Windows default: every rule Kerberos-only
KERBEROS_REASON = "Kerberos needs domain membership; this computer is a workgroup member"

POLICY_SCRIPT = f"""\
add filteraction name="Corp Negotiate" action=negotiate qmsecmethods="ESP[AES256,SHA256] ESP[3DES,SHA1]"
add filterlist name="Lab hosts"
add filter filterlist="Lab hosts" srcaddr=me dstaddr=10.9.0.0 dstmask=16 protocol=TCP dstport=22
add policy name="Corp Domain" activatedefaultrule=no
add rule name=corp policy="Corp Domain" filterlist="All IP Traffic" filteraction="Corp Negotiate" rootca="CN=Corp Root CA"
add policy name="Web Policy" activatedefaultrule=no
add rule name=web policy="Web Policy" filterlist="All IP Traffic" filteraction="Corp Negotiate" rootca="CN=Corp Root CA"
add policy name="Web Alt Policy" activatedefaultrule=no mmsecmethods="AES256-SHA256-3"
add rule name=web policy="Web Alt Policy" filterlist="All IP Traffic" filteraction="Corp Negotiate" rootca="CN=Corp Root CA"
add policy name="Db Policy" activatedefaultrule=no
add rule name=db policy="Db Policy" filterlist="All IP Traffic" filteraction="Corp Negotiate" psk="{DB_PSK}"
add policy name="Lab Policy" activatedefaultrule=no
add rule name=lab policy="Lab Policy" filterlist="Lab hosts" filteraction="Corp Negotiate" kerberos=yes
add policy name="Site Policy" activatedefaultrule=no
add rule name=site policy="Site Policy" filterlist="All IP Traffic" filteraction="Corp Negotiate" psk="{SITE_PSK}"
add policy name="Branch Policy" activatedefaultrule=no
add rule name=branch policy="Branch Policy" filterlist="All ICMP Traffic" filteraction="Corp Negotiate" kerberos=yes
"""

# (GPO, the IPsec policy it assigns, where it is linked) of the baseline registry.
BASELINE_GPOS = [
    ("Default Domain", "Corp Domain", f"domain:{DOMAIN}"),
    ("Db servers", "Db Policy", f"ou:{DB}"),
    ("Labs", "Lab Policy", f"ou:{LABS}"),
    ("HQ site", "Site Policy", f"site:{SITE}"),
    ("Branch", "Branch Policy", f"ou:{BRANCH}"),
]


@dataclass(frozen=True)
class Spec:
    """One computer of the fleet: how it enrolls, where the admin places it, what it then runs."""

    name: str
    proof: str  # "token" (join token) | "secret" (workgroup enrollment secret)
    token_domain: str = ""  # the join token vouches for this domain: a domain member
    ou: str = ""
    site: str = ""
    policy: str = ""  # the IPsec policy in force in the baseline ("" = none)

    @property
    def membership(self) -> str:
        return "domain" if self.token_domain else "workgroup"


def _fleet_specs() -> list[Spec]:
    specs = [Spec(f"web0{i}", "token", DOMAIN, WEB, SITE if i <= 2 else "", "Corp Domain") for i in range(1, 6)]
    specs += [Spec(f"db0{i}", "token", DOMAIN, DB, SITE if i == 1 else "", "Db Policy") for i in range(1, 4)]
    specs += [Spec(f"lab0{i}", "token", DOMAIN, LABS, "", "Lab Policy") for i in range(1, 4)]
    specs += [Spec(f"kiosk0{i}", "secret", "", KIOSKS, "", "Corp Domain") for i in range(1, 5)]
    specs += [Spec(f"br0{i}", "token", BRANCH_DOMAIN, BRANCH, "", "Branch Policy") for i in range(1, 3)]
    specs += [
        Spec("tok01", "token", "", "", SITE, "Site Policy"),  # a workgroup machine, only in a site
        Spec("tok02", "token"),  # a workgroup machine nowhere: no GPO reaches it
        Spec("rev01", "secret"),  # revoked by the last fleet test
    ]
    return specs


FLEET = _fleet_specs()
WEB_SET = {s.name for s in FLEET if s.ou == WEB}
DB_SET = {s.name for s in FLEET if s.ou == DB}
LAB_SET = {s.name for s in FLEET if s.ou == LABS}
KIOSK_SET = {s.name for s in FLEET if s.ou == KIOSKS}
BRANCH_SET = {s.name for s in FLEET if s.ou == BRANCH}
# Every computer the corp.example domain link reaches: its members and the workgroup
# machines the registry placed in one of its OUs.
CORP_SET = WEB_SET | DB_SET | LAB_SET | KIOSK_SET


# ---------------------------------------------------------------------------- waiting


def phase(what: str) -> None:
    """A timestamped progress line (shown with -s, or with a failure's captured stderr)."""
    print(f"[{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d}] {what}", file=sys.stderr)


class Fatal(AssertionError):
    """A check that failed for good: waiting longer cannot help."""


def wait_until(check: Callable[[], T], what: str, timeout: float = CONVERGE_S) -> T:
    """Call `check` every POLL_S until it returns without an AssertionError; its result.

    `check` raises AssertionError saying what is still missing (reported on timeout) or
    Fatal (reported at once). A failed RPC (a process still starting) counts as "not yet".
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except Fatal:
            raise
        except (AssertionError, grpc.RpcError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}: {exc}") from None
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------- CLI in process


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`policyagent ARGV` in this process (the real CLI code); (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def cli_ok(*argv: str) -> str:
    code, out, err = run_cli(*argv)
    assert code == 0, f"policyagent {' '.join(argv)} failed ({code}): {err}"
    return out


def cli_subprocess(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m policyagent.cli ARGV` as its own process."""
    return subprocess.run(
        [sys.executable, "-m", "policyagent.cli", *argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def netsh_script(address: str, script: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = netsh_main(["-r", address, "-f", str(script), "ipsec", "static"])
    assert code == 0, f"netsh -f {script} failed ({code}): {err.getvalue()}"


def netsh(address: str, *words: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = netsh_main(["-r", address, "ipsec", "static", *words])
    assert code == 0, f"netsh ipsec static {' '.join(words)} failed ({code}): {err.getvalue()}"
    return out.getvalue()


_CHANGED_RE = re.compile(r"effective policy changed on (\d+) computer\(s\): (.*)$", re.MULTILINE)


def changed_in_output(out: str) -> tuple[int, set[str]] | None:
    """What registry commands printed about the computers they changed: (count, names shown)."""
    matches = list(_CHANGED_RE.finditer(out))
    if not matches:
        return None
    count, names = 0, set()
    for match in matches:
        count += int(match.group(1))
        shown = re.sub(r" and \d+ more$", "", match.group(2).strip())
        names |= {n.strip() for n in shown.split(",") if n.strip()}
    return count, names


# ---------------------------------------------------------------------------- agents


def agent_credentials(state_dir: Path) -> grpc.ChannelCredentials:
    """The agent's own mTLS credentials, as enrollment left them in its state directory."""
    return grpc.ssl_channel_credentials(
        root_certificates=(state_dir / "ca.crt").read_bytes(),
        private_key=(state_dir / "host.key").read_bytes(),
        certificate_chain=(state_dir / "host.crt").read_bytes(),
    )


@dataclass
class AgentProc:
    """One `policyagent agent` process and its state directory."""

    spec: Spec
    state_dir: Path
    log_dir: Path
    proc: subprocess.Popen[str] | None = None
    stderr_path: Path | None = None
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def launch(self, server: str, extra: Sequence[str] = ()) -> None:
        """Start the process (enrollment flags in `extra` the first time); see wait_started()."""
        self.close_channel()
        self.stderr_path = self.log_dir / f"{self.name}-{time.monotonic_ns()}.stderr"
        with self.stderr_path.open("w", encoding="utf-8") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "policyagent.cli",
                    "agent",
                    "--server",
                    server,
                    "--state-dir",
                    str(self.state_dir),
                    "--backoff-max",
                    "0.5",
                    "--enforcer",
                    "record-only",  # 20 agents share this namespace: nothing here may touch its filters
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )

    def wait_started(self, deadline: float) -> None:
        """Wait for the `agent socket PATH` line (printed once enrolled and serving agent.sock)."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], POLL_S)
            if ready:
                line = proc.stdout.readline()
                if line.startswith("agent socket "):
                    return
                if not line and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
        raise AssertionError(f"agent {self.name} did not start (exit {proc.poll()}):\n{self.stderr()}")

    def stderr(self) -> str:
        """The current process's log (JSON lines)."""
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.close_channel()
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None

    # ------------------------------------------------------------ the local admin API (agent.sock)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _local(self) -> agent_grpc.AgentLocalStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.state_dir / 'agent.sock'}")
        return agent_grpc.AgentLocalStub(self._channel)

    def status(self) -> agent_pb.LocalStatus:
        return self._local().GetStatus(agent_pb.LocalStatusRequest(), timeout=RPC_TIMEOUT_S)

    def effective(self, include_secrets: bool = False) -> dist_pb.EffectivePolicy:
        request = agent_pb.LocalPolicyRequest(include_secrets=include_secrets)
        return self._local().GetEffectivePolicy(request, timeout=RPC_TIMEOUT_S)

    # ------------------------------------------------------------ the agent's certificate, used by hand

    def server_channel(self, address: str) -> grpc.Channel:
        return grpc.secure_channel(address, agent_credentials(self.state_dir))

    def files_on_disk(self) -> bytes:
        """Everything the agent keeps of the policies it got: the cache and the enforcer's record."""
        paths = [self.state_dir / "cache" / "effective.pb", self.state_dir / "enforcer" / "record-only.json"]
        return b"".join(p.read_bytes() for p in paths if p.exists())


# ---------------------------------------------------------------------------- the fleet


class Fleet:
    """A server subprocess, its agents, and the admin's view of both."""

    def __init__(self, server: ServerProcess, base: Path, specs: Iterable[Spec]) -> None:
        self.server = server
        self.base = base
        self.agents = {s.name: AgentProc(s, base / "agents" / s.name, base / "logs") for s in specs}
        self.revoked: set[str] = set()
        # The computers whose effective policy the placement write changed (start_fleet).
        self.placed: set[str] = set()
        self._admin: grpc.Channel | None = None
        (base / "logs").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ admin connections

    @property
    def address(self) -> str:
        return self.server.address

    def admin_channel(self) -> grpc.Channel:
        if self._admin is None:
            self._admin = admin_channel(self.address)
        return self._admin

    def reset_admin_channel(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def fleet_status(self, computers: Sequence[str] = ()) -> fleet_pb.FleetStatus:
        stub = fleet_grpc.FleetStub(self.admin_channel())
        return stub.Status(fleet_pb.FleetStatusRequest(computers=list(computers)), timeout=RPC_TIMEOUT_S)

    def status(self) -> dict[str, fleet_pb.FleetAgent]:
        return {a.computer: a for a in self.fleet_status().agents}

    def assignment(self) -> assign_grpc.AssignmentAdminStub:
        return assign_grpc.AssignmentAdminStub(self.admin_channel())

    def cli(self, *argv: str) -> str:
        """An admin command against this server (`policyagent ARGV -r ADDRESS`, in process)."""
        return cli_ok(*argv, "-r", self.address)

    @property
    def live(self) -> list[str]:
        return sorted(n for n in self.agents if n not in self.revoked)

    # ------------------------------------------------------------ setup

    def define_domain(self) -> None:
        """The policies (netsh), the OUs, the site and the baseline GPOs and links (policyagent CLI)."""
        script = self.base / "policies.netsh"
        script.write_text(POLICY_SCRIPT, encoding="utf-8")
        netsh_script(self.address, script)
        for dn in (CORP, WEB, DB, KIOSKS, BRANCH):
            self.cli("ou", "add", dn)
        self.cli("ou", "add", LABS, "--block-inheritance")
        self.cli("site", "add", SITE)
        for gpo, policy, scope in BASELINE_GPOS:
            self.cli("gpo", "add", gpo, "--policy", policy)
            self.cli("gpo", "link", gpo, scope)

    def enroll_and_start(self, secret_file: Path) -> None:
        """Join tokens for the token computers, then every agent process at once; wait for all."""
        ca_file = self.server.data_dir / "pki" / "ca.crt"
        launches: list[tuple[AgentProc, list[str]]] = []
        for agent in self.agents.values():
            spec = agent.spec
            enroll = [
                "--enroll-server",
                self.server.enroll_address,
                "--ca-file",
                str(ca_file),
                "--computer",
                spec.name,
            ]
            if spec.proof == "token":
                extra = ["--domain", spec.token_domain] if spec.token_domain else []
                out = cli_ok(
                    "join-token", "create", spec.name, "--ttl", "10m", "--data-dir", str(self.server.data_dir), *extra
                )
                token = out.strip()
                assert token.startswith("pajt1."), out
                enroll += ["--enroll-token", token]
            else:
                enroll += ["--enroll-workgroup-secret-file", str(secret_file)]
            launches.append((agent, enroll))
        for agent, enroll in launches:
            agent.launch(self.address, enroll)
        deadline = time.monotonic() + START_S
        for agent, _ in launches:
            agent.wait_started(deadline)

    def place(self) -> set[str]:
        """Put every computer in its OU and site with one AssignmentAdmin write; the computers it changed."""
        topology = self.assignment().GetTopology(assign_pb.GetTopologyRequest(), timeout=RPC_TIMEOUT_S)
        computers = {c.name: c for c in topology.computers}
        mutations = []
        for name, agent in self.agents.items():
            computer = computers[name]
            computer.ou, computer.site = agent.spec.ou, agent.spec.site
            mutations.append(assign_pb.TopologyMutation(put_computer=computer))
        response = self.assignment().Apply(
            assign_pb.TopologyApplyRequest(mutations=mutations, operation="place the fleet"), timeout=RPC_TIMEOUT_S
        )
        return set(response.changed_computers)

    def wait_all_in_sync(self, what: str, timeout: float = CONVERGE_S) -> dict[str, fleet_pb.FleetAgent]:
        def check() -> dict[str, fleet_pb.FleetAgent]:
            status = self.status()
            missing = [n for n in self.live if n not in status]
            assert not missing, f"not in the fleet view: {missing}"
            behind = {n: _state_word(status[n]) for n in self.live if status[n].state != fleet_pb.AGENT_STATE_IN_SYNC}
            assert not behind, f"not in sync: {behind}"
            return status

        return wait_until(check, what, timeout)

    def check_local(self, expected_policy: dict[str, str], status: dict[str, fleet_pb.FleetAgent]) -> None:
        """Each agent's own view (agent.sock): in sync, on the version the server wants, the right policy."""
        for name, policy in expected_policy.items():
            local = self.agents[name].status()
            assert local.connection == "in sync", f"{name}: {local.summary}"
            assert local.applied_version == status[name].desired_version, f"{name}: {local.summary}"
            assert local.policy_name == policy, f"{name} runs {local.policy_name!r}, expected {policy!r}"
            assert not local.running_on_cache, f"{name}: {local.summary}"

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.close_channel()
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            agent.stop()
        self.reset_admin_channel()
        self.server.close()


def _state_word(agent: fleet_pb.FleetAgent) -> str:
    return fleet_pb.AgentState.Name(agent.state).removeprefix("AGENT_STATE_").lower()


def start_fleet(base: Path, specs: Iterable[Spec]) -> Fleet:
    """Server + policies + registry + enrolled, placed, converged agents."""
    secret_file = base / "workgroup.secret"
    secret_file.write_text(WORKGROUP_SECRET + "\n", encoding="utf-8")
    secret_file.chmod(0o600)
    server = start_server_process(
        base / "data", extra=["--workgroup-secret-file", str(secret_file), "--log-level", "info"], log_dir=base
    )
    fleet = Fleet(server, base, specs)
    try:
        fleet.define_domain()
        fleet.enroll_and_start(secret_file)
        phase(f"{len(fleet.agents)} agents enrolled and started")
        fleet.wait_all_in_sync("every enrolled agent online and in sync", START_S)
        fleet.placed = fleet.place()
        status = fleet.wait_all_in_sync("every agent on its placed policy", START_S)
        phase("placed and in sync")
        fleet.check_local({n: a.spec.policy for n, a in fleet.agents.items()}, status)
    except BaseException:
        for agent in fleet.agents.values():
            if agent.proc is not None:
                print(f"--- {agent.name} stderr ---\n{agent.stderr()[-4000:]}", file=sys.stderr)
        fleet.stop()
        raise
    return fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("fleet")
    started = time.monotonic()
    fleet = start_fleet(base, FLEET)
    phase(f"fleet of {len(FLEET)} agents up in {time.monotonic() - started:.1f} s")
    yield fleet
    fleet.stop()


# ---------------------------------------------------------------------------- a change and its rollout


@dataclass
class Rollout:
    before: dict[str, fleet_pb.FleetAgent]
    after: dict[str, fleet_pb.FleetAgent]
    seconds: float
    output: str


def expect_rollout(
    fleet: Fleet,
    change: Callable[[], str],
    affected: set[str],
    policy: str | dict[str, str] | None = None,
    *,
    rejected: Iterable[str] = (),
    timeout: float = CONVERGE_S,
) -> Rollout:
    """Make `change`, then check that exactly `affected` got a new desired version and ACKed it.

    Agents in `rejected` must NACK it instead (state rejected, applied version unchanged).
    Every other agent keeps its desired version, its applied version and its last ACK time
    (no push reached it). `policy` is what the affected agents' enforcers run afterwards.
    """
    rejecting = set(rejected)
    assert rejecting <= affected
    before = fleet.status()
    started = time.monotonic()
    output = change()
    reported = changed_in_output(output)
    if reported is not None:
        count, shown = reported
        assert count == len(affected), f"the command changed {count} computer(s), expected {sorted(affected)}: {output}"
        assert shown <= affected, f"the command changed {sorted(shown - affected)} too: {output}"

    def converged() -> dict[str, fleet_pb.FleetAgent]:
        now = fleet.status()
        waiting = []
        for name in fleet.live:
            a, b = now[name], before[name]
            if name not in affected:
                if a.desired_version != b.desired_version:
                    raise Fatal(f"{name} is not affected, but its desired version changed")
                continue
            if a.desired_version == b.desired_version:
                raise Fatal(f"{name} is affected, but its desired version did not change")
            if name in rejecting:
                if a.state != fleet_pb.AGENT_STATE_REJECTED or a.last_nack_version != a.desired_version:
                    waiting.append(f"{name} ({_state_word(a)}, expected rejected)")
            elif a.state != fleet_pb.AGENT_STATE_IN_SYNC or a.applied_version != a.desired_version:
                waiting.append(f"{name} ({_state_word(a)})")
        assert not waiting, "; ".join(waiting)
        return now

    after = wait_until(converged, f"the rollout to {sorted(affected)}", timeout)
    seconds = time.monotonic() - started
    for name in fleet.live:
        a, b = after[name], before[name]
        if name in rejecting:
            assert a.applied_version == b.applied_version, f"{name} NACKed but its applied version moved"
            assert a.online, name
        elif name not in affected:
            assert (a.applied_version, a.last_ack_unix_ms) == (b.applied_version, b.last_ack_unix_ms), (
                f"{name} is not affected, but it was pushed a policy (applied or last ACK changed)"
            )
            assert a.state == b.state, f"{name}: {_state_word(b)} → {_state_word(a)}"
    # The agents' own view agrees.
    for name in fleet.live:
        local = fleet.agents[name].status()
        want = (
            before[name].applied_version if (name in rejecting or name not in affected) else after[name].desired_version
        )
        assert local.applied_version == want, f"{name}: {local.summary}"
    if policy is not None:
        wanted = policy if isinstance(policy, dict) else {n: policy for n in affected - rejecting}
        for name, policy_name in wanted.items():
            local = fleet.agents[name].status()
            assert local.policy_name == policy_name, f"{name} runs {local.policy_name!r}, expected {policy_name!r}"
    return Rollout(before, after, seconds, output)


def baseline_versions(fleet: Fleet) -> dict[str, str]:
    return {n: a.desired_version for n, a in fleet.status().items()}


# ============================================================================ 20 agents


def test_fleet_is_enrolled_by_token_and_secret_and_placed(fleet: Fleet) -> None:
    assert len(fleet.agents) == 20
    topology = fleet.assignment().GetTopology(assign_pb.GetTopologyRequest(), timeout=RPC_TIMEOUT_S)
    registry = {c.name: c for c in topology.computers}
    for name, agent in fleet.agents.items():
        spec = agent.spec
        computer = registry[name]
        # Join tokens that vouch for a domain make domain members; the workgroup secret and
        # plain join tokens make workgroup machines.
        assert computer.membership == spec.membership, name
        if spec.token_domain:
            assert computer.domain == spec.token_domain, name
        assert (computer.ou, computer.site) == (spec.ou, spec.site), name
        identity = json.loads((agent.state_dir / "identity.json").read_text())
        assert (identity["computer"], identity["membership"]) == (name, spec.membership)
    kinds = {(a.spec.proof, a.spec.membership) for a in fleet.agents.values()}
    assert kinds == {("token", "domain"), ("token", "workgroup"), ("secret", "workgroup")}

    # Placing changed exactly the computers a GPO now reaches differently: not web03-05 (OU=Web
    # has no GPO, and the domain GPO reached them already), not tok02 and rev01 (placed nowhere).
    assert fleet.placed == set(fleet.agents) - {"web03", "web04", "web05", "tok02", "rev01"}

    status = fleet.fleet_status()
    assert (status.total, status.in_sync, status.rejected, status.offline) == (20, 20, 0, 0)
    for agent in status.agents:
        assert agent.online and agent.capabilities.enforcer == "record-only" and not agent.capabilities.enforces
    # Each agent says, locally, that it records and enforces nothing.
    local = fleet.agents["kiosk01"].status()
    assert local.enforcer == "record-only: enforces nothing" and not local.enforces
    assert local.applied_source == "domain" and local.policy_name == "Corp Domain"
    none = fleet.agents["tok02"].status()
    assert none.applied_source == "none" and none.policy_name == "" and none.connection == "in sync"


def test_link_reorder_unlink_change_exactly_the_ou_agents(fleet: Fleet) -> None:
    baseline = baseline_versions(fleet)
    try:
        fleet.cli("gpo", "add", "Web servers", "--policy", "Web Policy")
        fleet.cli("gpo", "add", "Web alt", "--policy", "Web Alt Policy")
        # Link a GPO to OU=Web: the five web servers, and nobody else.
        linked = expect_rollout(
            fleet, lambda: fleet.cli("gpo", "link", "Web servers", f"ou:{WEB}"), WEB_SET, "Web Policy"
        )
        # A second link on the same OU goes last and loses: the policy stays, the RSoP changes.
        expect_rollout(fleet, lambda: fleet.cli("gpo", "link", "Web alt", f"ou:{WEB}"), WEB_SET, "Web Policy")
        # Reorder the two links on OU=Web: the other GPO wins.
        expect_rollout(
            fleet,
            lambda: fleet.cli("gpo", "link", "Web alt", f"ou:{WEB}", "--order", "1"),
            WEB_SET,
            "Web Alt Policy",
        )
        assert 'in force: "Web Alt Policy"' in fleet.cli("rsop", "web03")
        # Unlink the winner: back to the first GPO, on exactly the version first pushed.
        back = expect_rollout(fleet, lambda: fleet.cli("gpo", "unlink", "Web alt", f"ou:{WEB}"), WEB_SET, "Web Policy")
        assert {n: back.after[n].desired_version for n in WEB_SET} == {
            n: linked.after[n].desired_version for n in WEB_SET
        }
        # Unlink the last: the domain GPO again, and the baseline versions (content-addressed).
        last = expect_rollout(
            fleet, lambda: fleet.cli("gpo", "unlink", "Web servers", f"ou:{WEB}"), WEB_SET, "Corp Domain"
        )
        assert {n: a.desired_version for n, a in last.after.items()} == baseline
        phase(f"link → ACK by {len(WEB_SET)} agents in {linked.seconds:.2f} s")
    finally:
        for gpo in ("Web alt", "Web servers"):
            run_cli("gpo", "delete", gpo, "-r", fleet.address)
    fleet.wait_all_in_sync("the fleet back on the baseline")
    assert baseline_versions(fleet) == baseline


def test_enforced_domain_link_beats_block_inheritance(fleet: Fleet) -> None:
    baseline = baseline_versions(fleet)
    scope = f"domain:{DOMAIN}"
    try:
        # Enforcing the domain link reaches every computer of corp.example (the RSoP of each
        # changes); the Labs OU blocks inheritance but not an enforced link; the Db OU's own
        # GPO loses to it. The branch domain and the unplaced workgroup machines are untouched.
        enforced = expect_rollout(
            fleet,
            lambda: fleet.cli("gpo", "link", "Default Domain", scope, "--enforced"),
            CORP_SET,
            "Corp Domain",
        )
        report = fleet.cli("rsop", "lab01")
        assert 'IPsec policy in force: "Corp Domain"' in report
        assert f"linked at {scope} (link order 1, enforced)" in report
        assert fleet.agents["lab02"].effective().policy.name == "Corp Domain"
        phase(f"enforce → ACK by {len(CORP_SET)} agents in {enforced.seconds:.2f} s")
        restored = expect_rollout(
            fleet,
            lambda: fleet.cli("gpo", "link", "Default Domain", scope, "--not-enforced"),
            CORP_SET,
            {**{n: "Lab Policy" for n in LAB_SET}, **{n: "Db Policy" for n in DB_SET}},
        )
        assert {n: a.desired_version for n, a in restored.after.items()} == baseline
        assert "blocked by inheritance" in fleet.cli("rsop", "lab01")
    finally:
        run_cli("gpo", "link", "Default Domain", scope, "--not-enforced", "-r", fleet.address)
    fleet.wait_all_in_sync("the fleet back on the baseline")


def test_editing_a_policy_changes_exactly_its_agents(fleet: Fleet) -> None:
    baseline = baseline_versions(fleet)
    try:
        edit = expect_rollout(
            fleet,
            lambda: netsh(fleet.address, "set", "policy", "name=Db Policy", "pollinginterval=30"),
            DB_SET,
            "Db Policy",
        )
        assert fleet.agents["db02"].effective().policy.polling_interval_minutes == 30
        phase(f"policy edit → ACK by {len(DB_SET)} agents in {edit.seconds:.2f} s")
        # A filter list used by one policy only: its computers, nobody else.
        expect_rollout(
            fleet,
            lambda: netsh(
                fleet.address, "add", "filter", "filterlist=Lab hosts", "srcaddr=me", "dstaddr=10.10.0.0", "dstmask=16"
            ),
            LAB_SET,
            "Lab Policy",
        )
        assert len(fleet.agents["lab03"].effective().filter_lists[0].filters) == 2
        # A policy no GPO assigns: nobody.
        expect_rollout(
            fleet, lambda: netsh(fleet.address, "set", "policy", "name=Web Policy", "pollinginterval=45"), set()
        )
        expect_rollout(
            fleet, lambda: netsh(fleet.address, "set", "policy", "name=Db Policy", "pollinginterval=180"), DB_SET
        )
        expect_rollout(
            fleet,
            lambda: netsh(
                fleet.address,
                "delete",
                "filter",
                "filterlist=Lab hosts",
                "srcaddr=me",
                "dstaddr=10.10.0.0",
                "dstmask=16",
            ),
            LAB_SET,
        )
        assert baseline_versions(fleet) == baseline
    finally:
        run_cli_netsh_quiet(fleet.address, "set", "policy", "name=Db Policy", "pollinginterval=180")
        run_cli_netsh_quiet(fleet.address, "set", "policy", "name=Web Policy", "pollinginterval=180")
        run_cli_netsh_quiet(
            fleet.address, "delete", "filter", "filterlist=Lab hosts", "srcaddr=me", "dstaddr=10.10.0.0", "dstmask=16"
        )
    fleet.wait_all_in_sync("the fleet back on the baseline")


def run_cli_netsh_quiet(address: str, *words: str) -> None:
    """Clean-up: a netsh command whose failure (already undone) does not matter."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        netsh_main(["-r", address, "ipsec", "static", *words])


def test_policy_a_workgroup_member_cannot_apply_is_nacked_with_the_reason(fleet: Fleet) -> None:
    baseline = baseline_versions(fleet)
    try:
        fleet.cli("gpo", "add", "Lockdown", "--policy", KERBEROS_ONLY)

        def link_both() -> str:
            # One GPO, Kerberos-only rules, linked to the kiosks (workgroup machines) and to
            # the branch OU (domain members).
            out = fleet.cli("gpo", "link", "Lockdown", f"ou:{KIOSKS}")
            return out + fleet.cli("gpo", "link", "Lockdown", f"ou:{BRANCH}", "--order", "1")

        rollout = expect_rollout(
            fleet,
            link_both,
            KIOSK_SET | BRANCH_SET,
            {**{n: "Corp Domain" for n in KIOSK_SET}, **{n: KERBEROS_ONLY for n in BRANCH_SET}},
            rejected=KIOSK_SET,
        )
        status = fleet.fleet_status()
        assert (status.rejected, status.in_sync) == (len(KIOSK_SET), len(fleet.live) - len(KIOSK_SET))
        for agent in status.agents:
            if agent.computer in KIOSK_SET:
                assert agent.state == fleet_pb.AGENT_STATE_REJECTED
                assert agent.last_nack_version == agent.desired_version
                assert KERBEROS_REASON in agent.last_nack_reason, agent.last_nack_reason
                assert agent.applied_version == rollout.before[agent.computer].applied_version
        # The kiosk still enforces (records) its last good policy and says why it refused.
        local = fleet.agents["kiosk01"].status()
        assert KERBEROS_REASON in local.last_nack_reason and local.policy_name == "Corp Domain"
        assert "rejected" in local.summary
        # `policyagent fleet status --watch` (the real command, its own process): the progress
        # line until nobody is pending, then who is where, who refused and why.
        shown = cli_subprocess("fleet", "status", "--watch", "--timeout", "20", "--server", fleet.address)
        assert shown.returncode == 0, shown.stderr
        live, refused = len(fleet.live), len(KIOSK_SET)
        progress = f"rollout: {live - refused} of {live} on the desired version (0 pending, {refused} rejected, 0 stale"
        assert progress in shown.stderr, shown.stderr
        rows = {line.split()[0]: line for line in shown.stdout.splitlines() if line.strip()}
        for name in KIOSK_SET:
            assert " rejected " in rows[name] and KERBEROS_REASON in rows[name], rows[name]
        for name in BRANCH_SET:
            assert " in sync " in rows[name], rows[name]
        assert f"{len(KIOSK_SET)} rejected" in shown.stdout
        as_json = cli_subprocess("fleet", "status", "kiosk02", "--server", fleet.address, "--json")
        data = json.loads(as_json.stdout)
        assert data["agents"][0]["state"] == "AGENT_STATE_REJECTED"
        assert KERBEROS_REASON in data["agents"][0]["lastNackReason"]

        # Unlinking it: the kiosks are told to go back to the version they never left (and ACK).
        def unlink_both() -> str:
            out = fleet.cli("gpo", "unlink", "Lockdown", f"ou:{KIOSKS}")
            return out + fleet.cli("gpo", "unlink", "Lockdown", f"ou:{BRANCH}")

        back = expect_rollout(fleet, unlink_both, KIOSK_SET | BRANCH_SET, None)
        assert {n: a.desired_version for n, a in back.after.items()} == baseline
    finally:
        run_cli("gpo", "delete", "Lockdown", "-r", fleet.address)
    status = fleet.wait_all_in_sync("the fleet back on the baseline")
    assert all(status[n].last_nack_version for n in KIOSK_SET)  # history is kept: "earlier rejected"


def test_an_agent_certificate_reads_only_its_own_policy_and_no_admin_api(fleet: Fleet) -> None:
    address = fleet.address
    # Positive control: the db servers do get the pre-shared key their rule uses...
    db01 = fleet.agents["db01"]
    with db01.server_channel(address) as channel:
        own = dist_grpc.DistributionStub(channel).Fetch(dist_pb.FetchRequest(), timeout=RPC_TIMEOUT_S)
    assert own.computer == "db01" and own.policy.name == "Db Policy"
    assert DB_PSK.encode() in own.SerializeToString()
    assert DB_PSK.encode() in db01.files_on_disk()
    # ... and their local API masks it unless asked for secrets.
    assert DB_PSK.encode() not in db01.effective().SerializeToString()
    assert DB_PSK.encode() in db01.effective(include_secrets=True).SerializeToString()
    assert SITE_PSK.encode() in fleet.agents["tok01"].effective(include_secrets=True).SerializeToString()

    # Every other agent, with its own certificate, gets its own policy and never the db (or site) key.
    for name in fleet.live:
        agent = fleet.agents[name]
        with agent.server_channel(address) as channel:
            mine = dist_grpc.DistributionStub(channel).Fetch(dist_pb.FetchRequest(), timeout=RPC_TIMEOUT_S)
        assert mine.computer == name
        assert mine.policy.name == agent.spec.policy
        held = mine.SerializeToString() + agent.files_on_disk()
        if agent.spec.policy:  # (the local API answers NOT_FOUND when no policy is in force)
            held += agent.effective(include_secrets=True).SerializeToString()
        if name not in DB_SET:
            assert DB_PSK.encode() not in held, f"{name} holds the db servers' pre-shared key"
        if name != "tok01":
            assert SITE_PSK.encode() not in held, f"{name} holds the site policy's pre-shared key"

    # Claiming to be another computer in the Hello changes nothing: the certificate names it.
    web05 = fleet.agents["web05"]
    with web05.server_channel(address) as channel:
        call = dist_grpc.DistributionStub(channel).Stream(
            iter([dist_pb.AgentMessage(hello=dist_pb.Hello(computer="db01"))]), timeout=RPC_TIMEOUT_S
        )
        first = next(call)
        call.cancel()
    assert first.policy.computer == "web05" and first.policy.policy.name == "Corp Domain"
    assert DB_PSK.encode() not in first.SerializeToString()
    # (That stream replaced web05's own for a moment; the agent reconnects by itself.)
    fleet.wait_all_in_sync("web05 back after its stream was replaced")

    # No admin API answers an agent certificate.
    refused: list[tuple[str, Callable[[grpc.Channel], Any]]] = [
        (
            "PolicyAdmin.GetStore",
            lambda ch: admin_grpc.PolicyAdminStub(ch).GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S),
        ),
        (
            "PolicyAdmin.GetPolicy",
            lambda ch: admin_grpc.PolicyAdminStub(ch).GetPolicy(
                admin_pb.GetObjectRequest(name="Db Policy", include_secrets=True), timeout=RPC_TIMEOUT_S
            ),
        ),
        (
            "AssignmentAdmin.GetTopology",
            lambda ch: assign_grpc.AssignmentAdminStub(ch).GetTopology(
                assign_pb.GetTopologyRequest(), timeout=RPC_TIMEOUT_S
            ),
        ),
        (
            "AssignmentAdmin.GetRsop",
            lambda ch: assign_grpc.AssignmentAdminStub(ch).GetRsop(
                assign_pb.RsopRequest(computer="db01"), timeout=RPC_TIMEOUT_S
            ),
        ),
        (
            "AssignmentAdmin.Apply",
            lambda ch: assign_grpc.AssignmentAdminStub(ch).Apply(
                assign_pb.TopologyApplyRequest(
                    mutations=[
                        assign_pb.TopologyMutation(
                            put_computer=assign_pb.Computer(name="web01", membership="domain", domain=DOMAIN, ou=DB),
                            upsert=True,
                        )
                    ]
                ),
                timeout=RPC_TIMEOUT_S,
            ),
        ),
        (
            "Fleet.Status",
            lambda ch: fleet_grpc.FleetStub(ch).Status(fleet_pb.FleetStatusRequest(), timeout=RPC_TIMEOUT_S),
        ),
        (
            "Fleet.Watch",
            lambda ch: next(iter(fleet_grpc.FleetStub(ch).Watch(fleet_pb.FleetStatusRequest(), timeout=RPC_TIMEOUT_S))),
        ),
    ]
    web01 = fleet.agents["web01"]
    with web01.server_channel(address) as channel:
        for what, call_it in refused:
            with pytest.raises(grpc.RpcError) as info:
                call_it(channel)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
            assert "needs an admin certificate" in (info.value.details() or ""), what
    # Nothing was moved.
    topology = fleet.assignment().GetTopology(assign_pb.GetTopologyRequest(), timeout=RPC_TIMEOUT_S)
    assert next(c for c in topology.computers if c.name == "web01").ou == WEB


def test_a_revoked_agent_is_cut_off_at_once(fleet: Fleet) -> None:
    # Runs last among the fleet tests: rev01 stays revoked.
    victim = fleet.agents["rev01"]
    fleet.wait_all_in_sync("the fleet in sync before the revocation")
    started = time.monotonic()
    revoked = cli_subprocess("host-cert", "revoke", "rev01", "--data-dir", str(fleet.server.data_dir))
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked computer rev01: 1 certificate(s)" in revoked.stdout
    assert "the running server" in revoked.stdout
    fleet.revoked.add("rev01")

    def cut_off() -> fleet_pb.FleetAgent:
        agent = fleet.status()["rev01"]
        assert not agent.online and agent.state == fleet_pb.AGENT_STATE_REVOKED, _state_word(agent)
        assert agent.revoked_unix_ms > 0
        local = victim.status()
        assert local.connection != "in sync" and "revoked" in local.last_error, local.summary
        return agent

    wait_until(cut_off, "rev01's stream closed", CONVERGE_S)
    phase(f"revocation → stream closed in {time.monotonic() - started:.2f} s")

    # It keeps trying (backoff ≤ 0.5 s) and is refused every time; the fleet never sees it again.
    def refused_on_reconnect() -> None:
        local = victim.status()
        assert "certificate revoked" in local.last_error, local.last_error

    wait_until(refused_on_reconnect, "rev01's reconnect refused", CONVERGE_S)
    with victim.server_channel(fleet.address) as channel, pytest.raises(grpc.RpcError) as info:
        dist_grpc.DistributionStub(channel).Fetch(dist_pb.FetchRequest(), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "certificate revoked" in (info.value.details() or "")
    # For a few backoff periods: it keeps trying (its connection state keeps changing), and the
    # fleet view never shows it online.
    transitions = 0
    until = time.monotonic() + 1.5
    since = victim.status().connection_since_unix_ms
    while time.monotonic() < until:
        assert not fleet.status()["rev01"].online, "a revoked agent came back online"
        now = victim.status().connection_since_unix_ms
        transitions += now != since
        since = now
        time.sleep(POLL_S)
    assert transitions >= 1, "the revoked agent stopped trying (expected it to keep backing off)"
    listing = cli_subprocess("host-cert", "list", "--data-dir", str(fleet.server.data_dir)).stdout
    assert re.search(r"^rev01\t.*\trevoked ", listing, re.MULTILINE), listing
    # Everyone else is untouched.
    status = fleet.wait_all_in_sync("the rest of the fleet")
    assert len([n for n in status if status[n].online]) == len(fleet.agents) - 1


# ============================================================================ server killed


KILL_FLEET = [
    Spec("kweb1", "token", DOMAIN, WEB, SITE, "Corp Domain"),
    Spec("kweb2", "token", DOMAIN, WEB, "", "Corp Domain"),
    Spec("kdb1", "token", DOMAIN, DB, "", "Db Policy"),
    Spec("klab1", "token", DOMAIN, LABS, "", "Lab Policy"),
    Spec("kkiosk1", "secret", "", KIOSKS, "", "Corp Domain"),
    Spec("kkiosk2", "secret", "", KIOSKS, "", "Corp Domain"),
    Spec("ktok1", "token", "", "", SITE, "Site Policy"),
    Spec("ktok2", "token"),
]


def test_server_killed_agents_keep_their_cached_policy_and_converge_when_it_is_back(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = tmp_path_factory.mktemp("killed")
    fleet = start_fleet(base, KILL_FLEET)
    try:
        status = fleet.status()
        before = {n: fleet.agents[n].status() for n in fleet.agents}
        data_dir = fleet.server.data_dir
        port = fleet.address.rsplit(":", 1)[1]
        secret_file = base / "workgroup.secret"

        # SIGKILL: no goodbye to anyone.
        killed = fleet.server
        killed.proc.kill()
        killed.proc.wait(timeout=15)
        killed.close()
        fleet.reset_admin_channel()

        def all_noticed() -> None:
            for name, agent in fleet.agents.items():
                local = agent.status()
                assert local.connection in ("backoff", "connecting", "polling"), f"{name}: {local.connection}"
                assert local.last_error, name

        wait_until(all_noticed, "every agent to notice the server is gone", CONVERGE_S)
        # They keep what they run: same version, same policy, the enforcer's record untouched.
        for name, agent in fleet.agents.items():
            local = agent.status()
            assert local.applied_version == before[name].applied_version == status[name].desired_version, name
            assert local.policy_name == agent.spec.policy, name
            assert not local.running_on_cache, name  # it never restarted: it runs what it applied
            recorded = json.loads((agent.state_dir / "enforcer" / "record-only.json").read_text())
            assert recorded["version"] == local.applied_version, name

        # Agents restarted while the server is down start on their cached policy and say so.
        restarted = ["kweb1", "kdb1", "kkiosk1"]
        for name in restarted:
            fleet.agents[name].stop()
        restart_wall = time.time()
        for name in restarted:
            fleet.agents[name].launch(fleet.address)
        deadline = time.monotonic() + START_S
        for name in restarted:
            fleet.agents[name].wait_started(deadline)

        def on_cache(name: str) -> Callable[[], agent_pb.LocalStatus]:
            def check() -> agent_pb.LocalStatus:
                local = fleet.agents[name].status()
                assert local.running_on_cache, local.summary
                return local

            return check

        for name in restarted:
            local = wait_until(on_cache(name), f"{name} on its cached policy", CONVERGE_S)
            assert local.applied_version == before[name].applied_version, local.summary
            assert local.policy_name == fleet.agents[name].spec.policy
            assert local.connection != "in sync"
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(local.cache_since_unix_ms / 1000))
            assert local.summary.startswith(f"running on cached policy since {since}"), local.summary
            assert restart_wall - 1 <= local.cache_since_unix_ms / 1000 <= time.time() + 1
            # ... and its log says the same.
            logged = [
                json.loads(line)["message"] for line in fleet.agents[name].stderr().splitlines() if line.startswith("{")
            ]
            assert any(m.startswith(f"running on cached policy since {since}") for m in logged), logged
        # The same through `policyagent agent-status` (the real command).
        shown = cli_subprocess("agent-status", "--state-dir", str(fleet.agents["kdb1"].state_dir))
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith("running on cached policy since "), shown.stdout
        assert re.search(r"running on cache\s+yes", shown.stdout), shown.stdout
        assert "Db Policy" in shown.stdout
        # The restarted db server still holds its own key from the cache.
        assert DB_PSK.encode() in fleet.agents["kdb1"].effective(include_secrets=True).SerializeToString()

        # The server comes back on the same data directory and port.
        restarted_at = time.monotonic()
        fleet.server = _restart_server(data_dir, f"127.0.0.1:{port}", secret_file, base)
        assert fleet.address.endswith(f":{port}")

        def converged() -> fleet_pb.FleetStatus:
            view = fleet.fleet_status()
            agents = {a.computer: a for a in view.agents}
            waiting = []
            for name in fleet.agents:
                agent = agents.get(name)
                if agent is None:
                    waiting.append(f"{name} (not heard of yet)")
                elif agent.state != fleet_pb.AGENT_STATE_IN_SYNC or agent.applied_version != agent.desired_version:
                    waiting.append(f"{name} ({_state_word(agent)})")
                elif agent.running_on_cache:
                    waiting.append(f"{name} (running on cache)")
            assert not waiting, ", ".join(waiting)
            for name, agent in fleet.agents.items():
                local = agent.status()
                assert local.connection == "in sync" and not local.running_on_cache, f"{name}: {local.summary}"
            return view

        view = wait_until(converged, "every agent in sync with the restarted server", RECONVERGE_S)
        phase(f"server restart → all {len(fleet.agents)} agents in sync in {time.monotonic() - restarted_at:.2f} s")
        # The agents reported where they stood: the restarted ones said they ran on their cache.
        hellos: dict[str, list[dict[str, Any]]] = {}
        for line in fleet.server.stderr().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("message") == "agent connected":
                hellos.setdefault(record["computer"], []).append(record)
        for name in fleet.agents:
            first = hellos[name][0]
            assert first["applied"] == status[name].desired_version, name
            assert first["running_on_cache"] is (name in restarted), name
        assert (view.total, view.in_sync, view.on_cache, view.offline) == (len(KILL_FLEET), len(KILL_FLEET), 0, 0)
        # Nothing changed while it was down: everyone is on the version it had before the kill.
        for agent in view.agents:
            assert agent.desired_version == status[agent.computer].desired_version, agent.computer
            assert agent.applied_version == agent.desired_version, agent.computer
    except BaseException:
        for agent in fleet.agents.values():
            print(f"--- {agent.name} stderr ---\n{agent.stderr()[-4000:]}", file=sys.stderr)
        raise
    finally:
        fleet.stop()


def _restart_server(data_dir: Path, listen: str, secret_file: Path, log_dir: Path) -> ServerProcess:
    """Start the server again on `listen`; retry while the port is not yet free again."""
    extra = ["--workgroup-secret-file", str(secret_file), "--enroll-listen", "127.0.0.1:0", "--log-level", "info"]
    deadline = time.monotonic() + CONVERGE_S
    while True:
        try:
            return start_server_process(data_dir, listen=listen, extra=extra, log_dir=log_dir)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)
