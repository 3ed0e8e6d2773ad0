"""The main port's front: agents' streams served on asyncio directly, every other call relayed to grpc.aio.

Why it exists. The main port holds one long-lived mTLS connection per agent: 10,000 of
them on one server. Under grpc.aio each costs ~87 KiB of gRPC core's fixed TLS and
HTTP/2 buffers and ~0.2 ms of CPU per push and ACK (bench/conn_memory.py,
bench/fanout.py). Here the same wire protocol (TLS 1.2+, ALPN h2, HTTP/2, gRPC framing)
is served by a small HTTP/2 endpoint on the event loop: OpenSSL through `ssl.MemoryBIO`
with its buffers released between records, frames parsed by slicing, HPACK decoded by
`hpack`. Agents are unchanged grpc.aio clients.

    client ──TLS(client certificate required)──► Front ─┬─ /policyagent.v1.Distribution/Stream
                                                        │     → Hub.serve_stream (in process)
                                                        └─ any other method
                                                              → grpc.aio server on a private
                                                                unix socket, the verified
                                                                certificate forwarded

What the relay forwards: the caller's metadata (minus reserved and `policyagent-front-*`
keys, which a client cannot set), the verified client certificate (DER), the peer's
address and a per-process token. `pki.authz.peer_of` believes a forwarded certificate only
when the token matches one a running Front registered (`authz.trust_front`): the unix
socket lives in a 0700 directory, and the token keeps the enrollment port (also
grpc.aio, also without TLS client auth) from being talked into it.

Scope of the HTTP/2 endpoint (RFC 9113): server side only, no server push, no priority,
no compression (a compressed request fails with UNIMPLEMENTED, as the client asked for
something the server does not do), HPACK dynamic table 0 for what the server sends
(literal fields, no Huffman) and accepted up to 4 KiB from the client. Limits: 100
concurrent streams per connection, 16 KiB header blocks, frames up to 16 KiB, messages up
to GRPC_MAX_MESSAGE_BYTES, 10 s for the TLS handshake and preface, FLOOD_LIMIT PINGs,
SETTINGS and client resets per 10 s.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

import grpc
import hpack
from grpc import aio

from policyagent.pb import GRPC_MAX_MESSAGE_BYTES, GRPC_MESSAGE_OPTIONS
from policyagent.pki import authz

_log = logging.getLogger("policyagent.front")

STREAM_PATH = "/policyagent.v1.Distribution/Stream"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HANDSHAKE_TIMEOUT_S = 10.0
MAX_STREAMS = 100
MAX_HEADER_BLOCK = 16 * 1024
# The receive window each stream and the connection start with; replenished once half is used.
RECEIVE_WINDOW = 1 << 20
# HTTP/2's initial window and largest frame before SETTINGS say otherwise (RFC 9113 §6.5.2).
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_FRAME = DEFAULT_MAX_FRAME  # we never announce a larger SETTINGS_MAX_FRAME_SIZE

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# settings
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB
# What a client may make this side do per FLOOD_WINDOW_S — answer PINGs and SETTINGS, drop streams it
# resets — before the connection is closed with ENHANCE_YOUR_CALM (the control-frame and "rapid reset"
# floods). An agent pings every 20 s.
FLOOD_LIMIT = 1000
FLOOD_WINDOW_S = 10.0

# What a client may not pass through to the relayed call: HTTP/2 and gRPC's own headers.
_NOT_METADATA = frozenset({"content-type", "te", "user-agent", "host", "connection", "keep-alive", "upgrade"})
_METADATA_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + stream_id.to_bytes(4, "big") + payload


def _hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(fields: Iterable[tuple[str, str | bytes]]) -> bytes:
    """An HPACK block of literal fields without indexing (no table state, no Huffman)."""
    out = bytearray()
    for name, value in fields:
        raw_name = name.encode("ascii")
        raw_value = value if isinstance(value, bytes) else value.encode("utf-8")
        out += b"\x00" + _hpack_int(len(raw_name)) + raw_name + _hpack_int(len(raw_value)) + raw_value
    return bytes(out)


def grpc_message_encode(text: str) -> str:
    """grpc-message's percent-encoding: UTF-8, bytes outside 0x20-0x7E and '%' escaped."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode("utf-8"))


def grpc_timeout(value: str) -> float | None:
    """A grpc-timeout header ("100m", "5S") in seconds; None if malformed."""
    digits = value[:-1]
    if 1 <= len(digits) <= 8 and digits.isascii() and digits.isdigit() and value[-1] in _TIMEOUT_UNITS:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]
    return None


def _peer_string(transport: asyncio.BaseTransport) -> str:
    """The peer as gRPC writes it: ipv4:1.2.3.4:5, ipv6:[::1]:5, unix:PATH."""
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return f"unix:{name or ''}"


_OK_FIELDS: list[tuple[str, str | bytes]] = [("grpc-status", "0")]
_OK_TRAILERS = encode_headers(_OK_FIELDS)
_RESPONSE_FIELDS: list[tuple[str, str | bytes]] = [(":status", "200"), ("content-type", "application/grpc")]
_RESPONSE_HEADERS = encode_headers(_RESPONSE_FIELDS)
# What the server sends first on every connection: its SETTINGS and the connection's receive window.
_SERVER_PREFACE = frame(
    SETTINGS,
    0,
    0,
    b"".join(
        key.to_bytes(2, "big") + value.to_bytes(4, "big")
        for key, value in (
            (SETTINGS_HEADER_TABLE_SIZE, 0),
            (SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
            (SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW),
            (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK),
        )
    ),
) + frame(WINDOW_UPDATE, 0, 0, (RECEIVE_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))


class StreamClosed(Exception):
    """The stream ended under a writer or reader: reset by the client or the connection lost."""


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Stream:
    """One HTTP/2 stream: what the client sent, what waits for send window, how it ended."""

    __slots__ = (
        "buf",
        "conn",
        "error",
        "headers_sent",
        "id",
        "inbox",
        "local_done",
        "out",
        "recv_unacked",
        "relayed",
        "remote_done",
        "task",
        "trailers",
        "waiter",
        "window",
        "writable",
    )

    def __init__(self, conn: _Connection, stream_id: int, window: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.window = window  # what we may send on it
        self.recv_unacked = 0  # received bytes not yet given back with WINDOW_UPDATE
        self.buf = bytearray()  # a gRPC message split across DATA frames
        self.inbox: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None  # a reader waiting for the inbox
        self.writable: asyncio.Future[None] | None = None  # a writer waiting for send window
        self.out: collections.deque[bytes] = collections.deque()  # DATA payload waiting for window
        self.trailers: bytes | None = None  # the closing HEADERS block, sent after `out`
        self.headers_sent = False
        self.remote_done = False  # the client half-closed
        self.local_done = False  # trailers sent (or the stream reset)
        self.error: Exception | None = None
        self.task: asyncio.Task[None] | None = None
        self.relayed = False  # its task relays to the grpc.aio server: cancelled when the stream goes

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake_writer(self) -> None:
        writable, self.writable = self.writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def abandon(self, error: Exception) -> None:
        """Whoever serves the stream stops: its reader and writer get `error`, a relay is cancelled."""
        self.error = error
        self.wake()
        self.wake_writer()
        if self.relayed and self.task is not None:
            self.task.cancel()

    async def messages(self) -> AsyncIterator[bytes]:
        """The client's messages until it half-closes; StreamClosed if the stream is reset or lost.

        The stream's receive window is given back as they are taken: a reader that stops reading
        stops the client after RECEIVE_WINDOW bytes (the connection's window is given back on
        arrival, so other streams go on)."""
        inbox = self.inbox
        while True:
            if inbox:
                message = inbox.popleft()
                if not inbox and self.recv_unacked >= RECEIVE_WINDOW // 2 and not self.remote_done:
                    self.conn.release_window(self)
                yield message
                continue
            if self.error is not None:
                raise self.error
            if self.remote_done:
                return
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter


class _AgentContext:
    """What Hub.serve_stream uses of a grpc.aio ServicerContext, on a front stream."""

    __slots__ = ("_conn", "_stream")

    def __init__(self, conn: _Connection, stream: _Stream) -> None:
        self._conn = conn
        self._stream = stream

    def peer(self) -> str:
        return self._conn.peer

    async def write(self, message: Any) -> None:
        data = message if isinstance(message, bytes) else message.SerializeToString()
        await self._conn.send_message(self._stream, data)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        raise _Abort(code, details)


class _Connection(asyncio.Protocol):
    """One client connection: TLS through memory BIOs, HTTP/2 frames, its streams."""

    __slots__ = (
        "_batch",
        "_buf",
        "_closed",
        "_continuing",
        "_decoder",
        "_drained",
        "_flood",
        "_flood_since",
        "_front",
        "_goaway_sent",
        "_incoming",
        "_initial_window",
        "_last_stream",
        "_max_frame",
        "_outgoing",
        "_paused",
        "_preface",
        "_ready",
        "_recv_unacked",
        "_send_window",
        "_streams",
        "_timer",
        "_tls",
        "_transport",
        "certificate",
        "peer",
    )

    def __init__(self, front: Front) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = front.ssl_context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._ready = False  # TLS handshake done
        self._preface = False  # the client's preface read
        self._timer: asyncio.TimerHandle | None = None
        self._buf = bytearray()
        self._batch: list[bytes] | None = None  # frames written while a read is processed: sent together
        self._streams: dict[int, _Stream] = {}
        self._last_stream = 0
        self._continuing: tuple[int, int, bytearray] | None = None  # a header block awaiting CONTINUATION
        # Decoded header lists are held to what SETTINGS_MAX_HEADER_LIST_SIZE announces (an HPACK
        # block of indexed references could otherwise expand a 16 KiB block to megabytes).
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self._send_window = DEFAULT_WINDOW  # the connection's, for what we send
        self._initial_window = DEFAULT_WINDOW  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self._max_frame = MAX_FRAME  # the client's SETTINGS_MAX_FRAME_SIZE, capped at ours
        self._recv_unacked = 0
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._closed = False
        self._goaway_sent = False
        self._flood = 0
        self._flood_since = 0.0
        self.peer = ""
        self.certificate: bytes | None = None  # the verified client certificate, DER

    # ---------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.peer = _peer_string(transport)
        self._front.connections.add(self)
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        _log.debug("no TLS handshake and HTTP/2 preface in time", extra={"peer": self.peer})
        self.close(force=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._front.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        for stream in list(self._streams.values()):
            self._reset(stream, StreamClosed("the connection was lost"))
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def close(self, *, force: bool = False) -> None:
        """Close the connection (what is written still goes out, unless `force`)."""
        if self._transport is not None and not self._closed:
            self._closed = True
            if force:
                self._transport.abort()
            else:
                self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self._ready:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush_tls()
                return
            except (ssl.SSLError, OSError) as exc:
                _log.debug("TLS handshake failed", extra={"peer": self.peer, "error": str(exc)})
                self._flush_tls()
                self.close()
                return
            self._ready = True
            self.certificate = self._tls.getpeercert(binary_form=True)
            self._batch = [_SERVER_PREFACE]
        else:
            self._batch = []
        plain: list[bytes] = []
        eof = False
        try:
            while True:
                chunk = self._tls.read(32_768)
                if not chunk:
                    eof = True
                    break
                plain.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            eof = True
        except (ssl.SSLError, OSError) as exc:
            _log.debug("TLS error", extra={"peer": self.peer, "error": str(exc)})
            eof = True
        if plain:
            self._feed(plain[0] if len(plain) == 1 else b"".join(plain))
        batch, self._batch = self._batch, None
        if batch:
            self._write(b"".join(batch))
        else:
            self._flush_tls()
        if eof:
            self.close()

    def _write(self, data: bytes) -> None:
        """Send HTTP/2 bytes now, or with the batch of the read being processed."""
        if self._batch is not None:
            self._batch.append(data)
            return
        if self._closed:
            return
        try:
            self._tls.write(data)
        except (ssl.SSLError, OSError):
            self.close()
            return
        self._flush_tls()

    def _flush_tls(self) -> None:
        out = self._outgoing.read()
        if out and self._transport is not None and not self._closed:
            self._transport.write(out)

    async def drain(self) -> None:
        if self._paused and not self._closed:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    # ---------------------------------------------------------------- HTTP/2 frames in

    def _feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._preface:
            if len(buf) < len(PREFACE):
                return
            if buf[: len(PREFACE)] != PREFACE:
                _log.debug("not an HTTP/2 client", extra={"peer": self.peer})
                self.close()
                return
            del buf[: len(PREFACE)]
            self._preface = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        pos, size = 0, len(buf)
        while size - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > MAX_FRAME:
                self._goaway(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                return
            end = pos + 9 + length
            if end > size:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
            payload = bytes(buf[pos + 9 : end])
            pos = end
            self._on_frame(ftype, flags, stream_id, payload)
            if self._closed:
                return
        del buf[:pos]

    def _on_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuing is not None and ftype != CONTINUATION:
            self._goaway(PROTOCOL_ERROR, "expected CONTINUATION")
            return
        if ftype == DATA:
            self._on_data(flags, stream_id, payload)
        elif ftype == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif ftype == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif ftype == PING:
            if len(payload) != 8 or stream_id:
                self._goaway(FRAME_SIZE_ERROR if len(payload) != 8 else PROTOCOL_ERROR, "bad PING")
            elif not flags & ACK and self._owed():
                self._write(frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            stream = self._streams.get(stream_id)
            if stream is not None and self._owed():
                self._reset(stream, StreamClosed("the client reset the stream"))
        elif ftype == GOAWAY:
            pass  # the client will open no new streams; the ones it has run to their end
        elif ftype == PUSH_PROMISE:
            self._goaway(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5, §5.3.2)

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id or len(payload) % 6:
            self._goaway(PROTOCOL_ERROR, "bad SETTINGS")
            return
        if flags & ACK or not self._owed():
            return
        for i in range(0, len(payload), 6):
            key = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > 0x7FFF_FFFF:
                    self._goaway(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                    return
                delta, self._initial_window = value - self._initial_window, value
                for stream in self._streams.values():
                    stream.window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 16_777_215:
                    self._goaway(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                    return
                self._max_frame = min(value, MAX_FRAME)
        self._write(frame(SETTINGS, ACK, 0))
        self._pump_all()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._goaway(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
            return
        increment = int.from_bytes(payload, "big") & 0x7FFF_FFFF
        if stream_id == 0:
            self._send_window += increment
            self._pump_all()
            return
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.window += increment
            self._pump(stream)

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or not stream_id & 1:
            self._goaway(PROTOCOL_ERROR, "HEADERS on a stream a client may not open")
            return
        start, end = 0, len(payload)
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                self._goaway(PROTOCOL_ERROR, "bad padding")
                return
            start, end = 1, len(payload) - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if start > end:
            self._goaway(PROTOCOL_ERROR, "bad HEADERS")
            return
        block = payload[start:end]
        if flags & END_HEADERS:
            self._on_header_block(stream_id, flags, block)
        else:
            self._continuing = (stream_id, flags, bytearray(block))

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuing is None or self._continuing[0] != stream_id:
            self._goaway(PROTOCOL_ERROR, "unexpected CONTINUATION")
            return
        block = self._continuing[2]
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            self._goaway(PROTOCOL_ERROR, "header block too large")
            return
        if flags & END_HEADERS:
            first_flags = self._continuing[1]
            self._continuing = None
            self._on_header_block(stream_id, first_flags, bytes(block))

    def _on_header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        if len(block) > MAX_HEADER_BLOCK:
            self._goaway(PROTOCOL_ERROR, "header block too large")
            return
        try:
            fields = self._decoder.decode(block, raw=True)
        except Exception:  # hpack's errors: the connection's compression state is lost
            self._goaway(COMPRESSION_ERROR, "bad HPACK block")
            return
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers from the client: only END_STREAM matters
            if flags & END_STREAM:
                self._remote_done(stream)
            return
        if stream_id <= self._last_stream:
            self._rst(stream_id, STREAM_CLOSED)
            return
        self._last_stream = stream_id
        if self._goaway_sent or len(self._streams) >= MAX_STREAMS:
            self._rst(stream_id, REFUSED_STREAM)
            return
        stream = _Stream(self, stream_id, self._initial_window)
        self._streams[stream_id] = stream
        if flags & END_STREAM:
            stream.remote_done = True
        headers: dict[str, str] = {}
        metadata: list[tuple[str, str]] = []
        for raw_name, raw_value in fields:
            name, value = raw_name.decode("ascii", "replace"), raw_value.decode("latin-1")
            if name.startswith(":") or name in _NOT_METADATA or name.startswith("grpc-"):
                headers[name] = value
            else:
                metadata.append((name, value))
        problem = _check_request(headers)
        if problem is not None:
            code, details = problem
            self.finish(stream, code, details)
            return
        path = headers[":path"]
        if path == STREAM_PATH:
            stream.task = self._front.spawn(self._front.serve_agent(self, stream))
        else:
            stream.relayed = True
            stream.task = self._front.spawn(self._front.relay(self, stream, path, headers, metadata))

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        size = len(payload)
        self._recv_unacked += size
        if self._recv_unacked >= RECEIVE_WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, self._recv_unacked.to_bytes(4, "big")))
            self._recv_unacked = 0
        if flags & PADDED:
            if not payload or payload[0] >= size:
                self._goaway(PROTOCOL_ERROR, "bad padding")
                return
            payload = payload[1 : size - payload[0]]
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_done:
            if stream_id == 0 or stream_id > self._last_stream:
                self._goaway(PROTOCOL_ERROR, "DATA on a stream that is not open")
            # else: a stream this side has ended (or reset): what was in flight is dropped (RFC 9113 §5.1)
            return
        if not flags & END_STREAM:
            stream.recv_unacked += size  # given back as the stream's reader takes the messages
        buf = stream.buf
        if not buf and len(payload) >= 5 and int.from_bytes(payload[1:5], "big") == len(payload) - 5:
            if payload[0]:  # the compressed flag: nothing was negotiated
                self._fail(stream, grpc.StatusCode.INTERNAL, "compressed message without grpc-encoding")
                return
            stream.inbox.append(payload[5:])  # one whole message: the common case
        else:
            buf += payload
            while len(buf) >= 5:
                length = int.from_bytes(buf[1:5], "big")
                if length > GRPC_MAX_MESSAGE_BYTES:
                    self._fail(
                        stream,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"message larger than max ({length} vs. {GRPC_MAX_MESSAGE_BYTES})",
                    )
                    return
                if buf[0]:
                    self._fail(stream, grpc.StatusCode.INTERNAL, "compressed message without grpc-encoding")
                    return
                if len(buf) < 5 + length:
                    break
                stream.inbox.append(bytes(buf[5 : 5 + length]))
                del buf[: 5 + length]
        if flags & END_STREAM:
            if buf:
                self._fail(stream, grpc.StatusCode.INTERNAL, "the request ended inside a message")
                return
            self._remote_done(stream)
        else:
            if not stream.inbox and stream.recv_unacked >= RECEIVE_WINDOW // 2:
                self.release_window(stream)  # nothing waits for the reader: part of a message is in `buf`
            stream.wake()

    def _owed(self) -> bool:
        """Count one thing the client made this side do; past FLOOD_LIMIT, close the connection (False)."""
        now = time.monotonic()
        if now - self._flood_since > FLOOD_WINDOW_S:
            self._flood_since, self._flood = now, 0
        self._flood += 1
        if self._flood <= FLOOD_LIMIT:
            return True
        self._goaway(ENHANCE_YOUR_CALM, "too many PINGs, SETTINGS or reset streams")
        return False

    def _remote_done(self, stream: _Stream) -> None:
        stream.remote_done = True
        stream.wake()
        if stream.local_done:
            self._streams.pop(stream.id, None)

    def _goaway(self, code: int, why: str) -> None:
        _log.debug("connection error", extra={"peer": self.peer, "error": why})
        self._send_goaway(code, why.encode())
        batch, self._batch = self._batch, None
        if batch:
            self._write(b"".join(batch))
        self.close()

    def goaway(self) -> None:
        """No new streams (the server stops): the ones open may finish."""
        if self._ready and not self._closed:
            self._send_goaway(NO_ERROR)

    def _send_goaway(self, code: int, debug: bytes = b"") -> None:
        if not self._goaway_sent:
            self._goaway_sent = True
            self._write(frame(GOAWAY, 0, 0, self._last_stream.to_bytes(4, "big") + code.to_bytes(4, "big") + debug))

    def _rst(self, stream_id: int, code: int) -> None:
        self._write(frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big")))

    @property
    def idle(self) -> bool:
        return not self._streams

    # ---------------------------------------------------------------- HTTP/2 frames out

    def _reset(self, stream: _Stream, error: Exception) -> None:
        """The stream is gone (client reset, connection lost): wake its reader and writer with `error`."""
        stream.local_done = stream.remote_done = True
        stream.out.clear()
        self._streams.pop(stream.id, None)
        stream.abandon(error)

    def release_window(self, stream: _Stream) -> None:
        """Give the client back the receive window of what `stream`'s reader has taken."""
        if stream.recv_unacked and not self._closed and stream.id in self._streams:
            self._write(frame(WINDOW_UPDATE, 0, stream.id, stream.recv_unacked.to_bytes(4, "big")))
        stream.recv_unacked = 0

    def _fail(self, stream: _Stream, code: grpc.StatusCode, details: str) -> None:
        """The client broke the call (a bad message): end it with `code`, and stop whoever serves it."""
        self.finish(stream, code, details)
        stream.abandon(StreamClosed(details))

    async def send_message(self, stream: _Stream, message: bytes) -> None:
        """Send one gRPC message on `stream`, waiting for flow-control window and a draining socket."""
        if stream.error is not None:
            raise stream.error
        if stream.local_done:
            raise StreamClosed("the stream has ended")
        if not stream.headers_sent:
            stream.headers_sent = True
            self._write(frame(HEADERS, END_HEADERS, stream.id, _RESPONSE_HEADERS))
        stream.out.append(len(message).to_bytes(5, "big") + message)
        self._pump(stream)
        while stream.out:  # no send window: WINDOW_UPDATE or a SETTINGS change wakes the writer
            if stream.error is not None:
                raise stream.error
            stream.writable = asyncio.get_running_loop().create_future()
            await stream.writable
        if stream.error is not None:
            raise stream.error
        if self._paused:
            await self.drain()

    def finish(
        self,
        stream: _Stream,
        code: grpc.StatusCode,
        details: str = "",
        metadata: Iterable[tuple[str, str | bytes]] = (),
    ) -> None:
        """End `stream` with a gRPC status (after whatever data still waits for window)."""
        if stream.local_done:
            return
        fields: list[tuple[str, str | bytes]] = []
        if not stream.headers_sent:
            stream.headers_sent = True
            fields += _RESPONSE_FIELDS
        fields.append(("grpc-status", str(code.value[0])))
        if details:
            fields.append(("grpc-message", grpc_message_encode(details)))
        for key, value in metadata:
            if key.endswith("-bin"):
                raw = value if isinstance(value, bytes) else value.encode()
                fields.append((key, base64.b64encode(raw).rstrip(b"=")))
            else:
                fields.append((key, value))
        stream.trailers = _OK_TRAILERS if fields == _OK_FIELDS else encode_headers(fields)
        self._pump(stream)

    def _pump_all(self) -> None:
        for stream in list(self._streams.values()):
            if stream.out or stream.trailers is not None:
                self._pump(stream)

    def _pump(self, stream: _Stream) -> None:
        out = stream.out
        while out:
            allowed = min(self._send_window, stream.window, self._max_frame)
            if allowed <= 0:
                return
            chunk = out[0]
            if len(chunk) > allowed:
                out[0] = chunk[allowed:]
                chunk = chunk[:allowed]
            else:
                out.popleft()
            self._send_window -= len(chunk)
            stream.window -= len(chunk)
            self._write(frame(DATA, 0, stream.id, chunk))
        stream.wake_writer()
        if stream.trailers is not None and not stream.local_done:
            block, stream.trailers = stream.trailers, None
            self._write_header_block(stream.id, block, END_STREAM)
            stream.local_done = True
            if not stream.remote_done:
                # The response is complete: the client need not send the rest of its request.
                self._rst(stream.id, NO_ERROR)
                stream.remote_done = True
                stream.wake()
            self._streams.pop(stream.id, None)
            if self._goaway_sent and not self._streams:
                self.close()

    def _write_header_block(self, stream_id: int, block: bytes, flags: int) -> None:
        first, rest = block[: self._max_frame], block[self._max_frame :]
        if not rest:
            self._write(frame(HEADERS, flags | END_HEADERS, stream_id, first))
            return
        self._write(frame(HEADERS, flags, stream_id, first))
        while rest:
            piece, rest = rest[: self._max_frame], rest[self._max_frame :]
            self._write(frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, piece))


def _check_request(headers: dict[str, str]) -> tuple[grpc.StatusCode, str] | None:
    """Why a stream's request headers are not a gRPC call this endpoint serves (None: they are)."""
    if headers.get(":method") != "POST" or not headers.get(":path", "").startswith("/"):
        return grpc.StatusCode.UNIMPLEMENTED, "not a gRPC request (need POST and a method path)"
    if not headers.get("content-type", "").startswith("application/grpc"):
        return grpc.StatusCode.UNIMPLEMENTED, "not a gRPC request (content-type is not application/grpc)"
    encoding = headers.get("grpc-encoding", "identity")
    if encoding != "identity":
        return grpc.StatusCode.UNIMPLEMENTED, f"message compression {encoding!r} is not supported"
    return None


class Front:
    """The main port: TLS with a required client certificate, agents' streams here, the rest relayed."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        backend: str,
        serve_stream: Callable[[authz.Peer, Any, Any], Awaitable[None]],
        revocations: Any,
    ) -> None:
        """`backend`: the grpc.aio server's private target (unix:PATH); `serve_stream(peer, requests, context)`
        runs one agent's stream (Hub.serve_stream with the caller made from the peer)."""
        self.ssl_context = ssl_context
        self._serve_stream = serve_stream
        self._revocations = revocations
        self._backend_target = backend
        self._channel: aio.Channel | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self.connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unix_path = ""
        self.token = secrets.token_hex(32)

    async def start(self, host: str, port: int, unix_path: str = "") -> int:
        """Listen on host:port (or the unix socket); the bound port (0 for a unix socket)."""
        loop = asyncio.get_running_loop()
        self._channel = aio.insecure_channel(self._backend_target, options=GRPC_MESSAGE_OPTIONS)
        authz.trust_front(self.token)
        factory = lambda: _Connection(self)  # noqa: E731
        if unix_path:  # its permissions are the caller's (PolicyServer makes it 0600)
            self._servers.append(await loop.create_unix_server(factory, unix_path, backlog=4096))
            self._unix_path = unix_path
            return 0
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        bound = port
        errors: list[OSError] = []
        for family, _type, proto, _name, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, socket.SOCK_STREAM, proto)
            except OSError as exc:
                errors.append(exc)
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], bound, *address[2:]))
                bound = sock.getsockname()[1]
                self._servers.append(await loop.create_server(factory, sock=sock, backlog=4096))
            except OSError as exc:
                sock.close()
                if not self._servers:  # the first address must bind; others (::1 without IPv6) may not
                    await self.stop(0)
                    raise
                errors.append(exc)
        if not self._servers:
            raise errors[0] if errors else OSError(f"cannot listen on {host}:{port}")
        return bound

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task serving one stream, awaited at stop."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self, grace: float) -> None:
        """Stop accepting, tell clients (GOAWAY), let open calls finish within `grace`, close."""
        for server in self._servers:
            server.close()
        self._servers = []
        if self._unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = ""
        for conn in list(self.connections):
            conn.goaway()
            if conn.idle:
                conn.close()
        deadline = asyncio.get_running_loop().time() + grace
        while any(not c.idle for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close(force=True)
        if self._tasks:  # the streams' tasks see the connections go (relays are cancelled)
            await asyncio.wait(list(self._tasks), timeout=max(grace, 1.0))
        authz.forget_front(self.token)
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    # ---------------------------------------------------------------- the agents' stream

    async def serve_agent(self, conn: _Connection, stream: _Stream) -> None:
        try:
            certificate = conn.certificate
            peer = authz.check_peer(authz.peer_of_der(certificate) if certificate else None, "agent", self._revocations)
        except authz.AuthError as exc:
            conn.finish(stream, exc.status, exc.message)
            return
        context = _AgentContext(conn, stream)
        try:
            await self._serve_stream(peer, _agent_messages(stream), context)
        except _Abort as abort:
            conn.finish(stream, abort.code, abort.details)
        except StreamClosed:
            pass
        except Exception:
            _log.exception("agent stream failed", extra={"peer": conn.peer})
            conn.finish(stream, grpc.StatusCode.INTERNAL, "server error")
        else:
            conn.finish(stream, grpc.StatusCode.OK)

    # ---------------------------------------------------------------- everything else

    async def relay(
        self,
        conn: _Connection,
        stream: _Stream,
        path: str,
        headers: dict[str, str],
        metadata: list[tuple[str, str]],
    ) -> None:
        """One call relayed to the grpc.aio server, the verified client certificate with it."""
        assert self._channel is not None
        forwarded: list[tuple[str, str | bytes]] = []
        for key, value in metadata:
            if key.startswith(authz.FRONT_METADATA_PREFIX) or not set(key) <= _METADATA_CHARS:
                continue
            if key.endswith("-bin"):
                try:
                    forwarded.append((key, base64.b64decode(value + "=" * (-len(value) % 4), validate=True)))
                except ValueError:
                    conn.finish(stream, grpc.StatusCode.INTERNAL, f"metadata {key!r} is not base64")
                    return
            elif value.isascii() and value.isprintable():
                forwarded.append((key, value))
            else:  # gRPC: a text value is printable ASCII
                conn.finish(stream, grpc.StatusCode.INTERNAL, f"metadata {key!r} is not printable ASCII")
                return
        forwarded.append((authz.FRONT_TOKEN_KEY, self.token))
        forwarded.append((authz.FRONT_PEER_KEY, conn.peer))
        if conn.certificate is not None:
            forwarded.append((authz.FRONT_CERT_KEY, conn.certificate))
        timeout = None
        if "grpc-timeout" in headers:
            timeout = grpc_timeout(headers["grpc-timeout"])
            if timeout is None:
                conn.finish(stream, grpc.StatusCode.INTERNAL, f"malformed grpc-timeout {headers['grpc-timeout']!r}")
                return
        method = self._channel.stream_stream(path, request_serializer=None, response_deserializer=None)
        try:
            call = method(stream.messages(), metadata=tuple(forwarded), timeout=timeout)
        except Exception as exc:  # grpc refuses the metadata (e.g. a value that is not printable ASCII)
            conn.finish(stream, grpc.StatusCode.INTERNAL, f"the call's metadata cannot be relayed: {exc}")
            return
        try:
            async for response in call:
                await conn.send_message(stream, response)
            code, details = await call.code(), await call.details()
            trailing = tuple(await call.trailing_metadata() or ())
        except StreamClosed:
            call.cancel()
            return
        except asyncio.CancelledError:
            call.cancel()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task is being cancelled: the stream is gone
            # grpc.aio ends a call it could not start (e.g. metadata its core refuses) this way
            conn.finish(stream, grpc.StatusCode.CANCELLED, "the relayed call was cancelled")
            return
        except aio.AioRpcError as exc:
            code, details, trailing = exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ())
        except Exception:
            _log.exception("relaying a call failed", extra={"peer": conn.peer, "method": path})
            call.cancel()
            conn.finish(stream, grpc.StatusCode.INTERNAL, "server error")
            return
        conn.finish(stream, code, details or "", _plain_metadata(trailing))


async def _agent_messages(stream: _Stream) -> AsyncIterator[Any]:
    from policyagent.pb import dist_pb

    parse = dist_pb.AgentMessage.FromString
    async for raw in stream.messages():
        yield parse(raw)


def _plain_metadata(metadata: Any) -> list[tuple[str, str | bytes]]:
    out: list[tuple[str, str | bytes]] = []
    for key, value in metadata or ():
        if key.startswith(authz.FRONT_METADATA_PREFIX):
            continue
        out.append((key, value))
    return out


__all__ = [
    "STREAM_PATH",
    "Front",
    "StreamClosed",
    "encode_headers",
    "frame",
    "grpc_message_encode",
    "grpc_timeout",
]
