"""Network namespaces as hosts, for tests: a LAN (a bridge in its own namespace) that hosts join.

    lan = Lan.create()                       # 10.77.K.0/24, K unique per process
    a = lan.add_host("a")                    # namespace with veth "eth0" = 10.77.K.1/24, lo up
    b = lan.add_host("b")
    root_ip = lan.join_root()                # the test process's namespace joins as 10.77.K.254
    a.run(["ping", "-c1", b.ip])
    with a.capture("udp port 4500 or icmp") as pcap: ...   # tcpdump on a's eth0, pcap path after exit
    lan.close()                              # kills what hosts started, deletes namespaces and veths

Nothing leaves the machine: the bridge has no uplink; the root namespace joins only through its
own veth, on a private /24 no other interface uses. `netns_unavailable()` says why this machine
cannot run these tests (None when it can).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_counter = itertools.count()


def netns_unavailable(*programs: str) -> str | None:
    """Why namespace tests cannot run here: not root, or a program missing (Debian package hint)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    hints = {
        "charon-systemd": "charon-systemd",
        "swanctl": "strongswan-swanctl",
        "nft": "nftables",
        "tcpdump": "tcpdump",
        "tshark": "tshark",
        "ping": "iputils-ping",
    }
    for prog in ("ip", *programs):
        if not (shutil.which(prog) or any(Path(d, prog).exists() for d in ("/usr/sbin", "/sbin"))):
            return f"needs {prog} (Debian package {hints.get(prog, prog)})"
    return None


def _run(cmd: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)


@dataclass
class Host:
    lan: Lan
    name: str  # short name ("a")
    netns: str  # namespace name
    ip: str
    iface: str = "eth0"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return _run(self.cmd(argv), check=check, timeout=timeout)

    def popen(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.cmd(argv), start_new_session=True, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def ping(self, dst: str, count: int = 1, wait: float = 1.0, interval: float = 0.2) -> bool:
        out = self.run(
            ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait), dst], check=False,
            timeout=count * (interval + wait) + 5,
        )
        return out.returncode == 0

    def add_address(self, cidr: str, dev: str = "lo") -> None:
        self.run(["ip", "addr", "replace", cidr, "dev", dev])

    @contextlib.contextmanager
    def capture(self, bpf: str = "", iface: str | None = None) -> Iterator[Path]:
        """tcpdump on this host's interface for the duration of the block; yields the pcap path."""
        path = self.lan.workdir / f"{self.name}-{next(_counter)}.pcap"
        argv = ["tcpdump", "-U", "--immediate-mode", "-n", "-i", iface or self.iface, "-w", str(path)]
        if bpf:
            argv += bpf.split()
        proc = self.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not path.exists():  # tcpdump creates the file once listening
            time.sleep(0.02)
        time.sleep(0.1)
        try:
            yield path
        finally:
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tshark_lines(pcap: Path, display_filter: str = "", fields: Sequence[str] = ()) -> list[str]:
    """tshark's one-line summaries (or the given fields, tab-separated) of a capture."""
    argv = ["tshark", "-n", "-r", str(pcap)]
    if display_filter:
        argv += ["-Y", display_filter]
    if fields:
        argv += ["-T", "fields", *itertools.chain.from_iterable(("-e", f) for f in fields)]
    out = _run(argv, check=False, timeout=60)
    return [line for line in out.stdout.splitlines() if line.strip()]


@dataclass
class Lan:
    tag: str
    prefix: str  # "10.77.K"
    workdir: Path
    hosts: dict[str, Host] = field(default_factory=dict)
    root_veth: str = ""
    owns_workdir: bool = False

    @property
    def bridge_ns(self) -> str:
        return f"{self.tag}-lan"

    @classmethod
    def create(cls, workdir: Path | None = None) -> Lan:
        n = (os.getpid() * 7 + next(_counter)) % 150 + 60  # 10.77.60.0 - 10.77.209.0
        tag = f"pa{os.getpid() % 100000}x{n}"
        work = workdir or Path(f"/tmp/{tag}")
        work.mkdir(parents=True, exist_ok=True)
        lan = cls(tag=tag, prefix=f"10.77.{n}", workdir=work, owns_workdir=workdir is None)
        _run(["ip", "netns", "add", lan.bridge_ns])
        lan._ns(lan.bridge_ns, ["ip", "link", "set", "lo", "up"])
        lan._ns(lan.bridge_ns, ["ip", "link", "add", "br0", "type", "bridge"])
        lan._ns(lan.bridge_ns, ["ip", "link", "set", "br0", "up"])
        return lan

    def _ns(self, ns: str, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "netns", "exec", ns, *argv])

    def _plug(self, peer_name: str) -> None:
        """Move `peer_name` (a veth end in the root namespace) into the bridge namespace and enslave it."""
        _run(["ip", "link", "set", peer_name, "netns", self.bridge_ns])
        self._ns(self.bridge_ns, ["ip", "link", "set", peer_name, "master", "br0"])
        self._ns(self.bridge_ns, ["ip", "link", "set", peer_name, "up"])

    def add_host(self, name: str, octet: int | None = None) -> Host:
        octet = octet or len(self.hosts) + 1
        netns = f"{self.tag}-{name}"
        ip = f"{self.prefix}.{octet}"
        inner, outer = f"v{self.tag[-6:]}{name}"[:15], f"b{self.tag[-6:]}{name}"[:15]
        _run(["ip", "netns", "add", netns])
        _run(["ip", "link", "add", inner, "type", "veth", "peer", "name", outer])
        _run(["ip", "link", "set", inner, "netns", netns])
        self._plug(outer)
        host = Host(self, name, netns, ip)
        host.run(["ip", "link", "set", inner, "name", "eth0"])
        host.run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        host.run(["ip", "link", "set", "eth0", "up"])
        host.run(["ip", "link", "set", "lo", "up"])
        self.hosts[name] = host
        return host

    def join_root(self, octet: int = 254) -> str:
        """Give the test process's own namespace an address on this LAN (for a server it runs)."""
        ip = f"{self.prefix}.{octet}"
        self.root_veth, outer = f"r{self.tag[-8:]}"[:15], f"p{self.tag[-8:]}"[:15]
        _run(["ip", "link", "add", self.root_veth, "type", "veth", "peer", "name", outer])
        self._plug(outer)
        _run(["ip", "addr", "add", f"{ip}/24", "dev", self.root_veth])
        _run(["ip", "link", "set", self.root_veth, "up"])
        return ip

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in host.procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(Exception):
                        proc.wait(timeout=5)
            _run(["ip", "netns", "del", host.netns], check=False)
        if self.root_veth:
            _run(["ip", "link", "del", self.root_veth], check=False)
        _run(["ip", "netns", "del", self.bridge_ns], check=False)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def two_hosts(workdir: Path | None = None) -> Iterator[Lan]:
    """A LAN with hosts "a" and "b" for the duration of the block."""
    lan = Lan.create(workdir)
    try:
        lan.add_host("a")
        lan.add_host("b")
        yield lan
    finally:
        lan.close()


__all__ = ["Host", "Lan", "netns_unavailable", "tshark_lines", "two_hosts"]
