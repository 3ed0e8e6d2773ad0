"""Enforcement benchmark (strongSwan + nftables, hosts in network namespaces): prints figures, asserts nothing.

    .venv/bin/python bench/enforce.py [--runs 3] [--rules 1000] [--skip-e2e] [--profile] [--keep]

Needs root, charon-systemd (kernel-libipsec or kernel ESP), nft, tcpdump, tshark.

1. Assignment → first protected packet between two hosts, end to end. The policy server runs in
   the root namespace on a namespace LAN (tests/netns.py); hosts a and b each run a real
   `policyagent agent --enforcer strongswan` (enrolled with a join token). a is assigned "Client
   (Respond Only)", b nothing. A sender in b sends one UDP datagram to a every 10 ms (--interval);
   a receiver in a records, for each datagram, when it arrived and on which interface
   (IP_PKTINFO). At T0 the bench assigns "Secure Server (Require Security)" (its Kerberos
   authentication swapped for a pre-shared key with netsh, as tests/test_enforce_netns.py does) to
   b's GPO with `policyagent gpo set`. T1 = the moment the receiver in a gets the first datagram of
   the stream through a's IPsec tunnel device, i.e. one that crossed the wire inside ESP and was
   decrypted by a's charon. Also shown: the first IKE and ESP packets from b on b's wire (tcpdump,
   pcap read with tshark), and where the time went: the `gpo set` command itself, the push until
   b's enforcer started applying (its journal's started_unix_ms), the apply, and the rest (apply
   finished → T1: the first dropped datagram's acquire, IKE, and up to one --interval until the
   next datagram). Then b is unassigned again (`gpo set --no-policy`) and it all repeats --runs times.
2. Time to apply a policy of --rules rules, each negotiating (PSK, ESP aes128-sha256) with its own
   single peer 10.200.x.y (plus one permit and one block rule), with one StrongSwanEnforcer
   (its own charon, state dir in a temp dir) in a namespace of its own: the driver is this script
   run through `ip netns exec`. Each run first applies an empty policy. Shown with what was loaded
   (connections, secrets, nft rules) and a breakdown (compile, VICI calls, nft render, nft -f).
3. Time to apply a one-rule edit of that policy: (a) one rule's filter address changed (one
   connection + the filter table), (b) one rule's security method changed (one connection only).
   The enforcer's journal (STATE_DIR/enforcer/journal.json) must show `load_conns` of length 1.

Targets (issue): < 1 s for 1, < 5 s for 2, < 0.2 s for 3.
--profile adds one more driver cycle under cProfile (not counted) and prints the profiles of its three applies.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TARGET_E2E_S = 1.0
TARGET_BIG_S = 5.0
TARGET_EDIT_S = 0.2
T1_TIMEOUT_S = 30.0
PORT = 5002
PSK = "bench-enforce-preshared-key-0123456789"

# One UDP datagram every `interval` seconds, "<seq> <send time>"; the output hook may drop it (EPERM).
SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst, interval = (sys.argv[1], int(sys.argv[2])), float(sys.argv[3])
seq, due = 0, time.monotonic()
while True:
    seq += 1
    try:
        s.sendto(f"{seq} {time.time():.6f}".encode(), dst)
    except OSError:
        pass
    due += interval
    time.sleep(max(0.0, due - time.monotonic()))
"""

# "<arrival time> <interface> <seq> <send time>" per datagram; the interface from IP_PKTINFO.
RECEIVER = r"""
import socket, struct, sys, time
IP_PKTINFO = 8
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
names = {}
while True:
    data, anc, _flags, _addr = s.recvmsg(2048, 256)
    t = time.time()
    ifindex = next((struct.unpack("i", d[:4])[0] for lvl, typ, d in anc if typ == IP_PKTINFO), 0)
    if ifindex not in names:
        try:
            names[ifindex] = socket.if_indextoname(ifindex)
        except OSError:
            names[ifindex] = str(ifindex)
    print(f"{t:.6f} {names[ifindex]} {data.decode(errors='replace')}", flush=True)
"""


# ================================================================ driver (runs inside a namespace)


class Timers:
    """Wall time and call counts per label, for the apply breakdown."""

    def __init__(self) -> None:
        self.data: dict[str, list[float]] = {}

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                entry = self.data.setdefault(label, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - start

        return timed

    def take(self) -> dict[str, list[float]]:
        out, self.data = self.data, {}
        return out


def peer_ip(i: int, second: int = 200) -> str:
    return f"10.{second}.{i // 250}.{i % 250 + 1}"


def big_policy(n: int, *, edit_addr: int | None = None, edit_method: int | None = None) -> Any:
    """An EffectivePolicy: n rules negotiating with one peer each, a permit and a block rule, a default
    response rule; PSK everywhere. `edit_addr` moves that rule's peer to 10.201.x.y; `edit_method`
    gives that rule its own filter action (ESP aes256-sha256 instead of aes128-sha256)."""
    from policyagent.pb import dist_pb, pb

    def guid(kind: int, i: int) -> str:
        return f"{{{kind:08x}-0000-4000-8000-{i:012d}}}"

    def qm(cipher: int) -> Any:
        return pb.QuickModeMethod(
            esp=pb.EspTransform(encryption=cipher, integrity=pb.INTEGRITY_SHA256), lifetime_kb=100000,
            lifetime_seconds=3600,
        )

    psk = [pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key=PSK))]
    me = pb.Address(kind=pb.ADDRESS_KIND_ME)
    require = pb.FilterAction(id=guid(2, 1), name="Require Security", action=pb.ACTION_TYPE_NEGOTIATE,
                              methods=[qm(pb.CIPHER_AES128)])
    strong = pb.FilterAction(id=guid(2, 2), name="Require Security (AES-256)", action=pb.ACTION_TYPE_NEGOTIATE,
                             methods=[qm(pb.CIPHER_AES256)])
    permit = pb.FilterAction(id=guid(2, 3), name="Permit", action=pb.ACTION_TYPE_PERMIT)
    block = pb.FilterAction(id=guid(2, 4), name="Block", action=pb.ACTION_TYPE_BLOCK)
    lists, rules = [], []
    for i in range(n):
        ip = peer_ip(i, 201 if i == edit_addr else 200)
        fl = pb.FilterList(id=guid(1, i), name=f"Peer {i}", filters=[pb.Filter(
            id=guid(3, i), mirrored=True, source=me, destination=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=ip))])
        lists.append(fl)
        action = strong if i == edit_method else require
        rules.append(pb.Rule(id=guid(4, i), name=f"peer {i}", filter_list_id=fl.id, filter_action_id=action.id,
                             auth_methods=psk, connection_type=pb.CONNECTION_TYPE_ALL, active=True))
    icmp = pb.FilterList(id=guid(1, 900001), name="All ICMP Traffic", filters=[pb.Filter(
        id=guid(3, 900001), mirrored=True, source=me, destination=pb.Address(kind=pb.ADDRESS_KIND_ANY), protocol=1)])
    blocked = pb.FilterList(id=guid(1, 900002), name="Blocked subnet", filters=[pb.Filter(
        id=guid(3, 900002), mirrored=True, source=me,
        destination=pb.Address(kind=pb.ADDRESS_KIND_SUBNET, ip="10.250.0.0", mask="255.255.0.0"))])
    lists += [icmp, blocked]
    rules.append(pb.Rule(id=guid(4, 900001), name="icmp", filter_list_id=icmp.id, filter_action_id=permit.id,
                         auth_methods=psk, connection_type=pb.CONNECTION_TYPE_ALL, active=True))
    rules.append(pb.Rule(id=guid(4, 900002), name="block", filter_list_id=blocked.id, filter_action_id=block.id,
                         auth_methods=psk, connection_type=pb.CONNECTION_TYPE_ALL, active=True))
    policy = pb.Policy(
        id=guid(5, 1), name=f"Bench {n} peers",
        isakmp=pb.IsakmpSettings(methods=[pb.MainModeMethod(
            encryption=pb.CIPHER_AES128, integrity=pb.INTEGRITY_SHA256, dh_group=pb.DH_GROUP_MODP2048)],
            lifetime_minutes=480),
        rules=rules,
        default_response_rule=pb.DefaultResponseRule(
            id=guid(6, 1), active=True, methods=[qm(pb.CIPHER_AES128)], auth_methods=psk),
    )
    out = dist_pb.EffectivePolicy(computer="bench", membership="domain", source="domain",
                                  version=f"bench-{n}-a{edit_addr}-m{edit_method}")
    out.policy.CopyFrom(policy)
    out.filter_lists.extend(lists)
    out.filter_actions.extend([require, strong, permit, block])
    return out


def nft_rule_count() -> int:
    out = subprocess.run(["nft", "-j", "list", "table", "inet", "policyagent"], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        return 0
    return sum(1 for item in json.loads(out.stdout).get("nftables", []) if "rule" in item)


def profile_text(prof: cProfile.Profile, top: int = 22) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    lines = buf.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[max(0, start - 3):])


def driver(args: argparse.Namespace) -> None:
    """Inside the namespace: StrongSwanEnforcer start(), then per run: empty → big → edit address → edit method."""
    from policyagent.agent.enforce import HostFacts, nft
    from policyagent.agent.enforce.caps import probe
    from policyagent.agent.enforce.strongswan import JOURNAL, StrongSwanEnforcer
    from policyagent.pb import dist_pb

    state = Path(args.state)
    enf = StrongSwanEnforcer(state, probe())
    timers = Timers()
    # Instrumentation (this process only): compile, every VICI call, nft render and nft -f.
    enf._compile = timers.wrap("compile (incl. ip addr/route)", enf._compile)  # type: ignore[method-assign]
    # The filter table is an nft.NftTable (enf.filters): entries rendered once per key, whole table or difference.
    nft.NftTable._prepare = timers.wrap("nft render entries", nft.NftTable._prepare)  # type: ignore[method-assign]
    nft._script = timers.wrap("nft render whole table", nft._script)
    nft._diff_script = timers.wrap("nft render difference", nft._diff_script)
    nft._nft = timers.wrap("nft commands (nft -f, list set)", nft._nft)
    enf._journal = timers.wrap("journal writes", enf._journal)  # type: ignore[method-assign]
    real_session = enf.charon.session

    def session(*a: Any, **kw: Any) -> Any:
        s = real_session(*a, **kw)
        for name in ("load_conn", "load_shared", "unload_conn", "unload_shared", "terminate"):
            setattr(s, name, timers.wrap(f"vici {name.replace('_', '-')}", getattr(s, name)))
        return s

    enf.charon.session = session  # type: ignore[method-assign]
    facts = HostFacts(membership="domain", computer="bench")
    empty = dist_pb.EffectivePolicy(computer="bench", membership="domain", source="domain", version="bench-empty")
    n = args.rules
    results: dict[str, Any] = {"runs": []}

    def timed_apply(policy: Any, prof: cProfile.Profile | None = None) -> dict[str, Any]:
        timers.take()
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        enf.apply(policy, facts)
        if prof is not None:
            prof.disable()
        elapsed = time.perf_counter() - t
        journal = json.loads((state / JOURNAL).read_text())
        return {
            "s": elapsed,
            "breakdown": timers.take(),
            "load_conns": len(journal["load_conns"]),
            "unload_conns": len(journal["unload_conns"]),
            "load_secrets": len(journal["load_secrets"]),
            "filters_change": journal["filters_change"],
            "journal_state": journal["state"],
        }

    try:
        t = time.perf_counter()
        enf.start()
        results["start_s"] = time.perf_counter() - t
        for r in range(args.runs):
            run: dict[str, Any] = {}
            run["empty"] = timed_apply(empty)
            run["big"] = timed_apply(big_policy(n))
            run["big"]["conns"] = len(enf.conns)
            run["big"]["secrets"] = len(enf.secrets)
            run["big"]["nft_rules"] = nft_rule_count()
            run["big"]["script_lines"] = enf.filters.last_script.count("\n")
            k = (r * 37 + n // 2) % n  # a different rule each run
            run["edit_addr"] = timed_apply(big_policy(n, edit_addr=k))
            run["edit_addr"]["rule"] = k
            j = (k + 1) % n
            run["edit_method"] = timed_apply(big_policy(n, edit_addr=k, edit_method=j))
            run["edit_method"]["rule"] = j
            results["runs"].append(run)
            print(f"driver: run {r + 1}: big {run['big']['s']:.3f} s, edit address {run['edit_addr']['s']:.3f} s, "
                  f"edit method {run['edit_method']['s']:.3f} s", file=sys.stderr, flush=True)
        if args.profile:  # one more cycle under cProfile, not counted in the figures
            for key, policy in (("empty", empty), ("profile_big", big_policy(n)),
                                ("profile_edit_addr", big_policy(n, edit_addr=1)),
                                ("profile_edit_method", big_policy(n, edit_addr=1, edit_method=2))):
                prof = cProfile.Profile() if key != "empty" else None
                timed_apply(policy, prof)
                if prof is not None:
                    results[key] = profile_text(prof)
    finally:
        t = time.perf_counter()
        enf.close()
        results["close_s"] = time.perf_counter() - t
    print(json.dumps(results), flush=True)


# ================================================================ parent: cleanup helpers


def reap_charons(base: Path) -> None:
    """SIGKILL any charon-systemd whose STRONGSWAN_CONF lies under `base` (left by a killed agent or driver)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if Path(proc, "comm").read_text().strip() != "charon-systemd":
                continue
            env = Path(proc, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(b"STRONGSWAN_CONF=" + str(base).encode()) for e in env):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def drop_namespaces() -> None:
    """Delete namespaces this process created (tests/netns.py names them pa<pid % 100000>x<K>-...)."""
    mine = f"pa{os.getpid() % 100000}x"
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(mine):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _terminate_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(f"interrupted by signal {signum}")


# ================================================================ figure 1: end to end


def read_arrivals(path: Path) -> list[tuple[float, str, int, float]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                with contextlib.suppress(ValueError):
                    out.append((float(parts[0]), parts[1], int(parts[2]), float(parts[3])))
    return out


def wait_for(check: Callable[[], Any], what: str, timeout: float, step: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout:g} s: {what}")


def e2e(base: Path, runs: int, interval: float) -> list[dict[str, float]]:
    import conftest
    from conftest import make_pki_template
    from netns import tshark_lines
    from test_enforce_netns import SECURE, Site, cli

    from policyagent.pki.tls import ADMIN_DIR_ENV

    conftest._pki_template = make_pki_template(base / "pki-template")  # as the test_pki fixture does
    os.environ[ADMIN_DIR_ENV] = str(conftest._pki_template / "admin")

    site = Site(base / "e2e")
    try:
        site.start_server()
        address = site.address
        cli("gpo", "set", "GPO-B", "--no-policy", "-r", address)  # b: nothing assigned
        site.start_agent(site.a)
        site.start_agent(site.b)
        unplaced = {name: site.wait_applied(name) for name in ("a", "b")}
        site.place()
        site.wait_applied("a", not_version=unplaced["a"])
        site.wait_applied("b")
        a, b = site.a, site.b
        recv_log = base / "receiver-a.log"
        with recv_log.open("wb") as out:
            a.popen([sys.executable, "-c", RECEIVER, str(PORT)], stdout=out, stderr=subprocess.DEVNULL)
        b.popen([sys.executable, "-c", SENDER, a.ip, str(PORT), str(interval)], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        wait_for(lambda: any(x[1] == "eth0" for x in read_arrivals(recv_log)), "clear datagrams b → a", 10)
        journal_b = site.base / "agent-b" / "enforcer" / "journal.json"
        results = []
        for r in range(runs):
            before = site.fleet()["b"].desired_version
            with b.capture("udp port 500 or udp port 4500") as pcap:
                t0 = time.time()
                cli("gpo", "set", "GPO-B", "--policy", SECURE, "-r", address)
                t_cli = time.time()

                def tunnelled(t0: float = t0) -> float | None:
                    return next((x[0] for x in read_arrivals(recv_log) if x[0] >= t0 and x[1] != "eth0"), None)

                t1 = wait_for(tunnelled, "a datagram through a's IPsec tunnel device", T1_TIMEOUT_S)
                time.sleep(0.5)  # protected traffic keeps flowing: check that none comes in clear any more
                t_end = time.time()
            version = site.wait_applied("b", not_version=before)
            journal = json.loads(journal_b.read_text())
            esp = [float(v) for v in tshark_lines(pcap, f"esp && ip.src == {b.ip}", ["frame.time_epoch"])]
            esp = [v for v in esp if v >= t0]
            ike = [float(v) for v in tshark_lines(pcap, f"isakmp && ip.src == {b.ip}", ["frame.time_epoch"])]
            ike = [v for v in ike if v >= t0]
            arrivals = [x for x in read_arrivals(recv_log) if t0 <= x[0] <= t_end]
            clear_before = [x for x in arrivals if x[1] == "eth0" and x[0] < t1]
            first = next(x for x in arrivals if x[1] != "eth0")
            res = {
                "total": t1 - t0,
                "cli": t_cli - t0,
                "push": journal["started_unix_ms"] / 1000 - t0,
                "apply": (journal["finished_unix_ms"] - journal["started_unix_ms"]) / 1000,
                "negotiate": t1 - journal["finished_unix_ms"] / 1000,
                "ike_wire": (min(ike) - t0) if ike else float("nan"),
                "esp_wire": (min(esp) - t0) if esp else float("nan"),
                "last_clear": (clear_before[-1][0] - t0) if clear_before else float("nan"),
                "lost": first[2] - clear_before[-1][2] - 1 if clear_before else float("nan"),
                "clear_after": sum(1 for x in arrivals if x[1] == "eth0" and x[0] > t1),
                "journal_ok": journal["state"] == "applied" and journal["version"] == version,
            }
            results.append(res)
            print(f"e2e run {r + 1}: {res['total']:.3f} s (gpo set {res['cli']:.3f} s, push → apply start "
                  f"{res['push']:.3f} s, apply {res['apply']:.3f} s, negotiate {res['negotiate']:.3f} s)", flush=True)
            # Back to unassigned; wait until the stream flows in clear again and a has seen b's deletes.
            t_off = time.time()
            cli("gpo", "set", "GPO-B", "--no-policy", "-r", address)
            site.wait_applied("b", not_version=version)
            wait_for(lambda t_off=t_off: any(x[0] > t_off and x[1] == "eth0" for x in read_arrivals(recv_log)),
                     "clear datagrams again after unassigning", 10)
            time.sleep(1.0)
        return results
    except BaseException:
        for name in ("a", "b"):
            log = site.base / f"agent-{name}.log"
            if log.exists():
                print(f"--- agent {name} (tail) ---\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        raise
    finally:
        site.close()


# ================================================================ figures 2 and 3: driver in a namespace


def run_driver(base: Path, args: argparse.Namespace) -> dict[str, Any]:
    from netns import Lan

    lan = Lan.create(base / "driver-lan")
    try:
        host = lan.add_host("d")
        state = base / "driver-state"
        argv = [sys.executable, str(Path(__file__).resolve()), "--driver", "--state", str(state),
                "--rules", str(args.rules), "--runs", str(args.runs)]
        if args.profile:
            argv.append("--profile")
        proc = host.popen(argv, stdout=subprocess.PIPE, cwd=ROOT)
        try:
            stdout, _ = proc.communicate(timeout=600 + 60 * args.runs)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError("the driver did not finish in time") from None
        if proc.returncode != 0:
            raise RuntimeError(f"the driver failed (exit {proc.returncode})")
        return dict(json.loads(stdout.decode().strip().splitlines()[-1]))
    finally:
        lan.close()
        reap_charons(base)


# ================================================================ report


def fmt(values: list[float]) -> tuple[str, str]:
    return f"{statistics.median(values):.3f} s", f"{max(values):.3f} s"


def table(rows: list[tuple[str, str, list[float]]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'target':>8}  {'median':>9}  {'max':>9}  {'runs':>4}  ok")
    for label, target, values in rows:
        if not values:
            print(f"{label:<{width}}  {target:>8}  {'-':>9}  {'-':>9}  {0:>4}")
            continue
        med, mx = fmt(values)
        limit = float(target.strip("< s"))
        ok = "yes" if max(values) < limit else ("median" if statistics.median(values) < limit else "NO")
        print(f"{label:<{width}}  {target:>8}  {med:>9}  {mx:>9}  {len(values):>4}  {ok}")


def breakdown(title: str, runs: list[dict[str, Any]]) -> None:
    """Median per label of (calls, seconds) over runs."""
    labels = sorted({k for r in runs for k in r["breakdown"]}, key=lambda k: -runs[0]["breakdown"].get(k, [0, 0])[1])
    total = statistics.median(r["s"] for r in runs)
    parts = []
    accounted = 0.0
    for label in labels:
        secs = statistics.median(r["breakdown"].get(label, [0, 0.0])[1] for r in runs)
        calls = int(statistics.median(r["breakdown"].get(label, [0, 0.0])[0] for r in runs))
        accounted += secs
        parts.append(f"{label} {secs:.3f} s" + (f" ({calls} calls, {secs / calls * 1000:.2f} ms each)"
                                                  if calls > 1 else ""))
    parts.append(f"rest (plan, digests, bookkeeping) {max(0.0, total - accounted):.3f} s")
    print(f"  {title}: " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every figure (default 3)")
    parser.add_argument("--rules", type=int, default=1000, help="negotiating rules in the big policy (default 1000)")
    parser.add_argument("--skip-e2e", action="store_true", help="skip figure 1 (server + two agents)")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between datagrams b → a (figure 1)")
    parser.add_argument("--profile", action="store_true", help="print cProfiles of the three applies (an extra, uncounted run)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, pcaps) for inspection")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, charon, nft)")
    from netns import netns_unavailable

    from policyagent.agent.enforce.caps import probe

    why = netns_unavailable("charon-systemd", "nft", "tcpdump", "tshark") or "; ".join(probe().problems())
    if why:
        raise SystemExit(f"cannot run here: {why}")
    signal.signal(signal.SIGTERM, _terminate_on_signal)
    signal.signal(signal.SIGHUP, _terminate_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    print(f"backend: {probe().backend}; strongSwan {probe().charon_version}", flush=True)

    base = Path(tempfile.mkdtemp(prefix="pa-bench-enforce-"))
    e2e_runs: list[dict[str, float]] = []
    drv: dict[str, Any] = {}
    try:
        if not args.skip_e2e:
            e2e_runs = e2e(base, args.runs, args.interval)
        drv = run_driver(base, args)
    finally:
        reap_charons(base)
        drop_namespaces()
        if args.keep:
            print(f"kept {base}")
        else:
            import shutil

            shutil.rmtree(base, ignore_errors=True)

    runs = drv["runs"]
    n = args.rules
    print()
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    rows = []
    if not args.skip_e2e:
        rows.append(("1. assignment → first datagram b→a delivered through a's IPsec tunnel", "< 1 s",
                     [r["total"] for r in e2e_runs]))
    rows += [
        (f"2. apply a {n}-rule policy (from empty)", "< 5 s", [r["big"]["s"] for r in runs]),
        ("3a. apply a one-rule edit: filter address", "< 0.2 s", [r["edit_addr"]["s"] for r in runs]),
        ("3b. apply a one-rule edit: security method", "< 0.2 s", [r["edit_method"]["s"] for r in runs]),
    ]
    table(rows)
    print()
    if e2e_runs:
        def med(key: str) -> str:
            vals = [r[key] for r in e2e_runs if r[key] == r[key]]  # NaN-free
            return f"{statistics.median(vals):.3f} s" if vals else "-"

        print("1. T0 = `policyagent gpo set GPO-B --policy \"Secure Server (Require Security)\"` called; T1 = the "
              "receiver in a gets the first datagram of the b → a stream (one every "
              f"{args.interval * 1000:g} ms) through a's IPsec tunnel device (it crossed the wire in ESP). Medians:")
        print(f"  gpo set command {med('cli')}; T0 → b's enforcer starts applying {med('push')}; "
              f"apply {med('apply')}; apply done → T1 (acquire, IKEv1 main + quick mode, next datagram) {med('negotiate')}")
        print(f"  on b's wire (tcpdump): first IKE packet from b at T0 + {med('ike_wire')}, first ESP packet from b "
              f"at T0 + {med('esp_wire')}; last clear datagram "
              f"at T0 + {med('last_clear')}; datagrams lost in between: "
              f"{[r['lost'] for r in e2e_runs]}; clear datagrams after T1: {[r['clear_after'] for r in e2e_runs]}; "
              f"journal applied: {all(r['journal_ok'] for r in e2e_runs)}")
    big = runs[0]["big"]
    print(f"2. loaded: {big['conns']} connections, {big['secrets']} shared secrets, {big['nft_rules']} nft rules "
          f"({big['script_lines']} script lines); charon start {drv['start_s']:.3f} s, "
          f"back to empty {statistics.median(r['empty']['s'] for r in runs[1:]) if len(runs) > 1 else float('nan'):.3f} s,"
          f" close {drv['close_s']:.3f} s")
    breakdown("2. breakdown (median)", [r["big"] for r in runs])
    for key, what in (("edit_addr", "3a"), ("edit_method", "3b")):
        loads = [r[key]["load_conns"] for r in runs]
        print(f"{what}. journal load_conns per run {loads} (must be 1: {'ok' if set(loads) == {1} else 'NO'}); "
              f"unload_conns {[r[key]['unload_conns'] for r in runs]}, load_secrets "
              f"{[r[key]['load_secrets'] for r in runs]}, filters_change {[r[key]['filters_change'] for r in runs]}")
        breakdown(f"{what}. breakdown (median)", [r[key] for r in runs])
    for key, what in (("profile_big", "big apply"), ("profile_edit_addr", "address edit"),
                      ("profile_edit_method", "security method edit")):
        if key in drv:
            print(f"\n--- cProfile: {what} (cumulative; an extra run, not in the figures) ---")
            print(drv[key])


if __name__ == "__main__":
    main()
