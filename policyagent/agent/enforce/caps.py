"""What this host can enforce: kernel IPsec, the strongSwan daemon and its backends, nftables.

`probe()` looks, for real and cheaply (well under half a second), at the host (network namespace) the
agent runs in:

- kernel ESP / AH / IPComp: it adds one XFRM state of each kind in a *throwaway* network namespace
  (`unshare --net ip xfrm state add ...`), so the host's own SAD is never touched, and keeps the
  kernel's error text when the kernel refuses ("Requested type not found." on kernels built without
  ESP). Transport mode needs kernel ESP: strongSwan's userspace backend is tunnel-mode only.
- charon: `charon-systemd` (one daemon per agent, own STRONGSWAN_CONF and VICI socket), its Debian
  package version, whether the userspace `kernel-libipsec` plugin is installed, `nft`, and whether the
  Python `vici` binding imports.

The backend follows from that: "kernel-netlink" with kernel ESP, else "kernel-libipsec" (ESP only,
tunnel mode, ESP-in-UDP/4500; see reference/strongswan-libipsec.md), else none. The result is cached
for the life of the process (`probe(refresh=True)` probes again).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from policyagent.pb import dist_pb

ENFORCER_NAME = "strongswan"
BACKEND_NETLINK = "kernel-netlink"
BACKEND_LIBIPSEC = "kernel-libipsec"

LIBIPSEC_PLUGIN = Path("/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so")
CHARON_LEGACY = Path("/usr/lib/ipsec/charon")  # informational: the agent runs charon-systemd
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_PROBE_TIMEOUT_S = 5.0

# One XFRM state per kind, added in a throwaway namespace. TEST-NET-1 addresses and fixed dummy keys:
# nothing here ever carries traffic, the namespace (and with it the SAD) vanishes when `ip` exits.
_KEY16 = "0x" + "00112233445566778899aabbccddeeff"
_KEY32 = _KEY16 + "00112233445566778899aabbccddeeff"
_XFRM_BASE = "ip xfrm state add src 192.0.2.1 dst 192.0.2.2"
_XFRM_PROBES: dict[str, str] = {
    "esp": f"{_XFRM_BASE} proto esp spi 0x1001 mode tunnel enc 'cbc(aes)' {_KEY16} "
    f"auth-trunc 'hmac(sha256)' {_KEY32} 128",
    "ah": f"{_XFRM_BASE} proto ah spi 0x1002 mode tunnel auth 'hmac(sha256)' {_KEY32}",
    "comp": f"{_XFRM_BASE} proto comp spi 0x1003 mode tunnel comp deflate",
}
_MARK = "@@policyagent-probe"


@dataclass(frozen=True)
class KernelProbe:
    """Whether the kernel accepted an XFRM state of one kind, and its error text when it did not."""

    ok: bool
    error: str = ""


@dataclass(frozen=True)
class HostCapabilities:
    """What `probe()` found; `problems()` says why the strongSwan enforcer cannot run here."""

    kernel_esp: bool
    kernel_ah: bool
    ipcomp: bool
    transport_mode: bool
    esp_error: str = ""  # the kernel's answer when it refused the probe's ESP state
    ah_error: str = ""
    ipcomp_error: str = ""
    is_root: bool = False
    charon_path: str = ""  # charon-systemd, "" if not installed
    charon_legacy_path: str = ""  # /usr/lib/ipsec/charon if present (not used by the agent)
    charon_version: str = ""  # Debian package version of strongswan-charon, "" if unknown
    libipsec_plugin: bool = False
    nft_path: str = ""
    vici_importable: bool = False
    backend: str = ""  # "kernel-netlink" | "kernel-libipsec" | ""
    backend_reason: str = ""  # why backend is "" (or why it is the userspace one)

    def problems(self) -> list[str]:
        """Plain-language reasons the strongSwan enforcer cannot run here (empty: it can)."""
        out: list[str] = []
        if not self.is_root:
            out.append("not root (charon and nft need root)")
        if not self.charon_path:
            out.append("charon-systemd not found (Debian package charon-systemd)")
        if not self.backend:
            out.append(self.backend_reason)
        if not self.nft_path:
            out.append("nft not found (Debian package nftables)")
        if not self.vici_importable:
            out.append("the Python package vici is not installed (pip install 'vici>=6.0')")
        return out

    def features(self) -> list[str]:
        feats: list[str] = []
        if self.charon_path:
            feats += ["ikev1", "ikev2"]
        if self.backend == BACKEND_LIBIPSEC:
            feats += ["libipsec", "esp-in-udp"]  # libipsec 5.9.8 sends ESP only inside UDP/4500
        elif self.backend == BACKEND_NETLINK:
            feats += ["kernel-netlink", "esp-in-udp"]
        return feats

    def to_proto(self) -> dist_pb.Capabilities:
        return dist_pb.Capabilities(
            enforcer=ENFORCER_NAME,
            enforces=not self.problems(),
            kernel_esp=self.kernel_esp,
            kernel_ah=self.kernel_ah,
            ipcomp=self.ipcomp,
            transport_mode=self.transport_mode,
            features=self.features(),
        )


def find_program(name: str) -> str:
    """`name` on PATH or in the sbin directories (PATH of a non-login root shell may lack them); "" if absent."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN_DIRS:
        p = Path(d, name)
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return ""


def _probe_kernel(ip_path: str) -> dict[str, KernelProbe]:
    """Try each XFRM state kind in a new, empty network namespace (one `unshare` for all three)."""
    if not ip_path:
        return {k: KernelProbe(False, "ip not found (Debian package iproute2)") for k in _XFRM_PROBES}
    unshare = find_program("unshare")
    if not unshare:
        return {k: KernelProbe(False, "unshare not found (Debian package util-linux)") for k in _XFRM_PROBES}
    script = "".join(
        f"echo '{_MARK} {kind}'; {cmd.replace('ip xfrm', ip_path + ' xfrm', 1)} 2>&1; echo \"{_MARK} rc=$?\"; "
        for kind, cmd in _XFRM_PROBES.items()
    )
    # Unprivileged, a user namespace makes us root over the throwaway network namespace.
    argv = [unshare, "--net"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--net"]
    try:
        out = subprocess.run(
            [*argv, "sh", "-c", script], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {k: KernelProbe(False, f"could not probe: {e}") for k in _XFRM_PROBES}
    results: dict[str, KernelProbe] = {}
    kind = ""
    lines: list[str] = []
    for line in out.stdout.splitlines():
        if line.startswith(f"{_MARK} rc="):
            if kind:
                rc = line.split("=", 1)[1].strip()
                results[kind] = KernelProbe(rc == "0", "" if rc == "0" else " ".join(lines).strip() or f"rc {rc}")
            kind = ""
        elif line.startswith(_MARK + " "):
            kind, lines = line.split(" ", 1)[1].strip(), []
        else:
            lines.append(line.strip())
    why = (out.stderr.strip() or f"unshare exited {out.returncode}").splitlines()[-1]
    for k in _XFRM_PROBES:
        results.setdefault(k, KernelProbe(False, f"could not probe: {why}"))
    return results


def _charon_version() -> str:
    dpkg = find_program("dpkg-query")
    if not dpkg:
        return ""
    try:
        out = subprocess.run(
            [dpkg, "-W", "-f", "${Version}", "strongswan-charon"],
            capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _probe() -> HostCapabilities:
    kernel = _probe_kernel(find_program("ip"))
    esp, ah, comp = kernel["esp"], kernel["ah"], kernel["comp"]
    charon = find_program("charon-systemd")
    libipsec = LIBIPSEC_PLUGIN.is_file()
    if esp.ok:
        backend, reason = BACKEND_NETLINK, ""
    elif libipsec:
        backend = BACKEND_LIBIPSEC
        reason = f"no kernel ESP ({esp.error}): userspace ESP, tunnel mode and ESP-in-UDP only"
    else:
        backend = ""
        reason = (
            f"no kernel ESP ({esp.error}) and no kernel-libipsec plugin "
            "(Debian package libcharon-extra-plugins)"
        )
    return HostCapabilities(
        kernel_esp=esp.ok,
        kernel_ah=ah.ok,
        ipcomp=comp.ok,
        transport_mode=esp.ok,
        esp_error=esp.error,
        ah_error=ah.error,
        ipcomp_error=comp.error,
        is_root=os.geteuid() == 0,
        charon_path=charon,
        charon_legacy_path=str(CHARON_LEGACY) if CHARON_LEGACY.is_file() else "",
        charon_version=_charon_version() if charon else "",
        libipsec_plugin=libipsec,
        nft_path=find_program("nft"),
        vici_importable=importlib.util.find_spec("vici") is not None,
        backend=backend,
        backend_reason=reason,
    )


_cache: HostCapabilities | None = None
_lock = threading.Lock()


def probe(refresh: bool = False) -> HostCapabilities:
    """This host's capabilities, probed once per process (again with refresh=True)."""
    global _cache
    with _lock:
        if _cache is None or refresh:
            _cache = _probe()
        return _cache


__all__ = [
    "BACKEND_LIBIPSEC",
    "BACKEND_NETLINK",
    "ENFORCER_NAME",
    "HostCapabilities",
    "KernelProbe",
    "find_program",
    "probe",
]
