"""A minimal NFLOG listener (nfnetlink_log), stdlib only.

The agent's nftables table logs "this packet needed an SA and had none" to an NFLOG group with
prefix `pa-acq:<entry key> ` (see nft.py); this module receives those records:

    with NflogListener(7) as nl:
        for pkt in nl.recv(timeout=1.0):
            pkt.prefix, pkt.dst, pkt.proto, pkt.dport

Message layout (linux/netfilter/nfnetlink_log.h, linux/netfilter/nfnetlink.h): every message is an
`nlmsghdr` (type = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_*), then an `nfgenmsg` (family u8, version u8,
res_id = group, big-endian u16), then netlink attributes (u16 len, u16 type, 4-byte aligned).
Config requests carry NFULA_CFG_CMD (u8 command) and NFULA_CFG_MODE (be32 copy range, u8 mode, pad);
packets carry NFULA_PREFIX (NUL-terminated) and NFULA_PAYLOAD (starting at the IP header).

NFLOG instances belong to a network namespace: create the listener in the namespace whose ruleset
logs. Only one socket can bind a group (a second gets EPERM).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from types import TracebackType

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFNETLINK_V0 = 0

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_CFG_CMD_PF_BIND = 3
NFULNL_CFG_CMD_PF_UNBIND = 4

NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5

NFULNL_COPY_PACKET = 0x02

NFULA_PACKET_HDR = 1
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10

_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")
_NLATTR = struct.Struct("=HH")
_PORT_PROTOS = frozenset({6, 17, 33, 132, 136})
_IPV6_EXT = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options (length in 8-byte units)


@dataclass(frozen=True)
class LoggedPacket:
    """One NFLOG record. Addresses are "" and ports 0 when the payload does not carry them
    (non-TCP/UDP protocol, later fragment, truncated copy)."""

    prefix: str
    family: int  # socket.AF_INET / AF_INET6 (nfgenmsg family)
    src: str
    dst: str
    proto: int
    sport: int
    dport: int
    payload: bytes


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, data: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(data), kind) + data
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size or pos + length > len(data):
            break
        out[kind & _NLA_TYPE_MASK] = data[pos + _NLATTR.size : pos + length]
        pos += _align(length)
    return out


def _parse_ip(payload: bytes) -> tuple[int, str, str, int, int, int]:
    """(family, src, dst, proto, sport, dport) from an IPv4/IPv6 header."""
    if not payload:
        return 0, "", "", 0, 0, 0
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0x0F) * 4
        proto = payload[9]
        src = str(ipaddress.IPv4Address(payload[12:16]))
        dst = str(ipaddress.IPv4Address(payload[16:20]))
        frag_offset = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        sport = dport = 0
        if proto in _PORT_PROTOS and frag_offset == 0 and len(payload) >= ihl + 4:
            sport, dport = struct.unpack_from("!HH", payload, ihl)
        return socket.AF_INET, src, dst, proto, sport, dport
    if version == 6 and len(payload) >= 40:
        src = str(ipaddress.IPv6Address(payload[8:24]))
        dst = str(ipaddress.IPv6Address(payload[24:40]))
        proto, pos = payload[6], 40
        later_fragment = False
        while len(payload) >= pos + 8:
            if proto in _IPV6_EXT:
                proto, pos = payload[pos], pos + (payload[pos + 1] + 1) * 8
            elif proto == 44:  # fragment header, 8 bytes
                later_fragment = (struct.unpack_from("!H", payload, pos + 2)[0] & 0xFFF8) != 0
                proto, pos = payload[pos], pos + 8
            elif proto == 51:  # AH, length in 4-byte units minus 2
                proto, pos = payload[pos], pos + (payload[pos + 1] + 2) * 4
            else:
                break
        sport = dport = 0
        if proto in _PORT_PROTOS and not later_fragment and len(payload) >= pos + 4:
            sport, dport = struct.unpack_from("!HH", payload, pos)
        return socket.AF_INET6, src, dst, proto, sport, dport
    return 0, "", "", 0, 0, 0


def parse_packet_message(family: int, attrs: dict[int, bytes]) -> LoggedPacket:
    """A LoggedPacket from an NFULNL_MSG_PACKET's nfgenmsg family and attributes."""
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    payload = attrs.get(NFULA_PAYLOAD, b"")
    ip_family, src, dst, proto, sport, dport = _parse_ip(payload)
    return LoggedPacket(prefix, family or ip_family, src, dst, proto, sport, dport, payload)


class NflogListener:
    """Binds one NFLOG group in the current network namespace and yields its packets.

    `copy_range` bytes of each packet are copied (from the IP header). `bind_pf` additionally sends
    the legacy PF_UNBIND/PF_BIND commands for AF_INET and AF_INET6: that makes nfnetlink_log the
    namespace's *default* logger for those families (what old ulogd/libnetfilter_log examples do),
    which nft's `log group N` does not need (it asks for the ULOG logger type explicitly) and which
    would redirect other default-logger users, so it is off by default."""

    def __init__(self, group: int, *, copy_range: int = 256, bind_pf: bool = False, rcvbuf: int = 1 << 20) -> None:
        if not 0 <= group <= 65535:
            raise ValueError(f"invalid NFLOG group {group}")
        self.group = group
        self.overruns = 0  # times the kernel dropped records because the socket buffer was full
        self._seq = int(time.monotonic() * 1000) & 0x7FFFFFFF
        self._pending: list[LoggedPacket] = []
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.bind((0, 0))
            if bind_pf:
                for fam in (socket.AF_INET, socket.AF_INET6):
                    self._config(fam, 0, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_PF_UNBIND])))
                    self._config(fam, 0, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_PF_BIND])))
            self._config(socket.AF_UNSPEC, group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])))
            mode = struct.pack("!IBB", copy_range, NFULNL_COPY_PACKET, 0)
            # queue threshold 1: hand every record over at once (the default batches up to 100 or 1 s).
            self._config(
                socket.AF_UNSPEC,
                group,
                _attr(NFULA_CFG_MODE, mode) + _attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1)),
            )
        except BaseException:
            self._sock.close()
            raise

    # -- netlink plumbing -------------------------------------------------------------------------

    def _config(self, family: int, res_id: int, attrs: bytes) -> None:
        """Send one NFULNL_MSG_CONFIG request and wait for its ack (raises OSError on a NACK)."""
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        seq = self._seq
        body = _NFGENMSG.pack(family, NFNETLINK_V0, res_id) + attrs
        msg_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
        self._sock.send(hdr + body)
        deadline = time.monotonic() + 5.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no netlink ack for the NFLOG config request")
            ready, _, _ = select.select([self._sock], [], [], remaining)
            if not ready:
                continue
            ack = self._read(want_seq=seq)
            if ack is not None:
                if ack != 0:
                    raise OSError(-ack, f"NFLOG config (group {res_id}): {os.strerror(-ack)}")
                return

    def _read(self, want_seq: int | None = None, block: bool = True) -> int | None:
        """Read one datagram: packets go to the pending list; returns the error code of an
        NLMSG_ERROR answering `want_seq` (0 = ack), else None."""
        try:
            data = self._sock.recv(1 << 17, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.overruns += 1
                return None
            raise
        result: int | None = None
        pos = 0
        while pos + _NLMSGHDR.size <= len(data):
            length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
            if length < _NLMSGHDR.size or pos + length > len(data):
                break
            body = data[pos + _NLMSGHDR.size : pos + length]
            pos += _align(length)
            if msg_type == NLMSG_ERROR:
                code = struct.unpack_from("=i", body, 0)[0] if len(body) >= 4 else -errno.EIO
                if want_seq is not None and seq == want_seq:
                    result = code
                continue
            if msg_type in (NLMSG_NOOP, NLMSG_DONE):
                continue
            if msg_type == NLMSG_OVERRUN:
                self.overruns += 1
                continue
            if msg_type == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET and len(body) >= _NFGENMSG.size:
                family, _version, _res_id = _NFGENMSG.unpack_from(body, 0)
                self._pending.append(parse_packet_message(family, _attrs(body[_NFGENMSG.size :])))
        return result

    # -- public API -------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self, timeout: float | None = None) -> list[LoggedPacket]:
        """Packets logged so far; waits up to `timeout` seconds (None = until one arrives) when
        there are none yet. Returns [] on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._drain()
            if self._pending:
                out, self._pending = self._pending, []
                return out
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            select.select([self._sock], [], [], remaining)

    def _has_data(self) -> bool:
        ready, _, _ = select.select([self._sock], [], [], 0)
        return bool(ready)

    def _drain(self) -> None:
        while self._has_data():
            self._read(block=False)

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                self._config(socket.AF_UNSPEC, self.group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND])))
            self._sock.close()

    def __enter__(self) -> NflogListener:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["LoggedPacket", "NflogListener", "parse_packet_message"]
