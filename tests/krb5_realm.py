"""A throwaway MIT Kerberos realm (EXAMPLE.TEST) on a free 127.0.0.1 port, for tests.

    realm = start_realm(tmp_dir, hosts=["agent1.example.test"], services=["policyagent/server.example.test"])
    ... realm.env (KRB5_CONFIG, KRB5_KDC_PROFILE), realm.keytab("host/agent1.example.test") ...
    realm.stop()

Everything lives in the directory; the KDC is stopped by its pid. DNS is never used
(dns_lookup_* and rdns off, no hostname canonicalization). `realm_unavailable()` says
why this machine cannot run a KDC (None when it can).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from programs import find_program

REALM = "EXAMPLE.TEST"


def realm_unavailable() -> str | None:
    """Why a KDC cannot run here (missing programs or python gssapi), or None."""
    missing = [t for t in ("krb5kdc", "kdb5_util", "kadmin.local") if find_program(t) is None]
    if missing:
        return f"MIT Kerberos KDC programs not installed ({', '.join(missing)}; Debian: krb5-kdc krb5-admin-server)"
    try:
        import gssapi  # noqa: F401
    except ImportError:
        return "python gssapi is not installed (the 'kerberos' extra)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Realm:
    dir: Path
    port: int
    pid: int
    env: dict[str, str] = field(default_factory=dict)

    def keytab(self, principal: str) -> Path:
        return self.dir / (principal.replace("/", "_").replace("@", "_") + ".keytab")

    def add_principal(self, principal: str) -> Path:
        """Create `principal` with a random key and export it to its own keytab; returns the keytab."""
        path = self.keytab(principal)
        self._kadmin(f"addprinc -randkey {principal}")
        self._kadmin(f"ktadd -k {path} {principal}")
        return path

    def _kadmin(self, query: str) -> None:
        kadmin = find_program("kadmin.local")
        assert kadmin is not None
        subprocess.run(
            [kadmin, "-q", query], env={**os.environ, **self.env}, check=True, capture_output=True, timeout=30
        )

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)


def start_realm(directory: Path, host: str = "127.0.0.1") -> Realm:
    """Create the realm's database and config in `directory` and start its KDC on `host` (an address of
    this namespace: 127.0.0.1, or a test LAN address so that hosts in namespaces reach it)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    kport = _free_port()
    (directory / "krb5.conf").write_text(
        f"""[libdefaults]
  default_realm = {REALM}
  dns_lookup_kdc = false
  dns_lookup_realm = false
  dns_canonicalize_hostname = false
  rdns = false
  udp_preference_limit = 1
  default_ccache_name = FILE:{directory}/ccache
[realms]
  {REALM} = {{
    kdc = {host}:{port}
    admin_server = {host}:{kport}
  }}
[domain_realm]
  .example.test = {REALM}
  example.test = {REALM}
"""
    )
    (directory / "kdc.conf").write_text(
        f"""[kdcdefaults]
  kdc_listen = {host}:{port}
  kdc_tcp_listen = {host}:{port}
[realms]
  {REALM} = {{
    database_name = {directory}/principal
    key_stash_file = {directory}/stash
    acl_file = {directory}/kadm5.acl
    kadmind_listen = 127.0.0.1:{kport}
    kpasswd_listen = 127.0.0.1:{kport + 1 if kport < 65535 else kport}
    max_life = 10h
    supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
  }}
[logging]
  kdc = FILE:{directory}/kdc.log
  default = FILE:{directory}/krb5lib.log
"""
    )
    (directory / "kadm5.acl").write_text(f"*/admin@{REALM} *\n")
    env = {"KRB5_CONFIG": str(directory / "krb5.conf"), "KRB5_KDC_PROFILE": str(directory / "kdc.conf")}
    full_env = {**os.environ, **env}
    kdb5_util, krb5kdc = find_program("kdb5_util"), find_program("krb5kdc")
    assert kdb5_util is not None and krb5kdc is not None
    subprocess.run(
        [kdb5_util, "create", "-s", "-r", REALM, "-P", "throwaway-master-pw"],
        env=full_env, check=True, capture_output=True, timeout=60,
    )
    pid_file = directory / "krb5kdc.pid"
    subprocess.run([krb5kdc, "-P", str(pid_file)], env=full_env, check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (pid_file.exists() and pid_file.read_text().strip()):
        time.sleep(0.02)
    pid = int(pid_file.read_text().strip())
    # The KDC forks before it binds: wait until it answers on its TCP port.
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                break
        time.sleep(0.02)
    return Realm(directory, port, pid, env)
