"""Hub + agent daemons over real mTLS on port 0, in one process, with a fake effective-policy source."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from distkit import FakeEffective, HubServer, Pki, agent_config, kerberos_only_policy, simple_policy, until
from grpc import aio

from policyagent.agent.daemon import SOCKET_FILE, AgentDaemon
from policyagent.pb import agent_grpc, agent_pb, dist_grpc, dist_pb, fleet_grpc, fleet_pb


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 60))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


def _credentials(state: Path) -> grpc.ChannelCredentials:
    """mTLS credentials from a certificate directory the Pki fixture wrote."""
    return grpc.ssl_channel_credentials(
        (state / "ca.crt").read_bytes(), (state / "host.key").read_bytes(), (state / "host.crt").read_bytes()
    )


def _admin_channel(pki: Pki, address: str) -> aio.Channel:
    state, _ = pki.agent_dir("admin1", role="admin")
    creds = _credentials(state)
    return aio.secure_channel(address, creds)


def test_agents_get_policy_ack_and_only_affected_agents_get_pushes(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1", "pc2"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        daemons = [AgentDaemon(agent_config(pki.agent_dir(n)[0], address)) for n in ("pc1", "pc2")]
        for d in daemons:
            await d.start()
        try:
            await until(lambda: all(d.session.state.value == "in sync" for d in daemons), what="in sync")
            v1 = eff.version_of("pc1")
            assert hub.hub is not None
            await until(lambda: hub.hub.registry.get("pc1").applied_version == v1, what="ack recorded")
            # The cache holds the last good policy, 0600.
            cache = daemons[0].cache.path
            assert stat.S_IMODE(cache.stat().st_mode) == 0o600
            assert daemons[0].cache.load().policy.version == v1  # type: ignore[union-attr]
            applied_before = [len(_record_history(d)) for d in daemons]
            gets_before = eff.gets
            eff.set(["pc1"], simple_policy("Changed"))
            v2 = eff.version_of("pc1")
            await until(lambda: hub.hub.registry.get("pc1").applied_version == v2, what="pc1 acks v2")
            assert eff.gets - gets_before == 1  # only the affected computer was computed
            assert daemons[1].session.applied_version == eff.version_of("pc2")
            assert daemons[1].enforced is not None and daemons[1].enforced.policy.name == "Base"
            assert daemons[0].enforced is not None and daemons[0].enforced.policy.name == "Changed"
            del applied_before
            # Fleet view: both in sync.
            async with _admin_channel(pki, address) as channel:
                status = await fleet_grpc.FleetStub(channel).Status(fleet_pb.FleetStatusRequest())
            assert (status.total, status.in_sync) == (2, 2)
            assert status.agents[0].capabilities.enforcer == "record-only"
        finally:
            for d in daemons:
                await d.stop()
            await hub.stop()

    run(main)


def _record_history(daemon: AgentDaemon) -> list[Any]:
    path = daemon.state_dir / "enforcer" / "record-only.json"
    return [json.loads(path.read_text())] if path.exists() else []


def test_kerberos_only_policy_is_nacked_by_workgroup_member_and_shown_in_fleet(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["wg1"], simple_policy("Base"), membership="workgroup")
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        agent = AgentDaemon(agent_config(pki.agent_dir("wg1")[0], address))
        await agent.start()
        try:
            await until(lambda: agent.session.state.value == "in sync")
            good = eff.version_of("wg1")
            eff.set(["wg1"], kerberos_only_policy(), membership="workgroup")
            bad = eff.version_of("wg1")
            assert hub.hub is not None
            await until(lambda: hub.hub.registry.get("wg1").last_nack_version == bad, what="nack")
            record = hub.hub.registry.get("wg1")
            assert "Kerberos needs domain membership; this computer is a workgroup member" in record.last_nack_reason
            assert record.applied_version == good  # still on the last good one
            assert agent.session.applied_version == good
            async with _admin_channel(pki, address) as channel:
                status = await fleet_grpc.FleetStub(channel).Status(fleet_pb.FleetStatusRequest())
            assert status.rejected == 1
            assert status.agents[0].state == fleet_pb.AGENT_STATE_REJECTED
            assert "workgroup member" in status.agents[0].last_nack_reason
            # The local status says so too.
            local = agent.status()
            assert "workgroup member" in local.last_nack_reason
            assert local.enforcer == "record-only: enforces nothing"
        finally:
            await agent.stop()
            await hub.stop()

    run(main)


def test_server_outage_cache_restart_and_convergence(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        agent = AgentDaemon(agent_config(state, address))
        await agent.start()
        await until(lambda: agent.session.state.value == "in sync")
        version = eff.version_of("pc1")
        await hub.stop()
        await until(lambda: agent.session.state.value in ("backoff", "connecting"), what="agent notices")
        assert agent.session.applied_version == version  # keeps its policy
        await agent.stop()
        # Restart the agent while the server is down: it applies the cache and says so.
        agent = AgentDaemon(agent_config(state, address))
        await agent.start()
        try:
            await until(lambda: agent.session.running_on_cache, what="running on cache")
            st = agent.status()
            assert st.applied_version == version
            assert "running on cached policy since" in st.summary
            # Over the local unix socket too.
            async with aio.insecure_channel(f"unix:{state / SOCKET_FILE}") as channel:
                local = await agent_grpc.AgentLocalStub(channel).GetStatus(agent_pb.LocalStatusRequest())
                assert local.running_on_cache and local.enforcer == "record-only: enforces nothing"
                eff_local = await agent_grpc.AgentLocalStub(channel).GetEffectivePolicy(agent_pb.LocalPolicyRequest())
                assert eff_local.policy.name == "Base"
            # Server back on the same port: converge within seconds, cache flag clears.
            await hub.start(port=int(address.rsplit(":", 1)[1]))
            assert hub.hub is not None
            await until(lambda: hub.hub.registry.get("pc1").online, what="reconnected")
            await until(lambda: not agent.session.running_on_cache, what="cache flag cleared")
            await until(lambda: hub.hub.registry.get("pc1").applied_version == version)
            # The hub clears its flag when the agent's ACK of the confirmed version arrives, which can
            # be just after the agent cleared its own: wait for it rather than read it once.
            await until(lambda: not hub.hub.registry.get("pc1").running_on_cache, what="hub's cache flag cleared")
        finally:
            await agent.stop()
            await hub.stop()

    run(main)


def test_revoked_agent_is_cut_off(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, serial = pki.agent_dir("pc1")
        agent = AgentDaemon(agent_config(state, address))
        await agent.start()
        try:
            await until(lambda: agent.session.state.value == "in sync")
            assert hub.hub is not None
            assert hub.hub.revoke(serial=serial)
            await until(lambda: "revoked" in agent.session.last_error, what="agent cut off")
            assert not hub.hub.registry.get("pc1").online or agent.session.state.value != "in sync"
        finally:
            await agent.stop()
            await hub.stop()

    run(main)


def test_agent_cannot_call_fleet_and_admin_cannot_stream(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        creds = _credentials(state)
        try:
            async with aio.secure_channel(address, creds) as channel:
                with pytest.raises(aio.AioRpcError) as info:
                    await fleet_grpc.FleetStub(channel).Status(fleet_pb.FleetStatusRequest())
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                # Fetch returns only the caller's own policy.
                own = await dist_grpc.DistributionStub(channel).Fetch(dist_pb.FetchRequest())
                assert own.computer == "pc1"
            async with _admin_channel(pki, address) as channel:
                with pytest.raises(aio.AioRpcError) as info:
                    await dist_grpc.DistributionStub(channel).Fetch(dist_pb.FetchRequest())
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await hub.stop()

    run(main)


def test_hello_with_current_version_is_confirmed_unchanged(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        creds = _credentials(state)
        try:
            async with aio.secure_channel(address, creds) as channel:
                call = dist_grpc.DistributionStub(channel).Stream()
                version = eff.version_of("pc1")
                await call.write(dist_pb.AgentMessage(hello=dist_pb.Hello(applied_version=version)))
                first = await call.read()
                assert first.policy.unchanged and first.policy.version == version and first.policy.nonce
                assert not first.policy.HasField("policy")
                await call.write(dist_pb.AgentMessage(ack=dist_pb.Ack(version=version, nonce=first.policy.nonce)))
                # An ACK for a nonce never issued is ignored.
                await call.write(dist_pb.AgentMessage(ack=dist_pb.Ack(version="bogus", nonce="nope")))
                eff.set(["pc1"], simple_policy("Next"))
                second = await call.read()
                assert second.policy.version == eff.version_of("pc1") and second.policy.nonce != first.policy.nonce
                assert hub.hub is not None and hub.hub.registry.get("pc1").applied_version == version
                call.cancel()
        finally:
            await hub.stop()

    run(main)


def test_first_message_must_be_hello(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        creds = _credentials(state)
        try:
            async with aio.secure_channel(address, creds) as channel:
                call = dist_grpc.DistributionStub(channel).Stream()
                await call.write(dist_pb.AgentMessage(ack=dist_pb.Ack(version="x", nonce="y")))
                with pytest.raises(aio.AioRpcError) as info:
                    await call.read()
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await hub.stop()

    run(main)


def test_local_store_applies_when_domain_assigns_nothing(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        from policyagent.pb import admin_grpc, admin_pb

        eff = FakeEffective()
        eff.set(["pc1"], None)  # the domain assigns no IPsec policy
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        agent = AgentDaemon(agent_config(state, address))
        await agent.start()
        try:
            await until(lambda: agent.session.state.value == "in sync")
            assert agent.enforced_source == "none"
            # netsh -r unix:STATE/agent.sock set policy name="Server (Request Security)" assign=yes
            async with aio.insecure_channel(f"unix:{state / SOCKET_FILE}") as channel:
                admin = admin_grpc.PolicyAdminStub(channel)
                policy = await admin.GetPolicy(admin_pb.GetObjectRequest(name="Server (Request Security)", include_secrets=True))
                policy.assigned = True
                await admin.Apply(admin_pb.ApplyRequest(mutations=[admin_pb.Mutation(put_policy=policy)]))
            await until(lambda: agent.enforced_source == "local", what="local policy in force")
            assert agent.enforced is not None and agent.enforced.policy.name == "Server (Request Security)"
            # The domain assigns one: it overrides the local store's.
            eff.set(["pc1"], simple_policy("Domain policy"))
            await until(lambda: agent.enforced_source == "domain", what="domain overrides local")
            assert agent.enforced is not None and agent.enforced.policy.name == "Domain policy"
        finally:
            await agent.stop()
            await hub.stop()

    run(main)


def test_idle_stream_gets_keepalives_within_the_interval(tmp_path: Path, pki: Pki) -> None:
    """One hub-wide ticker, no timer per stream: an idle stream still hears from the server every keepalive_s."""

    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki, keepalive_s=0.4)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        creds = _credentials(state)
        try:
            async with aio.secure_channel(address, creds) as channel:
                call = dist_grpc.DistributionStub(channel).Stream()
                await call.write(dist_pb.AgentMessage(hello=dist_pb.Hello()))
                first = await call.read()
                assert first.policy.version == eff.version_of("pc1")
                await call.write(dist_pb.AgentMessage(ack=dist_pb.Ack(version=first.policy.version, nonce=first.policy.nonce)))
                loop = asyncio.get_running_loop()
                last, gaps = loop.time(), []
                for _ in range(4):
                    message = await asyncio.wait_for(call.read(), 2.0)
                    assert message.WhichOneof("msg") == "keepalive" and message.keepalive.server_time_unix_ms > 0
                    now = loop.time()
                    gaps.append(now - last)
                    last = now
                assert max(gaps) < 1.0  # about the interval (0.4 s), with slack for a loaded machine
                assert sum(gaps) / len(gaps) > 0.2  # not on every tick (0.1 s)
                call.cancel()
        finally:
            await hub.stop()

    run(main)


async def _assign_persistent(state: Path, *, kerberos_only: bool = False) -> None:
    """netsh -r unix:STATE/persistent.sock: a filter list, a filter action and an assigned policy using them."""
    from builders import filter_action, filter_list, policy, rule

    from policyagent.agent.daemon import PERSISTENT_SOCKET_FILE
    from policyagent.pb import admin_grpc, admin_pb, pb

    async with aio.insecure_channel(f"unix:{state / PERSISTENT_SOCKET_FILE}") as channel:
        admin = admin_grpc.PolicyAdminStub(channel)

        async def put(mutation: admin_pb.Mutation) -> admin_pb.ApplyResponse:
            return await admin.Apply(admin_pb.ApplyRequest(mutations=[mutation]))

        fl = (await put(admin_pb.Mutation(put_filter_list=filter_list("Management")))).written.filter_lists[0]
        kind = pb.ACTION_TYPE_NEGOTIATE if kerberos_only else pb.ACTION_TYPE_PERMIT
        fa = (await put(admin_pb.Mutation(put_filter_action=filter_action("Mgmt", action=kind)))).written.filter_actions[0]
        r = rule(fl.id, fa.id, name="Permit management")
        if not kerberos_only:
            r.auth_methods[0].CopyFrom(pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key="secret")))
        p = policy("Boot policy", rules=[r], assigned=True)
        p.default_response_rule.active = False
        await put(admin_pb.Mutation(put_policy=p))


def _recorded_rules(daemon: AgentDaemon) -> list[str]:
    (record,) = _record_history(daemon)
    return [r.get("name", "") for r in record["effective_policy"]["policy"].get("rules", [])]


def test_persistent_policy_applies_in_addition_to_the_domain_and_survives_a_nack(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        from builders import rule

        eff = FakeEffective()
        domain = simple_policy("Domain policy")
        domain.rules.append(rule("", "", name="Domain rule"))
        domain.rules[0].auth_methods[0].certificate.root_ca = "CN=Corp Root"
        eff.set(["pc1"], domain, membership="workgroup")
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        agent = AgentDaemon(agent_config(state, address))
        await agent.start()
        try:
            await until(lambda: agent.session.state.value == "in sync")
            good = eff.version_of("pc1")
            assert agent.enforced_source == "domain"
            await _assign_persistent(state)
            await until(lambda: agent.enforced_source == "persistent+domain", what="persistent + domain in force")
            assert _recorded_rules(agent) == ["Permit management", "Domain rule"]
            assert "the persistent store's policy is in force in addition to the domain policy" in agent.status().summary
            assert agent.session.applied_version == good  # the server's version, not the combination's
            assert hub.hub is not None
            await until(lambda: hub.hub.registry.get("pc1").applied_version == good, what="ack of the domain version")
            # A domain policy this workgroup member cannot apply: NACKed, the persistent part stays in force.
            eff.set(["pc1"], kerberos_only_policy(), membership="workgroup")
            bad = eff.version_of("pc1")
            await until(lambda: hub.hub.registry.get("pc1").last_nack_version == bad, what="nack")
            assert "workgroup member" in hub.hub.registry.get("pc1").last_nack_reason
            assert hub.hub.registry.get("pc1").applied_version == good
            assert agent.enforced_source == "persistent+domain"
            assert _recorded_rules(agent) == ["Permit management", "Domain rule"]
            # Over the local socket: the combination is the policy in force.
            async with aio.insecure_channel(f"unix:{state / SOCKET_FILE}") as channel:
                local = await agent_grpc.AgentLocalStub(channel).GetStatus(agent_pb.LocalStatusRequest())
                assert local.applied_source == "persistent+domain"
                assert "workgroup member" in local.last_nack_reason
        finally:
            await agent.stop()
            await hub.stop()

    run(main)


def test_persistent_policy_stays_when_the_first_domain_policy_is_nacked(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], None, membership="workgroup")
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        agent = AgentDaemon(agent_config(state, address))
        await agent.start()
        try:
            await until(lambda: agent.session.state.value == "in sync")
            await _assign_persistent(state)
            await until(lambda: agent.enforced_source == "persistent", what="persistent in force")
            assert _recorded_rules(agent) == ["Permit management"]
            eff.set(["pc1"], kerberos_only_policy(), membership="workgroup")
            bad = eff.version_of("pc1")
            assert hub.hub is not None
            await until(lambda: hub.hub.registry.get("pc1").last_nack_version == bad, what="nack")
            assert agent.enforced_source == "persistent"
            assert _recorded_rules(agent) == ["Permit management"]
            # After a restart the persistent policy applies at boot, before the session starts.
            await agent.stop()
            agent = AgentDaemon(agent_config(state, address))
            await agent.start()
            assert agent.enforced_source == "persistent"
            # Unassigned in the persistent store: no longer in force.
            from policyagent.agent.daemon import PERSISTENT_SOCKET_FILE
            from policyagent.pb import admin_grpc, admin_pb

            async with aio.insecure_channel(f"unix:{state / PERSISTENT_SOCKET_FILE}") as channel:
                admin = admin_grpc.PolicyAdminStub(channel)
                boot = await admin.GetPolicy(admin_pb.GetObjectRequest(name="Boot policy", include_secrets=True))
                boot.assigned = False
                await admin.Apply(admin_pb.ApplyRequest(mutations=[admin_pb.Mutation(put_policy=boot)]))
            await until(lambda: agent.enforced_source == "none", what="persistent policy no longer in force")
        finally:
            await agent.stop()
            await hub.stop()

    run(main)


def test_kerberos_only_persistent_rule_on_a_workgroup_member_is_reported(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Domain policy"), membership="workgroup")
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        agent = AgentDaemon(agent_config(state, address))
        await agent.start()
        try:
            await until(lambda: agent.session.state.value == "in sync")
            good = eff.version_of("pc1")
            await _assign_persistent(state, kerberos_only=True)
            await until(lambda: "persistent policy not applied" in agent.status().summary, what="reported")
            summary = agent.status().summary
            assert '"Permit management": Kerberos needs domain membership' in summary
            # The domain policy still applies (alone), and the server's version is still ACKed.
            assert agent.enforced_source == "domain"
            eff.set(["pc1"], simple_policy("Domain policy 2"), membership="workgroup")
            assert hub.hub is not None
            await until(lambda: hub.hub.registry.get("pc1").applied_version == eff.version_of("pc1"), what="ack")
            assert hub.hub.registry.get("pc1").applied_version != good
            assert not hub.hub.registry.get("pc1").last_nack_reason
            assert agent.enforced is not None and agent.enforced.policy.name == "Domain policy 2"
        finally:
            await agent.stop()
            await hub.stop()

    run(main)
