"""Issue 4, lifecycle on the wire: filters, edits, a dead charon and a restarted agent, with strongSwan.

Its own site (test_enforce_netns.Site: LAN, policy server, real agents; on a LAN and subnet of its own),
so this module and test_enforce_netns run side by side under pytest-xdist. a runs "Client (Respond
Only)", b "Secure Server (Require Security)" (PSK instead of Kerberos). Every test starts from that and
puts back what it changes, so any subset runs in any worker.

- block / permit / most specific: a netsh-made policy on b blocks "me ↔ any" (its first rule) and
  permits TCP to a's port 5001 and ICMP with a; the more specific permits win in both directions, the
  rest is dropped and counted on the block entry;
- an unrelated edit of b's policy (a block rule for 192.0.2.77 added, then removed) leaves the SAs with a
  up (same SPIs) and traffic flowing; so does deleting an *earlier* unrelated rule (connections are named
  after rule ids, not positions);
- a SIGKILLed charon is restarted by the agent with its connections, and protection resumes; a client
  speaking first after the crash gets through too (the agent re-negotiates with the peers it had SAs with);
- a stopped agent takes its filter table and charon with it; started again, it enforces the same version
  at once from its cache, the server confirms it, traffic is protected again;
- a workgroup agent given a Kerberos-only rule NACKs, and the fleet view says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RPC_TIMEOUT_S, admin_channel
from netns import Host, tshark_lines
from test_enforce_netns import (
    PSK,
    SECURE,
    TCP_SERVER,
    Site,
    cli,
    netsh,
    tcp,
    wait_until,
)
from test_enforce_netns import pytestmark as _netns_marks

from policyagent.agent.enforce import nft
from policyagent.agent.enforce.charon import ViciSession
from policyagent.pb import assign_grpc, assign_pb, fleet_pb

pytestmark = _netns_marks  # slow; skipped where strongSwan enforcement cannot run

OU_C = "OU=C,DC=corp,DC=example"
BLOCKED = "192.0.2.77"  # TEST-NET-1: no host on the LAN has it
OTHER_PORT = 5002


class LifecycleSite(Site):
    """test_enforce_netns.Site with helpers to move computers and read the charon of a host."""

    def move(self, name: str, ou: str) -> None:
        """Put computer `name` (once it has enrolled) in OU `ou`."""
        with admin_channel(self.address) as channel:
            stub = assign_grpc.AssignmentAdminStub(channel)

            def enrolled() -> assign_pb.Computer:
                topology = stub.GetTopology(assign_pb.GetTopologyRequest(), timeout=RPC_TIMEOUT_S)
                return {c.name: c for c in topology.computers}[name]  # KeyError until it has enrolled

            computer = wait_until(enrolled, f"{name} enrolled")
            computer.ou = ou
            stub.Apply(
                assign_pb.TopologyApplyRequest(
                    mutations=[assign_pb.TopologyMutation(put_computer=computer)], operation=f"place {name}"
                ),
                timeout=RPC_TIMEOUT_S,
            )

    def charon_pid(self, host: Host) -> int:
        return int((self.state_dir(host) / "charon" / "charon.pid").read_text().strip())

    def vici(self, host: Host, command: str) -> list[dict[str, Any]]:
        """A streamed VICI listing (list_sas, list_conns) of `host`'s charon, read to the end."""
        with ViciSession(self.charon_vici(host), 5.0) as session:
            return list(getattr(session, command)())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LifecycleSite]:
    s = LifecycleSite(tmp_path_factory.mktemp("lifecycle"))
    failed = request.session.testsfailed
    try:
        s.bring_up()
        s.b.popen([sys.executable, "-c", TCP_SERVER, "5001"], stdout=subprocess.DEVNULL)
        s.a.popen([sys.executable, "-c", TCP_SERVER, "5001"], stdout=subprocess.DEVNULL)
        s.a.popen([sys.executable, "-c", TCP_SERVER, str(OTHER_PORT)], stdout=subprocess.DEVNULL)
        for host, port in ((s.b, 5001), (s.a, 5001), (s.a, OTHER_PORT)):
            s.wait_listening(host, port)
        yield s
        if request.session.testsfailed > failed:
            s.dump_logs()
    except BaseException:
        s.dump_logs()
        raise
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------- helpers


def table_exists(host: Host) -> bool:
    return host.run(["nft", "list", "table", "inet", nft.DEFAULT_TABLE], check=False).returncode == 0


def block_entries(host: Host) -> set[str]:
    """Keys of the filter entries whose rules drop without asking for negotiation (BLOCK entries), as the
    rules' "pa:<key>" comments name them."""
    out = host.run(["nft", "-j", "list", "table", "inet", nft.DEFAULT_TABLE])
    found: set[str] = set()
    for item in json.loads(out.stdout)["nftables"]:
        rule = item.get("rule")
        comment = rule.get("comment", "") if isinstance(rule, dict) else ""
        if not isinstance(comment, str) or not comment.startswith(nft.ENTRY_COMMENT):
            continue
        exprs = [e for e in rule.get("expr", []) if isinstance(e, dict)]
        if any("drop" in e for e in exprs) and not any("log" in e for e in exprs):
            found.add(comment[len(nft.ENTRY_COMMENT) :])
    return found


def dropped(host: Host, entries: set[str]) -> int:
    """Packets counted on `entries` (keys as block_entries gives them)."""
    counters = {str(key): value for key, value in nft.entry_counters(netns=host.netns).items()}
    return sum(counters.get(key, (0, 0))[0] for key in entries)


def child_spis(site: LifecycleSite, host: Host) -> set[tuple[str, str, str, str]]:
    """(IKE SA, its SPIs, CHILD_SA inbound SPI, outbound SPI) of every established CHILD_SA of `host`."""
    out: set[tuple[str, str, str, str]] = set()
    for entry in site.vici(host, "list_sas"):
        for ike_name, ike in entry.items():
            ike_spis = f"{_text(ike.get('initiator-spi'))}/{_text(ike.get('responder-spi'))}"
            for child in (ike.get("child-sas") or {}).values():
                if _text(child.get("state")) == "INSTALLED":
                    out.add((str(ike_name), ike_spis, _text(child.get("spi-in")), _text(child.get("spi-out"))))
    return out


def conn_names(site: LifecycleSite, host: Host) -> set[str]:
    return {str(name) for entry in site.vici(host, "list_conns") for name in entry}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def fleet_agent(site: LifecycleSite, name: str) -> fleet_pb.FleetAgent:
    return site.fleet()[name]


def protected_tcp(site: LifecycleSite, src: Host, dst: Host, payload: str) -> None:
    """TCP src → dst:5001 works, ESP is on b's wire and none of the payload crosses it in clear."""
    with site.b.capture("udp port 4500 or tcp port 5001") as pcap:
        out = tcp(src, dst.ip, 5001, payload, timeout=10)
    assert out.startswith("OK"), out
    # One tshark pass: ESP packets carry an SPI; anything else it shows carried payload in clear.
    seen = tshark_lines(pcap, f'esp or tcp.payload or frame contains "{payload}"', fields=["esp.spi", "frame.number"])
    assert any(not line.startswith("\t") for line in seen), "no ESP on the wire"
    clear = [line for line in seen if line.startswith("\t")]
    assert clear == [], f"frames with payload in clear: {clear}"


def tcp_ok(src: Host, dst: Host, payload: str) -> None:
    """TCP src → dst:5001 works (protected or not)."""
    out = tcp(src, dst.ip, 5001, payload, timeout=10)
    assert out.startswith("OK"), f"{src.name} → {dst.name}: {out}"


def secure_version(site: LifecycleSite) -> str:
    """b's applied version, which must be its Secure Server one (as the site starts, and every test leaves it)."""
    agent = fleet_agent(site, "b")
    assert agent.state == fleet_pb.AGENT_STATE_IN_SYNC, agent.state
    assert "Secure Server" in agent_policy(site, "b"), "b is not on Secure Server"
    return agent.applied_version


def agent_policy(site: LifecycleSite, name: str) -> str:
    """The name of the policy `name`'s agent last applied (from its log)."""
    applied = [r for r in _log_records(site, name) if r.get("message", "").startswith("policy applied")]
    assert applied, f"{name} applied nothing yet"
    return str(applied[-1].get("policy", ""))


def _log_records(site: LifecycleSite, name: str, offset: int = 0) -> list[dict[str, Any]]:
    with (site.base / f"agent-{name}.log").open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def back_to_secure(site: LifecycleSite, version: str) -> None:
    """GPO-B back to Secure Server (whatever it holds now), and b back on `version`."""
    cli("gpo", "set", "GPO-B", "--policy", SECURE, "-r", site.address)

    def applied() -> None:
        agent = fleet_agent(site, "b")
        assert agent.state == fleet_pb.AGENT_STATE_IN_SYNC and agent.applied_version == version, agent.state

    wait_until(applied, "b back on Secure Server")


def static(site: LifecycleSite, line: str) -> None:
    """netsh ipsec static `line` against the site's server."""
    netsh(site.address, f"ipsec static {line}")


@contextlib.contextmanager
def restoring(site: LifecycleSite, *undo: str | Callable[[], object]) -> Iterator[None]:
    """Undo after the block: netsh lines or callables, in order. When the block failed, every step is tried
    (best effort) and the block's error is the one raised."""
    try:
        yield
    except BaseException:
        for step in undo:
            with contextlib.suppress(Exception):
                _run(site, step)
        raise
    for step in undo:
        _run(site, step)


def _run(site: LifecycleSite, step: str | Callable[[], object]) -> None:
    if isinstance(step, str):
        static(site, step)
    else:
        step()


# ---------------------------------------------------------------------------------------------- tests


def test_block_permit_and_most_specific_filter_win_through_the_agent(site: LifecycleSite) -> None:
    a, b = site.a, site.b
    secure = secure_version(site)
    # The block rule comes first: the more specific permits win anyway (filter weights, not rule order).
    with restoring(
        site,
        lambda: back_to_secure(site, secure),
        'delete policy name="Filters"',
        'delete filterlist name="Filters: me to any"',
        'delete filterlist name="Filters: me to a tcp 5001"',
        'delete filterlist name="Filters: icmp with a"',
        'delete filteraction name="Filters: block"',
    ):
        for line in (
            'add policy name="Filters" activatedefaultrule=no',
            'add filterlist name="Filters: me to any"',
            'add filter filterlist="Filters: me to any" srcaddr=me dstaddr=any mirrored=yes',
            'add filterlist name="Filters: me to a tcp 5001"',
            f'add filter filterlist="Filters: me to a tcp 5001" srcaddr=me dstaddr={a.ip} protocol=TCP dstport=5001 mirrored=yes',
            'add filterlist name="Filters: icmp with a"',
            f'add filter filterlist="Filters: icmp with a" srcaddr=me dstaddr={a.ip} protocol=ICMP mirrored=yes',
            'add filteraction name="Filters: block" action=block',
            'add rule name="Block all" policy="Filters" filterlist="Filters: me to any" filteraction="Filters: block"',
            'add rule name="Permit a 5001" policy="Filters" filterlist="Filters: me to a tcp 5001" filteraction="Permit"',
            'add rule name="Permit icmp a" policy="Filters" filterlist="Filters: icmp with a" filteraction="Permit"',
        ):
            static(site, line)
        site.assign("GPO-B", "Filters")
        blocks = block_entries(b)
        assert blocks, "no block entry in b's filter table"
        before = dropped(b, blocks)

        # b → a:5001 matches "me → a tcp/5001", a's answer (a:5001 → b) its mirror: permitted, in clear.
        with b.capture("tcp port 5001 or udp port 500 or udp port 4500") as pcap:
            out = tcp(b, a.ip, 5001, "permitted-5001")
        assert out.startswith("OK"), out
        assert tshark_lines(pcap, 'frame contains "permitted-5001"'), "permitted traffic should travel in clear"
        assert not tshark_lines(pcap, "isakmp or esp"), "a permit rule must not negotiate"
        assert b.ping(a.ip, count=2), "ICMP with a is permitted"
        assert a.ping(b.ip, count=2), "ICMP with a is permitted (mirrored)"
        assert dropped(b, blocks) == before, "permitted traffic counted on a block entry"

        # Everything else from or to b hits "me ↔ any": blocked (silently: the connection times out).
        other = tcp(b, a.ip, OTHER_PORT, "blocked-port", timeout=1.5)
        assert other.startswith("FAIL") and "timed out" in other, other
        # a → b:5001 is neither "b → a:5001" nor its mirror (a's source port is not 5001): blocked on input.
        inbound = tcp(a, b.ip, 5001, "blocked-direction", timeout=1.5)
        assert inbound.startswith("FAIL") and "timed out" in inbound, inbound
        after = dropped(b, blocks)
        assert after >= before + 2, f"block entries {sorted(blocks)} counted {before} → {after} packets"
    assert not block_entries(b), "Secure Server has no block entry"


def test_editing_one_rule_leaves_established_sas_up(site: LifecycleSite) -> None:
    a, b = site.a, site.b
    tcp_ok(a, b, "before-edit")
    spis = wait_until(lambda: _nonempty(child_spis(site, b)), "b has an established CHILD_SA with a")
    assert any(a.ip in name for name, *_ in spis), spis

    version = secure_version(site)
    with restoring(
        site,
        f'delete rule name="Block 192.0.2.77" policy="{SECURE}"',
        'delete filterlist name="Lifecycle: me to 192.0.2.77"',
        'delete filteraction name="Lifecycle: block"',
    ):
        for line in (
            'add filterlist name="Lifecycle: me to 192.0.2.77"',
            f'add filter filterlist="Lifecycle: me to 192.0.2.77" srcaddr=me dstaddr={BLOCKED}',
            'add filteraction name="Lifecycle: block" action=block',
            f'add rule name="Block 192.0.2.77" policy="{SECURE}" filterlist="Lifecycle: me to 192.0.2.77" '
            'filteraction="Lifecycle: block"',
        ):
            static(site, line)
        edited = site.wait_applied("b", not_version=version)
        assert edited != version
        assert block_entries(b), "the new block rule is in b's filter table"

        assert child_spis(site, b) == spis, "the edit replaced SAs it had nothing to do with"
        out = tcp(a, b.ip, 5001, "after-edit")
        assert out.startswith("OK"), out
        assert child_spis(site, b) == spis
    restored = site.wait_applied("b", not_version=edited)
    assert restored == version, "b's policy is not back as it was"
    assert not block_entries(b)
    assert child_spis(site, b) == spis, "removing the rule again replaced unrelated SAs"


def test_deleting_an_earlier_unrelated_rule_leaves_established_sas_up(site: LifecycleSite) -> None:
    """Rule numbers shift when an earlier rule goes; the negotiate rule's connection must not change with them."""
    a, b = site.a, site.b
    secure = secure_version(site)
    with restoring(
        site,
        lambda: back_to_secure(site, secure),
        'delete policy name="Layered"',
        'delete filterlist name="Layered: me to 192.0.2.77"',
        'delete filteraction name="Layered: block"',
    ):
        for line in (
            'add policy name="Layered"',
            f'set defaultrule policy="Layered" psk="{PSK}"',
            'add filterlist name="Layered: me to 192.0.2.77"',
            f'add filter filterlist="Layered: me to 192.0.2.77" srcaddr=me dstaddr={BLOCKED}',
            'add filteraction name="Layered: block" action=block',
            'add rule name="Block 192.0.2.77" policy="Layered" filterlist="Layered: me to 192.0.2.77" '
            'filteraction="Layered: block"',
            'add rule name="Require all" policy="Layered" filterlist="All IP Traffic" filteraction="Require Security" '
            f'psk="{PSK}"',
        ):
            static(site, line)
        site.assign("GPO-B", "Layered")
        tcp_ok(a, b, "layered-before")
        spis = wait_until(lambda: _nonempty(child_spis(site, b)), "b has an established CHILD_SA with a")
        conns = conn_names(site, b)

        version = fleet_agent(site, "b").applied_version
        static(site, 'delete rule name="Block 192.0.2.77" policy="Layered"')  # "Require all" is now rule 1
        site.wait_applied("b", not_version=version)
        assert not block_entries(b)
        assert child_spis(site, b) == spis, (
            f"deleting an unrelated rule replaced the SAs with a (connections {sorted(conns)} → "
            f"{sorted(conn_names(site, b))})"
        )
        tcp_ok(a, b, "layered-after")


def _nonempty(value: set[Any]) -> set[Any]:
    assert value, "none yet"
    return value


def kill_charon(site: LifecycleSite, host: Host) -> None:
    """SIGKILL `host`'s charon; return once its agent has started a new one with the same connections loaded
    (per-peer instances aside: they come back on demand)."""
    loaded = {n for n in conn_names(site, host) if "@" not in n}
    assert loaded, f"{host.name}'s charon holds no connection"
    old = site.charon_pid(host)
    started = time.monotonic()
    os.kill(old, signal.SIGKILL)

    def restarted() -> int:
        pid = site.charon_pid(host)
        assert pid != old, "still the old pid"
        assert conn_names(site, host) >= loaded, "connections not reloaded yet"
        return pid

    new = wait_until(restarted, "the agent restarts charon and reloads its connections", timeout=10)
    assert time.monotonic() - started < 10
    assert Path(f"/proc/{new}").exists()
    assert table_exists(host)


def test_agent_restarts_a_killed_charon_and_protection_resumes(site: LifecycleSite) -> None:
    a, b = site.a, site.b
    tcp_ok(a, b, "before-kill")
    kill_charon(site, b)
    # b's new charon knows nothing of its old SAs: b's own traffic to a negotiates afresh (the new IKE SA
    # replaces a's stale one), then a → b is protected again too.
    tcp_ok(b, a, "after-kill-b-to-a")
    protected_tcp(site, a, b, "after-kill-a-to-b")
    assert fleet_agent(site, "b").state == fleet_pb.AGENT_STATE_IN_SYNC


def test_a_client_reaches_b_again_after_b_s_charon_crashed(site: LifecycleSite) -> None:
    a, b = site.a, site.b
    tcp_ok(a, b, "before-crash")
    kill_charon(site, b)
    try:
        out = tcp(a, b.ip, 5001, "client-first-after-crash", timeout=4)
        assert out.startswith("OK"), f"a → b after b's charon crashed: {out}"
    finally:
        # Put things right for the next tests: b speaking first replaces a's stale SA.
        back = tcp(b, a.ip, 5001, "recover", timeout=10)
        assert back.startswith("OK"), back
        again = tcp(a, b.ip, 5001, "recovered", timeout=10)
        assert again.startswith("OK"), again


def test_agent_restart_removes_then_reapplies_the_same_version(site: LifecycleSite) -> None:
    a, b = site.a, site.b
    version = secure_version(site)
    before = fleet_agent(site, "b")
    charon = site.charon_pid(b)
    assert table_exists(b)

    stopped_ms = int(time.time() * 1000)
    site.stop_agent(b)
    assert not table_exists(b), "the stopped agent left its filter table behind"
    wait_until(lambda: _gone(charon), "b's charon is gone with its agent", timeout=5)
    assert not site.charon_vici(b).exists()
    # b has no IPsec now: a (Respond Only) talks to it in clear.
    out = tcp(a, b.ip, 5001, "no-agent", timeout=10)
    assert out.startswith("OK"), out

    log = site.base / "agent-b.log"
    offset = log.stat().st_size
    site.start_agent(b)

    def back() -> fleet_pb.FleetAgent:
        agent = fleet_agent(site, "b")
        assert agent.online and agent.connected_since_unix_ms > before.connected_since_unix_ms, "not reconnected"
        assert agent.state == fleet_pb.AGENT_STATE_IN_SYNC, agent.state
        return agent

    again = wait_until(back, "b reconnects and is in sync", timeout=20)
    assert again.applied_version == version, "the restarted agent applied another version"
    journal = json.loads((site.state_dir(b) / "enforcer" / "journal.json").read_text())
    assert journal["started_unix_ms"] >= stopped_ms, "no apply since the restart"
    assert journal["version"] == version and journal["state"] == "applied", journal
    # It enforced its cached copy of that version at once, before the server answered.
    cached = [r for r in _log_records(site, "b", offset) if r.get("message") == "cached policy found"]
    assert cached and cached[0].get("version") == version, cached
    assert table_exists(b)
    assert site.charon_pid(b) != charon
    # The stopping charon deleted its SAs at a: a (the client) may speak first.
    protected_tcp(site, a, b, "after-restart-a-to-b")
    tcp_ok(b, a, "after-restart-b-to-a")


def _gone(pid: int) -> None:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return
    assert state == "Z", f"{pid} still running ({state})"


def test_workgroup_agent_nacks_a_kerberos_rule_and_says_why(site: LifecycleSite) -> None:
    c = site.lan.add_host("c")
    static(site, 'add policy name="Kerberos Only"')
    static(
        site,
        'add rule name="All IP, Kerberos" policy="Kerberos Only" filterlist="All IP Traffic" '
        'filteraction="Require Security" kerberos=yes',
    )
    cli("ou", "add", OU_C, "-r", site.address)
    cli("gpo", "add", "GPO-C", "--policy", "Kerberos Only", "-r", site.address)
    cli("gpo", "link", "GPO-C", f"ou:{OU_C}", "-r", site.address)
    site.start_agent(c, domain=None)
    try:
        unplaced = site.wait_applied("c")  # a workgroup member in no OU: nothing assigned, nothing refused
        site.move("c", OU_C)

        def nacked() -> fleet_pb.FleetAgent:
            agent = fleet_agent(site, "c")
            assert agent.desired_version and agent.desired_version != unplaced, "no new version yet"
            assert agent.last_nack_version == agent.desired_version, f"not NACKed: {agent.state}"
            return agent

        agent = wait_until(nacked, "c NACKs the Kerberos-only policy", timeout=20)
        assert agent.state == fleet_pb.AGENT_STATE_REJECTED
        assert agent.applied_version == unplaced
        reason = agent.last_nack_reason
        assert "Kerberos" in reason and "workgroup" in reason, reason
        assert "Kerberos Only" in reason, reason
        # The refused policy left nothing half-applied: c's filter table has no entry.
        assert not nft.entry_counters(netns=c.netns)
        # The others are untouched.
        fleet = site.fleet()
        assert fleet["a"].state == fleet["b"].state == fleet_pb.AGENT_STATE_IN_SYNC
    finally:
        site.stop_agent(c)
        cli("gpo", "delete", "GPO-C", "-r", site.address)
        static(site, 'delete policy name="Kerberos Only"')


def test_server_down_an_agent_restarted_enforces_its_cached_policy(site: LifecycleSite) -> None:
    """Last in the module: it stops the policy server for good."""
    a, b = site.a, site.b
    version = secure_version(site)
    assert site.server is not None
    site.server.close()
    site.stop_agent(b)
    log = site.base / "agent-b.log"
    offset = log.stat().st_size
    site.start_agent(b)

    def on_cache() -> None:
        cached = [r for r in _log_records(site, "b", offset) if r.get("message") == "cached policy found"]
        assert cached and cached[0].get("version") == version, cached
        assert table_exists(b), "no filter table yet"

    wait_until(on_cache, "b enforces its cached policy with the server down", timeout=20)
    journal = json.loads((site.state_dir(b) / "enforcer" / "journal.json").read_text())
    assert journal["version"] == version and journal["state"] == "applied", journal
    protected_tcp(site, a, b, "cached-policy-a-to-b")
