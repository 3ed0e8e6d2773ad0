"""Dynamic mode and the IP Security Monitor of another computer, through the policy server (AgentRelay):
the server relays an admin's AgentLocal call on the agent's distribution stream and passes the answer (or
the agent's status) back. In process: a distkit hub + real agent daemons with the record-only enforcer
(its dynamic mode validates and records); one test runs the real server for its authorization."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from distkit import FakeEffective, HubServer, Pki, agent_config, simple_policy, state_credentials, until
from grpc import aio

from clients.ipsecmon.main import main as ipsecmon_main
from clients.netsh.dynamic import split_computer
from clients.netsh.main import main as netsh_main
from policyagent.agent.daemon import AgentDaemon
from policyagent.agent.enforce.recordonly import RecordOnlyEnforcer
from policyagent.agent.relay import RELAY_METHODS, RelayContext, dispatch
from policyagent.pb import agent_pb, dist_grpc, dist_pb, pb, relay_grpc, relay_pb
from policyagent.pki.authz import required_role
from policyagent.server.hub import AGENT_RELAY_SERVICE, RELAY_ORIGIN_KEY

PSK = "relay-secret-4711"


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 60))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


def _agent(pki: Pki, name: str, address: str) -> AgentDaemon:
    state, _ = pki.agent_dir(name)
    return AgentDaemon(agent_config(state, address), enforcer=RecordOnlyEnforcer(state))


class Relay:
    """AgentRelay.Call as an admin (or whoever `channel` authenticates)."""

    def __init__(self, channel: aio.Channel) -> None:
        self.stub = relay_grpc.AgentRelayStub(channel)

    async def call(self, computer: str, method: str, request: Any, response: Any) -> Any:
        reply = await self.stub.Call(
            relay_pb.RelayRequest(computer=computer, method=method, request=request.SerializeToString()), timeout=20
        )
        return response.FromString(reply.response)

    async def fails(self, computer: str, method: str, request: Any, code: grpc.StatusCode, origin: str) -> str:
        with pytest.raises(aio.AioRpcError) as info:
            await self.stub.Call(
                relay_pb.RelayRequest(computer=computer, method=method, request=request.SerializeToString()), timeout=20
            )
        assert info.value.code() == code, info.value.details()
        trailing = dict(info.value.trailing_metadata() or ())
        assert trailing.get(RELAY_ORIGIN_KEY) == origin, trailing
        return info.value.details() or ""


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def hub_log() -> Iterator[Records]:
    logger = logging.getLogger("policyagent.server.hub")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


MM = agent_pb.DynamicMmPolicy(
    name="mmp", methods=[pb.MainModeMethod(encryption=pb.CIPHER_AES128, integrity=pb.INTEGRITY_SHA256, dh_group=pb.DH_GROUP_MODP2048)]
)
QM = agent_pb.DynamicQmPolicy(
    name="qmp", methods=[pb.QuickModeMethod(esp=pb.EspTransform(encryption=pb.CIPHER_AES256, integrity=pb.INTEGRITY_SHA1))]
)


def _rule(**kw: Any) -> agent_pb.DynamicRule:
    fields: dict[str, Any] = {"mm_policy": "mmp", "qm_policy": "qmp", **kw}
    out = agent_pb.DynamicRule(
        source=pb.Address(kind=pb.ADDRESS_KIND_ME), destination=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip="10.9.9.9"),
        mirrored=True, action_inbound=pb.ACTION_TYPE_NEGOTIATE, action_outbound=pb.ACTION_TYPE_NEGOTIATE, **fields,
    )
    out.auth_methods.add(preshared_key=pb.PresharedKeyAuth(key=PSK))
    return out


def test_relayed_calls_read_and_change_the_agent_and_errors_are_statuses(tmp_path: Path, pki: Pki, hub_log: Records) -> None:
    assert set(RELAY_METHODS) == {
        "GetStatus", "GetStatistics", "ListAuditEvents", "ListSecurityAssociations", "ListFilters",
        "GetConfig", "SetConfig", "GetDynamic", "EditDynamic",
    }

    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1", "pc2"], simple_policy("Base"))  # pc2 is registered, its agent never connects
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        agent = _agent(pki, "pc1", address)
        await agent.start()
        certs = pki.admin_cert_dir()
        stopped = False
        try:
            assert hub.hub is not None
            await until(lambda: "pc1" in hub.hub.connected() and agent.status().connection == "in sync", what="pc1 in sync")
            async with aio.secure_channel(address, state_credentials(certs, "admin.crt", "admin.key")) as channel:
                relay = Relay(channel)
                status = await relay.call("PC1", "GetStatus", agent_pb.LocalStatusRequest(), agent_pb.LocalStatus)
                assert (status.computer, status.connection, status.enforcer.split(":")[0]) == ("pc1", "in sync", "record-only")
                assert status.policy_name == "Base"
                config = await relay.call("pc1", "GetConfig", agent_pb.ConfigRequest(), agent_pb.AgentConfigValues)
                assert {v.name: v.value for v in config.values}["ikelogging"] == "0"
                changed = await relay.call(
                    "pc1", "SetConfig", agent_pb.SetConfigRequest(name="ikelogging", value="1"), agent_pb.AgentConfigValues
                )
                assert {v.name: v.value for v in changed.values}["ikelogging"] == "1"
                assert agent.dynconfig.values["ikelogging"] == "1"

                # dynamic mode: edits go to the agent's memory; reads mask the pre-shared key
                for op in ({"add_mm_policy": MM}, {"add_qm_policy": QM}, {"add_rule": _rule()}):
                    await relay.call("pc1", "EditDynamic", agent_pb.DynamicEdit(**op), agent_pb.DynamicState)
                state = await relay.call("pc1", "GetDynamic", agent_pb.DynamicRequest(), agent_pb.DynamicState)
                assert [p.name for p in state.mm_policies] == ["mmp"] and [p.name for p in state.qm_policies] == ["qmp"]
                assert state.rules[0].auth_methods[0].preshared_key.key == "********"
                assert agent.dynamic.state.rules[0].auth_methods[0].preshared_key.key == PSK

                # the agent's refusals pass through with its details
                details = await relay.fails(
                    "pc1", "SetConfig", agent_pb.SetConfigRequest(name="nosuch", value="1"),
                    grpc.StatusCode.INVALID_ARGUMENT, "agent",
                )
                assert "nosuch" in details
                details = await relay.fails(
                    "pc1", "EditDynamic", agent_pb.DynamicEdit(add_rule=_rule(mm_policy="nope")),
                    grpc.StatusCode.INVALID_ARGUMENT, "agent",
                )
                assert 'no main mode policy "nope"' in details
                # the server's own refusals
                details = await relay.fails(
                    "pc1", "GetEffectivePolicy", agent_pb.LocalPolicyRequest(include_secrets=True),
                    grpc.StatusCode.PERMISSION_DENIED, "server",
                )
                assert "'GetEffectivePolicy' is not an AgentLocal method the server may relay" in details
                details = await relay.fails("nosuch", "GetStatus", agent_pb.LocalStatusRequest(), grpc.StatusCode.NOT_FOUND, "server")
                assert details == "no computer 'nosuch' is known to the policy server"
                details = await relay.fails("pc2", "GetStatus", agent_pb.LocalStatusRequest(), grpc.StatusCode.UNAVAILABLE, "server")
                assert details == "the agent of 'pc2' is not connected to the policy server"

                # each call is logged with who, where and what — never the payload
                logged = [r for r in hub_log.records if r.getMessage() == "relayed call"]
                assert len(logged) == 12
                first = vars(logged[0])
                assert (first["admin"], first["computer"], first["method"], first["outcome"]) == ("admin1", "pc1", "GetStatus", "OK")
                assert [vars(r)["outcome"] for r in logged[-4:]] == ["agent: INVALID_ARGUMENT", "PERMISSION_DENIED", "NOT_FOUND", "UNAVAILABLE"]
                assert not any(PSK in repr(vars(r)) for r in hub_log.records)

                # the agent goes away: UNAVAILABLE, saying when it was last seen
                stopped = True
                await agent.stop()
                await until(lambda: "pc1" not in hub.hub.connected(), what="pc1 offline")
                details = await relay.fails("pc1", "GetStatus", agent_pb.LocalStatusRequest(), grpc.StatusCode.UNAVAILABLE, "server")
                assert details.startswith("the agent of 'pc1' is not connected to the policy server (last seen 20")
        finally:
            if not stopped:
                await agent.stop()
            await hub.stop()

    run(main)


def test_deadline_disconnect_mid_call_and_an_agent_without_relay(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1", "old"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        agent = _agent(pki, "pc1", address)
        await agent.start()
        certs = pki.admin_cert_dir()
        released = asyncio.Event()

        async def slow_status(request: Any, context: Any) -> agent_pb.LocalStatus:
            await released.wait()
            return agent_pb.LocalStatus(computer="pc1")

        try:
            assert hub.hub is not None
            await until(lambda: "pc1" in hub.hub.connected(), what="pc1 connected")
            agent.local_api.GetStatus = slow_status  # type: ignore[method-assign]
            async with aio.secure_channel(address, state_credentials(certs, "admin.crt", "admin.key")) as channel:
                relay = Relay(channel)
                hub.hub.relay_timeout_s = 0.3
                details = await relay.fails("pc1", "GetStatus", agent_pb.LocalStatusRequest(), grpc.StatusCode.DEADLINE_EXCEEDED, "server")
                assert details == "the agent of 'pc1' did not answer GetStatus within 0.3 s"

                hub.hub.relay_timeout_s = 30
                pending = asyncio.ensure_future(
                    relay.fails("pc1", "GetStatus", agent_pb.LocalStatusRequest(), grpc.StatusCode.UNAVAILABLE, "server")
                )
                await until(lambda: any(c.pending for c in hub.hub._conns.values()), what="call pending")
                hub.hub.revoke(name="pc1")  # closes the stream under the call
                assert (await pending).startswith("the agent of 'pc1' disconnected before it answered (")
                released.set()

                # an agent whose Hello does not offer "relay" (older than the server) is not sent RelayCalls
                state, _ = pki.agent_dir("old")
                async with aio.secure_channel(address, state_credentials(state)) as old_channel:
                    stream = dist_grpc.DistributionStub(old_channel).Stream()
                    await stream.write(dist_pb.AgentMessage(hello=dist_pb.Hello(computer="old", agent_version="0.9")))
                    first = await stream.read()
                    assert first.WhichOneof("msg") == "policy"
                    details = await relay.fails("old", "GetStatus", agent_pb.LocalStatusRequest(), grpc.StatusCode.FAILED_PRECONDITION, "server")
                    assert details == "the agent of 'old' (version 0.9) does not take relayed calls: it is older than the policy server; upgrade it"
                    stream.cancel()
        finally:
            released.set()
            await agent.stop()
            await hub.stop()

    run(main)


def test_an_agent_certificate_cannot_call_agent_relay(tmp_path: Path, pki: Pki) -> None:
    assert required_role(AGENT_RELAY_SERVICE) == "admin"  # the server's AuthzInterceptor: admin certificate

    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        try:
            async with aio.secure_channel(address, state_credentials(state)) as channel:
                with pytest.raises(aio.AioRpcError) as info:
                    await relay_grpc.AgentRelayStub(channel).Call(relay_pb.RelayRequest(computer="pc1", method="GetStatus"))
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await hub.stop()

    run(main)


def test_the_agent_runs_only_relayed_methods_and_answers_every_call() -> None:
    class Servicer:
        async def GetConfig(self, request: Any, context: Any) -> agent_pb.AgentConfigValues:
            return agent_pb.AgentConfigValues(values=[agent_pb.ConfigValue(name="ikelogging", value="0")])

        async def SetConfig(self, request: agent_pb.SetConfigRequest, context: Any) -> agent_pb.AgentConfigValues:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown property {request.name!r}")
            raise AssertionError("unreachable")

        async def GetStatus(self, request: Any, context: Any) -> agent_pb.LocalStatus:
            raise KeyError("bug")

        async def GetEffectivePolicy(self, request: Any, context: Any) -> dist_pb.EffectivePolicy:
            raise AssertionError("never called through the relay")

    async def main() -> None:
        s = Servicer()
        ok = await dispatch(s, dist_pb.RelayCall(id=1, method="GetConfig"))
        assert (ok.id, ok.code) == (1, 0)
        assert agent_pb.AgentConfigValues.FromString(ok.response).values[0].name == "ikelogging"
        refused = await dispatch(
            s, dist_pb.RelayCall(id=2, method="SetConfig", request=agent_pb.SetConfigRequest(name="x").SerializeToString())
        )
        assert (refused.id, refused.code, refused.details) == (2, grpc.StatusCode.INVALID_ARGUMENT.value[0], "unknown property 'x'")
        denied = await dispatch(s, dist_pb.RelayCall(id=3, method="GetEffectivePolicy"))
        assert denied.code == grpc.StatusCode.PERMISSION_DENIED.value[0] and "GetEffectivePolicy" in denied.details
        garbled = await dispatch(s, dist_pb.RelayCall(id=4, method="SetConfig", request=b"\xff\xff"))
        assert garbled.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        crashed = await dispatch(s, dist_pb.RelayCall(id=5, method="GetStatus"))
        assert (crashed.code, crashed.details) == (grpc.StatusCode.INTERNAL.value[0], "internal error in the agent: KeyError")
        assert RelayContext().peer() == "relay:policy-server"

    run(main)


def test_computer_tag_is_taken_off_the_command_line() -> None:
    assert split_computer(["name=x", "Computer=PC1"]) == (["name=x"], "PC1")
    assert split_computer(["name=x"]) == (["name=x"], "")


def test_netsh_and_ipsecmon_through_the_server(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        agent = _agent(pki, "pc1", address)
        await agent.start()
        certs = str(pki.admin_cert_dir())

        def netsh(*words: str, code: int = 0) -> str:
            capsys.readouterr()
            got = netsh_main(["-r", address, "--cert-dir", certs, *words])
            out, err = capsys.readouterr()
            assert got == code, (out, err)
            if code:
                assert err.count("\n") == 1 and "Traceback" not in err, err
                return err
            assert err == "", err
            return out

        try:
            assert hub.hub is not None
            await until(lambda: "pc1" in hub.hub.connected(), what="pc1 connected")
            shown = await asyncio.to_thread(netsh, "--computer", "pc1", "ipsec", "dynamic", "show", "config")
            assert shown.splitlines()[:3] == [
                "IPsec configuration parameters", "------------------------------", "ikelogging       : 0",
            ]
            assert await asyncio.to_thread(
                netsh, "--computer", "pc1", "ipsec", "dynamic", "add", "mmpolicy", "name=mmp", "mmsec=3DES-SHA1-3"
            ) == ""
            assert [p.name for p in agent.dynamic.state.mm_policies] == ["mmp"]
            # the trailing computer= form, on the same line as the command's own tags
            listed = await asyncio.to_thread(netsh, "ipsec", "dynamic", "show", "mmpolicy", "name=mmp", "computer=pc1")
            assert listed.splitlines()[:2] == ["Main Mode Policies", "-" * 72] and "3DES-SHA1-3" in listed
            said = await asyncio.to_thread(netsh, "ipsec", "dynamic", "set", "config", "ikelogging", "1", "computer=PC1")
            assert said == "ikelogging set to 1: in effect now.\n"
            # one line for each failure
            err = await asyncio.to_thread(netsh, "--computer", "pc1", "ipsec", "dynamic", "add", "rule",
                                          "srcaddr=me", "dstaddr=10.9.9.9", "mmpolicy=nope", "qmpolicy=nope", code=1)
            assert err.startswith("netsh: ") and "nope" in err
            err = await asyncio.to_thread(netsh, "--computer", "nosuch", "ipsec", "dynamic", "show", "config", code=1)
            assert err == "netsh: no computer 'nosuch' is known to the policy server\n"
            err = await asyncio.to_thread(netsh, "ipsec", "dynamic", "show", "config", code=1)
            assert err.startswith(f"netsh: ipsec dynamic through the policy server {address} needs the computer")
            err = await asyncio.to_thread(netsh, "--computer", "pc1", "ipsec", "static", "show", "all", code=2)
            assert "--computer names the agent for ipsec dynamic" in err

            # ipsecmon: one computer through the server (without --computer: the fleet view)
            def mon(*words: str) -> str:
                capsys.readouterr()
                assert ipsecmon_main(["-r", address, "--cert-dir", certs, "--once", *words]) == 0
                return capsys.readouterr().out

            view = await asyncio.to_thread(mon, "--computer", "pc1")
            assert view.startswith("IP Security Monitor: pc1 ")
            assert "  Policy in force : Base (from domain)" in view and "Security associations: 0 main mode" in view
            assert (await asyncio.to_thread(mon)).startswith(f"IP Security Monitor (fleet, {address})")
        finally:
            await agent.stop()
            await hub.stop()

    run(main)


def test_the_policy_server_relays_for_admins_only(inproc_server: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    """The real server: AgentRelay is registered, admin-only under its AuthzInterceptor, and answers an admin."""
    server = inproc_server()
    issued = server.server.pki.ca.issue("agent", "pc9")
    from policyagent.pki.ca import cert_pem, key_pem

    agent_creds = grpc.ssl_channel_credentials(server.server.pki.ca.cert_pem, key_pem(issued.key), cert_pem(issued.cert))
    with grpc.secure_channel(server.address, agent_creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            relay_grpc.AgentRelayStub(channel).Call(relay_pb.RelayRequest(computer="pc9", method="GetStatus"), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs an admin certificate" in str(info.value.details())
    capsys.readouterr()
    assert netsh_main(["-r", server.address, "--computer", "pc9", "ipsec", "dynamic", "show", "config"]) == 1
    assert capsys.readouterr().err == "netsh: no computer 'pc9' is known to the policy server\n"
