"""The two kinds of netsh failure and their exit codes.

A usage error (exit 2) means the command line itself is wrong: an unknown or
ambiguous command or tag, a missing required parameter, alternatives given
together. Everything else a user can cause is a PolicyError (exit 1): a value
the setting table refuses, a write the model refuses, a missing object, or a
server that cannot be reached.
"""

from __future__ import annotations

from policyagent.model.errors import PolicyError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """The command line is malformed; the message says what and lists the candidates."""


class CommandError(PolicyError):
    """netsh refuses a well-formed command (e.g. a feature that is not available yet)."""

    code = "netsh"


class ServerUnreachable(PolicyError):
    """The policy server could not be reached or did not answer."""

    code = "unreachable"


class NoAdminCertificate(PolicyError):
    """No admin certificate was found to connect with; the message says where netsh looked."""

    code = "netsh"


class ServerRefusedCertificate(PolicyError):
    """The server refused the admin certificate (revoked, not an admin's, another CA's)."""

    code = "netsh"
