"""The Windows default filter lists, filter actions and policies, loaded from defaults/.

The data lives in `defaults/windows-defaults.json` (the export file format), not
in code. Every new store is seeded with it; `restore_defaults_plan` re-creates
those objects by their fixed ids without touching anything else. Values the
reference marks unconfirmed are listed in docs/policy-model.md.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from policyagent.model import exportfmt
from policyagent.model.objects import StoreObject, contents_objects, kind_of
from policyagent.model.view import StoreView
from policyagent.model.writes import Mutation, Put
from policyagent.pb import pb

DEFAULTS_FILE = "windows-defaults.json"


def defaults_dir() -> Path:
    """Where the defaults live: $POLICYAGENT_DEFAULTS_DIR, the source tree, or the installed data dir."""
    env = os.environ.get("POLICYAGENT_DEFAULTS_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "defaults")
    candidates.append(Path(sys.prefix) / "share" / "policyagent" / "defaults")
    for candidate in candidates:
        if (candidate / DEFAULTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{DEFAULTS_FILE} not found in {', '.join(str(c) for c in candidates)}")


@functools.cache
def _default_file() -> pb.ExportFile:
    path = defaults_dir() / DEFAULTS_FILE
    return exportfmt.loads(path.read_text(encoding="utf-8"), source=str(path))


def default_contents() -> pb.StoreContents:
    out = pb.StoreContents()
    out.CopyFrom(_default_file().contents)
    return out


def default_objects() -> list[StoreObject]:
    return contents_objects(default_contents())


def default_ids() -> frozenset[str]:
    return frozenset(obj.id for obj in default_objects())


def restore_defaults_plan(view: StoreView) -> list[Mutation]:
    """Re-create every default object by its fixed id (a PlanFn for PolicyStore.write).

    An existing default object is reset to its default content, keeping its
    assignment; objects users made are not touched. Dependencies come first
    (filter lists and actions before the policies that use them).
    """
    out: list[Mutation] = []
    for obj in default_objects():
        current = view.get(kind_of(obj), obj.id)
        if current is not None:
            obj.revision = current.revision
            if isinstance(obj, pb.Policy) and isinstance(current, pb.Policy):
                obj.assigned = current.assigned
        out.append(Put(obj))
    return out
