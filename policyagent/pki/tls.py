"""TLS credentials for clients: where an admin's certificate is found, and gRPC channel credentials.

A certificate directory holds three PEM files:

    admin dir (netsh, policyagent admin tools):  admin.crt  admin.key (0600)  ca.crt
    agent key dir (after enrollment):            host.crt   host.key  (0600)  ca.crt

`netsh` looks for the admin directory in this order: --cert-dir DIR, $POLICYAGENT_ADMIN_DIR,
./policyagent-data/admin (the server's local administrator, when run where `scripts/dev server`
runs), ~/.config/policyagent/admin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from policyagent.pki.ca import PkiError

ADMIN_DIR_ENV = "POLICYAGENT_ADMIN_DIR"
ADMIN_CERT = "admin.crt"
ADMIN_KEY = "admin.key"
HOST_CERT = "host.crt"
HOST_KEY = "host.key"
CA_FILE = "ca.crt"
LOCAL_ADMIN_SUBDIR = "admin"


def tls_options(target: str) -> list[tuple[str, str]]:
    """Channel options for TLS to `target`: over a unix socket, check the server's name as "localhost".

    (gRPC would check the socket path against the certificate; the server's certificate
    always carries localhost.)
    """
    return [("grpc.ssl_target_name_override", "localhost")] if target.startswith("unix:") else []


class NoCertificate(PkiError):
    """No usable certificate directory; the message says where we looked."""


@dataclass(frozen=True)
class ClientCertificate:
    """A client's certificate, key and the CA it trusts, as PEM bytes."""

    cert: bytes
    key: bytes
    ca: bytes
    source: Path

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def admin_dir_candidates(option: str | None) -> list[tuple[Path, str]]:
    """Where to look for an admin certificate, in order, each with how it was chosen."""
    if option:
        return [(Path(option).expanduser(), "--cert-dir")]
    env = os.environ.get(ADMIN_DIR_ENV)
    if env:
        return [(Path(env).expanduser(), f"${ADMIN_DIR_ENV}")]
    return [
        (Path("policyagent-data") / LOCAL_ADMIN_SUBDIR, "the local server's admin directory"),
        (Path.home() / ".config" / "policyagent" / "admin", "the default"),
    ]


def load_cert_dir(directory: Path, cert_name: str = ADMIN_CERT, key_name: str = ADMIN_KEY) -> ClientCertificate:
    """Read cert, key and CA from `directory`; NoCertificate naming the missing file."""
    paths = [directory / cert_name, directory / key_name, directory / CA_FILE]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise NoCertificate(f"{directory} has no {', '.join(missing)}")
    try:
        cert, key, ca = (p.read_bytes() for p in paths)
    except OSError as exc:
        raise NoCertificate(f"cannot read the certificate in {directory}: {exc.strerror}") from exc
    return ClientCertificate(cert, key, ca, directory)


def find_admin_certificate(option: str | None = None) -> ClientCertificate:
    """The admin certificate netsh uses (see the module docstring); NoCertificate saying where it looked."""
    tried: list[str] = []
    candidates = admin_dir_candidates(option)
    for directory, why in candidates:
        if directory.is_dir() or len(candidates) == 1:
            try:
                return load_cert_dir(directory)
            except NoCertificate as exc:
                if len(candidates) == 1:
                    raise NoCertificate(f"no admin certificate ({why}): {exc}") from None
                tried.append(f"{directory} ({exc})")
                continue
        tried.append(str(directory))
    raise NoCertificate(
        "no admin certificate found (looked in " + ", ".join(tried) + "); pass --cert-dir DIR or set "
        f"${ADMIN_DIR_ENV}, with a directory made by `policyagent admin-cert issue NAME --out DIR`"
    )
