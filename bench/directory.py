"""Directory benchmark: a full sync of N computers in M OUs from slapd, and directory change → agent ACK.

    .venv/bin/python bench/directory.py [--computers 10000] [--ous 100] [--interval 1] [--moves 5]

Prints figures, asserts nothing (tests do not assert timings).

- Directory: a throwaway OpenLDAP slapd (tests/slapd.py) holding the AD-like domain DC=example,DC=test:
  --ous OUs, --computers computers spread evenly over them (AD-style computer objects), two GPOs with
  their [MS-GPIPSEC] pointer objects — "Domain IPsec" linked at the domain (Server (Request Security))
  and "Even OUs IPsec" linked on every even-numbered OU (Secure Server (Require Security)) — and the
  policies published in CN=IP Security (policyagent.directory.adstore).
- Read: the connector alone (connect + read_topology, paged searches): the LDAP and mapping cost.
- Full sync: a real `policyagent server --directory ...` process on a fresh data directory; from the
  server announcing its address to DirectoryAdmin.GetStatus reporting in sync with every computer in the
  registry (read, diff, one registry write, every effective policy computed), and the server's own
  figure for that sync (last_sync_duration_ms). Then a forced re-sync of the unchanged directory
  (DirectoryAdmin.Sync: a full read that writes nothing).
- Change → ACK: one real `policyagent agent` (record-only enforcer, enrolled with a join token) for the
  computer pc-00000. Its computer object is moved between an even and an odd OU (modify DN in slapd)
  --moves times; each time, from the move to the server's fleet record showing the agent's ACK of the
  new version (Fleet.Status, polled every 10 ms), and to the agent's own status showing the new
  policy. Detection waits for the next check, so the figure is about interval/2 + the sync + push + ACK.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SUFFIX = "DC=example,DC=test"
DOMAIN = "example.test"
IPSEC_CSE = "[{E437BC1C-AA7D-11D2-A382-00C04F991E27}{DEA8AFA0-CC85-11D0-9CE2-0080C7221EBD}]"
GPO_DOMAIN = "{7B4EBC32-3D4E-4F50-A162-C3D4E5F60718}"
GPO_EVEN = "{5F2C9A10-1B2C-4D3E-8F40-A1B2C3D4E5F6}"
SECURE = "{7238523C-70FA-11D1-864C-14A300000000}"  # Secure Server (Require Security)
REQUEST = "{72385230-70FA-11D1-864C-14A300000000}"  # Server (Request Security)
RPC_TIMEOUT_S = 60.0


def _ok(conn: Any, done: bool) -> None:
    if not done:
        raise RuntimeError(f"slapd: {conn.result}")


def ou_dn(i: int) -> str:
    return f"OU=ou-{i:03d},{SUFFIX}"


def populate(ldap: Any, computers: int, ous: int) -> None:
    import ldap3

    from policyagent.directory import adstore
    from policyagent.model.defaults import default_contents

    conn = ldap.connection()
    for dn, cn in ((f"CN=System,{SUFFIX}", "System"), (f"CN=Policies,CN=System,{SUFFIX}", "Policies")):
        _ok(conn, conn.add(dn, ["container"], {"cn": cn}))
    contents = default_contents()
    adstore.publish(conn, SUFFIX, contents, [SECURE, REQUEST])
    policies = {p.id: p for p in contents.policies}
    for guid, name, policy in ((GPO_DOMAIN, "Domain IPsec", REQUEST), (GPO_EVEN, "Even OUs IPsec", SECURE)):
        dn = f"CN={guid},CN=Policies,CN=System,{SUFFIX}"
        _ok(conn, conn.add(dn, ["groupPolicyContainer"], {
            "cn": guid, "displayName": name, "flags": 0, "versionNumber": 0}))
        adstore.assign_gpo(conn, SUFFIX, guid, policies[policy])

    def link(dn: str, guid: str) -> None:
        value = f"[LDAP://cn={guid.lower()},cn=policies,cn=system,{SUFFIX.lower()};0]"
        _ok(conn, conn.modify(dn, {"gPLink": [(ldap3.MODIFY_REPLACE, [value])]}))

    link(SUFFIX, GPO_DOMAIN)
    for i in range(ous):
        ldap.add_ou(ou_dn(i))
        if i % 2 == 0:
            link(ou_dn(i), GPO_EVEN)
    for n in range(computers):
        name = f"pc-{n:05d}"
        ldap.add_computer(ou_dn(n % ous), name, f"{name}.{DOMAIN}")
    conn.unbind()


def read_only(ldap: Any) -> tuple[float, int]:
    from policyagent.directory.connector import DirectoryConfig, connect, read_topology

    start = time.perf_counter()
    conn = connect(DirectoryConfig(ldap.url, SUFFIX, "simple", ldap.bind_dn, ldap.password))
    topology = read_topology(conn, SUFFIX)
    elapsed = time.perf_counter() - start
    conn.unbind()
    return elapsed, len(topology.computers)


def start_server(data_dir: Path, ldap: Any, password_file: Path, interval: float, log: Path) -> tuple[Any, str, str]:
    command = [
        sys.executable, "-m", "policyagent.cli", "server", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
        "--directory", ldap.url, "--directory-base", SUFFIX, "--directory-user", ldap.bind_dn,
        "--directory-password-file", str(password_file), "--directory-interval", str(interval),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().split("listening on ", 1)[-1].strip()
    enroll = proc.stdout.readline().split("enrollment on ", 1)[-1].strip()
    if not address:
        raise RuntimeError("the server did not start:\n" + log.read_text())
    return proc, address, enroll


def wait(check: Any, what: str, timeout: float, step: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(step)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--computers", type=int, default=10_000)
    parser.add_argument("--ous", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0, help="the server's --directory-interval (s)")
    parser.add_argument("--moves", type=int, default=5)
    args = parser.parse_args(argv)

    warnings.simplefilter("ignore", DeprecationWarning)
    import grpc
    from slapd import slapd_unavailable, start_slapd

    from clients.netsh.client import open_admin_channel
    from policyagent.pb import agent_grpc, agent_pb, directory_grpc, directory_pb, fleet_grpc, fleet_pb

    why = slapd_unavailable()
    if why is not None:
        print(f"cannot run: {why}")
        return 1
    work = Path(tempfile.mkdtemp(prefix="pa-bench-dir-"))
    ldap = start_slapd(work / "slapd")
    server = agent = None
    try:
        t = time.perf_counter()
        populate(ldap, args.computers, args.ous)
        print(f"directory: {args.computers} computers in {args.ous} OUs, 2 GPOs "
              f"(loaded into slapd in {time.perf_counter() - t:.1f} s)")

        reads = [read_only(ldap) for _ in range(3)]
        print(f"connector read (connect + read_topology, {reads[0][1]} computers): "
              f"median {statistics.median(r[0] for r in reads):.2f} s, runs "
              + ", ".join(f"{r[0]:.2f}" for r in reads))

        password = work / "directory.password"
        password.write_text(ldap.password + "\n", encoding="utf-8")
        password.chmod(0o600)
        t0 = time.perf_counter()
        server, address, enroll = start_server(work / "data", ldap, password, args.interval, work / "server.log")
        t_listening = time.perf_counter() - t0
        # The server made its CA and an admin certificate in its data directory at first start.
        channel, _ = open_admin_channel(address, str(work / "data" / "admin"), None)
        directory = directory_grpc.DirectoryAdminStub(channel)

        def status() -> Any:
            return directory.GetStatus(directory_pb.DirectoryStatusRequest(), timeout=RPC_TIMEOUT_S)

        def synced() -> Any:
            s = status()
            return s if s.state == directory_pb.DIRECTORY_STATE_IN_SYNC and s.computers >= args.computers else None

        first = wait(synced, "the first full sync", 600, 0.05)
        t_sync = time.perf_counter() - t0
        print(f"full sync by the server: in sync {t_sync:.2f} s after start ({t_listening:.2f} s to listen); "
              f"the sync itself (read, diff, registry write, effective policies): "
              f"{first.last_sync_duration_ms / 1000:.2f} s; {first.computers} computers, {first.ous} OUs, "
              f"{first.gpos} GPOs, {first.links} links")
        resyncs = []
        for _ in range(3):
            t = time.perf_counter()
            response = directory.Sync(directory_pb.DirectorySyncRequest(), timeout=RPC_TIMEOUT_S)
            resyncs.append(time.perf_counter() - t)
            assert response.mutations == 0, response
        print("forced re-sync of the unchanged directory (full read, no writes): "
              + ", ".join(f"{x:.2f}" for x in resyncs) + " s")

        # One real agent for pc-00000 (in OU ou-000: even → Secure Server).
        token = subprocess.run(
            [sys.executable, "-m", "policyagent.cli", "join-token", "create", "pc-00000", "--ttl", "10m",
             "--data-dir", str(work / "data"), "--domain", DOMAIN],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        state = work / "agent"
        agent = subprocess.Popen(
            [sys.executable, "-m", "policyagent.cli", "agent", "--server", address, "--state-dir", str(state),
             "--enforcer", "record-only", "--enroll-server", enroll, "--ca-file", str(work / "data/pki/ca.crt"),
             "--computer", "pc-00000", "--enroll-token", token],
            stdout=subprocess.PIPE, stderr=(work / "agent.log").open("w"), text=True,
        )
        assert agent.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([agent.stdout], [], [], 0.1)
            if ready and agent.stdout.readline().startswith("agent socket "):
                break
            if agent.poll() is not None:
                raise RuntimeError("the agent stopped:\n" + (work / "agent.log").read_text())
        local = agent_grpc.AgentLocalStub(grpc.insecure_channel(f"unix:{state / 'agent.sock'}"))
        fleet = fleet_grpc.FleetStub(channel)

        def local_policy() -> str:
            s = local.GetStatus(agent_pb.LocalStatusRequest(), timeout=RPC_TIMEOUT_S)
            return s.policy_name if s.connection == "in sync" else ""

        def record() -> Any:
            answer = fleet.Status(fleet_pb.FleetStatusRequest(computers=["pc-00000"]), timeout=RPC_TIMEOUT_S)
            return next((a for a in answer.agents if a.computer == "pc-00000"), None)

        wait(lambda: local_policy() == "Secure Server (Require Security)", "the agent's first policy", 60)
        conn = ldap.connection()
        to_ack: list[float] = []
        to_agent: list[float] = []
        where = 0
        for i in range(args.moves):
            target = 1 if where == 0 else 0
            policy = "Server (Request Security)" if target % 2 else "Secure Server (Require Security)"
            before = record()
            old_version = before.desired_version if before is not None else ""
            t = time.perf_counter()
            _ok(conn, conn.modify_dn(f"CN=pc-00000,{ou_dn(where)}", "CN=pc-00000", new_superior=ou_dn(target)))

            def acked(old_version: str = old_version) -> bool:
                r = record()
                return r is not None and r.desired_version != old_version and r.applied_version == r.desired_version

            wait(acked, f"move {i + 1}: the server to record the ACK", 120, 0.005)
            to_ack.append(time.perf_counter() - t)
            wait(lambda: local_policy() == policy, f"move {i + 1}: the agent's status", 60, 0.005)  # noqa: B023
            to_agent.append(time.perf_counter() - t)
            where = target
            time.sleep(args.interval * ((i * 0.37) % 1))  # spread the moves over the check interval
        conn.unbind()
        last = status()
        print(f"directory change → ACK recorded by the server ({args.moves} moves, interval {args.interval:g} s): "
              f"p50 {statistics.median(to_ack):.3f} s, p99 {percentile(to_ack, 0.99):.3f} s, "
              f"max {max(to_ack):.3f} s; the sync of a change: {last.last_sync_duration_ms / 1000:.2f} s")
        print(f"directory change → the agent's status shows the new policy: p50 {statistics.median(to_agent):.3f} s, "
              f"max {max(to_agent):.3f} s")
        channel.close()
        return 0
    finally:
        for proc in (agent, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        ldap.stop()
        if os.environ.get("BENCH_KEEP") is None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
