"""Fan-out benchmark: N simulated agents on one policy server; prints figures, asserts nothing.

    .venv/bin/python bench/fanout.py [--agents 1000] [--workers 4] [--pace 32] [--cache-dir DIR]

- Certificates: one CA and N agent certificates (real, each its own key and CN
  "bench-NNNNN"), issued once into --cache-dir and reused by later runs.
- Server: a subprocess running the real `PolicyServer` (policyagent/server/app.py: its
  options, the AuthzInterceptor, the hub, the policy store and EffectivePolicies) on a
  data directory whose CA is the bench's. Its registry gets N computers spread over 20
  OUs and one GPO linked at the domain that assigns the seeded "Server (Request
  Security)" policy; the change is an edit of that policy's content, written through
  the server's policy store as PolicyAdmin writes it, so it runs the real incremental
  update, the hub's fan-out and the fleet records.
- Agents: --workers processes, each holding N/workers real gRPC streams, every one on
  its own TLS channel with its own certificate. A simulated agent says Hello, ACKs
  every policy pushed, and records when it did. Connects are paced (--pace handshakes in
  flight per worker): real agents do not all start in the same millisecond, and
  unpaced, 10,000 handshakes at once overflow the accept queue and time out.
- Figures: time until every agent is connected and in sync; the server's RSS before
  and after the agents connect (→ per agent); then one policy change touching all N
  agents: p50/p99/max from the change to each agent sending its ACK, and to the hub
  recording it (the fleet record's last_ack); the CPU the server and the agent workers
  used meanwhile (they share the machine's cores) and the server's time in the GC.
- --server-env KEY=VALUE (repeatable): environment of the server process only (e.g.
  MALLOC_MMAP_THRESHOLD_=17000, GRPC_EXPERIMENTS=...); --server-option KEY=VALUE (repeatable):
  a gRPC server channel arg set on top of hub.SERVER_CONNECTION_OPTIONS (same key: replaced;
  an int when the value parses as one). Both are printed with the figures.
- BENCH_PYSPY_DIR=DIR: record py-spy profiles of the server and the first worker
  around the change into DIR (py-spy must be installed in the venv).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread name of a process."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- certificates


def ensure_certs(cache: Path, n: int) -> None:
    """A CA, a server pair and n agent pairs in `cache` (issued once, reused)."""
    from policyagent.pki.ca import CertificateAuthority, cert_pem, key_pem

    ca, _ = CertificateAuthority.load_or_create(cache / "pki")
    agents = cache / "agents.jsonl"
    have = sum(1 for _ in agents.open()) if agents.exists() else 0
    if not (cache / "server.json").exists():
        issued = ca.issue("server", "localhost", dns_names=["localhost"], ip_addresses=[ipaddress.ip_address("127.0.0.1")])
        assert issued.key is not None
        (cache / "server.json").write_text(
            json.dumps({"cert": (cert_pem(issued.cert) + ca.cert_pem).decode(), "key": key_pem(issued.key).decode()})
        )
    if have >= n:
        return
    started = time.monotonic()
    with agents.open("a") as out:
        for i in range(have, n):
            issued = ca.issue("agent", f"bench-{i:05d}")
            assert issued.key is not None
            out.write(json.dumps({"name": f"bench-{i:05d}", "cert": cert_pem(issued.cert).decode(), "key": key_pem(issued.key).decode()}) + "\n")
    print(f"issued {n - have} agent certificates in {time.monotonic() - started:.1f} s (cached in {cache})", flush=True)


def load_agents(cache: Path, start: int, count: int) -> list[dict[str, str]]:
    out = []
    with (cache / "agents.jsonl").open() as f:
        for i, line in enumerate(f):
            if start <= i < start + count:
                out.append(json.loads(line))
    return out


# ---------------------------------------------------------------- server process


BENCH_DOMAIN = "bench.example"
BENCH_OUS = 20  # computers spread evenly over OU=Group NN,OU=Fleet,DC=bench,DC=example
BENCH_POLICY = "Server (Request Security)"  # a seeded default policy: 2 rules, their filter lists/actions


def populate(server: Any, names: list[str]) -> str:
    """The topology: N computers in OUs, one GPO linked at the domain assigning BENCH_POLICY (store thread)."""
    from policyagent.model.assignment import Computer, Gpo, GpoLink, OrgUnit, Scope
    from policyagent.model.objects import Kind
    from policyagent.store.topology import PutObject

    policy = server.assignment.policy_store.find(Kind.POLICY, BENCH_POLICY)
    fleet = f"OU=Fleet,DC={BENCH_DOMAIN.split('.')[0]},DC={BENCH_DOMAIN.split('.')[1]}"
    ous = [f"OU=Group {i:02d},{fleet}" for i in range(BENCH_OUS)]
    puts: list[Any] = [OrgUnit(fleet), *(OrgUnit(ou) for ou in ous)]
    puts += [Computer(name, "domain", BENCH_DOMAIN, ou=ous[i % BENCH_OUS]) for i, name in enumerate(names)]
    puts.append(Gpo("", "Bench domain IPsec", policy_id=policy.id))
    topology = server.topology_store
    topology.write([PutObject(o) for o in puts], principal="bench")
    topology.write([PutObject(GpoLink("Bench domain IPsec", Scope.domain(BENCH_DOMAIN)))], principal="bench")
    return str(policy.id)


def edit_policy(server: Any, generation: int) -> None:
    """The change: an edit of the assigned policy's content, as PolicyAdmin would write it (store thread)."""
    from policyagent.model.objects import Kind
    from policyagent.model.writes import Put

    store = server.assignment.policy_store
    policy = store.find(Kind.POLICY, BENCH_POLICY)
    policy.description = f"bench change {generation}"
    store.write([Put(policy)], principal="bench")


def _key_values(items: Sequence[str]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for item in items:
        key, _, value = item.partition("=")
        try:
            out.append((key, int(value)))
        except ValueError:
            out.append((key, value))
    return out


async def server_main(cache: Path, n: int, data_dir: Path, server_options: Sequence[str] = ()) -> None:
    """The real server (PolicyServer: interceptor, options, hub, EffectivePolicies) on the bench CA."""
    import shutil

    import policyagent.server.app as app
    from policyagent.server.app import PolicyServer, ServerConfig

    if server_options:  # --server-option: on top of hub.SERVER_CONNECTION_OPTIONS, as app.py passes them
        extra = _key_values(server_options)
        keys = {k for k, _ in extra}
        app.SERVER_CONNECTION_OPTIONS = [(k, v) for k, v in app.SERVER_CONNECTION_OPTIONS if k not in keys] + extra

    _raise_fd_limit()
    pki = data_dir / "pki"
    pki.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("ca.key", "ca.crt"):
        shutil.copy(cache / "pki" / name, pki / name)
    names = [f"bench-{i:05d}" for i in range(n)]
    server = PolicyServer(ServerConfig(data_dir=data_dir, listen="127.0.0.1:0", enroll_listen="127.0.0.1:0", grace_seconds=0))
    address = await server.start()
    loop = asyncio.get_running_loop()
    t = time.monotonic()
    await server._in_store_thread(populate, server, names)
    print(f"topology: {n} computers in {BENCH_OUS} OUs, one domain GPO, built in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    effective, hub = server.effective, server.hub
    gc_time = [0.0, 0, 0.0]  # CPU seconds in the cyclic GC since the change, collections, start of the current one

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_time[2] = time.thread_time()
        else:
            gc_time[0] += time.thread_time() - gc_time[2]
            gc_time[1] += 1

    gc.callbacks.append(on_gc)
    print(f"port {address.rsplit(':', 1)[1]}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    generation = 0
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        if line == "change":
            generation += 1
            gc_time[:2] = [0.0, 0]
            t0 = time.time()
            await server._in_store_thread(edit_policy, server, generation)
            t1 = time.time()
            print(f"changed {t0:.6f} {t1 - t0:.6f} {effective.version_of(names[0])}", flush=True)
        elif line == "status":
            # When did the server record the ACKs of the current version? (Checked every 0.5 s, up to
            # 30 s: the times are the hub's own records; checking often would only slow the hub down.)
            deadline = time.monotonic() + 30
            while True:
                records = [hub.registry.get(name) for name in names]
                acked = [r.last_ack_unix_ms for r in records if r.applied_version == effective.version_of(r.computer)]
                if len(acked) == n or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            print(f"status {len(acked)} {gc_time[1]} {gc_time[0]:.3f} {json.dumps(acked)}", flush=True)
    await server.stop(0)


# ---------------------------------------------------------------- agent worker process


async def worker_main(cache: Path, address: str, start: int, count: int, pace: int) -> None:
    import grpc
    from grpc import aio

    from policyagent.pb import dist_grpc, dist_pb
    from policyagent.server.hub import GC_GEN0_THRESHOLD

    _raise_fd_limit()
    # A worker holds thousands of streams, like the server: the same GC setting keeps it from spending
    # the shared cores on collections (a real agent holds one stream and does not need it).
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    agents = load_agents(cache, start, count)
    ca_pem = (cache / "pki" / "ca.crt").read_bytes()
    acks: dict[str, list[tuple[str, float]]] = {a["name"]: [] for a in agents}
    connected = asyncio.Event()
    in_sync = 0
    channels = []

    errors: dict[str, int] = {}
    # Pacing (a bench artefact: real agents start at different times and reconnect with jitter):
    # at most `pace` handshakes + first syncs in flight per worker process.
    connecting = asyncio.Semaphore(pace)

    async def one(agent: dict[str, str]) -> None:
        nonlocal in_sync
        creds = grpc.ssl_channel_credentials(ca_pem, agent["key"].encode(), agent["cert"].encode())
        first = True
        await connecting.acquire()
        while True:  # like the agent: reconnect when the stream fails (e.g. a handshake storm at start)
            channel = aio.secure_channel(address, creds, options=[("grpc.keepalive_time_ms", 60000)])
            channels.append(channel)
            try:
                call = dist_grpc.DistributionStub(channel).Stream()
                await call.write(dist_pb.AgentMessage(hello=dist_pb.Hello(computer=agent["name"])))
                async for message in call:
                    if message.WhichOneof("msg") != "policy":
                        continue
                    p = message.policy
                    await call.write(dist_pb.AgentMessage(ack=dist_pb.Ack(version=p.version, nonce=p.nonce)))
                    acks[agent["name"]].append((p.version, time.time()))
                    if first:
                        first = False
                        connecting.release()
                        in_sync += 1
                        if in_sync == len(agents):
                            connected.set()
                return
            except grpc.RpcError as exc:
                key = exc.code().name if isinstance(exc, aio.AioRpcError) else type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
                await channel.close()
                await asyncio.sleep(0.5 + random.random())

    tasks = []
    for agent in agents:
        tasks.append(asyncio.create_task(one(agent)))
        await asyncio.sleep(0)  # let the loop breathe while thousands of handshakes start
    await connected.wait()
    print(f"connected (stream errors retried: {errors or 'none'})", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        if line == "report":
            # Each agent's ACK of the pushed change: its second policy (the first was the sync on connect).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(len(h) < 2 for h in acks.values()):
                await asyncio.sleep(0.05)
            times = [h[1][1] for h in acks.values() if len(h) >= 2]
            print("acks " + json.dumps(times), flush=True)
    for task in tasks:
        task.cancel()
    for channel in channels:
        await channel.close()


# ---------------------------------------------------------------- controller


def _readline(proc: subprocess.Popen[str], prefix: str, timeout: float = 600) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited waiting for {prefix!r}")
        if line.startswith(prefix):
            return line.strip()
    raise TimeoutError(prefix)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run(
    n: int, workers: int, cache: Path, pace: int, worker_nice: int = 0,
    server_env: Sequence[str] = (), server_options: Sequence[str] = (),
) -> None:
    import tempfile

    ensure_certs(cache, n)
    me = [sys.executable, __file__, "--cache-dir", str(cache)]
    env = dict(os.environ)
    env.update((k, str(v)) for k, v in _key_values(server_env))
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [*me, "--role", "server", "--agents", str(n), "--data-dir", tmp, *(f"--server-option={o}" for o in server_options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        try:
            port = int(_readline(server, "port ").split()[1])
            time.sleep(0.5)
            rss_before = _rss_kb(server.pid)
            share = (n + workers - 1) // workers
            started = time.monotonic()
            procs = [
                subprocess.Popen(
                    [*me, "--role", "worker", "--address", f"127.0.0.1:{port}", "--start", str(i * share), "--count", str(min(share, n - i * share)), "--pace", str(pace), "--worker-nice", str(worker_nice)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
                for i in range(workers)
                if i * share < n
            ]
            connect_cpu = {"server": _cpu_s(server.pid)}
            retried = [_readline(proc, "connected").partition("retried: ")[2].rstrip(")") for proc in procs]
            connect_s = time.monotonic() - started
            connect_cpu["server"] = tuple(a - b for a, b in zip(_cpu_s(server.pid), connect_cpu["server"], strict=True))
            time.sleep(1.0)  # let the fleet records flush
            rss_after = _rss_kb(server.pid)
            assert server.stdin is not None
            spies = []
            if os.environ.get("BENCH_PYSPY_DIR"):  # profile the change: server and the first worker
                out = Path(os.environ["BENCH_PYSPY_DIR"])
                spies = [
                    subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-d", "6", "-r", "250",
                                      "-f", "raw", "-o", str(out / f"{role}.txt"), "--nonblocking", *os.environ.get("BENCH_PYSPY_ARGS", "").split()],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for role, pid in (("server", server.pid), ("worker0", procs[0].pid))
                ]
                time.sleep(1.0)
            server.stdin.write("change\n")
            server.stdin.flush()
            cpu_before = {pid: _cpu_s(pid) for pid in [server.pid, *(p.pid for p in procs)]}
            threads_before = _thread_cpu_s(server.pid)
            _, t0_text, write_s, _version = _readline(server, "changed ").split()
            t0 = float(t0_text)
            latencies: list[float] = []
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("report\n")
                proc.stdin.flush()
            for proc in procs:
                latencies += [t - t0 for t in json.loads(_readline(proc, "acks ")[5:])]
            server.stdin.write("status\n")
            server.stdin.flush()
            _, done, collections, gc_s, acked = _readline(server, "status ").split(" ", 4)
            server_done, at_hub = int(done), [ms / 1000 - t0 for ms in json.loads(acked)]
            cpu = {pid: tuple(a - b for a, b in zip(_cpu_s(pid), before, strict=True)) for pid, before in cpu_before.items()}
            workers_cpu = [sum(v[i] for k, v in cpu.items() if k != server.pid) for i in (0, 1)]
            threads = {k: v - threads_before.get(k, 0.0) for k, v in _thread_cpu_s(server.pid).items()}
            busiest = sorted(((v, k) for k, v in threads.items() if v >= 0.01), reverse=True)
            print(f"agents                      {n} ({len(procs)} worker processes, one mTLS channel + stream each)")
            if server_env or server_options:
                print(f"server settings             env {' '.join(server_env) or '-'}; options {' '.join(server_options) or '-'}")
            print(f"connect + first sync        {connect_s:.2f} s for all agents (pace: {pace} handshakes in flight per "
                  f"worker; server CPU {connect_cpu['server'][0]:.1f} s user + {connect_cpu['server'][1]:.1f} s sys; "
                  f"streams retried per worker: {', '.join(retried)})")
            print(f"server RSS                  {rss_before / 1024:.1f} MiB idle -> {rss_after / 1024:.1f} MiB connected "
                  f"= {(rss_after - rss_before) / n:.1f} KiB per agent")
            if latencies:
                print(f"change -> agent ACK sent    p50 {statistics.median(latencies) * 1000:.0f} ms, "
                      f"p99 {_pct(latencies, 99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms ({len(latencies)} ACKs)")
            if at_hub:
                print(f"change -> ACK recorded      p50 {statistics.median(at_hub) * 1000:.0f} ms, "
                      f"p99 {_pct(at_hub, 99) * 1000:.0f} ms, max {max(at_hub) * 1000:.0f} ms "
                      f"({server_done}/{n} recorded in sync at the hub)")
            print(f"  policy store write + effective-policy update: {float(write_s) * 1000:.0f} ms; "
                  f"server cyclic GC: {collections} collections, {float(gc_s) * 1000:.0f} ms CPU")
            print(f"  CPU from change to last ACK recorded: server {cpu[server.pid][0]:.2f} s user + {cpu[server.pid][1]:.2f} s sys, "
                  f"agent workers {workers_cpu[0]:.2f} s user + {workers_cpu[1]:.2f} s sys")
            print("  server CPU by thread: " + ", ".join(f"{k} {v:.2f} s" for v, k in busiest))
            for spy in spies:
                spy.wait(timeout=30)
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            for proc in procs:
                proc.wait(timeout=60)
        finally:
            if server.stdin is not None:
                try:
                    server.stdin.write("quit\n")
                    server.stdin.flush()
                except BrokenPipeError:
                    pass
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cache-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "policyagent-bench-certs"))
    parser.add_argument("--role", choices=("controller", "server", "worker"), default="controller")
    parser.add_argument("--address", default="")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--pace", type=int, default=32, help="handshakes in flight per worker process")
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=0,
        help="niceness of the simulated-agent processes: real agents run on other machines; with e.g. 19 "
        "they take only the CPU the server leaves, so the server's figures are less skewed by the simulation",
    )
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the server process only (repeatable)")
    parser.add_argument("--server-option", action="append", default=[], metavar="KEY=VALUE",
                        help="gRPC server channel arg on top of hub.SERVER_CONNECTION_OPTIONS (repeatable)")
    args = parser.parse_args()
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if args.role == "server":
        asyncio.run(server_main(cache, args.agents, Path(args.data_dir), args.server_option))
    elif args.role == "worker":
        if args.worker_nice:
            os.nice(args.worker_nice)
        asyncio.run(worker_main(cache, args.address, args.start, args.count, args.pace))
    else:
        run(args.agents, args.workers, cache, args.pace, args.worker_nice, args.server_env, args.server_option)


if __name__ == "__main__":
    main()
