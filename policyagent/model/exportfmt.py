"""The exportpolicy / importpolicy file format (docs/export-format.md).

A UTF-8 JSON document: the protobuf JSON mapping of `policyagent.v1.ExportFile`
with the proto field names, objects sorted by kind then name, revisions and
modification times left out (they belong to a store, not to the policy). It
carries pre-shared keys in clear, like Windows' .ipsec files: treat it as a
secret (the CLI writes it with mode 0600).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

from google.protobuf import json_format

from policyagent.model.errors import ValidationError, Violation
from policyagent.model.objects import Kind, StoreObject, contents_objects, kind_of, name_key
from policyagent.model.view import StoreView
from policyagent.model.writes import Mutation, PlanFn, Put
from policyagent.pb import pb

FORMAT = "policyagent-ipsec-export"
VERSION = 1


def _strip(obj: StoreObject) -> StoreObject:
    copy = type(obj)()
    copy.CopyFrom(obj)  # type: ignore[arg-type]
    copy.revision = 0
    copy.modified_unix_ms = 0
    return copy


def canonical_contents(contents: pb.StoreContents) -> pb.StoreContents:
    """The store-independent part of the contents, in a stable order."""
    out = pb.StoreContents()

    def order(objs: Sequence[StoreObject]) -> list[StoreObject]:
        return sorted((_strip(o) for o in objs), key=lambda o: (name_key(o.name), o.id))

    out.filter_lists.extend(order(contents.filter_lists))  # type: ignore[arg-type]
    out.filter_actions.extend(order(contents.filter_actions))  # type: ignore[arg-type]
    out.policies.extend(order(contents.policies))  # type: ignore[arg-type]
    return out


def export_file(contents: pb.StoreContents, now: dt.datetime | None = None) -> pb.ExportFile:
    when = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0).isoformat()
    return pb.ExportFile(format=FORMAT, version=VERSION, exported_at=when, contents=canonical_contents(contents))


def dumps(file: pb.ExportFile) -> str:
    return json_format.MessageToJson(file, preserving_proto_field_name=True, indent=2, sort_keys=False) + "\n"


def loads(text: str, source: str = "export file") -> pb.ExportFile:
    """Parses an export file; raises ValidationError naming the problem (and the source)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(Violation(source, "file", f"is not JSON: {exc}")) from None
    if not isinstance(data, dict):
        raise ValidationError(Violation(source, "file", "is not a policyagent export file (not a JSON object)"))
    if data.get("format") != FORMAT:
        raise ValidationError(Violation(source, "file", f'is not a policyagent export file (format is not "{FORMAT}")'))
    version = data.get("version")
    if version != VERSION:
        raise ValidationError(Violation(source, "file", f"has format version {version}; this version reads {VERSION}"))
    file = pb.ExportFile()
    try:
        json_format.ParseDict(data, file)
    except json_format.ParseError as exc:
        raise ValidationError(Violation(source, "file", f"is malformed: {exc}")) from None
    return file


def import_mutations(view: StoreView, file: pb.ExportFile) -> list[Mutation]:
    """Mutations that put every object of the file into the store, replacing objects with the same id."""
    objs = contents_objects(file.contents)
    seen: set[tuple[Kind, str]] = set()
    out: list[Mutation] = []
    for obj in objs:
        kind = kind_of(obj)
        if not obj.id:
            raise ValidationError(Violation(f'{kind.value} "{obj.name}"', "id", "the export file gives no id"))
        if (kind, obj.id) in seen:
            raise ValidationError(
                Violation(f'{kind.value} "{obj.name}"', "id", f"id {obj.id} appears twice in the file")
            )
        seen.add((kind, obj.id))
        copy = _strip(obj)
        current = view.get(kind, obj.id)
        copy.revision = current.revision if current is not None else 0
        out.append(Put(copy))
    return out


def import_plan(file: pb.ExportFile) -> PlanFn:
    """A PlanFn (see policyagent.store.base) importing `file` inside the store's transaction."""

    def plan(view: StoreView) -> list[Mutation]:
        return import_mutations(view, file)

    return plan
