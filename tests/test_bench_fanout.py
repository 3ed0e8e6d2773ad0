"""bench/fanout.py still runs: a tiny fleet with each simulated-agent client (the figures are not checked,
only that every agent connected, got the change and had its ACK recorded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("client", ["wire", "grpc"])
def test_fanout_bench_runs(tmp_path: Path, client: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fanout.py"), "--agents", "12", "--workers", "2",
         "--client", client, "--cache-dir", str(tmp_path / "certs")],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"client: {client}" in out.stdout
    assert "12/12 recorded in sync at the hub" in out.stdout, out.stdout + out.stderr
