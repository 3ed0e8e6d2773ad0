"""Kerberos (GSS-API, RFC 4121) for enrollment: the agent's token and the server's check of it.

The agent obtains an initial context token for the server's service principal
with its host credentials (its keytab, as `kinit -k` would, or a ticket cache);
the server accepts it with its keytab and takes the computer's identity from
the authenticated client principal: host/NAME[.domain]@REALM → computer NAME,
a member of REALM. One round trip, no mutual authentication at the GSS level:
the agent authenticates the server through TLS (the CA it was given).

The `gssapi` package (extra `kerberos`) is imported lazily. Without it, Kerberos
enrollment is refused with that reason; it is never faked.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policyagent.pki.identity import EnrollmentRefused

GSSAPI_MISSING = (
    "Kerberos enrollment needs the python package gssapi (install policyagent with the "
    "'kerberos' extra; it builds against libkrb5-dev)"
)


class KerberosUnavailable(RuntimeError):
    """Kerberos cannot be used here at all (no gssapi, no keytab); the message says why."""


def _gssapi() -> Any:
    try:
        import gssapi
    except ImportError as exc:
        raise KerberosUnavailable(GSSAPI_MISSING) from exc
    return gssapi


def gssapi_available() -> bool:
    try:
        _gssapi()
    except KerberosUnavailable:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


@dataclass(frozen=True)
class HostPrincipal:
    """A parsed host principal: host/INSTANCE@REALM."""

    instance: str
    realm: str

    @property
    def computer(self) -> str:
        """The computer name: the first label of the instance, lower case (AD's sAMAccountName without '$')."""
        return self.instance.split(".", 1)[0].lower()


def parse_host_principal(principal: str) -> HostPrincipal:
    """host/NAME@REALM → HostPrincipal; EnrollmentRefused for anything else (users, other services)."""
    name, at, realm = principal.rpartition("@")
    if not at or not realm:
        raise EnrollmentRefused(f"Kerberos principal {principal!r} has no realm")
    service, slash, instance = name.partition("/")
    if service.lower() != "host" or not slash or not instance or "/" in instance:
        raise EnrollmentRefused(
            f"Kerberos principal {principal!r} is not a computer's host principal (host/NAME@REALM)"
        )
    return HostPrincipal(instance, realm)


class KerberosAcceptor:
    """The server side: accepts GSS-API tokens with the service principal's keys from a keytab."""

    def __init__(self, keytab: Path, principal: str | None = None) -> None:
        if not keytab.is_file():
            raise KerberosUnavailable(f"the Kerberos keytab {keytab} does not exist")
        self.keytab = keytab
        self.principal = principal

    def accept(self, token: bytes) -> str:
        """The authenticated client principal of `token`; EnrollmentRefused with the reason otherwise."""
        gssapi = _gssapi()
        try:
            name = (
                gssapi.Name(self.principal, gssapi.NameType.kerberos_principal) if self.principal else None
            )
            creds = gssapi.Credentials(name=name, usage="accept", store={"keytab": str(self.keytab)})
        except gssapi.exceptions.GSSError as exc:
            raise KerberosUnavailable(f"cannot use the server's keytab {self.keytab}: {_first_line(exc)}") from exc
        context = gssapi.SecurityContext(creds=creds, usage="accept")
        try:
            context.step(token)
        except gssapi.exceptions.GSSError as exc:
            raise EnrollmentRefused(f"Kerberos token refused: {_first_line(exc)}") from exc
        if not context.complete:
            raise EnrollmentRefused("Kerberos token refused: the exchange needs more than one message")
        return str(context.initiator_name)


def initiate_token(
    service_principal: str,
    *,
    keytab: Path | None = None,
    client_principal: str | None = None,
    ccache: str | None = None,
) -> bytes:
    """An initial context token for `service_principal` from the host's credentials.

    With `keytab`, credentials come straight from it (into a private in-memory ticket
    cache unless `ccache` is given), for `client_principal` (e.g. host/agent1.example.test)
    or the keytab's first entry; without, from the default ticket cache. Raises
    KerberosUnavailable with the reason (no gssapi, no credentials, KDC unreachable).
    """
    gssapi = _gssapi()
    try:
        name = gssapi.Name(client_principal, gssapi.NameType.kerberos_principal) if client_principal else None
        store: dict[str, str] | None = None
        if keytab is not None:
            store = {
                "client_keytab": str(keytab),
                "ccache": ccache or f"MEMORY:policyagent-enroll-{secrets.token_hex(8)}",
            }
        elif ccache is not None:
            store = {"ccache": ccache}
        creds = gssapi.Credentials(name=name, usage="initiate", store=store)
        target = gssapi.Name(service_principal, gssapi.NameType.kerberos_principal)
        context = gssapi.SecurityContext(name=target, creds=creds, usage="initiate", flags=0)
        token = context.step()
    except gssapi.exceptions.GSSError as exc:
        raise KerberosUnavailable(
            f"cannot get a Kerberos token for {service_principal}: {_first_line(exc)}"
        ) from exc
    return bytes(token)
