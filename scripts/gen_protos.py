"""Regenerate policyagent/_proto from protos/ (python, grpc and mypy stubs).

Usage: python scripts/gen_protos.py [OUTDIR]
The output is committed; tests/test_proto_drift.py regenerates into a temporary
directory and fails if anything differs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def generate(out: Path) -> None:
    from grpc_tools import protoc  # dev dependency

    # protoc finds the protoc-gen-mypy plugins on PATH, next to this interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        # Generated modules import "policyagent.v1..."; we ship them under
        # policyagent._proto, so rewrite the package prefix.
        gen = Path(tmp) / "policyagent"
        for path in gen.rglob("*"):
            if path.suffix in (".py", ".pyi"):
                text = path.read_text()
                text = text.replace("from policyagent.v1 import", "from policyagent._proto.policyagent.v1 import")
                text = text.replace("import policyagent.v1.", "import policyagent._proto.policyagent.v1.")
                text = text.replace(" policyagent.v1.", " policyagent._proto.policyagent.v1.")
                text = text.replace("[policyagent.v1.", "[policyagent._proto.policyagent.v1.")
                text = text.replace("(policyagent.v1.", "(policyagent._proto.policyagent.v1.")
                path.write_text(text)
        for pkg in (gen, gen / "v1"):
            (pkg / "__init__.py").write_text("")
        target = out / "policyagent"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(gen, target)
    (out / "__init__.py").write_text('"""Generated protobuf and gRPC code; see scripts/gen_protos.py."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "policyagent" / "_proto")
