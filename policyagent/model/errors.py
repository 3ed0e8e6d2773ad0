"""The error catalog of the policy model and the stores.

Every error a user can cause has a code; the server maps each code to one gRPC
status (policyagent.server.errors) and the CLI prints its message on one line.
Anything else is a bug and becomes INTERNAL with the detail only in the log.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Violation:
    """One broken rule: where (object path), which setting, what is wrong."""

    path: str
    field: str
    message: str

    def __str__(self) -> str:
        where = self.path
        if self.field:
            where = f"{where}: {self.field}" if where else self.field
        return f"{where}: {self.message}" if where else self.message


class PolicyError(Exception):
    """Base of every error a caller can cause. `code` is stable and machine-readable."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ValidationError(PolicyError):
    """The input breaks one or more rules of the model; nothing was written."""

    code = "validation"

    def __init__(self, violations: list[Violation] | Violation) -> None:
        if isinstance(violations, Violation):
            violations = [violations]
        if not violations:
            raise ValueError("ValidationError needs at least one violation")
        self.violations = list(violations)
        first = str(self.violations[0])
        more = len(self.violations) - 1
        super().__init__(first if not more else f"{first} (and {more} more)")


class NotFoundError(PolicyError):
    code = "not-found"


class AlreadyExistsError(PolicyError):
    code = "already-exists"


class ConflictError(PolicyError):
    """An update was based on a stale revision of the named object."""

    code = "conflict"


class InUseError(PolicyError):
    """The object is referenced and cannot be deleted."""

    code = "in-use"


class ProtectedError(PolicyError):
    """The operation is not allowed on this object (e.g. deleting the default response rule)."""

    code = "protected"


class UnavailableError(PolicyError):
    """Something the request needs is unreachable (e.g. the directory); the message says what and why."""

    code = "unavailable"


class StoreError(PolicyError):
    """The store cannot serve the request (corrupt, unavailable, locked)."""

    code = "store"
