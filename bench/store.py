"""Store benchmark: prints figures, asserts nothing.

    .venv/bin/python bench/store.py [--policies 1000] [--rules 10] [--filters 10000]

Against a real `policyagent server` (subprocess, SQLite store in a temp dir, port 0):
  1. time to create N policies of R rules each, one Apply RPC per policy (what
     `netsh ... add policy` + rules amount to, minus the CLI's read-modify-write);
  2. time to validate and store one filter list of F filters (one Apply RPC), and the
     same in-process without gRPC (validator + SQLite commit);
  3. latency of `netsh ipsec static show all` on that store (in-process netsh main,
     output discarded; median and max of several runs), and of GetStore alone.
Targets (issue 2): < 1 s for the 10,000-filter list, < 0.5 s for `show all`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from builders import big_filter_list, policy_using  # noqa: E402

from policyagent.model.defaults import default_contents  # noqa: E402
from policyagent.model.writes import Put  # noqa: E402
from policyagent.pb import GRPC_MESSAGE_OPTIONS, admin_grpc, admin_pb  # noqa: E402
from policyagent.pki.tls import load_cert_dir  # noqa: E402
from policyagent.store.sqlite import SqliteStore  # noqa: E402


def start_server(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "policyagent.cli", "server", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.split()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--rules", type=int, default=10)
    parser.add_argument("--filters", type=int, default=10_000)
    parser.add_argument("--show-runs", type=int, default=5)
    args = parser.parse_args()

    defaults = default_contents()
    fl = next(f for f in defaults.filter_lists if f.name == "All IP Traffic")
    fa = next(a for a in defaults.filter_actions if a.name == "Require Security")

    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_server(Path(tmp) / "data")
        try:
            # mTLS with the local administrator's certificate the server made in its data dir.
            admin_dir = Path(tmp) / "data" / "admin"
            channel = grpc.secure_channel(
                address, load_cert_dir(admin_dir).channel_credentials(), options=GRPC_MESSAGE_OPTIONS
            )
            stub = admin_grpc.PolicyAdminStub(channel)

            start = time.perf_counter()
            for i in range(args.policies):
                p = policy_using(f"Policy {i:05d}", fl, fa, rules=args.rules)
                stub.Apply(admin_pb.ApplyRequest(mutations=[admin_pb.Mutation(put_policy=p)]))
            elapsed = time.perf_counter() - start
            print(f"create {args.policies} policies x {args.rules} rules (1 Apply each): {elapsed:.2f} s "
                  f"({elapsed / args.policies * 1000:.2f} ms per policy)")

            big = big_filter_list("Big list", args.filters)
            start = time.perf_counter()
            stub.Apply(admin_pb.ApplyRequest(mutations=[admin_pb.Mutation(put_filter_list=big)]))
            print(f"validate + store one {args.filters}-filter list over gRPC: {time.perf_counter() - start:.3f} s")

            with SqliteStore(Path(tmp) / "inproc.sqlite3") as store:
                start = time.perf_counter()
                store.write([Put(big_filter_list("Big list", args.filters))], principal="bench")
                print(f"validate + store one {args.filters}-filter list in-process: {time.perf_counter() - start:.3f} s")

            times = []
            for _ in range(args.show_runs):
                start = time.perf_counter()
                stub.GetStore(admin_pb.GetStoreRequest())
                times.append(time.perf_counter() - start)
            print(f"GetStore (whole store): median {statistics.median(times):.3f} s, max {max(times):.3f} s")

            from clients.netsh.main import main as netsh

            times = []
            size = 0
            for _ in range(args.show_runs):
                out = io.StringIO()
                start = time.perf_counter()
                with contextlib.redirect_stdout(out):
                    code = netsh(["-r", address, "--cert-dir", str(admin_dir), "ipsec", "static", "show", "all"])
                times.append(time.perf_counter() - start)
                size = len(out.getvalue())
                assert code == 0, code
            print(f"netsh ipsec static show all: median {statistics.median(times):.3f} s, "
                  f"max {max(times):.3f} s ({size / 1e6:.1f} MB of output)")
            db = Path(tmp) / "data" / "store.sqlite3"
            if db.exists():
                print(f"store file: {db.stat().st_size / 1e6:.1f} MB")
            channel.close()
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
