"""The main port's front (policyagent/server/front.py): its HPACK/gRPC helpers, TLS with a required client
certificate, the hand-written HTTP/2 endpoint (driven frame by frame by a raw client), identity forwarding
that a client cannot spoof, the relay to the grpc.aio server, the handshake timeout and a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest
from conftest import RPC_TIMEOUT_S, InProcessServer, ServerProcess, admin_certificate, admin_channel
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policyagent.model.errors import NotFoundError
from policyagent.pb import admin_grpc, admin_pb, dist_grpc, dist_pb, fleet_grpc, fleet_pb, pb
from policyagent.pki import authz
from policyagent.pki.ca import CertificateAuthority, cert_pem, key_pem
from policyagent.pki.identity import Revocations
from policyagent.pki.tls import ClientCertificate
from policyagent.server import front
from policyagent.server.errors import error_from_rpc
from policyagent.server.front import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOOD_LIMIT,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PING,
    PREFACE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    WINDOW_UPDATE,
    encode_headers,
    frame,
    grpc_message_encode,
    grpc_timeout,
)

DEFAULT_POLICY_NAMES = {
    "Client (Respond Only)",
    "Server (Request Security)",
    "Secure Server (Require Security)",
}
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
GET_STORE = "/policyagent.v1.PolicyAdmin/GetStore"
# How long a raw client waits for a frame the server should send (the server is local: fast).
FRAME_TIMEOUT_S = 5.0


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertFiles:
    """A client certificate as the ssl module (files) and grpc (PEM bytes) want it."""

    client: ClientCertificate
    cert_file: Path
    key_file: Path

    @property
    def ca(self) -> bytes:
        return self.client.ca

    @property
    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.client.cert).public_bytes(Encoding.DER)


def _cert_files(client: ClientCertificate, directory: Path) -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "client.crt", directory / "client.key"
    cert_file.write_bytes(client.cert)
    key_file.write_bytes(client.key)
    key_file.chmod(0o600)
    return CertFiles(client, cert_file, key_file)


@pytest.fixture(scope="module")
def agent(test_pki: Path, tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """An agent certificate "web1" from the session's CA (every server the fixtures start trusts it)."""
    ca, _ = CertificateAuthority.load_or_create(test_pki / "pki")
    issued = ca.issue("agent", "web1")
    assert issued.key is not None
    client = ClientCertificate(cert_pem(issued.cert), key_pem(issued.key), ca.cert_pem, Path("."))
    return _cert_files(client, tmp_path_factory.mktemp("agent-cert"))


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """The session's admin certificate, also as files for a raw client."""
    return _cert_files(admin_certificate(), tmp_path_factory.mktemp("admin-cert"))


# ---------------------------------------------------------------- a raw HTTP/2 client


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream: int
    payload: bytes


class FrameTimeout(Exception):
    """No frame arrived in time (deliberately not an OSError: tests tell it apart from a closed connection)."""


def tls_context(ca: bytes, cert: CertFiles | None, alpn: Iterable[str] = ("h2",)) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca.decode("ascii"))
    if cert is not None:
        context.load_cert_chain(cert.cert_file, cert.key_file)
    context.set_alpn_protocols(list(alpn))
    return context


def tls_connect(address: str, context: ssl.SSLContext) -> ssl.SSLSocket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=FRAME_TIMEOUT_S)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def grpc_request(path: str, *extra: tuple[str, str | bytes]) -> list[tuple[str, str | bytes]]:
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


def grpc_message(data: bytes) -> bytes:
    return b"\x00" + len(data).to_bytes(4, "big") + data


def settings_payload(*pairs: tuple[int, int]) -> bytes:
    return b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs)


def parse_settings(payload: bytes) -> dict[int, int]:
    return {
        int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
        for i in range(0, len(payload), 6)
    }


@dataclass
class Response:
    """What the server sent on one stream."""

    headers: list[tuple[str, str]]
    messages: list[bytes]
    trailers: list[tuple[str, str]]
    reset: int | None = None  # the RST_STREAM error code, if the stream was reset

    def field(self, name: str) -> str | None:
        for key, value in [*self.headers, *self.trailers]:
            if key == name:
                return value
        return None


class RawH2:
    """A hand-driven HTTP/2 client connection over TLS: frames written as given, read one at a time."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder()

    @classmethod
    def open(cls, address: str, cert: CertFiles) -> RawH2:
        """A TLS connection with `cert` (nothing sent yet)."""
        return cls(tls_connect(address, tls_context(cert.ca, cert)))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, *data: bytes) -> None:
        self.sock.sendall(b"".join(data))

    def start(self, *settings: tuple[int, int]) -> dict[int, int]:
        """Preface and SETTINGS; checks the server's first frame is its SETTINGS and that ours are ACKed."""
        self.send(PREFACE, frame(SETTINGS, 0, 0, settings_payload(*settings)))
        first = self.read_frame()
        assert (first.type, first.flags, first.stream) == (SETTINGS, 0, 0), first
        self.expect(lambda f: f.type == SETTINGS and f.flags & ACK != 0)
        return parse_settings(first.payload)

    def headers(self, stream_id: int, fields: Iterable[tuple[str, str | bytes]], end_stream: bool = False) -> bytes:
        block = self._encoder.encode(list(fields))
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, block)

    def read_frame(self, timeout: float = FRAME_TIMEOUT_S) -> Frame:
        """The next frame; EOFError when the server closed the connection, FrameTimeout when none came."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) >= 9:
                length = int.from_bytes(self._buf[:3], "big")
                if len(self._buf) >= 9 + length:
                    head, payload = bytes(self._buf[:9]), bytes(self._buf[9 : 9 + length])
                    del self._buf[: 9 + length]
                    return Frame(head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFF_FFFF, payload)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrameTimeout(f"no frame within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65_536)
            except TimeoutError:
                raise FrameTimeout(f"no frame within {timeout} s") from None
            if not chunk:
                raise EOFError("the server closed the connection")
            self._buf += chunk

    def expect(self, match: Callable[[Frame], bool], timeout: float = FRAME_TIMEOUT_S) -> Frame:
        """Read until a frame matches (the others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.read_frame(max(deadline - time.monotonic(), 0.001))
            if match(got):
                return got

    def read_until_closed(self, timeout: float = FRAME_TIMEOUT_S) -> list[Frame]:
        """Every frame until the server closes the connection (fails if it stays open past `timeout`)."""
        frames: list[Frame] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                frames.append(self.read_frame(max(deadline - time.monotonic(), 0.001)))
        except (EOFError, ConnectionError, ssl.SSLError):
            return frames

    def ping(self, data: bytes = b"12345678") -> list[Frame]:
        """A PING round trip: every frame the server sent before the PING's ACK."""
        self.send(frame(PING, 0, 0, data))
        before: list[Frame] = []
        while True:
            got = self.read_frame()
            if got.type == PING and got.flags & ACK and got.payload == data:
                return before
            before.append(got)

    def response(self, stream_id: int, timeout: float = FRAME_TIMEOUT_S) -> Response:
        """Read the response on `stream_id` (frames of other streams are dropped) until it ends."""
        result = Response([], [], [])
        data = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            got = self.read_frame(max(deadline - time.monotonic(), 0.001))
            if got.stream != stream_id:
                continue
            if got.type == RST_STREAM:
                result.reset = int.from_bytes(got.payload, "big")
                break
            if got.type == DATA:
                data += got.payload
            elif got.type == HEADERS:
                assert got.flags & END_HEADERS, "this client does not reassemble CONTINUATION"
                fields = [(str(k), str(v)) for k, v in self._decoder.decode(got.payload)]
                if result.headers:
                    result.trailers = fields
                else:
                    result.headers = fields
            if got.flags & END_STREAM:
                break
        while data:
            length = int.from_bytes(data[1:5], "big")
            result.messages.append(bytes(data[5 : 5 + length]))
            del data[: 5 + length]
        return result


# ---------------------------------------------------------------- helpers for grpc clients


def agent_channel(address: str, cert: CertFiles) -> grpc.Channel:
    return grpc.secure_channel(address, cert.client.channel_credentials())


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def code_and_details(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    assert isinstance(exc, grpc.Call)
    return exc.code(), exc.details() or ""


def wait_until(condition: Callable[[], bool], timeout: float = RPC_TIMEOUT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------- pure helpers


def test_encode_headers_is_plain_hpack_with_multibyte_lengths() -> None:
    """encode_headers' block decodes with hpack to the same fields: str and bytes values, UTF-8,
    and names and values at and past the 7-bit prefix (126, 127, 128, 300 and 20,000 bytes)."""
    fields: list[tuple[str, str | bytes]] = [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("x-empty", ""),
        ("x-126", "a" * 126),
        ("x-127", "b" * 127),
        ("x-128", "c" * 128),
        ("x-300", "d" * 300),
        ("x-huge", "e" * 20_000),
        ("n" * 127, "name of 127 bytes"),
        ("x-utf8", "grüße, 世界"),
        ("x-bin", bytes(range(256))),
    ]
    block = encode_headers(fields)
    decoded = hpack.Decoder().decode(block, raw=True)
    expected = [(k.encode(), v if isinstance(v, bytes) else v.encode("utf-8")) for k, v in fields]
    assert [(bytes(k), bytes(v)) for k, v in decoded] == expected
    # Literal fields without indexing: a decoder that kept no state decodes the same block again.
    assert hpack.Decoder().decode(block, raw=True) == decoded


def test_grpc_message_encode_percent_encodes_what_grpc_requires() -> None:
    """grpc-message keeps printable ASCII, percent-encodes '%', control characters and UTF-8 bytes,
    and decodes back to the text with urllib.parse.unquote."""
    assert grpc_message_encode("plain ASCII: ~!{}[]'\"") == "plain ASCII: ~!{}[]'\""
    assert grpc_message_encode("100%") == "100%25"
    assert grpc_message_encode("a\nb\tc\r") == "a%0Ab%09c%0D"
    assert grpc_message_encode("é") == "%C3%A9"
    assert grpc_message_encode("\x7f") == "%7F"
    text = 'Nö such policy: 100% "Grüße"\n世界 \x00 end'
    encoded = grpc_message_encode(text)
    assert all(0x20 <= ord(ch) <= 0x7E for ch in encoded)
    assert urllib.parse.unquote(encoded, encoding="utf-8") == text


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("100m", 0.1),
        ("5S", 5.0),
        ("1H", 3600.0),
        ("2M", 120.0),
        ("250u", 250e-6),
        ("7n", 7e-9),
        ("0S", 0.0),
        ("12345678S", 12_345_678.0),
    ],
)
def test_grpc_timeout_parses_the_units(value: str, seconds: float) -> None:
    """grpc-timeout: up to 8 digits and one unit letter (H M S m u n), in seconds."""
    assert grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["", "S", "5", "5s", "5h", "1.5S", "-1S", "+5S", " 5S", "5 S", "5SS", "123456789S", "0x5S"],
)
def test_grpc_timeout_refuses_malformed_values(value: str) -> None:
    """A malformed grpc-timeout is None (not an exception): a unit missing or unknown, a sign, a dot,
    blanks, more than 8 digits."""
    assert grpc_timeout(value) is None


@pytest.mark.parametrize("value", ["²S", "1³m"])
def test_grpc_timeout_refuses_non_decimal_digits(value: str) -> None:
    """Characters str.isdigit() accepts but int() does not (superscripts, reachable as latin-1 header
    bytes 0xB2/0xB3/0xB9) are malformed too: None."""
    assert grpc_timeout(value) is None


# ---------------------------------------------------------------- TLS


def assert_no_http2(address: str, context: ssl.SSLContext) -> None:
    """The TLS handshake fails, or the server closes the connection at once: no HTTP/2 frame arrives."""
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)), RawH2(tls_connect(address, context)) as conn:
        conn.send(PREFACE, frame(SETTINGS, 0, 0))
        conn.read_frame()


def test_main_port_refuses_a_client_without_a_certificate(server: ServerProcess, agent: CertFiles) -> None:
    """Without a client certificate the TLS handshake fails (TLS 1.2), or the server closes the connection
    right after it (TLS 1.3, where the client finishes first): no HTTP/2 frame ever arrives."""
    assert_no_http2(server.address, tls_context(agent.ca, None))
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = tls_context(agent.ca, None)
        context.minimum_version = context.maximum_version = version
        assert_no_http2(server.address, context)


def test_main_port_refuses_a_certificate_from_another_ca(
    server: ServerProcess, agent: CertFiles, tmp_path: Path
) -> None:
    """A client certificate the server's CA did not sign does not get an HTTP/2 connection either."""
    other, _ = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    issued = other.issue("agent", "web1")
    assert issued.key is not None
    foreign = _cert_files(
        ClientCertificate(cert_pem(issued.cert), key_pem(issued.key), agent.ca, Path(".")), tmp_path / "foreign"
    )
    assert_no_http2(server.address, tls_context(agent.ca, foreign))


def test_main_port_selects_h2_for_an_agent_certificate(server: ServerProcess, agent: CertFiles) -> None:
    """With an agent certificate the handshake completes, on TLS 1.2 as on 1.3, and ALPN selects h2."""
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = tls_context(agent.ca, agent)
        context.minimum_version = context.maximum_version = version
        with RawH2(tls_connect(server.address, context)) as conn:
            assert conn.sock.version() == ("TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
            assert conn.sock.selected_alpn_protocol() == "h2"
            conn.start()


# ---------------------------------------------------------------- HTTP/2, frame by frame


def test_settings_exchange_and_ping(server: ServerProcess, agent: CertFiles) -> None:
    """The server's first frame is its SETTINGS (100 concurrent streams); it ACKs the client's SETTINGS,
    and answers a PING with a PING ACK carrying the same 8 bytes."""
    with RawH2.open(server.address, agent) as conn:
        settings = conn.start((SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20))
        assert settings[SETTINGS_MAX_CONCURRENT_STREAMS] == 100
        assert conn.ping(b"\x00\x01front\xff") == []
        # A second SETTINGS later in the connection is ACKed too.
        conn.send(frame(SETTINGS, 0, 0, settings_payload((SETTINGS_INITIAL_WINDOW_SIZE, 65_535))))
        ack = conn.read_frame()
        assert (ack.type, ack.flags, ack.payload) == (SETTINGS, ACK, b"")


def test_wrong_preface_closes_the_connection(server: ServerProcess, agent: CertFiles) -> None:
    """A client that does not start with the HTTP/2 preface (here: HTTP/1.1) is disconnected."""
    with RawH2.open(server.address, agent) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        frames = conn.read_until_closed()
        # At most the SETTINGS the server sends as soon as TLS is up; never an answer.
        assert {f.type for f in frames} <= {SETTINGS, WINDOW_UPDATE}


def test_oversized_frame_is_a_frame_size_error(server: ServerProcess, agent: CertFiles) -> None:
    """A frame longer than SETTINGS_MAX_FRAME_SIZE (16,384) gets GOAWAY FRAME_SIZE_ERROR, then the close."""
    with RawH2.open(server.address, agent) as conn:
        conn.start()
        conn.send(frame(PING, 0, 0, b"\x00" * 16_385))
        frames = conn.read_until_closed()
        goaways = [f for f in frames if f.type == GOAWAY]
        assert len(goaways) == 1 and frames[-1] == goaways[0], frames
        payload = goaways[0].payload
        assert int.from_bytes(payload[:4], "big") == 0  # no stream was opened
        assert int.from_bytes(payload[4:8], "big") == FRAME_SIZE_ERROR == 6


def test_a_ping_flood_closes_the_connection(server: ServerProcess, agent: CertFiles) -> None:
    """PINGs past FLOOD_LIMIT in FLOOD_WINDOW_S get GOAWAY ENHANCE_YOUR_CALM and the close; the ones
    before the limit are answered."""
    with RawH2.open(server.address, agent) as conn:
        conn.start()
        conn.send(b"".join(frame(PING, 0, 0, i.to_bytes(8, "big")) for i in range(FLOOD_LIMIT + 10)))
        frames = conn.read_until_closed()
        acks = [f for f in frames if f.type == PING]
        # The client's SETTINGS (answered by start()) counts as one.
        assert len(acks) == FLOOD_LIMIT - 1 and all(f.flags == ACK for f in acks)
        assert frames[-1].type == GOAWAY, frames[-3:]
        assert int.from_bytes(frames[-1].payload[4:8], "big") == ENHANCE_YOUR_CALM == 0xB


def test_the_101st_concurrent_stream_is_refused(server: ServerProcess, agent: CertFiles) -> None:
    """100 open calls on one connection (relayed health checks still waiting for their request) are
    served; the 101st stream gets RST_STREAM REFUSED_STREAM, and the others stay open and usable."""
    with RawH2.open(server.address, agent) as conn:
        conn.start()
        opened = [1 + 2 * i for i in range(101)]
        conn.send(*(conn.headers(sid, grpc_request(HEALTH_CHECK)) for sid in opened))
        refused = conn.expect(lambda f: f.type == RST_STREAM)
        assert refused.stream == opened[-1] == 201
        assert int.from_bytes(refused.payload, "big") == REFUSED_STREAM == 7
        # Nothing else happened to the first 100 streams.
        assert not [f for f in conn.ping() if f.stream], "a frame on a stream that should be waiting"
        # The first and the 100th stream still work: their requests end, their answers come.
        request = grpc_message(health_pb2.HealthCheckRequest().SerializeToString())
        for sid in (opened[0], opened[99]):
            conn.send(frame(DATA, END_STREAM, sid, request))
            response = conn.response(sid)
            assert response.field("grpc-status") == "0", response
            assert len(response.messages) == 1
            status = health_pb2.HealthCheckResponse.FromString(response.messages[0]).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_compressed_request_is_unimplemented(server: ServerProcess, agent: CertFiles) -> None:
    """A request with grpc-encoding: gzip gets a trailers-only response: grpc-status 12 (UNIMPLEMENTED),
    a grpc-message naming the encoding, the stream ended."""
    with RawH2.open(server.address, agent) as conn:
        conn.start()
        conn.send(conn.headers(1, grpc_request(HEALTH_CHECK, ("grpc-encoding", "gzip")), end_stream=True))
        got = conn.expect(lambda f: f.stream == 1)
        assert got.type == HEADERS and got.flags & END_STREAM and got.flags & END_HEADERS
        fields = {str(k): str(v) for k, v in hpack.Decoder().decode(got.payload)}
        assert fields[":status"] == "200" and fields["content-type"] == "application/grpc"
        assert fields["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0]) == "12"
        assert "gzip" in urllib.parse.unquote(fields["grpc-message"])


def test_flow_control_window_of_the_client_is_respected(server: ServerProcess, admin: CertFiles) -> None:
    """With a 100-byte stream window the server never sends more DATA than the client granted; the
    message, given its window bit by bit, arrives whole (GetStore as a grpc client gets it)."""
    with admin_channel(server.address) as channel:
        expected = admin_grpc.PolicyAdminStub(channel).GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
    with RawH2.open(server.address, admin) as conn:
        conn.start((SETTINGS_INITIAL_WINDOW_SIZE, 100))
        request = grpc_message(admin_pb.GetStoreRequest().SerializeToString())
        conn.send(conn.headers(1, grpc_request(GET_STORE)), frame(DATA, END_STREAM, 1, request))
        granted, received = 100, bytearray()
        trailers: list[tuple[str, str]] = []
        decoder = hpack.Decoder()
        while not trailers:
            if len(received) == granted:
                # The server used the whole window: grant the next 500 bytes (stream and connection).
                grant = (500).to_bytes(4, "big")
                conn.send(frame(WINDOW_UPDATE, 0, 1, grant), frame(WINDOW_UPDATE, 0, 0, grant))
                granted += 500
            got = conn.read_frame()
            if got.type == DATA and got.stream == 1:
                received += got.payload
                assert len(received) <= granted, "DATA beyond the stream's flow-control window"
            elif got.type == HEADERS and got.stream == 1 and got.flags & END_STREAM:
                trailers = [(str(k), str(v)) for k, v in decoder.decode(got.payload)]
            elif got.type == HEADERS and got.stream == 1:
                decoder.decode(got.payload)
        assert ("grpc-status", "0") in trailers
        length = int.from_bytes(received[1:5], "big")
        assert length == len(received) - 5 > 1_000  # it took several grants
        assert admin_pb.GetStoreResponse.FromString(bytes(received[5:])) == expected


def test_padding_priority_and_continuation_are_understood(server: ServerProcess, agent: CertFiles) -> None:
    """A request whose HEADERS is padded, carries priority and continues in two CONTINUATION frames, and
    whose message comes in padded DATA split mid-message, is served like any other."""
    with RawH2.open(server.address, agent) as conn:
        conn.start()
        block = hpack.Encoder().encode(grpc_request(HEALTH_CHECK))
        pieces = [block[:5], block[5:12], block[12:]]
        padding = 3
        conn.send(
            frame(
                HEADERS,
                front.PADDED | front.PRIORITY_FLAG,
                1,
                bytes((padding,)) + (0).to_bytes(4, "big") + b"\x10" + pieces[0] + b"\x00" * padding,
            ),
            frame(front.CONTINUATION, 0, 1, pieces[1]),
            frame(front.CONTINUATION, END_HEADERS, 1, pieces[2]),
        )
        message = grpc_message(health_pb2.HealthCheckRequest(service="").SerializeToString())
        conn.send(
            frame(DATA, front.PADDED, 1, b"\x02" + message[:3] + b"\x00\x00"),
            frame(DATA, front.PADDED | END_STREAM, 1, b"\x00" + message[3:]),
        )
        response = conn.response(1)
        assert response.field("grpc-status") == "0", response
        assert health_pb2.HealthCheckResponse.FromString(response.messages[0]).status == (
            health_pb2.HealthCheckResponse.SERVING
        )


def test_malformed_grpc_timeout_still_gets_an_answer(server: ServerProcess, agent: CertFiles) -> None:
    """A relayed call with an unparsable grpc-timeout still ends with a gRPC status (whichever)."""
    with RawH2.open(server.address, agent) as conn:
        conn.start()
        request = grpc_message(health_pb2.HealthCheckRequest().SerializeToString())
        conn.send(
            conn.headers(1, grpc_request(HEALTH_CHECK, ("grpc-timeout", b"\xb2S"))),
            frame(DATA, END_STREAM, 1, request),
        )
        response = conn.response(1, timeout=2.0)
        assert response.reset is not None or response.field("grpc-status") is not None


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        (("x-note", b"caf\xe9"), "is not printable ASCII"),
        (("x-note", b"a\x01b"), "is not printable ASCII"),
        (("x-note-bin", b"!!!"), "is not base64"),
    ],
)
def test_metadata_that_cannot_be_relayed_gets_an_answer(
    server: ServerProcess, agent: CertFiles, field: tuple[str, bytes], problem: str
) -> None:
    """Metadata gRPC does not allow (a text value outside printable ASCII, a -bin value that is not
    base64) ends the call with INTERNAL naming the key, instead of leaving the stream hanging."""
    with RawH2.open(server.address, agent) as conn:
        conn.start()
        request = grpc_message(health_pb2.HealthCheckRequest().SerializeToString())
        conn.send(conn.headers(1, grpc_request(HEALTH_CHECK, field)), frame(DATA, END_STREAM, 1, request))
        response = conn.response(1, timeout=2.0)
        assert response.field("grpc-status") == "13", response
        assert problem in urllib.parse.unquote(response.field("grpc-message") or ""), response


# ---------------------------------------------------------------- identity forwarding


def spoofed_metadata(admin_der: bytes) -> tuple[tuple[str, str | bytes], ...]:
    return (
        (authz.FRONT_TOKEN_KEY, "0" * 64),
        (authz.FRONT_CERT_KEY, admin_der),
        (authz.FRONT_PEER_KEY, "ipv4:192.0.2.1:1"),
    )


def spoofed_get_store(channel: grpc.Channel, admin: CertFiles) -> tuple[grpc.StatusCode, str]:
    """GetStore on `channel` with the front's metadata keys forged (the admin certificate): its status."""
    stub = admin_grpc.PolicyAdminStub(channel)
    exc = rpc_error(
        lambda: stub.GetStore(admin_pb.GetStoreRequest(), metadata=spoofed_metadata(admin.der), timeout=RPC_TIMEOUT_S)
    )
    return code_and_details(exc)


def test_agent_cannot_pass_itself_off_as_an_admin(server: ServerProcess, agent: CertFiles, admin: CertFiles) -> None:
    """On the main port, an agent sending the front's own metadata keys (a guessed token, the admin
    certificate) is still the agent: the front strips those keys, GetStore is PERMISSION_DENIED."""
    with agent_channel(server.address, agent) as channel:
        code, details = spoofed_get_store(channel, admin)
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert details.startswith(authz.ADMIN_MESSAGE) and "'web1' presented an agent certificate" in details


def test_enrollment_port_ignores_forwarded_identity(server: ServerProcess, admin: CertFiles) -> None:
    """On the enrollment port (no client certificate) the same metadata is not believed without the
    front's token: GetStore is UNAUTHENTICATED."""
    assert server.enroll_address
    with grpc.secure_channel(server.enroll_address, grpc.ssl_channel_credentials(admin.ca)) as channel:
        code, details = spoofed_get_store(channel, admin)
    assert code == grpc.StatusCode.UNAUTHENTICATED, details
    assert details.startswith(authz.ADMIN_MESSAGE)


def test_agent_stream_refuses_an_admin_certificate(server: ServerProcess, admin: CertFiles) -> None:
    """The agents' stream, served by the front itself, needs an agent certificate: an admin's gets a
    trailers-only PERMISSION_DENIED naming the rule."""
    with RawH2.open(server.address, admin) as conn:
        conn.start()
        conn.send(conn.headers(1, grpc_request(front.STREAM_PATH)))
        response = conn.response(1)
        assert response.field("grpc-status") == str(grpc.StatusCode.PERMISSION_DENIED.value[0])
        assert urllib.parse.unquote(response.field("grpc-message") or "").startswith(authz.AGENT_MESSAGE)
        assert not response.messages and not response.trailers  # trailers-only: one HEADERS block


def test_admin_call_through_the_front(server: ServerProcess) -> None:
    """An admin certificate on the main port reaches PolicyAdmin through the relay: GetStore answers with
    the default policies."""
    response = server.admin().GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
    assert {p.name for p in response.contents.policies} >= DEFAULT_POLICY_NAMES
    assert response.contents.filter_lists and response.contents.filter_actions
    assert response.store_revision > 0


# ---------------------------------------------------------------- the relay


def test_large_request_and_response_through_the_relay(server: ServerProcess) -> None:
    """A ~1.6 MB Apply (a filter list of 1,500 filters with long descriptions) goes through the relay,
    its ~1.6 MB answer comes back whole, as does a GetFilterList of it: many DATA frames and window
    updates both ways. The caller's own metadata (x-policyagent-user) is relayed with the certificate."""
    filters = [
        pb.Filter(
            mirrored=True,
            description=f"filter {i} " + "x" * 1_000,
            source=pb.Address(kind=pb.ADDRESS_KIND_ME),
            destination=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=f"10.{(i >> 8) & 0xFF}.{i & 0xFF}.1"),
        )
        for i in range(1_500)
    ]
    big = pb.FilterList(name="Front relay big list", filters=filters)
    request = admin_pb.ApplyRequest(mutations=[admin_pb.Mutation(put_filter_list=big)], operation="front test")
    assert request.ByteSize() > 1_500_000
    stub = server.admin()
    applied = stub.Apply(request, metadata=(("x-policyagent-user", "bob"),), timeout=RPC_TIMEOUT_S * 3)
    assert applied.ByteSize() > 1_500_000
    (written,) = applied.written.filter_lists
    assert [f.description for f in written.filters] == [f.description for f in filters]
    fetched = stub.GetFilterList(admin_pb.GetObjectRequest(id=written.id), timeout=RPC_TIMEOUT_S)
    assert fetched == written
    changes = stub.ListChanges(admin_pb.ListChangesRequest(), timeout=RPC_TIMEOUT_S).changes
    mine = [c for c in changes if c.object_id == written.id]
    assert mine and mine[-1].principal == "admin:test-admin/bob"


def test_relayed_errors_keep_code_details_and_trailers(server: ServerProcess) -> None:
    """A relayed failure keeps its status code, its (non-ASCII, '%'-bearing) message and its binary trailing
    metadata (ErrorDetail); an unknown method or service is UNIMPLEMENTED."""
    name = "Nö Such Pölicy 100%"
    with admin_channel(server.address) as channel:
        stub = admin_grpc.PolicyAdminStub(channel)
        exc = rpc_error(lambda: stub.GetPolicy(admin_pb.GetObjectRequest(name=name), timeout=RPC_TIMEOUT_S))
        code, details = code_and_details(exc)
        assert code == grpc.StatusCode.NOT_FOUND and name in details
        error = error_from_rpc(exc)
        assert isinstance(error, NotFoundError) and name in str(error)
        for path in ("/policyagent.v1.PolicyAdmin/NoSuchMethod", "/no.such.Service/Method"):
            method = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            exc = rpc_error(lambda m=method: m(b"", timeout=RPC_TIMEOUT_S))  # type: ignore[misc]
            assert code_and_details(exc)[0] == grpc.StatusCode.UNIMPLEMENTED, path
        # The connection is still fine after the failures.
        assert stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S).store_revision > 0


def test_server_streaming_call_is_relayed_and_cancelled(inproc_server: Callable[..., InProcessServer]) -> None:
    """Fleet.Watch through the relay delivers its snapshot; when the client cancels it the cancellation
    reaches the grpc.aio servicer (the hub's watcher goes away), and the server keeps answering."""
    srv = inproc_server()
    hub = srv.server.hub
    assert hub is not None
    with admin_channel(srv.address) as channel:
        fleet = fleet_grpc.FleetStub(channel)
        call = fleet.Watch(fleet_pb.FleetStatusRequest(), timeout=RPC_TIMEOUT_S)
        first = next(call)
        assert first.server_time_unix_ms > 0
        assert len(hub._watchers) == 1
        call.cancel()
        assert code_and_details(rpc_error(lambda: next(call)))[0] == grpc.StatusCode.CANCELLED
        wait_until(lambda: not hub._watchers, what="the relayed Watch to end on the server")
        status = fleet.Status(fleet_pb.FleetStatusRequest(), timeout=RPC_TIMEOUT_S)
        assert status.server_time_unix_ms >= first.server_time_unix_ms
        # Again on a fresh stream, which is also cancelled by closing the connection's channel.
        again = fleet.Watch(fleet_pb.FleetStatusRequest(), timeout=RPC_TIMEOUT_S)
        assert next(again).server_time_unix_ms > 0
    wait_until(lambda: not hub._watchers, what="the Watch of a closed channel to end on the server")
    assert srv.admin().GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S).store_revision > 0


# ---------------------------------------------------------------- a Front on a backend of the test's own


@dataclass
class Seen:
    """What the test's backend and agent-stream handler were given."""

    metadata: list[dict[str, str | bytes]]
    agent_peers: list[tuple[authz.Peer, str]]


def _server_ssl_context(test_pki: Path, directory: Path) -> ssl.SSLContext:
    """The main port's TLS as PolicyServer sets it up, with a server certificate from the session's CA."""
    ca, _ = CertificateAuthority.load_or_create(test_pki / "pki")
    issued = ca.issue("server", "localhost", dns_names=["localhost"], ip_addresses=[ipaddress.ip_address("127.0.0.1")])
    assert issued.key is not None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.crt").write_bytes(cert_pem(issued.cert))
    (directory / "server.key").write_bytes(key_pem(issued.key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(directory / "server.crt", directory / "server.key")
    context.load_verify_locations(cadata=ca.cert_pem.decode("ascii"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


def _backend_handler(seen: Seen) -> grpc.GenericRpcHandler:
    """/t.Test/Echo (unary, trailing metadata on success) and /t.Test/Chat (bidi echo), on raw bytes."""

    async def echo(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        seen.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        context.set_trailing_metadata((("x-trail", "after"), ("x-trail-bin", b"\x00\xff")))
        return b"echo:" + request

    async def chat(requests: AsyncIterator[bytes], context: aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        seen.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        async for request in requests:
            yield b"chat:" + request

    return grpc.method_handlers_generic_handler(
        "t.Test",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo), "Chat": grpc.stream_stream_rpc_method_handler(chat)},
    )


def run_with_front(
    test_pki: Path, tmp_path: Path, scenario: Callable[[int, front.Front, Seen], Awaitable[None]]
) -> Seen:
    """Run `scenario(port, front, seen)` against a Front on 127.0.0.1 relaying to a grpc.aio server of the test's."""
    seen = Seen([], [])

    async def serve_stream(peer: authz.Peer, requests: AsyncIterator[Any], context: Any) -> None:
        seen.agent_peers.append((peer, context.peer()))
        async for message in requests:
            await context.write(
                dist_pb.ServerMessage(keepalive=dist_pb.KeepAlive(server_time_unix_ms=len(seen.agent_peers)))
            )
            if message.WhichOneof("msg") == "nack":
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "told to stop")

    async def main() -> None:
        backend = aio.server()
        backend.add_generic_rpc_handlers([_backend_handler(seen)])
        target = f"unix:{tmp_path}/backend.sock"
        assert backend.add_insecure_port(target)
        await backend.start()
        the_front = front.Front(
            _server_ssl_context(test_pki, tmp_path / "server"),
            backend=target,
            serve_stream=serve_stream,
            revocations=Revocations(),
        )
        try:
            port = await the_front.start("127.0.0.1", 0)
            await asyncio.wait_for(scenario(port, the_front, seen), RPC_TIMEOUT_S * 2)
        finally:
            await the_front.stop(0)
            await backend.stop(0)

    asyncio.run(main())
    return seen


def test_relay_forwards_metadata_and_identity(test_pki: Path, tmp_path: Path, agent: CertFiles) -> None:
    """The backend gets the caller's metadata (text and -bin, decoded), the front's token, the client's
    address and the verified certificate (DER); the caller's own policyagent-front-* keys are dropped."""

    async def scenario(port: int, the_front: front.Front, seen: Seen) -> None:
        async with aio.secure_channel(f"127.0.0.1:{port}", agent.client.channel_credentials()) as channel:
            echo = channel.unary_unary("/t.Test/Echo")
            metadata = (
                ("x-custom", "value"),
                ("x-custom-bin", b"\x00\x01\xfe\xff"),
                (authz.FRONT_TOKEN_KEY, "f" * 64),
                (authz.FRONT_PEER_KEY, "ipv4:192.0.2.1:1"),
            )
            assert await echo(b"hi", metadata=metadata, timeout=RPC_TIMEOUT_S) == b"echo:hi"

    seen = run_with_front(test_pki, tmp_path, scenario)
    (got,) = seen.metadata
    assert got["x-custom"] == "value" and got["x-custom-bin"] == b"\x00\x01\xfe\xff"
    assert got[authz.FRONT_CERT_KEY] == agent.der
    token, peer = got[authz.FRONT_TOKEN_KEY], got[authz.FRONT_PEER_KEY]
    assert isinstance(token, str) and token != "f" * 64 and len(token) == 64
    assert isinstance(peer, str) and peer.startswith("ipv4:127.0.0.1:")


def test_relay_streams_both_ways(test_pki: Path, tmp_path: Path, agent: CertFiles) -> None:
    """A bidirectional call is relayed message by message: each answer arrives before the next request is
    sent (nothing waits for the end of the request stream)."""

    async def scenario(port: int, the_front: front.Front, seen: Seen) -> None:
        async with aio.secure_channel(f"127.0.0.1:{port}", agent.client.channel_credentials()) as channel:
            call = channel.stream_stream("/t.Test/Chat")(timeout=RPC_TIMEOUT_S)
            for word in (b"one", b"two", b"x" * 100_000):
                await call.write(word)
                assert await call.read() == b"chat:" + word
            await call.done_writing()
            assert await call.read() is aio.EOF
            assert await call.code() == grpc.StatusCode.OK

    run_with_front(test_pki, tmp_path, scenario)


def test_relay_keeps_trailing_metadata_of_a_successful_call(test_pki: Path, tmp_path: Path, agent: CertFiles) -> None:
    """A successful relayed call's trailing metadata (text and -bin) reaches the client."""

    async def scenario(port: int, the_front: front.Front, seen: Seen) -> None:
        async with aio.secure_channel(f"127.0.0.1:{port}", agent.client.channel_credentials()) as channel:
            call = channel.unary_unary("/t.Test/Echo")(b"hi", timeout=RPC_TIMEOUT_S)
            assert await call == b"echo:hi"
            trailing = dict(await call.trailing_metadata() or ())
            assert trailing.get("x-trail") == "after"
            assert trailing.get("x-trail-bin") == b"\x00\xff"

    run_with_front(test_pki, tmp_path, scenario)


def test_agent_stream_is_served_in_process(test_pki: Path, tmp_path: Path, agent: CertFiles) -> None:
    """The agents' stream never reaches the backend: the front's own handler gets the agent's Peer (from
    its certificate) and address, its writes reach the agent, and its abort ends the call with that status."""

    async def scenario(port: int, the_front: front.Front, seen: Seen) -> None:
        async with aio.secure_channel(f"127.0.0.1:{port}", agent.client.channel_credentials()) as channel:
            call = dist_grpc.DistributionStub(channel).Stream(timeout=RPC_TIMEOUT_S)
            await call.write(dist_pb.AgentMessage(hello=dist_pb.Hello(computer="web1")))
            reply = await call.read()
            assert isinstance(reply, dist_pb.ServerMessage) and reply.keepalive.server_time_unix_ms == 1
            await call.write(dist_pb.AgentMessage(nack=dist_pb.Nack(version="v1")))
            assert isinstance(await call.read(), dist_pb.ServerMessage)
            assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert await call.details() == "told to stop"

    seen = run_with_front(test_pki, tmp_path, scenario)
    assert not seen.metadata  # not relayed
    ((peer, address),) = seen.agent_peers
    assert (peer.role, peer.name) == ("agent", "web1") and address.startswith("ipv4:127.0.0.1:")


# ---------------------------------------------------------------- timeouts and stop


def test_handshake_timeout_closes_silent_connections(
    inproc_server: Callable[..., InProcessServer], monkeypatch: pytest.MonkeyPatch, agent: CertFiles
) -> None:
    """A TCP connection that sends nothing, and a TLS connection that never sends the HTTP/2 preface, are
    closed once HANDSHAKE_TIMEOUT_S passes; one that sent its preface is not."""
    monkeypatch.setattr(front, "HANDSHAKE_TIMEOUT_S", 0.5)
    srv = inproc_server()
    host, port = srv.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=FRAME_TIMEOUT_S) as sock:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):  # closed (FIN) or aborted (RST): either way, gone
            assert sock.recv(1) == b""
        assert time.monotonic() - started < 3.0
    with RawH2.open(srv.address, agent) as quiet:
        started = time.monotonic()
        frames = quiet.read_until_closed()
        assert time.monotonic() - started < 3.0
        assert {f.type for f in frames} <= {SETTINGS, WINDOW_UPDATE}
    with RawH2.open(srv.address, agent) as ready:
        ready.start()
        with pytest.raises(FrameTimeout):
            ready.read_frame(timeout=1.0)  # twice the handshake timeout: nothing, not a close
        assert ready.ping() == []


def test_stop_sends_goaway_and_lets_open_calls_finish(
    inproc_server: Callable[..., InProcessServer], agent: CertFiles
) -> None:
    """server.stop(): an idle connection gets GOAWAY (NO_ERROR) and is closed; a connection with a call in
    progress gets GOAWAY naming its last stream, the call still finishes, then the connection is closed."""
    srv = inproc_server()
    idle = RawH2.open(srv.address, agent)
    busy = RawH2.open(srv.address, agent)
    with idle, busy:
        idle.start()
        busy.start()
        busy.send(busy.headers(1, grpc_request(HEALTH_CHECK)))
        assert busy.ping() == []  # the stream is open, its request not finished
        stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(grace=RPC_TIMEOUT_S), srv.loop)
        try:
            idle_frames = idle.read_until_closed()
            assert [f.type for f in idle_frames] == [GOAWAY]
            assert idle_frames[0].payload[:8] == (0).to_bytes(4, "big") + NO_ERROR.to_bytes(4, "big")

            goaway = busy.expect(lambda f: f.type == GOAWAY)
            assert int.from_bytes(goaway.payload[:4], "big") == 1
            assert int.from_bytes(goaway.payload[4:8], "big") == NO_ERROR
            busy.send(frame(DATA, END_STREAM, 1, grpc_message(health_pb2.HealthCheckRequest().SerializeToString())))
            response = busy.response(1)
            assert response.field("grpc-status") == "0" and len(response.messages) == 1
            assert busy.read_until_closed() == []
        finally:
            busy.close()
            stopping.result(RPC_TIMEOUT_S)


def test_frames_after_goaway_are_all_processed(inproc_server: Callable[..., InProcessServer], agent: CertFiles) -> None:
    """While the server stops, a connection with a call in progress keeps working frame after frame: each
    PING is answered with its own payload, a new stream is refused (REFUSED_STREAM), and the open call
    still gets its request and answers."""
    srv = inproc_server()
    with RawH2.open(srv.address, agent) as busy:
        busy.start()
        busy.send(busy.headers(1, grpc_request(HEALTH_CHECK)))
        assert busy.ping() == []
        stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(grace=RPC_TIMEOUT_S), srv.loop)
        try:
            busy.expect(lambda f: f.type == GOAWAY)
            busy.send(frame(PING, 0, 0, b"ping-one"))
            assert busy.read_frame() == Frame(PING, ACK, 0, b"ping-one")
            busy.send(frame(PING, 0, 0, b"ping-two"))
            assert busy.read_frame() == Frame(PING, ACK, 0, b"ping-two")  # the bug: b"ping-one" again
            busy.send(busy.headers(3, grpc_request(HEALTH_CHECK), end_stream=True))
            assert busy.response(3).reset == REFUSED_STREAM
            busy.send(frame(DATA, END_STREAM, 1, grpc_message(health_pb2.HealthCheckRequest().SerializeToString())))
            response = busy.response(1)
            assert response.field("grpc-status") == "0" and len(response.messages) == 1
        finally:
            busy.close()  # the server's stop then finds no open call and ends
            stopping.result(RPC_TIMEOUT_S)


def test_health_through_the_front_with_an_agent_certificate(server: ServerProcess, agent: CertFiles) -> None:
    """A public service (health) answers an agent through the relay, as a grpc client sees it."""
    with agent_channel(server.address, agent) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
