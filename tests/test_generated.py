"""Generated artefacts must match their sources: protobuf code and the netsh reference."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path

import pytest

from policyagent.model.settings import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def _diff(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [str(Path(cmp.left) / n) for n in cmp.left_only + cmp.right_only + cmp.diff_files]
    for sub in cmp.subdirs.values():
        out += _diff(Path(sub.left), Path(sub.right))
    return out


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) not installed")
def test_generated_protobuf_code_matches_protos(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_protos
    finally:
        sys.path.pop(0)
    gen_protos.generate(tmp_path)
    drift = _diff(ROOT / "policyagent" / "_proto", tmp_path)
    assert not drift, f"generated code is out of date, run scripts/gen_protos.py: {drift}"


def test_netsh_reference_doc_matches_setting_table() -> None:
    doc = (ROOT / "docs" / "netsh-static.md").read_text()
    assert doc == reference_markdown() + "\n", "docs/netsh-static.md is stale: python -m policyagent.model.settings"
