"""The Enrollment service: check a proof, issue the host certificate, record the computer.

`enroll_computer` does the work (blocking; the server runs it in its store
thread, where the topology registry's writes also run). Everything it records
commits in one identity-database transaction, with the topology registry's
upsert inside it: the certificate is issued and the computer recorded, or
neither (docs/operations.md, "Enrolling computers").
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import grpc
from grpc import aio

from policyagent.auth.kerberos import KerberosAcceptor, KerberosUnavailable, parse_host_principal
from policyagent.pb import enroll_grpc, enroll_pb
from policyagent.pki.ca import PkiError, cert_pem, check_name
from policyagent.pki.identity import EnrollmentRefused, Membership, Peer
from policyagent.pki.server import ServerPki

_log = logging.getLogger("policyagent.auth")

T = TypeVar("T")

# (name, membership, domain) → registers the computer in the topology registry; raises to refuse.
RecordComputer = Callable[[str, Membership, str], None]


class ProofUnavailable(RuntimeError):
    """This kind of proof is not enabled on this server; the message says how to enable it."""


@dataclass(frozen=True)
class EnrollmentSettings:
    """Which proofs the server accepts."""

    kerberos: KerberosAcceptor | None = None
    workgroup_secret: bytes | None = None
    workgroup_name: str = ""  # "" = the default workgroup (WORKGROUP)

    @classmethod
    def from_files(
        cls,
        *,
        kerberos_keytab: Path | None = None,
        kerberos_principal: str | None = None,
        workgroup_secret_file: Path | None = None,
    ) -> EnrollmentSettings:
        """Settings from the server's command line; ValueError (one line) for unusable files."""
        acceptor = None
        if kerberos_keytab is not None:
            try:
                acceptor = KerberosAcceptor(kerberos_keytab, kerberos_principal)
            except KerberosUnavailable as exc:
                raise ValueError(str(exc)) from exc
        secret = None
        if workgroup_secret_file is not None:
            try:
                secret = workgroup_secret_file.read_bytes().strip()
            except OSError as exc:
                raise ValueError(
                    f"cannot read the workgroup secret file {workgroup_secret_file}: {exc.strerror}"
                ) from exc
            if len(secret) < 16:
                raise ValueError(
                    f"the workgroup secret in {workgroup_secret_file} is too short (use 16 or more characters)"
                )
        return cls(kerberos=acceptor, workgroup_secret=secret)


@dataclass(frozen=True)
class Enrolled:
    """The outcome of one enrollment."""

    response: enroll_pb.EnrollResponse
    proof: str
    replaced: list[Peer]  # the computer's earlier certificates, now revoked


def enroll_computer(
    pki: ServerPki,
    settings: EnrollmentSettings,
    request: enroll_pb.EnrollRequest,
    record_computer: RecordComputer | None = None,
) -> Enrolled:
    """Check the request's proof, then issue and record in one transaction.

    Raises EnrollmentRefused (bad/expired/reused proof, with the reason),
    ProofUnavailable (that proof is not enabled here), PkiError (malformed request).
    """
    if not request.csr_pem:
        raise PkiError("the request carries no certificate request (csr_pem)")
    which = request.WhichOneof("proof")
    realm = ""
    proof: Literal["kerberos", "join-token", "workgroup-secret"]
    if which == "kerberos_token":
        if settings.kerberos is None:
            raise ProofUnavailable(
                "Kerberos enrollment is not enabled on this server (start it with --kerberos-keytab FILE)"
            )
        try:
            principal = parse_host_principal(settings.kerberos.accept(request.kerberos_token))
        except KerberosUnavailable as exc:
            raise ProofUnavailable(str(exc)) from exc
        computer = principal.computer
        if request.computer and request.computer.lower() not in (computer, principal.instance.lower()):
            raise EnrollmentRefused(
                f"the Kerberos principal is host/{principal.instance}@{principal.realm}, "
                f"which is not computer {request.computer!r}"
            )
        membership: Membership = "domain"
        realm = principal.realm
        domain = principal.realm.lower()
        proof = "kerberos"
    elif which == "join_token":
        computer = check_name("computer", request.computer.strip()).lower()
        vouched = pki.identity.join_token_domain(request.join_token)
        membership = "domain" if vouched else "workgroup"
        domain = vouched or ""
        proof = "join-token"
    elif which == "workgroup_secret":
        if settings.workgroup_secret is None:
            raise ProofUnavailable(
                "workgroup enrollment is not enabled on this server (start it with --workgroup-secret-file FILE)"
            )
        if not hmac.compare_digest(request.workgroup_secret.strip().encode(), settings.workgroup_secret):
            raise EnrollmentRefused("wrong workgroup secret")
        computer = check_name("computer", request.computer.strip()).lower()
        membership = "workgroup"
        domain = settings.workgroup_name
        proof = "workgroup-secret"
    else:
        raise PkiError("the request carries no proof (kerberos_token, join_token or workgroup_secret)")

    def issue() -> Any:
        return pki.ca.issue_from_csr("agent", computer, request.csr_pem).cert

    cert, replaced = pki.identity.enroll(
        computer=computer,
        membership=membership,
        domain=domain,
        proof=proof,
        issue=issue,
        join_token=request.join_token if proof == "join-token" else None,
        record_computer=record_computer,
    )
    response = enroll_pb.EnrollResponse(
        certificate_pem=cert_pem(cert),
        ca_certificate_pem=pki.ca.cert_pem,
        computer=computer,
        membership=membership,
        domain=domain if membership == "domain" else "",
        realm=realm,
    )
    return Enrolled(response, proof, replaced)


class EnrollmentServicer(enroll_grpc.EnrollmentServicer):
    """grpc.aio servicer for policyagent.v1.Enrollment (public: no certificate needed to call it).

    `run_blocking(fn)` runs `fn()` off the event loop (the server's store thread);
    `record_computer()` gives the topology registry's upsert, or None while there is none.
    """

    def __init__(
        self,
        pki: ServerPki,
        settings: EnrollmentSettings,
        run_blocking: Callable[[Callable[[], Enrolled]], Awaitable[Enrolled]],
        record_computer: Callable[[], RecordComputer | None] = lambda: None,
    ) -> None:
        self._pki = pki
        self._settings = settings
        self._run_blocking = run_blocking
        self._record_computer = record_computer

    async def Enroll(
        self, request: enroll_pb.EnrollRequest, context: aio.ServicerContext[Any, Any]
    ) -> enroll_pb.EnrollResponse:
        started = time.monotonic()
        proof = request.WhichOneof("proof") or "none"
        record = self._record_computer()
        try:
            outcome = await self._run_blocking(
                lambda: enroll_computer(self._pki, self._settings, request, record)
            )
        except EnrollmentRefused as exc:
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, str(exc), proof, started)
        except ProofUnavailable as exc:
            await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), proof, started)
        except (PkiError, ValueError) as exc:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), proof, started)
        if outcome.replaced:
            self._pki.revocations.revoked(outcome.replaced)
        _log.info(
            "enrolled",
            extra={
                "computer": outcome.response.computer,
                "membership": outcome.response.membership,
                "domain": outcome.response.domain,
                "proof": outcome.proof,
                "replaced": len(outcome.replaced),
                "peer": context.peer(),
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        return outcome.response

    async def _refuse(
        self, context: aio.ServicerContext[Any, Any], status: grpc.StatusCode, reason: str, proof: str, started: float
    ) -> NoReturn:
        _log.info(
            "enrollment refused",
            extra={
                "proof": proof,
                "reason": reason,
                "peer": context.peer(),
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        await context.abort(status, f"enrollment refused: {reason}")
        raise AssertionError("context.abort returned")  # pragma: no cover


async def run_in(executor: Any, fn: Callable[[], T]) -> T:
    """`fn()` in `executor`, awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor, fn)
