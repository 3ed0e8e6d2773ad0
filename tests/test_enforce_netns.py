"""Issue 4, on the wire: agents in network namespaces enforce the Windows defaults with strongSwan.

A LAN (tests/netns.py) with hosts a and b; the test's own namespace joins it and runs the policy
server (`policyagent server` on the LAN address). Each host runs a real `policyagent agent
--enforcer strongswan` (enrolled with a join token), which supervises its own charon and its nftables
filter table. Policies are the Windows defaults with their Kerberos authentication swapped for a
pre-shared key (netsh), assigned through GPOs linked to each host's OU. Traffic is checked on b's wire
with tcpdump/tshark: protected traffic shows only ESP in UDP 4500 (this kernel has no ESP; charon's
userspace kernel-libipsec carries it).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import RPC_TIMEOUT_S, ServerProcess, start_server_process
from netns import Host, Lan, netns_unavailable, tshark_lines

from clients.netsh.main import main as netsh_main
from policyagent.cli import main as cli_main
from policyagent.pb import agent_grpc, agent_pb, assign_pb, fleet_pb

T = TypeVar("T")
pytestmark = pytest.mark.slow

DOMAIN = "corp.example"
OU_A = "OU=A,DC=corp,DC=example"
OU_B = "OU=B,DC=corp,DC=example"
PSK = "netns-test-preshared-key-0123456789"
CLIENT = "Client (Respond Only)"
SERVER = "Server (Request Security)"
SECURE = "Secure Server (Require Security)"

_why = netns_unavailable("charon-systemd", "nft", "tcpdump", "tshark", "ping")
if _why is None:
    from policyagent.agent.enforce.caps import probe

    _problems = probe().problems()
    _why = "; ".join(_problems) if _problems else None
if _why:
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=f"strongSwan enforcement cannot run here: {_why}")]


def wait_until(check: Callable[[], T], what: str, timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            return check()
        except (AssertionError, KeyError, subprocess.SubprocessError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out: {what}: {last}")


def cli(*argv: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(list(argv))
    assert code == 0, f"policyagent {' '.join(argv)} failed: {out.getvalue()}"
    return out.getvalue()


def netsh(address: str, line: str) -> None:
    import contextlib
    import io
    import shlex

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = netsh_main(["-r", address, *shlex.split(line)])
    assert code == 0, f"netsh {line}: {out.getvalue()}"


TCP_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8); print("ready", flush=True)
while True:
    c, _ = s.accept()
    data = b""
    while not data.endswith(b"\n"):
        chunk = c.recv(65536)
        if not chunk: break
        data += chunk
    c.sendall(b"echo:" + data); c.close()
"""

TCP_CLIENT = r"""
import socket, sys, time
t = time.monotonic()
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
    c.sendall(sys.argv[3].encode() + b"\n"); c.settimeout(float(sys.argv[4]))
    data = b""
    while True:
        chunk = c.recv(65536)
        if not chunk: break
        data += chunk
    print("OK", round(time.monotonic() - t, 3), data.decode().strip())
except OSError as e:
    print("FAIL", type(e).__name__, e)
"""


def tcp(host: Host, dst: str, port: int, payload: str, timeout: float = 8.0) -> str:
    out = host.run([sys.executable, "-c", TCP_CLIENT, dst, str(port), payload, str(timeout)], check=False, timeout=timeout + 10)
    return out.stdout.strip()


def _root_prefixes() -> set[str]:
    """The "10.77.K" prefixes the test process's own namespace already has an address in."""
    import json

    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=False)
    return {
        info.get("local", "").rsplit(".", 1)[0] for link in json.loads(out.stdout or "[]") for info in link.get("addr_info", [])
    }


class Site:
    """Hosts a and b on a LAN whose subnet no other LAN of this machine uses (so modules' sites coexist),
    the policy server in the test's own namespace, real agents in the hosts."""

    def __init__(self, base: Path) -> None:
        self.base = base
        used = _root_prefixes()
        lan = Lan.create(base / "lan")
        for _ in range(20):
            if lan.prefix not in used:
                break
            lan.close()
            lan = Lan.create(base / "lan")
        self.lan = lan
        self.a = self.lan.add_host("a")
        self.b = self.lan.add_host("b")
        self.root_ip = self.lan.join_root()
        self.server: ServerProcess | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    def start_server(self) -> None:
        self.server = start_server_process(self.base / "data", listen=f"{self.root_ip}:0", log_dir=self.base)
        for policy in (CLIENT, SERVER, SECURE):
            netsh(self.address, f'ipsec static set defaultrule policy="{policy}" psk="{PSK}"')
        for policy in (SERVER, SECURE):
            netsh(self.address, f'ipsec static set rule name="All IP Traffic" policy="{policy}" psk="{PSK}"')
        for ou in (OU_A, OU_B):
            cli("ou", "add", ou, "-r", self.address)
        cli("gpo", "add", "GPO-A", "--policy", CLIENT, "-r", self.address)
        cli("gpo", "add", "GPO-B", "--policy", SECURE, "-r", self.address)
        cli("gpo", "link", "GPO-A", f"ou:{OU_A}", "-r", self.address)
        cli("gpo", "link", "GPO-B", f"ou:{OU_B}", "-r", self.address)

    def start_agent(self, host: Host, domain: str | None = DOMAIN) -> None:
        """Start `host`'s agent (enrolling it first with a join token; `domain=None`: a workgroup member)."""
        assert self.server is not None
        state = self.state_dir(host)
        extra: list[str] = []
        if not (state / "host.crt").exists():
            token_args = ["join-token", "create", host.name, "--ttl", "10m"] + (["--domain", domain] if domain else [])
            token = cli(*token_args, "--data-dir", str(self.server.data_dir)).strip()
            extra = ["--enroll-token", token, "--enroll-server", self.server.enroll_address,
                     "--ca-file", str(self.server.data_dir / "pki" / "ca.crt"), "--computer", host.name]
        log = (self.base / f"agent-{host.name}.log").open("ab")
        self.agents[host.name] = host.popen(
            [sys.executable, "-m", "policyagent.cli", "agent", "--server", self.address, "--state-dir", str(state),
             "--enforcer", "strongswan", "--backoff-max", "0.5", "--log-level", "info", *extra,
             *self.agent_args(host)],
            stdout=log, stderr=log,
        )

    def agent_args(self, host: Host) -> list[str]:
        """Extra `policyagent agent` arguments for `host` (subclasses add Kerberos, ...)."""
        return []

    def stop_agent(self, host: Host) -> None:
        proc = self.agents.pop(host.name)
        proc.terminate()
        proc.wait(timeout=20)

    def place(self) -> None:
        from conftest import admin_channel

        from policyagent.pb import assign_grpc

        stub = assign_grpc.AssignmentAdminStub(admin_channel(self.address))
        topology = wait_until(
            lambda: self._both(stub.GetTopology(assign_pb.GetTopologyRequest(), timeout=RPC_TIMEOUT_S)), "enrolled"
        )
        mutations = []
        for c in topology.computers:
            if c.name in ("a", "b"):
                c.ou = OU_A if c.name == "a" else OU_B
                mutations.append(assign_pb.TopologyMutation(put_computer=c))
        stub.Apply(assign_pb.TopologyApplyRequest(mutations=mutations, operation="place a and b"), timeout=RPC_TIMEOUT_S)

    @staticmethod
    def _both(topology: assign_pb.Topology) -> assign_pb.Topology:
        names = {c.name for c in topology.computers}
        assert {"a", "b"} <= names, names
        return topology

    def fleet(self) -> dict[str, fleet_pb.FleetAgent]:
        from conftest import admin_channel

        from policyagent.pb import fleet_grpc

        stub = fleet_grpc.FleetStub(admin_channel(self.address))
        status = stub.Status(fleet_pb.FleetStatusRequest(), timeout=RPC_TIMEOUT_S)
        return {a.computer: a for a in status.agents}

    def wait_applied(self, name: str, not_version: str = "", timeout: float = 30.0) -> str:
        """Wait until `name` has ACKed its desired version (other than `not_version`); return it."""

        def check() -> str:
            agent = self.fleet()[name]
            assert agent.desired_version and agent.desired_version != not_version, "no new version yet"
            assert agent.last_nack_version != agent.desired_version, f"NACK: {agent.last_nack_reason}"
            assert agent.state == fleet_pb.AGENT_STATE_IN_SYNC, agent.state
            return agent.applied_version

        return wait_until(check, f"{name} applies its policy", timeout)

    def assign(self, gpo: str, policy: str) -> None:
        """Give GPO `gpo` the IPsec policy `policy` and wait for its host to apply the new version."""
        name = "a" if gpo == "GPO-A" else "b"
        before = self.fleet()[name].desired_version
        cli("gpo", "set", gpo, "--policy", policy, "-r", self.address)
        self.wait_applied(name, not_version=before)

    def bring_up(self) -> None:
        """Server, both agents enrolled and online, then placed in their OUs and on their policies."""
        self.start_server()
        self.start_agent(self.a)
        self.start_agent(self.b)
        unplaced = {name: self.wait_applied(name) for name in ("a", "b")}  # online, nothing assigned yet
        self.place()
        for name, version in unplaced.items():
            self.wait_applied(name, not_version=version)

    def state_dir(self, host: Host) -> Path:
        return self.base / f"agent-{host.name}"

    def charon_vici(self, host: Host) -> Path:
        return self.state_dir(host) / "charon" / "charon.vici"

    def local(self, host: Host) -> agent_grpc.AgentLocalStub:
        """The AgentLocal API on `host`'s agent socket."""
        import grpc

        return agent_grpc.AgentLocalStub(grpc.insecure_channel(f"unix:{self.state_dir(host) / 'agent.sock'}"))

    def dump_logs(self, tail: int = 6000) -> None:
        """Every agent's log (its end) on stderr, for a failed setup or test."""
        for log in sorted(self.base.glob("agent-*.log")):
            print(f"--- {log.stem} ---\n{log.read_text(errors='replace')[-tail:]}", file=sys.stderr)

    @staticmethod
    def wait_listening(host: Host, port: int) -> None:
        def listening() -> None:
            out = host.run(["ss", "-Hltn", f"sport = :{port}"], check=False)
            assert out.stdout.strip(), f"nothing listens on {port}"

        wait_until(listening, f"{host.name} listens on {port}", 10)

    def close(self) -> None:
        for proc in self.agents.values():
            proc.terminate()
        for proc in self.agents.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.server is not None:
            self.server.close()
        self.lan.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("enforce"))
    try:
        s.bring_up()
        s.b.popen([sys.executable, "-c", TCP_SERVER, "5001"], stdout=subprocess.DEVNULL)
        s.a.popen([sys.executable, "-c", TCP_SERVER, "5001"], stdout=subprocess.DEVNULL)
        time.sleep(0.3)
        yield s
    except BaseException:
        s.dump_logs()
        raise
    finally:
        s.close()


def test_secure_server_and_respond_only_client_talk_only_through_esp(site: Site) -> None:
    a, b = site.a, site.b
    with b.capture("udp port 4500 or icmp or tcp port 5001") as pcap:
        first = tcp(a, b.ip, 5001, "secret-tcp-payload-1")
        assert first.startswith("OK"), first
        assert a.ping(b.ip, count=3)
        assert b.ping(a.ip, count=3)
        again = tcp(a, b.ip, 5001, "secret-tcp-payload-2")
        assert again.startswith("OK"), again
    esp = tshark_lines(pcap, "esp")
    assert esp, "no ESP on the wire"
    # The first SYN travels in clear (Require Security accepts it: inbound pass-through) and b's
    # answer is what triggers the negotiation; every payload byte travels inside ESP.
    clear_payload = tshark_lines(pcap, 'tcp.payload or frame contains "secret-tcp-payload"')
    assert clear_payload == [], clear_payload
    clear_icmp_after = tshark_lines(pcap, "icmp")
    assert clear_icmp_after == [], clear_icmp_after


def test_the_agent_reports_monitor_counters_sas_filters_and_audit_events(site: Site) -> None:
    a, b = site.a, site.b
    out = tcp(a, b.ip, 5001, "monitored")
    assert out.startswith("OK"), out
    stub = site.local(b)
    stats = stub.GetStatistics(agent_pb.StatisticsRequest(), timeout=10)
    qm = {c.key: c.value for c in stats.quick_mode}
    mm = {c.key: c.value for c in stats.main_mode}
    assert stats.ipsec_active and stats.policy_name == SECURE
    assert qm["key_additions"] >= 1 and qm["confidential_bytes_received"] > 0, qm
    assert mm["ike_main_modes"] >= 1 and mm["ike_quick_modes"] >= 1, mm
    assert [c.name for c in stats.quick_mode][:1] == ["Active Security Associations"]
    sas = stub.ListSecurityAssociations(agent_pb.SecurityAssociationsRequest(), timeout=10)
    assert any(q.remote_address == a.ip and q.spi_in and q.spi_out and q.encapsulated for q in sas.quick_mode), sas
    assert any(m.remote_address == a.ip and m.state == "ESTABLISHED" for m in sas.main_mode)
    filters = stub.ListFilters(agent_pb.FiltersRequest(), timeout=10)
    verdicts = [f.verdict for f in filters.filters]
    assert verdicts[:2] == ["permit", "permit"] and "negotiate" in verdicts  # most specific first
    assert any(f.verdict == "negotiate" and f.packets > 0 for f in filters.filters), filters.filters
    assert any("IKE" in e for e in filters.exemptions) and any(p.name == "default-response" for p in filters.policies)
    events = stub.ListAuditEvents(agent_pb.AuditEventsRequest(ids=[541]), timeout=10).events
    assert events and events[-1].computer == "b" and events[-1].fields, events
    assert "Peer Identity" in events[-1].fields
    # set config: ikelogging applies at once (a trace file appears), ipsecexempt at the next start
    trace = site.base / "agent-b" / "charon" / "ike-trace.log"
    values = stub.SetConfig(agent_pb.SetConfigRequest(name="ikelogging", value="1"), timeout=10)
    assert {v.name: v.value for v in values.values}["ikelogging"] == "1"
    assert trace.exists()  # charon reloaded its settings and opened the trace file before SetConfig returned
    values = stub.SetConfig(agent_pb.SetConfigRequest(name="ipsecexempt", value="0"), timeout=10)
    pending = {v.name: (v.value, v.pending) for v in values.values}["ipsecexempt"]
    assert pending == ("3", "0")
    import grpc

    with pytest.raises(grpc.RpcError) as bad:
        stub.SetConfig(agent_pb.SetConfigRequest(name="ikelogging", value="7"), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ikelogging" in (bad.value.details() or "")
    stub.SetConfig(agent_pb.SetConfigRequest(name="ikelogging", value="0"), timeout=10)
    stub.SetConfig(agent_pb.SetConfigRequest(name="ipsecexempt", value="3"), timeout=10)


def test_request_security_falls_back_to_clear_with_a_host_without_ipsec(site: Site) -> None:
    a, b = site.a, site.b
    site.stop_agent(a)  # a: no IPsec at all (its agent and charon are gone)
    site.assign("GPO-B", SERVER)
    soft_before = _counter(site, b, "soft_associations")
    with b.capture("udp port 500 or udp port 4500 or tcp port 5001") as pcap:
        out = tcp(a, b.ip, 5001, "hello-clear", timeout=12)
    assert out.startswith("OK"), out
    assert tshark_lines(pcap, "isakmp"), "b never tried IKE with a"
    assert tshark_lines(pcap, 'frame contains "hello-clear"'), "fallback traffic should be clear"
    assert _counter(site, b, "soft_associations") == soft_before + 1  # counted, as the IP Security Monitor does


def test_secure_server_refuses_a_host_without_ipsec(site: Site) -> None:
    a, b = site.a, site.b
    site.assign("GPO-B", SECURE)
    out = tcp(a, b.ip, 5001, "never", timeout=6)
    assert out.startswith("FAIL"), out


def _online(site: Site, name: str) -> bool:
    assert site.fleet()[name].online, f"{name} offline"
    return True


def _server_ca_name(site: Site) -> str:
    from cryptography import x509

    assert site.server is not None
    ca = x509.load_pem_x509_certificate((site.server.data_dir / "pki" / "ca.crt").read_bytes())
    return ca.subject.rfc4514_string()  # e.g. "CN=policyagent CA host,O=policyagent"


def _remote_ids(host: Host, site: Site) -> set[str]:
    from policyagent.agent.enforce.charon import ViciSession

    ids = set()
    with ViciSession(site.charon_vici(host), 10) as session:
        for sa in session.list_sas():
            for ike in sa.values():
                ids.add(ike["remote-id"].decode())
    return ids


def test_certificates_from_the_servers_ca_authenticate_and_an_untrusted_root_is_refused(site: Site) -> None:
    a, b = site.a, site.b
    if "a" not in site.agents:  # the fallback tests stopped a's agent
        site.start_agent(a)
        wait_until(lambda: _online(site, "a"), "a back online")
        site.wait_applied("a")
    ca = _server_ca_name(site)
    before = {n: site.fleet()[n].desired_version for n in ("a", "b")}
    netsh(site.address, f'ipsec static set defaultrule policy="{CLIENT}" rootca="{ca} certmap:no excludecaname:no"')
    netsh(site.address, f'ipsec static set rule name="All IP Traffic" policy="{SECURE}" rootca="{ca}"')
    netsh(site.address, f'ipsec static set defaultrule policy="{SECURE}" rootca="{ca}"')
    for name in ("a", "b"):
        site.wait_applied(name, not_version=before[name])
    out = tcp(a, b.ip, 5001, "over-certificates")
    assert out.startswith("OK"), out
    assert any("CN=a" in rid for rid in _remote_ids(b, site)), _remote_ids(b, site)

    # A root CA that neither host trusts: b refuses the policy, with the reason, and keeps the last good one.
    previous = site.fleet()["b"].applied_version
    netsh(site.address, f'ipsec static set rule name="All IP Traffic" policy="{SECURE}" rootca="CN=Nobody Trusts Me"')

    def nacked() -> str:
        agent = site.fleet()["b"]
        assert agent.last_nack_version == agent.desired_version, "no NACK yet"
        return agent.last_nack_reason

    reason = wait_until(nacked, "b NACKs the untrusted root CA")
    assert "Nobody Trusts Me" in reason and "not among the CAs this host trusts" in reason, reason
    assert site.fleet()["b"].applied_version == previous
    # back to the pre-shared key for whatever runs next
    before = {n: site.fleet()[n].desired_version for n in ("a", "b")}
    for policy in (CLIENT, SECURE):
        netsh(site.address, f'ipsec static set defaultrule policy="{policy}" psk="{PSK}"')
    netsh(site.address, f'ipsec static set rule name="All IP Traffic" policy="{SECURE}" psk="{PSK}"')
    for name in ("a", "b"):
        site.wait_applied(name, not_version=before[name])


def test_dynamic_mode_rules_apply_at_once_and_vanish_with_the_agent(site: Site) -> None:
    import grpc

    from policyagent.pb import pb

    a, b = site.a, site.b
    assert tcp(a, b.ip, 5001, "before-dynamic").startswith("OK")
    stub = site.local(b)
    mm = agent_pb.DynamicMmPolicy(
        name="mm-block",
        methods=[pb.MainModeMethod(encryption=pb.CIPHER_AES128, integrity=pb.INTEGRITY_SHA256, dh_group=pb.DH_GROUP_MODP2048)],
    )
    stub.EditDynamic(agent_pb.DynamicEdit(add_mm_policy=mm), timeout=10)
    block = agent_pb.DynamicRule(
        source=pb.Address(kind=pb.ADDRESS_KIND_ME), destination=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=a.ip),
        mirrored=True, mm_policy="mm-block", action_inbound=pb.ACTION_TYPE_BLOCK, action_outbound=pb.ACTION_TYPE_BLOCK,
    )
    state = stub.EditDynamic(agent_pb.DynamicEdit(add_rule=block), timeout=10)
    assert len(state.rules) == 1
    assert tcp(a, b.ip, 5001, "blocked", timeout=3).startswith("FAIL")
    assert not a.ping(b.ip, count=1)  # more specific than the static ICMP permit
    with pytest.raises(grpc.RpcError) as refused:
        stub.EditDynamic(agent_pb.DynamicEdit(delete_mm_policy="mm-block"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "used by a rule" in (refused.value.details() or "")
    stub.EditDynamic(agent_pb.DynamicEdit(delete_rule=block), timeout=10)
    assert tcp(a, b.ip, 5001, "unblocked").startswith("OK")
    # dynamic state and statistics do not survive an agent restart (Windows: net stop / net start)
    stub.EditDynamic(agent_pb.DynamicEdit(add_rule=block), timeout=10)
    before = site.fleet()["b"].applied_version
    site.stop_agent(b)
    site.start_agent(b)
    wait_until(lambda: _online(site, "b"), "b back online")
    assert site.wait_applied("b") == before
    stub = site.local(b)
    state = stub.GetDynamic(agent_pb.DynamicRequest(), timeout=10)
    assert not state.rules and not state.mm_policies
    stats = stub.GetStatistics(agent_pb.StatisticsRequest(), timeout=10)
    assert {c.key: c.value for c in stats.quick_mode}["key_additions"] == 0
    assert tcp(a, b.ip, 5001, "after-restart").startswith("OK")


def test_ikev2_as_a_policy_option(site: Site) -> None:
    from policyagent.agent.enforce.charon import ViciSession

    a, b = site.a, site.b
    before = site.fleet()["b"].desired_version
    netsh(site.address, f'ipsec static set policy name="{SECURE}" ikeversion=2')
    try:
        site.wait_applied("b", not_version=before)
        with ViciSession(site.charon_vici(site.b), 10) as session:
            for sa in session.list_sas():  # the v1 SAs of the earlier tests were closed with the change
                assert all(ike["version"].decode() == "2" for ike in sa.values()), sa
        out = tcp(a, b.ip, 5001, "over-ikev2")
        assert out.startswith("OK"), out
        with ViciSession(site.charon_vici(site.b), 10) as session:
            versions = {ike["version"].decode() for sa in session.list_sas() for ike in sa.values()}
        assert versions == {"2"}, versions
    finally:
        changed = site.fleet()["b"].desired_version
        netsh(site.address, f'ipsec static set policy name="{SECURE}" ikeversion=1')
        site.wait_applied("b", not_version=changed)


def _events(site: Site, host: Host, ids: list[int], since: int) -> list[agent_pb.AuditEvent]:
    return list(site.local(host).ListAuditEvents(agent_pb.AuditEventsRequest(ids=ids, since_unix_ms=since), timeout=10).events)


def _wait_events(site: Site, host: Host, ids: list[int], since: int, what: str) -> list[agent_pb.AuditEvent]:
    def check() -> list[agent_pb.AuditEvent]:
        events = _events(site, host, ids, since)
        assert events, f"no audit {ids} on {host.name} yet"
        return events

    return wait_until(check, what)


def _counter(site: Site, host: Host, key: str) -> int:
    stats = site.local(host).GetStatistics(agent_pb.StatisticsRequest(), timeout=10)
    return {c.key: c.value for c in [*stats.main_mode, *stats.quick_mode]}[key]


def test_a_pre_shared_key_mismatch_is_counted_and_audited(site: Site) -> None:
    a, b = site.a, site.b
    since = int(time.time() * 1000)
    failures = _counter(site, a, "authentication_failures")
    before = {n: site.fleet()[n].desired_version for n in ("a", "b")}
    netsh(site.address, f'ipsec static set defaultrule policy="{CLIENT}" psk="not-the-same-key-at-all-0123"')
    try:
        site.wait_applied("a", not_version=before["a"])
        out = tcp(a, b.ip, 5001, "mismatch", timeout=5)
        assert out.startswith("FAIL"), out  # b answers only under IPsec, and IKE cannot authenticate

        event = _wait_events(site, a, [545], since, "a audits the authentication failure")[-1]
        assert b.ip in event.fields["Peer Identity"] and event.fields["Filter"], event
        assert _counter(site, a, "authentication_failures") > failures
        negotiation = _wait_events(site, b, [547], since, "b audits the failed negotiation")
        assert negotiation[-1].fields.get("Failure Point"), negotiation
    finally:
        changed = site.fleet()["a"].desired_version
        netsh(site.address, f'ipsec static set defaultrule policy="{CLIENT}" psk="{PSK}"')
        site.wait_applied("a", not_version=changed)


def test_a_certificate_from_an_untrusted_root_is_audited_as_544(site: Site) -> None:
    from cryptography import x509

    from policyagent.pki.ca import CertificateAuthority

    a, b = site.a, site.b
    other, _ = CertificateAuthority.load_or_create(site.base / "other-ca", ca_name="Some Other Root")
    (site.base / "agent-a" / "ca.d").mkdir(exist_ok=True)
    (site.base / "agent-a" / "ca.d" / "other.pem").write_bytes(other.cert_pem)
    other_dn = x509.load_pem_x509_certificate(other.cert_pem).subject.rfc4514_string()
    server_dn = _server_ca_name(site)
    since = int(time.time() * 1000)
    before = {n: site.fleet()[n].desired_version for n in ("a", "b")}
    netsh(site.address, f'ipsec static set defaultrule policy="{CLIENT}" rootca="{other_dn}"')  # a trusts only "other"
    netsh(site.address, f'ipsec static set rule name="All IP Traffic" policy="{SECURE}" rootca="{server_dn}"')
    netsh(site.address, f'ipsec static set defaultrule policy="{SECURE}" rootca="{server_dn}"')
    try:
        for name in ("a", "b"):
            site.wait_applied(name, not_version=before[name])
        assert tcp(a, b.ip, 5001, "untrusted", timeout=5).startswith("FAIL")
        events = _wait_events(site, a, [544], since, "a audits the untrusted certificate")
        assert "CN=b" in events[-1].fields["Peer Identity"], events
    finally:
        before = {n: site.fleet()[n].desired_version for n in ("a", "b")}
        for policy in (CLIENT, SECURE):
            netsh(site.address, f'ipsec static set defaultrule policy="{policy}" psk="{PSK}"')
        netsh(site.address, f'ipsec static set rule name="All IP Traffic" policy="{SECURE}" psk="{PSK}"')
        for name in ("a", "b"):
            site.wait_applied(name, not_version=before[name])
