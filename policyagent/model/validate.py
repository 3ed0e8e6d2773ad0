"""Validation of policy objects (being written; see policyagent/model/settings.py)."""

from __future__ import annotations

from policyagent.model.errors import Violation
from policyagent.model.objects import StoreObject
from policyagent.model.view import StoreView


def validate_object(obj: StoreObject, view: StoreView) -> list[Violation]:
    return []
