"""The server's certificate authority: created at first start, issues host, admin and server certificates.

Layout of <data-dir>/pki/ (directory 0700):

    ca.key          the CA's private key (EC P-256, PKCS#8 PEM, 0600)
    ca.crt          the CA certificate (what agents and admins trust)
    server.key      the server's TLS key (0600)
    server.crt      the server's TLS certificate + the CA certificate (the chain it presents)

Roles live in the certificate, in two places: the extended key usage carries
one of our role OIDs (authoritative: `role_of` reads it), and the subject's OU
says the same for people reading `openssl x509 -text`. The subject CN is the
computer's name (agent) or the admin's name (admin).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Role = Literal["agent", "admin", "server"]

# Our OID arc: a UUID-based OID (ITU-T X.667, 2.25.<uuid>), which needs no
# registration; 1.x below it are the role marks placed in extendedKeyUsage.
_ARC = "2.25.221676430563682105553847531963518832184"
OID_ROLE_AGENT = x509.ObjectIdentifier(f"{_ARC}.1.1")
OID_ROLE_ADMIN = x509.ObjectIdentifier(f"{_ARC}.1.2")
OID_ROLE_SERVER = x509.ObjectIdentifier(f"{_ARC}.1.3")
_ROLE_OIDS: dict[Role, x509.ObjectIdentifier] = {
    "agent": OID_ROLE_AGENT,
    "admin": OID_ROLE_ADMIN,
    "server": OID_ROLE_SERVER,
}
_OID_ROLES = {oid: role for role, oid in _ROLE_OIDS.items()}

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
# Clocks drift: certificates are valid from a little before they are made.
_BACKDATE = datetime.timedelta(minutes=5)

# Computer names as Windows and DNS allow them (one label or a dotted name);
# admin names may also carry '@' (alice@corp). Both end up in CN and file names.
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._@-]{0,62}[A-Za-z0-9])?$")


class PkiError(ValueError):
    """A certificate cannot be issued, loaded or accepted; the message says why, on one line."""


def check_name(what: str, name: str) -> str:
    """`name` if it is a usable computer or admin name; PkiError naming `what` otherwise."""
    if not _NAME_RE.match(name) or (what == "computer" and "@" in name):
        raise PkiError(
            f"{what} name {name!r} is not valid: use 1-64 letters, digits, '.', '-' or '_'"
            + (" (and '@')" if what != "computer" else "")
            + ", starting and ending with a letter or digit"
        )
    return name


def name_key(name: str) -> str:
    """Names compare case-insensitively, as Windows computer names do."""
    return name.casefold()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# ------------------------------------------------------------ files


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, born 0600 (never readable by others, not even briefly)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate (public) atomically, 0644."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def private_dir(path: Path) -> Path:
    """Create `path` 0700 if missing and tighten it to 0700 if it is open to others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


# ------------------------------------------------------------ keys and certificates


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key (fast to make, accepted by every TLS stack gRPC uses)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(data: bytes) -> x509.Certificate:
    """The first certificate of a PEM blob; PkiError if there is none."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate ({exc})") from exc


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of the DER certificate, lower-case hex without colons."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A PEM CSR for `name` signed with `key` (the agent keeps the key; only this leaves it)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def role_of(cert: x509.Certificate) -> Role | None:
    """The role our CA put in the certificate's extended key usage, or None."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    roles = {_OID_ROLES[oid] for oid in eku if oid in _OID_ROLES}
    return roles.pop() if len(roles) == 1 else None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode()


@dataclass(frozen=True)
class Issued:
    """A certificate just issued: the certificate and, when the CA made the key, the key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None = None

    @property
    def serial(self) -> int:
        return self.cert.serial_number


class CertificateAuthority:
    """The CA: its key and certificate, and the one function that signs leaf certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    @classmethod
    def load_or_create(cls, pki_dir: Path, *, ca_name: str = "policyagent CA") -> tuple[CertificateAuthority, bool]:
        """Load the CA from `pki_dir`, creating it (key 0600, directory 0700) if absent.

        Returns (ca, created). PkiError if only half of it exists or it cannot be read.
        """
        private_dir(pki_dir)
        key_path, cert_path = pki_dir / CA_KEY, pki_dir / CA_CERT
        if key_path.exists() and cert_path.exists():
            if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
                os.chmod(key_path, 0o600)
            try:
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            except ValueError as exc:
                raise PkiError(f"cannot read the CA key {key_path}: {exc}") from exc
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise PkiError(f"the CA key {key_path} is not an EC key")
            return cls(key, load_cert(cert_path.read_bytes())), False
        if key_path.exists() or cert_path.exists():
            raise PkiError(
                f"the CA in {pki_dir} is incomplete (one of {CA_KEY}, {CA_CERT} is missing); "
                "restore both from a backup"
            )
        key = new_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "policyagent"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{ca_name} {_now():%Y-%m-%d %H:%M:%S}"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a crash between the two writes leaves "incomplete", never a
        # certificate whose key is lost.
        write_private(key_path, key_pem(key))
        write_public(cert_path, cert_pem(cert))
        return cls(key, cert), True

    def issue(
        self,
        role: Role,
        name: str,
        public_key: ec.EllipticCurvePublicKey | None = None,
        *,
        dns_names: Sequence[str] = (),
        ip_addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
        validity: datetime.timedelta = LEAF_VALIDITY,
    ) -> Issued:
        """Sign a certificate for `role`/`name`; makes the key pair too when `public_key` is None."""
        key = None
        if public_key is None:
            key = new_key()
            public_key = key.public_key()
        now = _now()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "policyagent"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        tls_usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        usages = [_ROLE_OIDS[role], tls_usage]
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(min(now + validity, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ip) for ip in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key)

    def issue_from_csr(self, role: Role, name: str, csr_pem: bytes) -> Issued:
        """Sign the CSR's public key for `role`/`name` (the CSR's own subject is ignored: we name it)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError(f"the certificate request is not a PEM CSR ({exc})") from exc
        if not csr.is_signature_valid:
            raise PkiError("the certificate request's signature is not valid")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name not in (
            "secp256r1",
            "secp384r1",
        ):
            raise PkiError("the certificate request must carry an EC P-256 or P-384 public key")
        return self.issue(role, name, public_key)

    def verify_issued(self, cert: x509.Certificate) -> bool:
        """True if `cert` was signed by this CA and is within its validity period."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (InvalidSignature, ValueError, TypeError):
            return False
        now = _now()
        return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def server_sans(hosts: Iterable[str]) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """DNS and IP SANs for the server's certificate: the given hosts plus localhost, 127.0.0.1, ::1."""
    dns: list[str] = ["localhost"]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    for host in hosts:
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if host.lower() not in (d.lower() for d in dns):
                dns.append(host)
            continue
        if ip.is_unspecified:  # 0.0.0.0 / :: say nothing about the name clients use
            continue
        if ip not in ips:
            ips.append(ip)
    return dns, ips
