"""Fan-out benchmark: N simulated agents on one policy server; prints figures, asserts nothing.

    .venv/bin/python bench/fanout.py [--agents 1000] [--workers 4] [--pace 32] [--client wire|grpc] [--cache-dir DIR]

- Certificates: one CA and N agent certificates (real, each its own key and CN
  "bench-NNNNN"), issued once into --cache-dir and reused by later runs.
- Server: a subprocess running the real `PolicyServer` (policyagent/server/app.py: its
  options, the AuthzInterceptor, the hub, the policy store and EffectivePolicies) on a
  data directory whose CA is the bench's. Its registry gets N computers spread over 20
  OUs and one GPO linked at the domain that assigns the seeded "Server (Request
  Security)" policy; the change is an edit of that policy's content, written through
  the server's policy store as PolicyAdmin writes it, so it runs the real incremental
  update, the hub's fan-out and the fleet records.
- Agents: --workers processes, each holding N/workers real gRPC streams, every one on
  its own TLS channel with its own certificate. A simulated agent says Hello, ACKs
  every policy pushed, and records when it did. Connects are paced (--pace handshakes in
  flight per worker): real agents do not all start in the same millisecond, and
  unpaced, 10,000 handshakes at once overflow the accept queue and time out.
- --client: how the simulated agents speak. `wire` (the default): `WireAgent`, gRPC over
  HTTP/2 written by the bench on an asyncio TLS connection: the same protocol on the wire as
  a grpc.aio agent for a fraction of the CPU (the simulator shares the cores the server is
  measured on; real agents run on other machines). `grpc`: grpc.aio clients, as the agent
  itself uses (~300 µs of CPU per agent per push + ACK). Printed with the figures.
- Figures: time until every agent is connected and in sync; the server's RSS before
  and after the agents connect (→ per agent); then one policy change touching all N
  agents: p50/p99/max from the change to each agent sending its ACK, and to the hub
  recording it (the fleet record's last_ack); the CPU the server and the agent workers
  used meanwhile (they share the machine's cores) and the server's time in the GC.
- --server-env KEY=VALUE (repeatable): environment of the server process only (e.g.
  MALLOC_MMAP_THRESHOLD_=17000, GRPC_EXPERIMENTS=...); --server-option KEY=VALUE (repeatable):
  a gRPC server channel arg set on top of hub.SERVER_CONNECTION_OPTIONS (same key: replaced;
  an int when the value parses as one); it reaches the grpc.aio server (the enrollment port and the
  services the front relays to), not the main port's front that serves the agents' streams. Both are
  printed with the figures.
- BENCH_PYSPY_DIR=DIR: record py-spy profiles of the server and the first worker
  around the change into DIR (py-spy must be installed in the venv).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import os
import random
import resource
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread name of a process."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- certificates


def ensure_certs(cache: Path, n: int) -> None:
    """A CA, a server pair and n agent pairs in `cache` (issued once, reused)."""
    from policyagent.pki.ca import CertificateAuthority, cert_pem, key_pem

    ca, _ = CertificateAuthority.load_or_create(cache / "pki")
    agents = cache / "agents.jsonl"
    have = sum(1 for _ in agents.open()) if agents.exists() else 0
    if not (cache / "server.json").exists():
        issued = ca.issue("server", "localhost", dns_names=["localhost"], ip_addresses=[ipaddress.ip_address("127.0.0.1")])
        assert issued.key is not None
        (cache / "server.json").write_text(
            json.dumps({"cert": (cert_pem(issued.cert) + ca.cert_pem).decode(), "key": key_pem(issued.key).decode()})
        )
    if have >= n:
        return
    started = time.monotonic()
    with agents.open("a") as out:
        for i in range(have, n):
            issued = ca.issue("agent", f"bench-{i:05d}")
            assert issued.key is not None
            out.write(json.dumps({"name": f"bench-{i:05d}", "cert": cert_pem(issued.cert).decode(), "key": key_pem(issued.key).decode()}) + "\n")
    print(f"issued {n - have} agent certificates in {time.monotonic() - started:.1f} s (cached in {cache})", flush=True)


def load_agents(cache: Path, start: int, count: int) -> list[dict[str, str]]:
    out = []
    with (cache / "agents.jsonl").open() as f:
        for i, line in enumerate(f):
            if start <= i < start + count:
                out.append(json.loads(line))
    return out


# ---------------------------------------------------------------- server process


BENCH_DOMAIN = "bench.example"
BENCH_OUS = 20  # computers spread evenly over OU=Group NN,OU=Fleet,DC=bench,DC=example
BENCH_POLICY = "Server (Request Security)"  # a seeded default policy: 2 rules, their filter lists/actions


def populate(server: Any, names: list[str]) -> str:
    """The topology: N computers in OUs, one GPO linked at the domain assigning BENCH_POLICY (store thread)."""
    from policyagent.model.assignment import Computer, Gpo, GpoLink, OrgUnit, Scope
    from policyagent.model.objects import Kind
    from policyagent.store.topology import PutObject

    policy = server.assignment.policy_store.find(Kind.POLICY, BENCH_POLICY)
    fleet = f"OU=Fleet,DC={BENCH_DOMAIN.split('.')[0]},DC={BENCH_DOMAIN.split('.')[1]}"
    ous = [f"OU=Group {i:02d},{fleet}" for i in range(BENCH_OUS)]
    puts: list[Any] = [OrgUnit(fleet), *(OrgUnit(ou) for ou in ous)]
    puts += [Computer(name, "domain", BENCH_DOMAIN, ou=ous[i % BENCH_OUS]) for i, name in enumerate(names)]
    puts.append(Gpo("", "Bench domain IPsec", policy_id=policy.id))
    topology = server.topology_store
    topology.write([PutObject(o) for o in puts], principal="bench")
    topology.write([PutObject(GpoLink("Bench domain IPsec", Scope.domain(BENCH_DOMAIN)))], principal="bench")
    return str(policy.id)


def edit_policy(server: Any, generation: int) -> None:
    """The change: an edit of the assigned policy's content, as PolicyAdmin would write it (store thread)."""
    from policyagent.model.objects import Kind
    from policyagent.model.writes import Put

    store = server.assignment.policy_store
    policy = store.find(Kind.POLICY, BENCH_POLICY)
    policy.description = f"bench change {generation}"
    store.write([Put(policy)], principal="bench")


def _key_values(items: Sequence[str]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for item in items:
        key, _, value = item.partition("=")
        try:
            out.append((key, int(value)))
        except ValueError:
            out.append((key, value))
    return out


async def server_main(cache: Path, n: int, data_dir: Path, server_options: Sequence[str] = ()) -> None:
    """The real server (PolicyServer: interceptor, options, hub, EffectivePolicies) on the bench CA."""
    import shutil

    import policyagent.server.app as app
    from policyagent.server.app import PolicyServer, ServerConfig

    if server_options:  # --server-option: on top of hub.SERVER_CONNECTION_OPTIONS, as app.py passes them
        extra = _key_values(server_options)
        keys = {k for k, _ in extra}
        app.SERVER_CONNECTION_OPTIONS = [(k, v) for k, v in app.SERVER_CONNECTION_OPTIONS if k not in keys] + extra

    _raise_fd_limit()
    pki = data_dir / "pki"
    pki.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("ca.key", "ca.crt"):
        shutil.copy(cache / "pki" / name, pki / name)
    names = [f"bench-{i:05d}" for i in range(n)]
    server = PolicyServer(ServerConfig(data_dir=data_dir, listen="127.0.0.1:0", enroll_listen="127.0.0.1:0", grace_seconds=0))
    address = await server.start()
    loop = asyncio.get_running_loop()
    t = time.monotonic()
    await server._in_store_thread(populate, server, names)
    print(f"topology: {n} computers in {BENCH_OUS} OUs, one domain GPO, built in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    effective, hub = server.effective, server.hub
    gc_time = [0.0, 0, 0.0]  # CPU seconds in the cyclic GC since the change, collections, start of the current one

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_time[2] = time.thread_time()
        else:
            gc_time[0] += time.thread_time() - gc_time[2]
            gc_time[1] += 1

    gc.callbacks.append(on_gc)
    print(f"port {address.rsplit(':', 1)[1]}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    generation = 0
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        if line == "change":
            generation += 1
            gc_time[:2] = [0.0, 0]
            t0 = time.time()
            await server._in_store_thread(edit_policy, server, generation)
            t1 = time.time()
            print(f"changed {t0:.6f} {t1 - t0:.6f} {effective.version_of(names[0])}", flush=True)
        elif line == "status":
            # When did the server record the ACKs of the current version? (Checked every 0.5 s, up to
            # 30 s: the times are the hub's own records; checking often would only slow the hub down.)
            deadline = time.monotonic() + 30
            while True:
                records = [hub.registry.get(name) for name in names]
                acked = [r.last_ack_unix_ms for r in records if r.applied_version == effective.version_of(r.computer)]
                if len(acked) == n or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            print(f"status {len(acked)} {gc_time[1]} {gc_time[0]:.3f} {json.dumps(acked)}", flush=True)
    await server.stop(0)


# ---------------------------------------------------------------- wire agent: gRPC over HTTP/2 by hand

# The frame and HPACK-literal encoders and the protocol's numbers are the server front's
# (policyagent/server/front.py); the client side (parsing, windows, the agent's behaviour) is the bench's.
from policyagent.server import front as _front  # noqa: E402  (after the sys.path insert)

_H2_PREFACE, STREAM_PATH, encode_headers, _h2_frame = _front.PREFACE, _front.STREAM_PATH, _front.encode_headers, _front.frame
_DATA, _HEADERS, _RST_STREAM, _SETTINGS = _front.DATA, _front.HEADERS, _front.RST_STREAM, _front.SETTINGS
_PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE = _front.PUSH_PROMISE, _front.PING, _front.GOAWAY, _front.WINDOW_UPDATE
_CONTINUATION, _END_STREAM, _ACK, _END_HEADERS = _front.CONTINUATION, _front.END_STREAM, _front.ACK, _front.END_HEADERS
_PADDED, _PRIORITY_FLAG = _front.PADDED, _front.PRIORITY_FLAG
_H2_HEAD = struct.Struct(">BHBBL")  # frame header: length (24 bits: high byte + low 16), type, flags, stream id
_H2_SETTING = struct.Struct(">HL")
# error codes (RFC 9113 §7)
_NO_ERROR, _PROTOCOL_ERROR, _FRAME_SIZE_ERROR = _front.NO_ERROR, _front.PROTOCOL_ERROR, _front.FRAME_SIZE_ERROR
_COMPRESSION_ERROR = _front.COMPRESSION_ERROR
_H2_MAX_FRAME = _front.DEFAULT_MAX_FRAME  # the largest frame we accept: we never raise SETTINGS_MAX_FRAME_SIZE
_H2_WINDOW = 1 << 20  # our receive windows (connection and stream); replenished once half is consumed
_H2_DEFAULT_WINDOW = _front.DEFAULT_WINDOW
_GRPC_CODES = {code.value[0]: code.name for code in grpc.StatusCode}
# What a gRPC client makes of an RST_STREAM's error code (gRPC's PROTOCOL-HTTP2.md; others: INTERNAL)
# and of a response's HTTP status when it has no grpc-status (others: UNKNOWN).
_RST_TO_GRPC = {0x7: "UNAVAILABLE", 0x8: "CANCELLED", 0xB: "RESOURCE_EXHAUSTED", 0xC: "PERMISSION_DENIED"}
_HTTP_TO_GRPC = {
    400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
    429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE",
}


class WireAgent(asyncio.Protocol):
    """One simulated agent's Distribution.Stream spoken by hand: gRPC over HTTP/2 (RFC 9113) over mTLS.

    Why it exists: the bench measures the server, and the simulated agents share its cores (real
    agents run on other machines). A grpc.aio agent costs ~300 µs of CPU per push + ACK, so at
    10,000 agents the simulator takes seconds of the CPU the server is measured on. This class does
    only what an agent's stream needs, on an asyncio TLS connection (`loop.create_connection(lambda:
    agent, ssl=...)`), and costs a fraction of that. On the wire it speaks what a grpc.aio agent
    speaks: TLS 1.2+ with the agent's own client certificate and ALPN h2; the HTTP/2 preface,
    SETTINGS and flow control (windows replenished, the server's send windows respected); one POST
    /policyagent.v1.Distribution/Stream on stream 1 with gRPC length-prefixed messages in DATA
    frames; the server's header blocks decoded with `hpack`, its PINGs answered, GOAWAY and
    RST_STREAM honoured, grpc-status read from the trailers. The server runs exactly the code it
    runs for a real agent (only the client's SETTINGS values and optional headers such as
    user-agent differ from grpc's).

    Minimal, not general: one stream, no compression, no server push, no priorities; request headers
    are encoded without indexing (no encoder state). `on_message(data)` gets each gRPC message the
    server sends (serialized ServerMessage bytes); `send(data)` sends one (serialized AgentMessage),
    writing it at once. `done` resolves when the stream ends: None when the server ended it with
    grpc-status 0, else the name of the gRPC status code a grpc.aio call would fail with.
    `close()` says GOAWAY and closes the connection; `closed` resolves when it is gone.
    """

    __slots__ = (
        "_authority", "_buf", "_closing", "_grpc_buf", "_hblock", "_hend", "_hpack", "_hstream", "_local_closed",
        "_out", "_peer_initial", "_peer_max_frame", "_pending", "_recv_conn", "_recv_stream", "_remote_closed",
        "_response", "_send_conn", "_send_stream", "closed", "done", "message", "on_message", "transport",
    )

    def __init__(self, authority: str, on_message: Callable[[bytes], None]) -> None:
        import hpack

        loop = asyncio.get_running_loop()
        self._authority = authority
        self.on_message = on_message
        self.done: asyncio.Future[str | None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.message = ""  # grpc-message of a failed stream, for debugging
        self.transport: asyncio.Transport | None = None
        self._closing = False
        self._hpack = hpack.Decoder()  # one per connection: the server's encoder indexes into it
        self._buf = b""  # an incomplete frame
        self._out: list[bytes] = []  # frames to write at the end of this data_received (or now, by send)
        self._grpc_buf = bytearray()  # an incomplete gRPC message
        self._pending = bytearray()  # gRPC bytes waiting for the server's send windows
        self._hblock: bytearray | None = None  # a header block waiting for its CONTINUATIONs
        self._hstream = 0
        self._hend = False
        self._response = False  # the response headers came (the next header block is the trailers)
        self._remote_closed = self._local_closed = False
        self._send_conn = self._send_stream = self._peer_initial = _H2_DEFAULT_WINDOW
        self._peer_max_frame = _H2_MAX_FRAME
        self._recv_conn = self._recv_stream = 0  # received since the last WINDOW_UPDATE

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        tls = transport.get_extra_info("ssl_object")
        if tls is None or tls.selected_alpn_protocol() != "h2":
            self._finish("UNAVAILABLE")  # a gRPC client refuses a server that does not speak h2
            self._local_closed = self._closing = True
            transport.close()
            return
        settings = _H2_SETTING.pack(0x2, 0) + _H2_SETTING.pack(0x4, _H2_WINDOW)  # ENABLE_PUSH, INITIAL_WINDOW_SIZE
        headers = encode_headers(
            (
                (":method", "POST"),
                (":scheme", "https"),
                (":path", STREAM_PATH),
                (":authority", self._authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        self._out += (
            _H2_PREFACE,
            _h2_frame(_SETTINGS, 0, 0, settings),
            _h2_frame(_WINDOW_UPDATE, 0, 0, (_H2_WINDOW - _H2_DEFAULT_WINDOW).to_bytes(4, "big")),
            _h2_frame(_HEADERS, _END_HEADERS, 1, headers),
        )
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._finish("UNAVAILABLE")  # the connection went before the stream ended
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # we said GOAWAY: what still arrives is of no concern
        if self._buf:
            data = self._buf + data
        end = len(data)
        off = 0
        while end - off >= 9:
            high, low, kind, flags, stream = _H2_HEAD.unpack_from(data, off)
            size = high << 16 | low
            if size > _H2_MAX_FRAME:
                self._connection_error(_FRAME_SIZE_ERROR)
                return
            start = off + 9
            if end - start < size:
                break
            off = start + size
            if self._hblock is not None and kind != _CONTINUATION:
                self._connection_error(_PROTOCOL_ERROR)  # nothing comes between a header block's frames (§6.10)
                return
            if kind == _DATA:
                self._on_data(flags, stream, data[start:off])
            elif kind in (_HEADERS, _CONTINUATION):
                if not self._on_headers(kind, flags, stream, data[start:off]):
                    return
            elif kind == _SETTINGS:
                if not flags & _ACK:
                    if size % 6:
                        self._connection_error(_FRAME_SIZE_ERROR)
                        return
                    self._on_settings(data[start:off])
            elif kind == _PING:
                if not flags & _ACK:
                    self._out.append(_h2_frame(_PING, _ACK, 0, data[start:off]))
            elif kind == _WINDOW_UPDATE:
                increment = int.from_bytes(data[start : start + 4], "big") & 0x7FFFFFFF
                if stream == 0:
                    self._send_conn += increment
                elif stream == 1:
                    self._send_stream += increment
                if self._pending:
                    self._flush_data()
            elif kind == _RST_STREAM:
                if stream == 1:
                    self._remote_closed = self._local_closed = True
                    self._finish(_RST_TO_GRPC.get(int.from_bytes(data[start : start + 4], "big"), "INTERNAL"))
            elif kind == _GOAWAY:
                last_stream = int.from_bytes(data[start : start + 4], "big") & 0x7FFFFFFF
                error = int.from_bytes(data[start + 4 : start + 8], "big")
                if last_stream < 1 or error != _NO_ERROR:
                    self._finish("UNAVAILABLE")  # our stream was not processed, or the connection failed
                # else: a graceful GOAWAY; the server still ends our stream (trailers, RST_STREAM or close)
            elif kind == _PUSH_PROMISE:
                self._connection_error(_PROTOCOL_ERROR)  # we said SETTINGS_ENABLE_PUSH = 0
                return
            # PRIORITY and unknown frame types: ignored (§5.5)
        self._buf = data[off:] if off < end else b""
        self._flush()

    # -- frames

    def _on_data(self, flags: int, stream: int, payload: bytes) -> None:
        size = len(payload)  # all of it counts against the windows, padding included (§6.9.1)
        self._recv_conn += size
        if self._recv_conn >= _H2_WINDOW // 2:
            self._out.append(_h2_frame(_WINDOW_UPDATE, 0, 0, self._recv_conn.to_bytes(4, "big")))
            self._recv_conn = 0
        if stream != 1 or self._remote_closed:
            return
        if flags & _PADDED:
            payload = payload[1 : size - payload[0]] if size and payload[0] < size else b""
        if flags & _END_STREAM:
            self._remote_closed = True
        else:
            self._recv_stream += size
            if self._recv_stream >= _H2_WINDOW // 2:
                self._out.append(_h2_frame(_WINDOW_UPDATE, 0, 1, self._recv_stream.to_bytes(4, "big")))
                self._recv_stream = 0
        if payload:
            self._on_grpc_bytes(payload)
        if flags & _END_STREAM:
            self._finish("INTERNAL")  # the stream ended without trailers (no grpc-status)

    def _on_headers(self, kind: int, flags: int, stream: int, payload: bytes) -> bool:
        if kind == _CONTINUATION:
            if self._hblock is None or stream != self._hstream:
                self._connection_error(_PROTOCOL_ERROR)
                return False
            self._hblock += payload
            if not flags & _END_HEADERS:
                return True
            block, self._hblock = bytes(self._hblock), None
            return self._on_header_block(self._hstream, self._hend, block)
        if flags & _PADDED:
            size = len(payload)
            payload = payload[1 : size - payload[0]] if size and payload[0] < size else b""
        if flags & _PRIORITY_FLAG:
            payload = payload[5:]
        if flags & _END_HEADERS:
            return self._on_header_block(stream, bool(flags & _END_STREAM), payload)
        self._hblock, self._hstream, self._hend = bytearray(payload), stream, bool(flags & _END_STREAM)
        return True

    def _on_header_block(self, stream: int, end_stream: bool, block: bytes) -> bool:
        import hpack

        try:
            fields = dict(self._hpack.decode(block, raw=True))  # always decoded: it updates the decoder's table
        except hpack.HPACKError:
            self._connection_error(_COMPRESSION_ERROR)
            return False
        if stream != 1 or self._remote_closed:
            return True
        if not self._response:  # the response headers (or a trailers-only response)
            self._response = True
            status = fields.get(b":status", b"")
            if status != b"200":
                self._remote_closed = True
                self._finish(_HTTP_TO_GRPC.get(int(status) if status.isdigit() else 0, "UNKNOWN"))
                return True
            if not end_stream:
                return True
        elif not end_stream:
            self._connection_error(_PROTOCOL_ERROR)  # trailers without END_STREAM
            return False
        self._remote_closed = True
        code = fields.get(b"grpc-status", b"2")  # no grpc-status: UNKNOWN
        number = int(code) if code.isdigit() else 2
        self.message = urllib.parse.unquote(fields.get(b"grpc-message", b"").decode("ascii", "replace"))
        self._finish(None if number == 0 else _GRPC_CODES.get(number, "UNKNOWN"))
        return True

    def _on_settings(self, payload: bytes) -> None:
        for ident, value in _H2_SETTING.iter_unpack(payload):
            if ident == 0x4:  # SETTINGS_INITIAL_WINDOW_SIZE: applies to open streams as a delta (§6.9.2)
                self._send_stream += value - self._peer_initial
                self._peer_initial = value
            elif ident == 0x5:  # SETTINGS_MAX_FRAME_SIZE
                self._peer_max_frame = value
            # HEADER_TABLE_SIZE: our encoder uses no table; the others do not concern a client's one stream
        self._out.append(_h2_frame(_SETTINGS, _ACK, 0))
        if self._pending:
            self._flush_data()

    def _on_grpc_bytes(self, data: bytes) -> None:
        """gRPC length-prefixed messages (1 byte compressed flag, 4 bytes length), across DATA frames."""
        if self._grpc_buf:
            self._grpc_buf += data
            data = bytes(self._grpc_buf)
            self._grpc_buf.clear()
        end = len(data)
        off = 0
        while end - off >= 5:
            start = off + 5
            stop = start + int.from_bytes(data[off + 1 : start], "big")
            if stop > end:
                break
            if data[off]:  # compressed: we never offered an encoding (grpc-accept-encoding)
                self._remote_closed = True
                self._finish("INTERNAL")
                return
            off = stop
            self.on_message(data[start:stop])
        if off < end:
            self._grpc_buf += data[off:]

    # -- sending

    def send(self, message: bytes) -> None:
        """One gRPC message on the stream, written now (queued while the server's windows are exhausted)."""
        if self._local_closed:
            return
        size = len(message) + 5  # compressed flag 0 + 4-byte big-endian length, then the message
        if not self._pending and size <= min(self._send_conn, self._send_stream, self._peer_max_frame):
            self._out.append(_h2_frame(_DATA, 0, 1, len(message).to_bytes(5, "big") + message))
            self._send_conn -= size
            self._send_stream -= size
        else:
            self._pending += len(message).to_bytes(5, "big")
            self._pending += message
            self._flush_data()
        self._flush()

    def _flush_data(self) -> None:
        pending = self._pending
        while pending:
            n = min(len(pending), self._send_conn, self._send_stream, self._peer_max_frame)
            if n <= 0:
                return  # the server's WINDOW_UPDATE (or SETTINGS) sends the rest
            self._out.append(_h2_frame(_DATA, 0, 1, bytes(pending[:n])))
            del pending[:n]
            self._send_conn -= n
            self._send_stream -= n

    def _flush(self) -> None:
        if self._out:
            if self.transport is not None and not self._closing:
                self.transport.write(b"".join(self._out))
            self._out.clear()

    def _finish(self, status: str | None) -> None:
        if not self.done.done():
            self.done.set_result(status)

    def _connection_error(self, error: int) -> None:
        self._finish("INTERNAL")
        self.close(error)

    def close(self, error: int = _NO_ERROR) -> None:
        """Say GOAWAY (last stream 0: we accept none) and close the connection."""
        self._local_closed = True
        if self.transport is None:
            if not self.closed.done():
                self.closed.set_result(None)  # never connected, or already gone
            return
        if not self._closing:
            self._out.append(_h2_frame(_GOAWAY, 0, 0, bytes(4) + error.to_bytes(4, "big")))
            self._flush()
            self._closing = True
            self.transport.close()


# ---------------------------------------------------------------- agent worker process


async def worker_main(cache: Path, address: str, start: int, count: int, pace: int, client: str = "wire") -> None:
    import grpc
    from grpc import aio

    from policyagent.pb import dist_grpc, dist_pb
    from policyagent.server.hub import GC_GEN0_THRESHOLD

    _raise_fd_limit()
    # A worker holds thousands of streams, like the server: the same GC setting keeps it from spending
    # the shared cores on collections (a real agent holds one stream and does not need it).
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    agents = load_agents(cache, start, count)
    ca_pem = (cache / "pki" / "ca.crt").read_bytes()
    acks: dict[str, list[tuple[str, float]]] = {a["name"]: [] for a in agents}
    connected = asyncio.Event()
    in_sync = 0
    channels = []

    errors: dict[str, int] = {}
    # Pacing (a bench artefact: real agents start at different times and reconnect with jitter):
    # at most `pace` handshakes + first syncs in flight per worker process.
    connecting = asyncio.Semaphore(pace)
    from policyagent.agent.daemon import keepalive_options
    from policyagent.pb import GRPC_MESSAGE_OPTIONS

    # The real agent's channel options (policyagent/agent/daemon.py), at its default keepalive.
    agent_options = [*keepalive_options(20.0), *GRPC_MESSAGE_OPTIONS]

    def sent_ack(name: str, version: str, first: bool) -> None:
        """After an agent sent an ACK: when it did and, on its first, the pacing and in-sync count."""
        nonlocal in_sync
        acks[name].append((version, time.time()))
        if first:
            connecting.release()
            in_sync += 1
            if in_sync == len(agents):
                connected.set()

    async def one(agent: dict[str, str]) -> None:
        creds = grpc.ssl_channel_credentials(ca_pem, agent["key"].encode(), agent["cert"].encode())
        first = True
        await connecting.acquire()
        while True:  # like the agent: reconnect when the stream fails (e.g. a handshake storm at start)
            channel = aio.secure_channel(address, creds, options=agent_options)
            channels.append(channel)
            try:
                call = dist_grpc.DistributionStub(channel).Stream()
                await call.write(dist_pb.AgentMessage(hello=dist_pb.Hello(computer=agent["name"])))
                async for message in call:
                    if message.WhichOneof("msg") != "policy":
                        continue
                    p = message.policy
                    await call.write(dist_pb.AgentMessage(ack=dist_pb.Ack(version=p.version, nonce=p.nonce)))
                    sent_ack(agent["name"], p.version, first)
                    first = False
                return
            except grpc.RpcError as exc:
                key = exc.code().name if isinstance(exc, aio.AioRpcError) else type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
                await channel.close()
                await asyncio.sleep(0.5 + random.random())

    # --client wire: the same agent, speaking gRPC over HTTP/2 itself (WireAgent) at a fraction of the CPU.
    loop = asyncio.get_running_loop()
    host, _, port = address.rpartition(":")
    wires: dict[str, WireAgent] = {}
    pem_dir = tempfile.mkdtemp(prefix="fanout-wire-") if client == "wire" else ""  # load_cert_chain reads files only

    def tls_context(agent: dict[str, str]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server's certificate and host name
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cadata=ca_pem.decode())
        context.set_alpn_protocols(["h2"])
        pem = Path(pem_dir) / f"{agent['name']}.pem"
        pem.write_text(agent["cert"] + agent["key"])
        try:
            context.load_cert_chain(pem)
        finally:
            pem.unlink()
        return context

    async def one_wire(agent: dict[str, str]) -> None:
        name = agent["name"]
        hello = dist_pb.AgentMessage(hello=dist_pb.Hello(computer=name)).SerializeToString()
        first = True

        def on_message(data: bytes) -> None:
            nonlocal first
            message = dist_pb.ServerMessage.FromString(data)
            if message.WhichOneof("msg") != "policy":
                return
            p = message.policy
            wire.send(dist_pb.AgentMessage(ack=dist_pb.Ack(version=p.version, nonce=p.nonce)).SerializeToString())
            sent_ack(name, p.version, first)
            first = False

        await connecting.acquire()
        context = tls_context(agent)
        while True:  # like the grpc worker: reconnect when the stream fails
            wire = wires[name] = WireAgent(address, on_message)
            try:
                await asyncio.wait_for(loop.create_connection(lambda w=wire: w, host, int(port), ssl=context), 20)
                wire.send(hello)
                status = await wire.done
            except OSError:  # refused, reset, TLS handshake failed, timed out: what grpc calls UNAVAILABLE
                status = "UNAVAILABLE"
            finally:
                wire.close()
            if status is None:  # the server ended the stream with grpc-status 0
                return
            errors[status] = errors.get(status, 0) + 1
            await asyncio.sleep(0.5 + random.random())

    tasks = []
    for agent in agents:
        tasks.append(asyncio.create_task(one_wire(agent) if client == "wire" else one(agent)))
        await asyncio.sleep(0)  # let the loop breathe while thousands of handshakes start
    await connected.wait()
    print(f"connected (stream errors retried: {errors or 'none'})", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        if line == "report":
            # Each agent's ACK of the pushed change: its second policy (the first was the sync on connect).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(len(h) < 2 for h in acks.values()):
                await asyncio.sleep(0.05)
            times = [h[1][1] for h in acks.values() if len(h) >= 2]
            print("acks " + json.dumps(times), flush=True)
    for task in tasks:
        task.cancel()
    if wires:  # GOAWAY + TLS close_notify sent as the tasks end; let the connections go
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait([w.closed for w in wires.values()], timeout=5)
    if pem_dir:
        os.rmdir(pem_dir)  # empty: each file goes once loaded
    for channel in channels:
        await channel.close()


# ---------------------------------------------------------------- controller


def _readline(proc: subprocess.Popen[str], prefix: str, timeout: float = 600) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited waiting for {prefix!r}")
        if line.startswith(prefix):
            return line.strip()
    raise TimeoutError(prefix)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run(
    n: int, workers: int, cache: Path, pace: int, worker_nice: int = 0,
    server_env: Sequence[str] = (), server_options: Sequence[str] = (), client: str = "wire",
) -> None:
    import tempfile

    ensure_certs(cache, n)
    me = [sys.executable, __file__, "--cache-dir", str(cache)]
    env = dict(os.environ)
    env.update((k, str(v)) for k, v in _key_values(server_env))
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [*me, "--role", "server", "--agents", str(n), "--data-dir", tmp, *(f"--server-option={o}" for o in server_options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        try:
            port = int(_readline(server, "port ").split()[1])
            time.sleep(0.5)
            rss_before = _rss_kb(server.pid)
            share = (n + workers - 1) // workers
            started = time.monotonic()
            procs = [
                subprocess.Popen(
                    [*me, "--role", "worker", "--address", f"127.0.0.1:{port}", "--start", str(i * share), "--count", str(min(share, n - i * share)), "--pace", str(pace), "--worker-nice", str(worker_nice), "--client", client],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
                for i in range(workers)
                if i * share < n
            ]
            connect_cpu = {"server": _cpu_s(server.pid)}
            retried = [_readline(proc, "connected").partition("retried: ")[2].rstrip(")") for proc in procs]
            connect_s = time.monotonic() - started
            connect_cpu["server"] = tuple(a - b for a, b in zip(_cpu_s(server.pid), connect_cpu["server"], strict=True))
            time.sleep(1.0)  # let the fleet records flush
            rss_after = _rss_kb(server.pid)
            assert server.stdin is not None
            spies = []
            if os.environ.get("BENCH_PYSPY_DIR"):  # profile the change: server and the first worker
                out = Path(os.environ["BENCH_PYSPY_DIR"])
                spies = [
                    subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-d", "6", "-r", "250",
                                      "-f", "raw", "-o", str(out / f"{role}.txt"), "--nonblocking", *os.environ.get("BENCH_PYSPY_ARGS", "").split()],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for role, pid in (("server", server.pid), ("worker0", procs[0].pid))
                ]
                time.sleep(1.0)
            server.stdin.write("change\n")
            server.stdin.flush()
            cpu_before = {pid: _cpu_s(pid) for pid in [server.pid, *(p.pid for p in procs)]}
            threads_before = _thread_cpu_s(server.pid)
            _, t0_text, write_s, _version = _readline(server, "changed ").split()
            t0 = float(t0_text)
            latencies: list[float] = []
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("report\n")
                proc.stdin.flush()
            for proc in procs:
                latencies += [t - t0 for t in json.loads(_readline(proc, "acks ")[5:])]
            server.stdin.write("status\n")
            server.stdin.flush()
            _, done, collections, gc_s, acked = _readline(server, "status ").split(" ", 4)
            server_done, at_hub = int(done), [ms / 1000 - t0 for ms in json.loads(acked)]
            cpu = {pid: tuple(a - b for a, b in zip(_cpu_s(pid), before, strict=True)) for pid, before in cpu_before.items()}
            workers_cpu = [sum(v[i] for k, v in cpu.items() if k != server.pid) for i in (0, 1)]
            threads = {k: v - threads_before.get(k, 0.0) for k, v in _thread_cpu_s(server.pid).items()}
            busiest = sorted(((v, k) for k, v in threads.items() if v >= 0.01), reverse=True)
            print(f"agents                      {n} ({len(procs)} worker processes, one mTLS channel + stream each; "
                  f"client: {client})")
            if server_env or server_options:
                print(f"server settings             env {' '.join(server_env) or '-'}; options {' '.join(server_options) or '-'}")
            print(f"connect + first sync        {connect_s:.2f} s for all agents (pace: {pace} handshakes in flight per "
                  f"worker; server CPU {connect_cpu['server'][0]:.1f} s user + {connect_cpu['server'][1]:.1f} s sys; "
                  f"streams retried per worker: {', '.join(retried)})")
            print(f"server RSS                  {rss_before / 1024:.1f} MiB idle -> {rss_after / 1024:.1f} MiB connected "
                  f"= {(rss_after - rss_before) / n:.1f} KiB per agent")
            if latencies:
                print(f"change -> agent ACK sent    p50 {statistics.median(latencies) * 1000:.0f} ms, "
                      f"p99 {_pct(latencies, 99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms ({len(latencies)} ACKs)")
            if at_hub:
                print(f"change -> ACK recorded      p50 {statistics.median(at_hub) * 1000:.0f} ms, "
                      f"p99 {_pct(at_hub, 99) * 1000:.0f} ms, max {max(at_hub) * 1000:.0f} ms "
                      f"({server_done}/{n} recorded in sync at the hub)")
            print(f"  policy store write + effective-policy update: {float(write_s) * 1000:.0f} ms; "
                  f"server cyclic GC: {collections} collections, {float(gc_s) * 1000:.0f} ms CPU")
            print(f"  CPU from change to last ACK recorded: server {cpu[server.pid][0]:.2f} s user + {cpu[server.pid][1]:.2f} s sys, "
                  f"agent workers {workers_cpu[0]:.2f} s user + {workers_cpu[1]:.2f} s sys")
            print("  server CPU by thread: " + ", ".join(f"{k} {v:.2f} s" for v, k in busiest))
            for spy in spies:
                spy.wait(timeout=30)
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            for proc in procs:
                proc.wait(timeout=60)
        finally:
            if server.stdin is not None:
                try:
                    server.stdin.write("quit\n")
                    server.stdin.flush()
                except BrokenPipeError:
                    pass
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cache-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "policyagent-bench-certs"))
    parser.add_argument("--role", choices=("controller", "server", "worker"), default="controller")
    parser.add_argument("--address", default="")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--pace", type=int, default=32, help="handshakes in flight per worker process")
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=0,
        help="niceness of the simulated-agent processes: real agents run on other machines; with e.g. 19 "
        "they take only the CPU the server leaves, so the server's figures are less skewed by the simulation",
    )
    parser.add_argument(
        "--client",
        choices=("wire", "grpc"),
        default="wire",
        help="simulated agents: wire = gRPC over HTTP/2 spoken by the bench itself (WireAgent: little CPU), "
        "grpc = grpc.aio clients (~300 µs CPU per agent per push + ACK, taken from the server's cores)",
    )
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the server process only (repeatable)")
    parser.add_argument("--server-option", action="append", default=[], metavar="KEY=VALUE",
                        help="gRPC server channel arg on top of hub.SERVER_CONNECTION_OPTIONS (repeatable)")
    args = parser.parse_args()
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if args.role == "server":
        asyncio.run(server_main(cache, args.agents, Path(args.data_dir), args.server_option))
    elif args.role == "worker":
        if args.worker_nice:
            os.nice(args.worker_nice)
        asyncio.run(worker_main(cache, args.address, args.start, args.count, args.pace, args.client))
    else:
        run(args.agents, args.workers, cache, args.pace, args.worker_nice, args.server_env, args.server_option, args.client)


if __name__ == "__main__":
    main()
