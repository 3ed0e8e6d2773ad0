"""`netsh ipsec dynamic` and `ipsecmon` against an agent socket.

These are client tests: a real gRPC aio server on a temporary unix socket serves a stub
`AgentLocal` with fixed, realistic answers (taken from a real agent enforcing "Secure Server
(Require Security)" between two namespaces); set config uses the agent's own DynamicConfig, and
the dynamic-mode policy RPCs the agent's own DynamicStore (its validation, without enforcement)
and its masking of pre-shared keys. What the real agent answers is covered by
tests/test_enforce_netns.py and tests/test_dynamic.py; the last test here runs netsh against real
agents once, when strongSwan and network namespaces are available.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from clients.ipsecmon import main as ipsecmon
from clients.netsh.main import main
from policyagent.agent.daemon import mask_dynamic
from policyagent.agent.enforce.dynamic import DynamicError, DynamicStore
from policyagent.agent.enforce.dynconfig import PROPERTIES, ConfigError, DynamicConfig
from policyagent.pb import agent_grpc, agent_pb, dist_pb, pb

A, B, C = "10.77.192.1", "10.77.192.2", "10.77.192.3"  # B is the computer the agent runs on
SECURE = "Secure Server (Require Security)"
RULE = "rule-7238523e70fa11d1864c14a300000000"
T0 = 1795802430200

MM = [
    ("active_acquire", "Active Acquire", 0), ("acquire_failures", "Acquire Failures", 0),
    ("authentication_failures", "Authentication Failures", 1), ("negotiation_failures", "Negotiation Failures", 0),
    ("total_acquire", "Total Acquire", 2), ("key_additions", "Key Additions", 2), ("key_updates", "Key Updates", 2),
    ("isadb_list_size", "ISADB List Size", 2), ("connection_list_size", "Connection List Size", 2),
    ("ike_main_modes", "IKE Main Mode", 2), ("ike_quick_modes", "IKE Quick Mode", 2),
    ("soft_associations", "Soft Associations", 0), ("invalid_packets_received", "Invalid Packets Received", 0),
]
QM = [
    ("active_security_associations", "Active Security Associations", 2), ("key_additions", "Key Additions", 2),
    ("key_deletions", "Key Deletions", 0), ("rekeys", "Rekeys", 0), ("active_tunnels", "Active Tunnels", 2),
    ("bad_spi_packets", "Bad SPI Packets", 0), ("packets_not_decrypted", "Packets Not Decrypted", 0),
    ("packets_not_authenticated", "Packets Not Authenticated", 0),
    ("packets_with_replay_detection", "Packets With Replay Detection", 0),
    ("confidential_bytes_sent", "Confidential Bytes Sent", 339),
    ("confidential_bytes_received", "Confidential Bytes Received", 326),
    ("authenticated_bytes_sent", "Authenticated Bytes Sent", 0),
    ("authenticated_bytes_received", "Authenticated Bytes Received", 0),
    ("transport_bytes_sent", "Transport Bytes Sent", 0), ("transport_bytes_received", "Transport Bytes Received", 0),
    ("bytes_sent_in_tunnels", "Bytes Sent In Tunnels", 339),
    ("bytes_received_in_tunnels", "Bytes Received In Tunnels", 326),
]
IKE = ["3des-sha1-modp1024", "3des-md5-modp1024", "des-sha1-modp768", "des-md5-modp768"]
ESP = ["3des-sha1", "3des-md5", "des-sha1", "des-md5"]


def _status() -> agent_pb.LocalStatus:
    return agent_pb.LocalStatus(
        computer="b", server="10.77.192.254:43977", connection="in sync", applied_version="238cee661b3d",
        applied_source="domain", enforcer="strongswan: enforcing with charon (kernel-libipsec) and nftables",
        enforces=True, policy_name=SECURE, capabilities=dist_pb.Capabilities(enforcer="strongswan", enforces=True),
        summary="applied version 238cee661b3d; server 10.77.192.254:43977: in sync",
    )


def _sas() -> agent_pb.SecurityAssociations:
    out = agent_pb.SecurityAssociations()
    for peer, cookies, spis, ts in (
        (A, ("4ce6d4ed46c9a312", "704f681169418e8c"), ("d58103fd", "b1f3d056"), ""),
        (C, ("1111222233334444", "5555666677778888"), ("c0ffee01", "c0ffee02"), "[udp/53]"),
    ):
        out.main_mode.add(
            connection=f"{RULE}@{peer}", state="ESTABLISHED", local_address=B, remote_address=peer, local_id=B,
            remote_id=peer, encryption="3DES_CBC", integrity="HMAC_SHA1_96", dh_group="MODP_1024",
            initiator_cookie=cookies[0], responder_cookie=cookies[1], initiator=peer == A,
            established_unix_ms=T0 + 651, reauth_in_s=26866, ike_version=1,
        )
        out.quick_mode.add(
            connection=f"{RULE}@{peer}", child=f"{RULE}-1", state="INSTALLED", mode="TUNNEL-in-UDP", protocol="ESP",
            encapsulated=True, local_address=B, remote_address=peer, local_ts=[f"{B}/32{ts}"],
            remote_ts=[f"{peer}/32{ts}"], encryption="3DES_CBC", integrity="HMAC_SHA1_96", spi_in=spis[0],
            spi_out=spis[1], bytes_in=326, bytes_out=339, packets_in=6, packets_out=6,
            installed_unix_ms=T0 + 651, rekey_in_s=2942, expires_in_s=3599,
        )
    return out


def _filters() -> agent_pb.Filters:
    out = agent_pb.Filters()
    label = f'policy "{SECURE}"/rule'
    add = out.filters.add
    add(key="33c09464ff9f", label=f'{label} 2 "All ICMP Traffic"/filter 1', verdict="permit", source=[f"{B}/32"],
        protocol=1, weight=516)
    add(key="b607d9bc3391", label=f'{label} 2 "All ICMP Traffic"/filter 1 (mirror)', verdict="permit",
        destination=[f"{B}/32"], protocol=1, weight=516)
    add(key="9a9a9a9a9a9a", label=f'{label} 3 "Telnet"/filter 1', verdict="block", source=["10.0.0.0/8"],
        destination=["192.168.5.0/24"], protocol=6, destination_port=23, weight=500, packets=3, bytes=180)
    add(key="cba2a5384900", label=f'{label} 1 "All IP Traffic"/filter 1', verdict="negotiate", source=[f"{B}/32"],
        weight=512, inbound_passthrough=True, connection=RULE, packets=7, bytes=399)
    add(key="37a489532803", label=f'{label} 1 "All IP Traffic"/filter 1 (mirror)', verdict="negotiate",
        destination=[f"{B}/32"], weight=512, inbound_passthrough=True, connection=RULE, packets=7, bytes=386)
    out.policies.add(name=RULE, label=f'{label} 1 "All IP Traffic"', ike_proposals=IKE, esp_proposals=ESP, auth="psk",
                     initiates=True, per_peer=True)
    out.policies.add(name="default-response", label=f'policy "{SECURE}"/default response rule', ike_proposals=IKE,
                     esp_proposals=ESP, auth="psk")
    out.exemptions.extend(["IKE: udp port 500", "IKE: udp port 4500", "policy server: tcp port 43977 with 10.77.192.254/32"])
    out.notes.append(f'{label} 1 "All IP Traffic": transport-mode rule(s) enforced as host-to-host tunnels')
    return out


def _events() -> list[agent_pb.AuditEvent]:
    out = []
    for n in range(7):  # oldest first, as the agent answers
        peer = f"10.77.192.{10 + n}"
        out.append(agent_pb.AuditEvent(
            id=541, time_unix_ms=T0 + 1000 * n, computer="b",
            fields={"Mode": "Key Exchange Mode (Main Mode)", "Peer Identity": f"ID {peer}; address {peer}"},
            message=f"Main mode security association established with {peer} ({RULE}@{peer}).",
        ))
    return out


class StubAgent(agent_grpc.AgentLocalServicer):
    """AgentLocal with fixed answers; GetStatistics adds `grow` bytes sent per call (for ipsecmon's changes)."""

    def __init__(self, state_dir: Path) -> None:
        self.config = DynamicConfig(state_dir)
        self.grow = 0
        self.since = T0
        self.calls = 0
        self.sas_error = ""
        self.dynamic = DynamicStore()
        self.edits: list[agent_pb.DynamicEdit] = []  # as received: pre-shared keys in clear
        self.enforce_error = ""  # set: EditDynamic fails as the agent does when it cannot enforce
        self.older = False  # an agent from before dynamic-mode policy

    async def GetStatus(self, request: agent_pb.LocalStatusRequest, context: Any) -> agent_pb.LocalStatus:
        return _status()

    async def GetEffectivePolicy(self, request: agent_pb.LocalPolicyRequest, context: Any) -> dist_pb.EffectivePolicy:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no policy is applied on this computer")
        raise AssertionError("unreachable")

    async def GetStatistics(self, request: agent_pb.StatisticsRequest, context: Any) -> agent_pb.IpsecStatistics:
        extra = self.grow * self.calls
        self.calls += 1
        out = agent_pb.IpsecStatistics(ipsec_active=True, policy_name=SECURE, enforcer=_status().enforcer,
                                       since_unix_ms=self.since, time_unix_ms=int(time.time() * 1000))
        for key, name, value in MM:
            out.main_mode.add(key=key, name=name, value=value)
        for key, name, value in QM:
            out.quick_mode.add(key=key, name=name, value=value + (extra if key == "confidential_bytes_sent" else 0))
        return out

    async def ListAuditEvents(self, request: agent_pb.AuditEventsRequest, context: Any) -> agent_pb.AuditEvents:
        events = [e for e in _events() if e.time_unix_ms >= request.since_unix_ms]
        return agent_pb.AuditEvents(events=events[: request.limit or 1000])

    async def ListSecurityAssociations(
        self, request: agent_pb.SecurityAssociationsRequest, context: Any
    ) -> agent_pb.SecurityAssociations:
        if self.sas_error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot read the security associations: {self.sas_error}")
        return _sas()

    async def ListFilters(self, request: agent_pb.FiltersRequest, context: Any) -> agent_pb.Filters:
        return _filters()

    def _values(self) -> agent_pb.AgentConfigValues:
        out = agent_pb.AgentConfigValues()
        for p in PROPERTIES:
            out.values.add(name=p.name, value=self.config.values[p.name], pending=self.config.pending.get(p.name, ""),
                           description=p.description, applies_at_once=p.at_once)
        return out

    async def GetConfig(self, request: agent_pb.ConfigRequest, context: Any) -> agent_pb.AgentConfigValues:
        return self._values()

    async def SetConfig(self, request: agent_pb.SetConfigRequest, context: Any) -> agent_pb.AgentConfigValues:
        try:
            self.config.set(request.name, request.value)
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self._values()

    # Dynamic mode as the agent serves it (daemon.AgentLocalServicer), minus enforcement.
    async def GetDynamic(self, request: agent_pb.DynamicRequest, context: Any) -> agent_pb.DynamicState:
        if self.older:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        return mask_dynamic(self.dynamic.state)

    async def EditDynamic(self, request: agent_pb.DynamicEdit, context: Any) -> agent_pb.DynamicState:
        self.edits.append(request)
        try:
            new = self.dynamic.edit(request)
        except DynamicError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from None
        if self.enforce_error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot be enforced here: {self.enforce_error}")
        self.dynamic.commit(new)
        return mask_dynamic(new)


@dataclass
class Agent:
    socket: Path
    stub: StubAgent


@pytest.fixture
def agent() -> Iterator[Agent]:
    # A short directory: a unix socket path must fit in 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="pa-dyn-"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="stub-agent", daemon=True)
    thread.start()
    stub = StubAgent(base)
    path = base / "agent.sock"

    async def start() -> aio.Server:
        server = aio.server()
        agent_grpc.add_AgentLocalServicer_to_server(stub, server)
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield Agent(path, stub)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Run:
    code: int
    out: str
    err: str


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


@pytest.fixture
def netsh(agent: Agent, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    def dyn(*words: str, json_output: bool = False) -> Run:
        options = ["--json"] if json_output else []
        return run(capsys, "-r", f"unix:{agent.socket}", *options, "ipsec", "dynamic", *words)

    yield dyn


def ok(result: Run) -> Run:
    assert result.code == 0, result.err
    assert result.err == ""
    return result


def fails(result: Run, message: str, code: int = 1) -> Run:
    assert result.code == code, (result.out, result.err)
    assert result.err.count("\n") == 1, result.err
    assert message in result.err, result.err
    assert "Traceback" not in result.err
    return result


def block(text: str, title: str) -> list[str]:
    """The lines of one titled block (up to the next blank line)."""
    lines = text.splitlines()
    start = lines.index(title) + 2  # the title and its dashes
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


# ------------------------------------------------------------------ show stats


def test_show_stats_prints_both_blocks_with_the_agents_counters_in_order(netsh: Any) -> None:
    out = ok(netsh("show", "stats")).out
    mm = block(out, "IKE Main Mode Statistics")
    qm = block(out, "IPSec Quick Mode Statistics")
    assert "IKE Main Mode Statistics\n------------------------\n" in out
    assert [line.split(":")[0].rstrip() for line in mm] == [name for _, name, _ in MM]
    assert [line.split(":")[0].rstrip() for line in qm] == [name for _, name, _ in QM]
    assert "Active Acquire                 : 0" in mm
    assert "Authentication Failures        : 1" in mm
    assert "Confidential Bytes Received    : 326" in qm
    assert "Key Additions                  : 2" in qm


def test_show_stats_type_and_abbreviations(netsh: Any) -> None:
    ike = ok(netsh("sh", "st", "type=ike")).out
    assert "IKE Main Mode Statistics" in ike and "IPSec Quick Mode Statistics" not in ike
    ipsec = ok(netsh("SH", "ST", "IPSEC")).out  # positional type, any case
    assert "IPSec Quick Mode Statistics" in ipsec and "IKE Main Mode Statistics" not in ipsec
    assert ok(netsh("show", "stats", "ty=ip")).out == ipsec  # abbreviated tag and choice
    fails(netsh("show", "stats", "type=esp"), "type")


def test_ambiguous_and_unknown_commands_are_usage_errors(netsh: Any) -> None:
    fails(netsh("sh", "mm"), 'ambiguous show command "mm": could be mmfilter, mmpolicy, mmsas', code=2)
    fails(netsh("show", "frobs"), 'unknown show command "frobs"', code=2)
    fails(netsh("show", "mmsas", "color=red"), 'unknown tag for "show mmsas" "color"', code=2)


# ------------------------------------------------------------------ security associations


def test_show_mmsas_lists_each_sa_like_windows(netsh: Any) -> None:
    out = ok(netsh("show", "mmsas")).out
    assert out.startswith("Main Mode SAs at ")
    for line in (
        f"Connection                   : {RULE}@{A}",
        f"Source (Me)                  : {B}",
        f"Destination (Peer)           : {A}",
        f"Destination ID               : {A}",
        "Authentication Mode          : Preshared key",  # from the connection's policy (ListFilters)
        "Encryption                   : 3DES_CBC",
        "Integrity                    : HMAC_SHA1_96",
        "Diffie-Hellman Group         : MODP_1024",
        "Cookie Pair                  : 4ce6d4ed46c9a312:704f681169418e8c",
        "Key Exchange                 : IKEv1 (main mode)",
        "Reauthentication In          : 26866 seconds",
    ):
        assert line in out.splitlines(), line
    assert out.rstrip().endswith("Number of Main Mode SAs: 2")


def test_show_mmsas_filters_by_address(netsh: Any) -> None:
    out = ok(netsh("show", "mmsas", f"dstaddr={C}")).out
    assert f"Destination (Peer)           : {C}" in out and f": {A}\n" not in out
    assert "Number of Main Mode SAs: 1" in out
    assert "Number of Main Mode SAs: 2" in ok(netsh("show", "mmsas", "all", f"srcaddr={B}")).out
    none = ok(netsh("show", "mmsas", f"srcaddr={A}")).out  # A is the peer, never the source
    assert "No main mode SAs." in none and "Number of Main Mode SAs: 0" in none
    fails(netsh("show", "mmsas", "srcaddr=300.1.1.1"), "srcaddr")


def test_show_qmsas_list_and_table(netsh: Any) -> None:
    out = ok(netsh("show", "qmsas")).out
    lines = out.splitlines()
    assert out.startswith("Quick Mode SAs at ")
    assert "Tunnel Filter" in lines
    for line in (
        f"Source Address               : {B}/32",
        f"Destination Address          : {A}/32",
        f"Tunnel Destination           : {A}",
        "Mode                         : Tunnel in UDP 4500 (ESP-in-UDP encapsulation)",
        "Security Protocol            : ESP",
        "Offer Used                   : 3DES_CBC / HMAC_SHA1_96",
        "Inbound SPI                  : d58103fd",
        "Outbound SPI                 : b1f3d056",
        "Bytes Received               : 326 (6 packets)",
        "Bytes Sent                   : 339 (6 packets)",
        "Rekey In                     : 2942 seconds",
        "Expires In                   : 3599 seconds",
        "Protocol                     : UDP",  # the SA with C carries udp/53 only
    ):
        assert line in lines, line
    table = ok(netsh("sh", "qms", "format=table")).out.splitlines()
    header = next(line for line in table if line.startswith("Source"))
    assert "SPI In" in header and "Bytes Out" in header
    assert any("d58103fd" in line and "b1f3d056" in line and "339" in line for line in table)


def test_show_qmsas_filters_by_address_and_protocol(netsh: Any) -> None:
    only_c = ok(netsh("show", "qmsas", f"dstaddr={C}")).out
    assert "c0ffee01" in only_c and "d58103fd" not in only_c
    tcp = ok(netsh("show", "qmsas", "protocol=tcp")).out  # the ANY SA carries TCP; the udp/53 one does not
    assert "d58103fd" in tcp and "c0ffee01" not in tcp
    assert "Number of Quick Mode SAs: 2" in ok(netsh("show", "qmsas", "protocol=udp")).out
    subnet = ok(netsh("show", "qmsas", "dstaddr=10.9.0.0")).out
    assert "No quick mode SAs." in subnet


# ------------------------------------------------------------------ filters


def test_show_mmfilter_lists_negotiating_filters_with_their_main_mode_policy(netsh: Any) -> None:
    out = ok(netsh("show", "mmfilter")).out
    lines = out.splitlines()
    assert lines[0] == "Main Mode Filters: Generic"
    assert "Filter Name                  : cba2a5384900" in lines
    assert "33c09464ff9f" not in out  # a permit filter negotiates nothing
    assert f"Main Mode Policy             : {RULE}" in lines
    assert "Authentication Methods       : Preshared key" in lines
    assert "Security Methods             : 3DES-SHA1-2  (3des-sha1-modp1024)" in lines
    assert any(line.strip() == "DES-MD5-1  (des-md5-modp768)" for line in lines)
    assert "Weight                       : 512" in lines
    assert "2 Generic Filter(s)" in lines
    assert any(line.startswith("Main mode policy default-response answers peers") for line in lines)
    specific = ok(netsh("show", "mmfilter", "type=specific")).out
    assert specific.startswith("Main Mode Filters: Specific") and "one per host address" in specific
    assert "2 Specific Filter(s)" in specific


def test_show_qmfilter_lists_every_filter_with_its_action(netsh: Any) -> None:
    out = ok(netsh("show", "qmfilter")).out
    lines = out.splitlines()
    assert lines[0] == "Quick Mode Filters: Generic"
    names = [line.split(": ", 1)[1] for line in lines if line.startswith("Filter Name")]
    assert names == ["33c09464ff9f", "b607d9bc3391", "9a9a9a9a9a9a", "cba2a5384900", "37a489532803"]  # agent's order
    assert "Action                       : PERMIT" in lines
    assert "Action                       : BLOCK" in lines
    assert "Action                       : NEGOTIATE SECURITY" in lines
    assert "Inbound Pass-through         : YES" in lines
    assert "Fallback To Clear            : NO" in lines
    assert "Destination Port             : 23" in lines
    assert "Protocol                     : ICMP" in lines
    assert "Destination Address          : <Any IP Address>" in lines
    assert "Security Methods             : ESP[3DES,SHA1]  (3des-sha1)" in lines
    assert "Packets Matched              : 7 (399 bytes)" in lines
    assert "5 Generic Filter(s)" in lines
    assert "  IKE: udp port 4500" in lines and any("host-to-host tunnels" in line for line in lines)


def test_show_qmfilter_selects_by_address_name_and_port(netsh: Any) -> None:
    def names(*words: str) -> list[str]:
        out = ok(netsh("show", "qmfilter", *words)).out
        return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("Filter Name")]

    # Traffic from 192.168.1.1: only the filters whose source is any address match it.
    assert names("srcaddr=192.168.1.1") == ["b607d9bc3391", "37a489532803"]
    assert names("srcaddr=10.1.2.3", "dstaddr=192.168.5.7") == ["9a9a9a9a9a9a"]
    assert names("srcaddr=10.1.0.0", "srcmask=255.255.0.0", "dstaddr=192.168.5.0", "dstmask=24") == ["9a9a9a9a9a9a"]
    assert names("name=All ICMP Traffic") == ["33c09464ff9f", "b607d9bc3391"]
    assert names("cba2a5384900") == ["cba2a5384900"]  # positional name = the filter's key
    assert "9a9a9a9a9a9a" not in names("dstport=80")
    assert names("all", "protocol=icmp") == ["33c09464ff9f", "b607d9bc3391", "cba2a5384900", "37a489532803"]
    fails(netsh("show", "qmfilter", "name=Nothing Like It"), 'there is no quick mode filter named "Nothing Like It"')
    fails(netsh("show", "mmfilter", "srcmask=24"), "srcmask= needs srcaddr=")


def show_values(text: str, label: str) -> list[str]:
    """The value of every `label : value` line (first lines only)."""
    return [line.split(" : ", 1)[1] for line in text.splitlines() if line.startswith(label + " ") and " : " in line]


def field_block(text: str, label: str) -> list[str]:
    """A `label : v1` line and its continuation lines (a list value), as values."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(label + " "))
    values = [lines[start].split(" : ", 1)[1]]
    indent = lines[start].index(" : ") + 3
    for line in lines[start + 1 :]:
        if not line.startswith(" " * indent) or not line.strip():
            break
        values.append(line.strip())
    return values


# ------------------------------------------------------------------ dynamic-mode policy


def test_add_mmpolicy_with_the_static_defaults_and_with_explicit_methods(netsh: Any, agent: Agent) -> None:
    ok(netsh("add", "mmpolicy", "name=defaults"))
    policy = agent.stub.dynamic.state.mm_policies[0]
    assert (policy.qm_per_mm, policy.mm_lifetime_minutes, policy.soft_sa_expiration_s) == (0, 480, 300)
    assert [(m.encryption, m.integrity, m.dh_group) for m in policy.methods] == [
        (pb.CIPHER_3DES, pb.INTEGRITY_SHA1, pb.DH_GROUP_MODP1024), (pb.CIPHER_3DES, pb.INTEGRITY_MD5, pb.DH_GROUP_MODP1024),
        (pb.CIPHER_DES, pb.INTEGRITY_SHA1, pb.DH_GROUP_MODP768), (pb.CIPHER_DES, pb.INTEGRITY_MD5, pb.DH_GROUP_MODP768),
    ]  # the static `add policy` default: 3DES-SHA1-2 3DES-MD5-2 DES-SHA1-1 DES-MD5-1
    # The public script's line (windows-ipsec.md §3.3): abbreviated command, tags and all.
    ok(netsh("add", "mmp", "name=mmp", "qmpermm=10", "mmlifetime=300", "softsa=20", "mmsec=3DES-SHA1-3 DES-SHA1-2 3DES-MD5-3"))
    out = ok(netsh("show", "mmpolicy", "name=MMP")).out  # names compare as the agent compares them
    assert out.splitlines()[:2] == ["Main Mode Policies", "-" * 72]
    assert show_values(out, "Policy Name") == ["mmp"]
    assert show_values(out, "Soft SA Expiration Time") == ["20 seconds"]
    assert show_values(out, "Main Mode Life Time") == ["300 minutes"]
    assert show_values(out, "Quick Modes Per Main Mode") == ["10"]
    assert field_block(out, "Security Methods") == ["3DES-SHA1-3", "DES-SHA1-2", "3DES-MD5-3"]
    assert show_values(out, "Used By") == ["no rule"] and "Number of Main Mode Policies: 1" in out
    both = ok(netsh("sh", "mmp")).out
    assert show_values(both, "Policy Name") == ["defaults", "mmp"]
    assert field_block(both, "Security Methods") == ["3DES-SHA1-2", "3DES-MD5-2", "DES-SHA1-1", "DES-MD5-1"]
    assert show_values(both, "Quick Modes Per Main Mode")[0] == "unlimited"
    doc = json.loads(ok(netsh("show", "mmpolicy", "mmp", json_output=True)).out)
    assert [p["name"] for p in doc["mm_policies"]] == ["mmp"] and doc["mm_policies"][0]["qm_per_mm"] == 10


def test_add_qmpolicy_with_pfsgroup_and_soft(netsh: Any, agent: Agent) -> None:
    ok(netsh("add", "qmpolicy", "name=plain"))
    ok(netsh("add", "qmp", "strong", "pfs=grp3", "soft=yes", "qmsec=ESP[AES128,SHA1]:50000k/1800s AH[SHA1]"))
    ok(netsh("add", "qmpolicy", "name=mm", "pfsgroup=GRPMM"))
    plain, strong, mm = agent.stub.dynamic.state.qm_policies
    assert (plain.soft, plain.pfs_group, len(plain.methods)) == (False, "", 4)  # defaults: no, NOPFS, 4 ESP methods
    assert (strong.soft, strong.pfs_group, mm.pfs_group) == (True, "3", "mm")
    assert (strong.methods[0].lifetime_kb, strong.methods[0].lifetime_seconds) == (50_000, 1_800)
    assert strong.methods[1].HasField("ah") and not strong.methods[1].HasField("esp")
    out = ok(netsh("show", "qmpolicy", "strong")).out
    assert out.splitlines()[0] == "Quick Mode Policies"
    assert show_values(out, "Fall Back to Clear (soft)") == ["YES"]
    assert show_values(out, "PFS Group") == ["GRP3 (2048-bit)"]
    assert field_block(out, "Security Methods") == ["ESP[AES128,SHA1]:50000k/1800s", "AH[SHA1]:100000k/3600s"]
    shown = ok(netsh("show", "qmpolicy")).out
    assert show_values(shown, "PFS Group") == ["NOPFS (no PFS)", "GRP3 (2048-bit)", "GRPMM (the main mode group)"]
    assert field_block(shown, "Security Methods")[0] == "ESP[3DES,SHA1]:100000k/3600s"
    fails(netsh("add", "qmpolicy", "x", "pfsgroup=grp9"), 'pfsgroup: "grp9" is not one of grp1, grp2, grp3, grpmm, nopfs')


def _policies(netsh: Any) -> None:
    ok(netsh("add", "mmpolicy", "mmp"))
    ok(netsh("add", "qmpolicy", "qmp"))


def test_add_rule_with_each_action_and_a_masked_psk(netsh: Any, agent: Agent) -> None:
    _policies(netsh)
    ok(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=MMP", "qmpolicy=qmp", "psk=s3cret key"))
    ok(netsh("add", "rule", "srcaddr=me", "dstaddr=10.0.0.0", "dstmask=8", "mmpolicy=mmp", "protocol=tcp",
             "dstport=23", "actioninbound=block", "actionoutbound=permit", "conntype=lan"))
    ok(netsh("add", "rule", "srcaddr=any", "dstaddr=dns", "mmpolicy=mmp", "protocol=udp", "dstport=53",
             "actioni=permit", "actiono=permit", "mirrored=no"))
    ok(netsh("add", "rule", "srcaddr=me", "dstaddr=any", "mmpolicy=mmp", "actioni=block", "actiono=block",
             "tunneldstaddress=10.9.9.9"))
    sent = agent.stub.edits[-4].add_rule
    assert sent.auth_methods[0].preshared_key.key == "s3cret key"  # the agent gets the key itself
    first, telnet, dns, tunnel = agent.stub.dynamic.state.rules
    assert (first.mm_policy, first.qm_policy) == ("mmp", "qmp")  # as the agent spells the policy
    assert (first.action_inbound, first.action_outbound) == (pb.ACTION_TYPE_NEGOTIATE, pb.ACTION_TYPE_NEGOTIATE)
    assert first.mirrored and first.connection_type == pb.CONNECTION_TYPE_ALL
    assert first.destination == pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=A)
    assert telnet.destination == pb.Address(kind=pb.ADDRESS_KIND_SUBNET, ip="10.0.0.0", mask="255.0.0.0")
    assert (telnet.action_inbound, telnet.action_outbound) == (pb.ACTION_TYPE_BLOCK, pb.ACTION_TYPE_PERMIT)
    assert telnet.auth_methods[0].HasField("kerberos")  # no method given: Kerberos, as a static rule
    assert telnet.connection_type == pb.CONNECTION_TYPE_LAN and (telnet.protocol, telnet.destination_port) == (6, 23)
    assert dns.destination.kind == pb.ADDRESS_KIND_DNS_SERVERS and not dns.mirrored
    assert tunnel.tunnel_endpoint == "10.9.9.9" and not tunnel.mirrored  # a tunnel rule defaults to one-way
    out = ok(netsh("show", "rule")).out
    assert "s3cret" not in out
    assert [line for line in out.splitlines() if line.startswith(("Transport Rule", "Tunnel Rule"))] == [
        "Transport Rule 1", "Transport Rule 2", "Transport Rule 3", "Tunnel Rule 4"]
    assert show_values(out, "Inbound Action") == ["NEGOTIATE SECURITY", "BLOCK", "PERMIT", "BLOCK"]
    assert show_values(out, "Outbound Action") == ["NEGOTIATE SECURITY", "PERMIT", "PERMIT", "BLOCK"]
    assert show_values(out, "Authentication Methods") == ["1. Preshared Key: ********", *["1. Kerberos"] * 3]
    assert show_values(out, "Destination Address") == [A, "10.0.0.0", "<DNS Servers>", "<Any IP Address>"]
    assert show_values(out, "Destination Mask")[:2] == ["255.255.255.255", "255.0.0.0"]
    assert show_values(out, "Connection Type") == ["ALL", "LAN", "ALL", "ALL"]
    assert show_values(out, "Quick Mode Policy") == ["qmp", "None", "None", "None"]
    assert show_values(out, "Tunnel Destination Address") == ["10.9.9.9"]
    assert show_values(out, "Mirrored") == ["YES", "YES", "NO", "NO"]
    assert "Number of Dynamic Rules: 4" in out
    doc = json.loads(ok(netsh("show", "rule", json_output=True)).out)
    assert doc["rules"][0]["auth_methods"] == [{"preshared_key": {"key": "********"}}]
    # show rule keeps the rules that have the values given, numbered as in the whole list
    assert show_values(ok(netsh("show", "rule", "type=tunnel")).out, "Main Mode Policy") == ["mmp"]
    assert "Tunnel Rule" not in ok(netsh("sh", "ru", "ty=trans")).out
    picked = ok(netsh("show", "rule", "dstaddr=10.0.0.0", "protocol=tcp")).out
    assert "Transport Rule 2" in picked and "Number of Dynamic Rules: 1" in picked
    assert "Transport Rule 1\n" in ok(netsh("show", "rule", f"dstaddr={A}", "dstmask=32")).out
    mms = ok(netsh("show", "mmpolicy")).out
    assert show_values(mms, "Used By") == ["4 rule(s)"]


def test_add_rule_refusals_are_one_line(netsh: Any, agent: Agent) -> None:
    _policies(netsh)
    fails(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp"),
          f"rule me→{A}: qmpolicy is required when an action is negotiate")  # the agent's words
    fails(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=nope", "qmpolicy=qmp"),
          f'rule me→{A}: mmpolicy: there is no main mode policy "nope"')
    fails(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "qmpolicy=qmp", "kerberos=no"),
          "give an authentication method (kerberos=, psk= or rootca=)")
    fails(netsh("add", "rule", "srcaddr=me", "dstaddr=me", "mmpolicy=mmp", "actioni=block", "actiono=block"),
          "rule me→me: dstaddr: source and destination are the same")  # the static validator's words
    fails(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "dstport=80", "actioni=block",
                "actiono=block"), "dstport: ports can only be given with protocol TCP or UDP")
    fails(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "qmpolicy=qmp", "psk=a", "psk=b"),
          "psk= is given more than once", code=2)
    fails(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "tunneldst=10.9.9.9", "mirrored=yes",
                "actioni=block", "actiono=block"), "tunnel rules cannot be mirrored")
    fails(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}"), '"add rule" needs mmpolicy=', code=2)
    fails(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "actioninbound=drop"),
          'actioninbound: "drop" is not one of permit, block, negotiate')
    ok(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "actioni=block", "actiono=block"))
    fails(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "actioni=permit", "actiono=permit"),
          "a rule with these filters exists already (use set rule)")
    agent.stub.enforce_error = "no usable authentication method: Kerberos (this agent has no keytab)"
    fails(netsh("add", "rule", "srcaddr=me", f"dstaddr={B}", "mmpolicy=mmp", "qmpolicy=qmp"),
          "cannot be enforced here: no usable authentication method: Kerberos")
    assert len(agent.stub.dynamic.state.rules) == 1  # nothing kept that was not enforced


def test_set_rule_changes_actions_policies_and_auth(netsh: Any, agent: Agent) -> None:
    _policies(netsh)
    ok(netsh("add", "mmpolicy", "other", "mmsec=AES128-SHA256-3"))
    ok(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "qmpolicy=qmp", "psk=first"))
    ok(netsh("set", "rule", "srcaddr=me", f"dstaddr={A}", "actioninbound=permit", "mmpolicy=OTHER"))
    (rule,) = agent.stub.dynamic.state.rules
    assert (rule.action_inbound, rule.action_outbound) == (pb.ACTION_TYPE_PERMIT, pb.ACTION_TYPE_NEGOTIATE)
    assert rule.mm_policy == "other" and rule.auth_methods[0].preshared_key.key == "first"  # auth kept
    ok(netsh("set", "rule", "srcaddr=me", f"dstaddr={A}", "kerberos=yes", "rootca=CN=Example Root certmap:yes"))
    (rule,) = agent.stub.dynamic.state.rules
    assert [m.WhichOneof("method") for m in rule.auth_methods] == ["kerberos", "certificate"]  # all replaced
    assert rule.auth_methods[1].certificate.cert_to_account_mapping
    out = ok(netsh("show", "rule")).out
    assert field_block(out, "Authentication Methods") == [
        "1. Kerberos", '2. Root CA: "CN=Example Root" (certmap: YES, excludecaname: NO)']
    ok(netsh("set", "rule", "srcaddr=me", f"dstaddr={A}", "actiono=block", "actioni=block"))
    assert show_values(ok(netsh("show", "rule")).out, "Outbound Action") == ["BLOCK"]
    fails(netsh("set", "rule", "srcaddr=me", f"dstaddr={A}", "protocol=tcp", "actioni=permit"),
          f"rule me→{A} protocol 6: no dynamic rule has these filters")
    fails(netsh("set", "rule", "srcaddr=me", f"dstaddr={A}"), '"set rule" needs something to change', code=2)
    fails(netsh("set", "rule", "srcaddr=me", f"dstaddr={A}", "kerberos=no"),
          "kerberos=no alone would leave the rule no authentication method")


def test_set_mmpolicy_and_qmpolicy_change_only_what_is_given(netsh: Any, agent: Agent) -> None:
    ok(netsh("add", "mmpolicy", "mmp", "qmpermm=5", "mmsec=AES256-SHA256-3"))
    ok(netsh("set", "mmpolicy", "MMP", "mmlifetime=60"))
    (mm,) = agent.stub.dynamic.state.mm_policies
    assert (mm.name, mm.qm_per_mm, mm.mm_lifetime_minutes, len(mm.methods)) == ("mmp", 5, 60, 1)
    ok(netsh("add", "qmpolicy", "qmp", "pfsgroup=grp2"))
    ok(netsh("set", "qmpolicy", "qmp", "soft=yes"))
    (qm,) = agent.stub.dynamic.state.qm_policies
    assert (qm.soft, qm.pfs_group, len(qm.methods)) == (True, "2", 4)
    fails(netsh("set", "mmpolicy", "nothing", "qmpermm=1"), 'there is no main mode policy "nothing"')
    fails(netsh("set", "mmpolicy", "mmp", "mmlifetime=1"), "mmlifetime: 1 is out of range (5–2 880 minutes)")
    fails(netsh("add", "mmpolicy", "mmp"), 'main mode policy "mmp" exists already (use set)')


def test_delete_rule_by_its_filters(netsh: Any, agent: Agent) -> None:
    _policies(netsh)
    ok(netsh("add", "rule", "srcaddr=me", "dstaddr=10.0.0.0", "dstmask=255.0.0.0", "mmpolicy=mmp",
             "protocol=tcp", "dstport=23", "actioni=block", "actiono=block"))
    ok(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "actioni=block", "actiono=block"))
    fails(netsh("delete", "rule", "srcaddr=me", "dstaddr=10.0.0.0", "dstmask=8"),
          "rule me→10.0.0.0/255.0.0.0: no dynamic rule has these filters (show rule lists them)")
    ok(netsh("delete", "rule", "srcaddr=me", "dstaddr=10.0.0.0", "dstmask=8", "protocol=TCP", "dstport=23"))
    assert [r.destination.ip for r in agent.stub.dynamic.state.rules] == [A]
    ok(netsh("del", "ru", "srcaddr=me", f"dstaddr={A}"))
    assert not agent.stub.dynamic.state.rules


def test_a_dns_name_makes_one_rule_per_address(netsh: Any, agent: Agent) -> None:
    from clients.netsh.addresses import resolve
    from policyagent.model.settings import DSTADDR

    _policies(netsh)
    ips = resolve("localhost", DSTADDR)
    out = ok(netsh("add", "rule", "srcaddr=me", "dstaddr=localhost", "mmpolicy=mmp", "actioni=block",
                   "actiono=block")).out
    assert out == f"Resolved localhost: added {len(ips)} dynamic rule(s).\n"
    rules = agent.stub.dynamic.state.rules
    assert [(r.destination.ip, r.destination.dns_name) for r in rules] == [(ip, "localhost") for ip in ips]
    assert show_values(ok(netsh("show", "rule")).out, "Destination DNS Name") == ["localhost"] * len(ips)
    ok(netsh("set", "rule", "srcaddr=me", f"dstaddr={ips[0]}", "actioninbound=permit"))  # by address too
    assert agent.stub.dynamic.state.rules[0].action_inbound == pb.ACTION_TYPE_PERMIT
    ok(netsh("delete", "rule", "srcaddr=me", "dstaddr=localhost"))
    assert not agent.stub.dynamic.state.rules


def test_delete_policies_in_use_all_and_everything(netsh: Any, agent: Agent) -> None:
    _policies(netsh)
    ok(netsh("add", "mmpolicy", "spare"))
    ok(netsh("add", "qmpolicy", "spare"))
    ok(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "qmpolicy=qmp", "kerberos=yes"))
    fails(netsh("delete", "mmpolicy", "name=mmp"), 'main mode policy "mmp" is used by a rule; delete or change the rule first')
    fails(netsh("delete", "qmpolicy", "qmp"), 'quick mode policy "qmp" is used by a rule')
    fails(netsh("delete", "mmpolicy", "name=gone"), 'there is no main mode policy "gone"')
    fails(netsh("delete", "mmpolicy"), '"delete mmpolicy" needs one of name=, all', code=2)
    ok(netsh("delete", "qmpolicy", "name=SPARE"))
    assert [p.name for p in agent.stub.dynamic.state.qm_policies] == ["qmp"]
    out = ok(netsh("delete", "mmpolicy", "all")).out
    assert out == "Kept the main mode policies that rules use: mmp.\n"
    assert [p.name for p in agent.stub.dynamic.state.mm_policies] == ["mmp"]
    ok(netsh("delete", "all"))
    state = agent.stub.dynamic.state
    assert not state.rules and not state.mm_policies and not state.qm_policies
    assert "No dynamic-mode rules (add rule adds one)." in ok(netsh("show", "rule")).out
    assert "No dynamic-mode main mode policies" in ok(netsh("show", "mmpolicy")).out
    fails(netsh("show", "qmpolicy", "qmp"), 'there is no quick mode policy "qmp" (show qmpolicy lists them)')


def test_dynamic_policy_errors(netsh: Any) -> None:
    fails(netsh("add", "mmpolicy", "x", "mmsec=3DES-SHA1-9"), 'mmsecmethods: "3DES-SHA1-9": unknown DH group "9"')
    fails(netsh("add", "qmpolicy", "x", "qmsec=ESP[3DES,SHA1]:10k"),
          'qmpolicy "x"/security method 1: qmsecmethods: lifetime 10 KB is out of range')
    fails(netsh("add", "mmpolicy", "x", "softsaexpirationtime=0"), "softsaexpirationtime: 0 is out of range")
    fails(netsh("add", "mmpolicy"), '"add mmpolicy" needs name=', code=2)
    fails(netsh("add", "po", "x"), 'unknown add command "po"; expected one of: mmpolicy, qmpolicy, rule', code=2)
    fails(netsh("set", "rule", "dstaddr=me", "srcaddr=any", "m=x"), 'ambiguous tag for "set rule" "m"', code=2)
    fails(netsh("delete", "rule", "srcaddr=me", "dstaddr=nosuchhost.invalid"), 'dstaddr: cannot resolve "nosuchhost.invalid"')
    fails(netsh("show", "rule", "srcmask=8"), "srcmask= needs srcaddr=")


def test_show_all_includes_the_dynamic_mode_policy(netsh: Any) -> None:
    _policies(netsh)
    ok(netsh("add", "rule", "srcaddr=me", f"dstaddr={A}", "mmpolicy=mmp", "qmpolicy=qmp", "psk=hidden"))
    out = ok(netsh("show", "all")).out
    titles = ["IPsec configuration parameters", "Main Mode Policies", "Quick Mode Policies", "Dynamic Rules",
              "Main Mode Filters: Generic"]
    positions = [out.index(t) for t in titles]
    assert positions == sorted(positions) and "hidden" not in out
    doc = json.loads(ok(netsh("show", "all", json_output=True)).out)
    assert doc["dynamic"]["rules"][0]["auth_methods"] == [{"preshared_key": {"key": "********"}}]


def test_an_agent_without_dynamic_mode_says_so(netsh: Any, agent: Agent) -> None:
    agent.stub.older = True
    fails(netsh("show", "rule"), "does not serve dynamic-mode policy (GetDynamic/EditDynamic)")


# ------------------------------------------------------------------ config


def test_show_config_and_set_config_at_once_and_at_restart(netsh: Any, agent: Agent) -> None:
    shown = ok(netsh("show", "config")).out.splitlines()
    assert shown[0] == "IPsec configuration parameters"
    assert "ikelogging       : 0" in shown and "ipsecexempt      : 3" in shown
    now = ok(netsh("set", "config", "property=ikelogging", "value=1")).out
    assert now == "ikelogging set to 1: in effect now.\n"
    assert agent.stub.config.values["ikelogging"] == "1"
    later = ok(netsh("set", "config", "ipsecexempt", "0")).out  # the positional form
    assert later == "ipsecexempt set to 0: it will take effect when the agent restarts (in force until then: 3).\n"
    shown = ok(netsh("sh", "conf")).out.splitlines()
    assert "ipsecexempt      : 3  (set to 0: takes effect when the agent restarts)" in shown
    back = ok(netsh("set", "config", "ipsecexempt", "3")).out
    assert "nothing waits for a restart" in back
    assert ok(netsh("set", "config", "strongcrl", "2")).out == "strongcrlcheck set to 2: in effect now.\n"


def test_set_config_refusals(netsh: Any) -> None:
    fails(netsh("set", "config", "ikelogging", "7"), 'set config: ikelogging: "7" is not valid; use 0 or 1')
    fails(netsh("set", "config", "property=frobnicate", "value=1"), 'unknown property "frobnicate"')
    fails(netsh("set", "config", "ipsec", "1"), "ambiguous config property", code=2)
    fails(netsh("set", "config", "ikelogging"), "needs value=", code=2)


# ------------------------------------------------------------------ show all, json


def test_show_all_shows_every_part_in_order(netsh: Any) -> None:
    out = ok(netsh("show", "all")).out
    titles = ["IPsec configuration parameters", "Main Mode Filters: Generic", "Quick Mode Filters: Generic",
              "Main Mode SAs at ", "Quick Mode SAs at ", "IKE Main Mode Statistics", "IPSec Quick Mode Statistics"]
    positions = [out.index(t) for t in titles]
    assert positions == sorted(positions)


def test_json_output_prints_the_api_messages(netsh: Any) -> None:
    stats = json.loads(ok(netsh("show", "stats", json_output=True)).out)
    assert [c["name"] for c in stats["main_mode"]] == [name for _, name, _ in MM]
    assert stats["policy_name"] == SECURE and stats["ipsec_active"] is True
    ike = json.loads(ok(netsh("show", "stats", "ike", json_output=True)).out)
    assert ike["quick_mode"] == []
    mmsas = json.loads(ok(netsh("show", "mmsas", f"dstaddr={A}", json_output=True)).out)
    assert [sa["remote_address"] for sa in mmsas["main_mode"]] == [A] and mmsas["quick_mode"] == []
    qmsas = json.loads(ok(netsh("show", "qmsas", json_output=True)).out)
    assert {sa["spi_in"] for sa in qmsas["quick_mode"]} == {"d58103fd", "c0ffee01"}
    mmf = json.loads(ok(netsh("show", "mmfilter", json_output=True)).out)
    assert {f["verdict"] for f in mmf["filters"]} == {"negotiate"}
    assert {p["name"] for p in mmf["policies"]} == {RULE, "default-response"}
    config = json.loads(ok(netsh("set", "config", "ikelogging", "1", json_output=True)).out)
    assert {v["name"]: v["value"] for v in config["values"]}["ikelogging"] == "1"
    everything = json.loads(ok(netsh("show", "all", json_output=True)).out)
    assert set(everything) == {"config", "dynamic", "filters", "security_associations", "statistics"}


# ------------------------------------------------------------------ not available, errors, help


def test_dump_is_not_available_yet(netsh: Any) -> None:
    result = fails(netsh("dump"), '"ipsec dynamic dump" is not available yet')
    assert result.out == ""


def test_an_unreachable_socket_is_one_line_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "state" / "agent.sock"
    result = fails(run(capsys, "-r", f"unix:{missing}", "ipsec", "dynamic", "show", "stats"), f"no agent socket at {missing}")
    assert f"policyagent agent --state-dir {missing.parent}" in result.err
    stale = tmp_path / "stale.sock"
    stale.write_text("")  # a file that no agent serves
    fails(run(capsys, "-r", f"unix:{stale}", "ipsec", "dynamic", "show", "config"), f"no agent answers on {stale}")
    # A policy server without a computer: one line saying how to name it (tests/test_relay.py relays).
    fails(run(capsys, "-r", "127.0.0.1:50051", "ipsec", "dynamic", "show", "stats"), "needs the computer whose agent")


def test_without_r_netsh_asks_the_socket_in_the_environment(
    agent: Agent, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICYAGENT_AGENT_SOCKET", str(agent.socket))
    assert "IKE Main Mode Statistics" in ok(run(capsys, "ipsec", "dynamic", "show", "stats")).out


def test_socket_forms_and_resolvedns(monkeypatch: pytest.MonkeyPatch) -> None:
    from clients.netsh.dynamic import agent_socket, show_address

    monkeypatch.delenv("POLICYAGENT_AGENT_SOCKET", raising=False)
    assert agent_socket("unix:/run/pa/agent.sock") == "/run/pa/agent.sock"
    assert agent_socket("unix:///run/pa/agent.sock") == "/run/pa/agent.sock"
    assert agent_socket("/run/pa/agent.sock") == "/run/pa/agent.sock"
    assert agent_socket(None) == "/var/lib/policyagent-agent/agent.sock"
    assert show_address("127.0.0.1/32", False) == "127.0.0.1/32"
    assert show_address("127.0.0.1/32", True).startswith("127.0.0.1/32 (")  # its name, or <not resolved>
    assert show_address("10.0.0.0/8", True) == "10.0.0.0/8"  # a subnet has no name


def test_an_agent_that_cannot_read_its_sas_says_so(netsh: Any, agent: Agent) -> None:
    agent.stub.sas_error = "charon is not running"
    fails(netsh("show", "mmsas"), "cannot read the security associations: charon is not running")


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    listing = ok(run(capsys, "ipsec", "dynamic", "?")).out
    assert 'Commands in the "ipsec dynamic" context:' in listing and "show qmsas" in listing
    assert "Not available yet: dump." in listing and "add rule" in listing and "delete all" in listing
    rule = ok(run(capsys, "ipsec", "dynamic", "add", "rule", "?")).out
    assert rule.startswith("Usage: add rule srcaddr=<address> dstaddr=<address> mmpolicy=<name> [qmpolicy=<name>]")
    assert "actioninbound = permit|block|negotiate   (default negotiate)" in rule
    assert "mirrored = yes|no   (default yes)" in rule and "rootca = <root CA>   (may be repeated)" in rule
    mmp = ok(run(capsys, "ipsec", "dynamic", "add", "mmp", "?")).out
    assert "mmsecmethods = <main mode methods>   (default 3DES-SHA1-2 3DES-MD5-2 DES-SHA1-1 DES-MD5-1)" in mmp
    qmp = ok(run(capsys, "ipsec", "dynamic", "add", "qmpolicy", "?")).out
    assert "pfsgroup = grp1|grp2|grp3|grpmm|nopfs   (default nopfs)" in qmp
    assert "identify the rule" in ok(run(capsys, "ipsec", "dynamic", "delete", "rule", "?")).out
    assert "replaces all authentication methods" in ok(run(capsys, "ipsec", "dynamic", "set", "rule", "?")).out
    assert "delete all" in ok(run(capsys, "ipsec", "dynamic", "delete", "?")).out
    usage = ok(run(capsys, "ipsec", "dynamic", "show", "qmsas", "?")).out
    assert usage.startswith("Usage: show qmsas") and "protocol" in usage
    assert "set config" in ok(run(capsys, "ipsec", "dynamic", "set", "?")).out
    contexts = ok(run(capsys, "ipsec", "?")).out
    assert "dynamic" in contexts and "not available" not in contexts and "main mode policies, quick mode" in contexts
    root = ok(run(capsys, "?")).out
    assert "ipsec dynamic   Dynamic mode" in root and "$POLICYAGENT_AGENT_SOCKET" in root


def test_scripts_and_pushd_reach_the_dynamic_context(netsh: Any, agent: Agent, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    script = tmp_path / "dyn.netsh"
    script.write_text("ipsec dynamic show config\npushd ipsec dynamic\nsh st ike\nset config ikelogging 1\n")
    out = ok(run(capsys, "-r", f"unix:{agent.socket}", "-f", str(script))).out
    assert "IPsec configuration parameters" in out and "IKE Main Mode Statistics" in out
    assert "ikelogging set to 1: in effect now." in out


# ------------------------------------------------------------------ ipsecmon


def mon(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    capsys.readouterr()
    code = ipsecmon.main(list(argv))
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def test_ipsecmon_once_prints_one_snapshot(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    out = ok(mon(capsys, "--socket", str(agent.socket), "--once")).out
    lines = out.splitlines()
    assert lines[0].startswith("IP Security Monitor: b")
    assert f"  Policy in force : {SECURE} (from domain)" in lines
    assert "  Enforcer        : strongswan: enforcing with charon (kernel-libipsec) and nftables" in lines
    assert "  IPsec active    : yes" in lines
    head = next(line for line in lines if line.startswith("Main Mode"))
    assert "Quick Mode" in head and "Value" in head and "Change" in head  # side by side
    assert any(line.startswith("Active Acquire") and "Active Security Associations" in line for line in lines)
    assert "Security associations: 2 main mode, 2 quick mode" in lines
    events = [line for line in lines if "  541  " in line]
    assert len(events) == 5 and "10.77.192.16" in events[0] and "10.77.192.12" in events[-1]  # newest first
    assert "\x1b[" not in out and "Refreshing" not in out
    # --state-dir names the socket's directory
    assert ok(mon(capsys, "--state-dir", str(agent.socket.parent), "--once")).out.startswith("IP Security Monitor: b")


def test_ipsecmon_shows_changes_since_the_last_refresh(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.stub.grow = 1500
    out = ok(mon(capsys, "--socket", str(agent.socket), "--interval", "0.05", "--count", "2")).out
    first, second = out.split("\nIP Security Monitor: b")  # not a terminal: snapshots are appended
    assert "+1500" not in first
    row = next(line for line in second.splitlines() if "Confidential Bytes Sent" in line)
    assert row.split()[-2:] == ["1839", "+1500"]
    assert "Refreshing every 0.05 s" in second


def test_ipsecmon_redraws_a_terminal_and_notices_a_restart(agent: Agent) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, err = Tty(), io.StringIO()
    args = ipsecmon.parser().parse_args(["--socket", str(agent.socket), "--interval", "0.05", "--count", "2"])
    monitor = ipsecmon.Monitor(ipsecmon.AgentClient(str(agent.socket)))
    monitor.refresh()
    agent.stub.since = T0 + 60_000  # the agent restarted: its statistics start again
    snap = monitor.refresh()
    assert snap.restarted and snap.mm_changes is None
    assert "the agent restarted: counters reset" in ipsecmon.render(snap)
    assert ipsecmon.snapshot_dict(monitor.refresh())["changes"] is not None  # and count from there
    assert ipsecmon.run(args, out, err) == 0
    assert out.getvalue().count(ipsecmon.CLEAR) == 2 and err.getvalue() == ""


def test_ipsecmon_json_and_errors(agent: Agent, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    doc = json.loads(ok(mon(capsys, "--socket", str(agent.socket), "--once", "--json")).out)
    assert doc["status"]["computer"] == "b" and doc["security_associations"] == {"main_mode": 2, "quick_mode": 2}
    assert len(doc["audit_events"]) == 5 and doc["changes"] is None
    agent.stub.sas_error = "charon is not running"
    out = ok(mon(capsys, "--socket", str(agent.socket), "--once")).out
    assert "Security associations: unavailable (the agent at" in out and "charon is not running" in out
    missing = tmp_path / "agent.sock"
    result = fails(mon(capsys, "--socket", str(missing), "--once"), f"no agent socket at {missing}")
    assert result.err.startswith("ipsecmon: ")
    with pytest.raises(SystemExit):
        ipsecmon.main(["--interval", "0"])


# ------------------------------------------------------------------ end to end (real agents, strongSwan)


@pytest.mark.slow
def test_netsh_dynamic_against_real_agents(tmp_path_factory: pytest.TempPathFactory) -> None:
    """a talks to b under "Secure Server"; b's agent reports the SA and its counters to netsh, and a
    dynamic-mode block rule added to b's agent with netsh cuts a off until it is deleted."""
    from test_enforce_netns import TCP_SERVER, Site, _why, tcp

    if _why:
        pytest.skip(f"strongSwan enforcement cannot run here: {_why}")
    site = Site(tmp_path_factory.mktemp("dynamic"))
    try:
        site.start_server()
        site.start_agent(site.a)
        site.start_agent(site.b)
        unplaced = {name: site.wait_applied(name) for name in ("a", "b")}
        site.place()
        for name, version in unplaced.items():
            site.wait_applied(name, not_version=version)
        site.b.popen([sys.executable, "-c", TCP_SERVER, "5001"], stdout=subprocess.DEVNULL)
        time.sleep(0.3)
        answer = tcp(site.a, site.b.ip, 5001, "dynamic-mode")
        assert answer.startswith("OK"), answer
        sock = site.base / "agent-b" / "agent.sock"

        def netsh(*words: str) -> str:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["-r", f"unix:{sock}", "ipsec", "dynamic", *words])
            assert code == 0, err.getvalue()
            return out.getvalue()

        stats = netsh("show", "stats")
        qm = dict(line.rsplit(":", 1) for line in block(stats, "IPSec Quick Mode Statistics"))
        qm = {k.strip(): v.strip() for k, v in qm.items()}
        assert int(qm["Key Additions"]) >= 1, stats
        assert int(qm["Confidential Bytes Received"]) > 0 and int(qm["Confidential Bytes Sent"]) > 0, stats
        sas = netsh("show", "qmsas", f"dstaddr={site.a.ip}")
        spis = [line.split(":", 1)[1].strip() for line in sas.splitlines() if line.startswith("Inbound SPI")]
        assert spis and all(len(s) == 8 and int(s, 16) for s in spis), sas
        assert "Tunnel in UDP 4500" in sas
        assert f"Destination (Peer)           : {site.a.ip}" in netsh("show", "mmsas")
        monitor = io.StringIO()
        with contextlib.redirect_stdout(monitor):
            assert ipsecmon.main(["--socket", str(sock), "--once"]) == 0
        assert "  IPsec active    : yes" in monitor.getvalue()

        # Dynamic mode: a rule added on b's agent blocks a both ways, at once; deleting it lets a in again.
        assert netsh("add", "mmpolicy", "name=dyn-mm") == ""
        assert netsh("add", "rule", "srcaddr=me", f"dstaddr={site.a.ip}", "mmpolicy=dyn-mm",
                     "actioninbound=block", "actionoutbound=block") == ""
        rules = netsh("show", "rule")
        assert f"Destination Address          : {site.a.ip}" in rules and "Inbound Action               : BLOCK" in rules
        assert "dynamic mode rule 1" in netsh("show", "qmfilter")  # in force beside the static filters
        blocked = tcp(site.a, site.b.ip, 5001, "dynamic-block", timeout=3.0)
        assert blocked.startswith("FAIL"), blocked
        assert netsh("delete", "rule", "srcaddr=me", f"dstaddr={site.a.ip}") == ""
        assert "Number of Dynamic Rules: 0" in netsh("show", "rule")
        answer = tcp(site.a, site.b.ip, 5001, "dynamic-again")
        assert answer.startswith("OK"), answer
        assert netsh("delete", "all") == ""
    except BaseException:
        for name in ("a", "b"):
            log = site.base / f"agent-{name}.log"
            if log.exists():
                print(f"--- agent {name} ---\n{log.read_text(errors='replace')[-6000:]}", file=sys.stderr)
        raise
    finally:
        site.close()
