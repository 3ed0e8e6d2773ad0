"""Server memory per idle mTLS connection: a bare grpc.aio server, one trivial bidi stream per connection.

    .venv/bin/python bench/conn_memory.py [--steps 1000,3000] [--clients 4] [--pace 32]
        [--option grpc.tsi.max_frame_size=4096 ...] [--env MALLOC_ARENA_MAX=2 ...] [--preload LIB]
        [--trim] [--insecure] [--server-key ec|rsa] [--reply-bytes 64] [--label TEXT] [--json]

What it isolates: the transport's floor. The servicer holds nothing per stream (it echoes each
request, 64 bytes by default, and otherwise waits in `async for`), no interceptor, no Python
objects of the application: what a connection costs is gRPC core (TCP, TLS, HTTP/2), grpc.aio's
per-call objects and the allocator's overhead.

- Certificates: bench/fanout.py's cache (--cache-dir; one CA, N agent certificates, each its own
  EC P-256 key and CN). The server certificate is issued by the same CA at every run: EC P-256
  (like policyagent/pki) or, with --server-key rsa, RSA 2048.
- Server: a subprocess; channel args from --option KEY=VALUE (an int when it parses as one),
  environment from --env KEY=VALUE and --preload LIB (LD_PRELOAD). mTLS with the client
  certificate required (as the real agent port), or --insecure (plain TCP).
- Clients: --clients processes per step, each with its share of the step's connections, one
  channel with its own certificate and one open stream per connection; connects are paced
  (--pace handshakes + first replies in flight per process), as in bench/fanout.py.
- Steps: --steps 1000,3000 means "connect until 1000 are open, measure, connect until 3000 are
  open, measure" (cumulative: the first 1000 stay open). After each step: 3 s to settle, then the
  server's RSS. Figures: (RSS - idle RSS) / N, and the marginal (RSS_k - RSS_{k-1}) / (N_k - N_{k-1})
  which excludes one-off costs (threads, arenas, lazily initialised state). With --trim, also the
  RSS after malloc_trim(0) in the server (glibc: returns free pages inside the heap arenas).
- Allocator figures (glibc mallinfo2, or jemalloc's stats when it is preloaded): bytes in use
  vs. held, to tell live memory from fragmentation; the server's memory maps and open fds.
- Variants: --no-stream (connections only, no call), --resume (each client first makes a
  connection that it closes, then reconnects resuming the TLS session: the reconnect churn of a
  real fleet), --tune-malloc BYTES (the server calls policyagent.server.memory.tune_malloc),
  --profile DIR (live allocations by call stack, see MEMPROF_C), --smaps DIR.
- Every client channel has its own subchannel pool: without it, channels with equal arguments
  (all the insecure ones) share one connection per process, and "per connection" figures are
  per stream.

Measured (grpcio 1.85.1, Python 3.11, glibc 2.36; KiB per connection at 3,000, fresh server):
mTLS + stream 84.8 with grpc.tsi.max_frame_size=4096 (89.7 with gRPC's defaults); mTLS without a
stream 60.0; plain TCP + stream 39.5, without 14.7. After one reconnect per client 95.2. Live
allocations per mTLS connection (--profile): BoringSSL BIO pair 2 x 17,416 B, secure-endpoint
staging buffers 2 x 8 KiB, TCP read 8 KiB, TSI frame protector max_frame_size - 100 B, ~10 KiB of
objects; per stream ~12 KiB in gRPC core (one 8.5 KiB block) and ~6 KiB of Python objects.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import ipaddress
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

METHOD = "/bench.Conn/Stream"


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _status_kb(pid: int | str = "self") -> dict[str, int]:
    out = {
        "maps": Path(f"/proc/{pid}/maps").read_text().count("\n"),  # VMAs (vm.max_map_count: 65530 by default)
        "fds": len(os.listdir(f"/proc/{pid}/fd")),  # ~ the connections open
    }
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])
    return out


# ---------------------------------------------------------------- allocator statistics (server process)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL(None)


def _jemalloc_stats() -> dict[str, int] | None:
    mallctl = getattr(_libc, "mallctl", None)
    if mallctl is None:
        return None
    epoch = ctypes.c_uint64(1)
    size = ctypes.c_size_t(8)
    mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.c_size_t(8))
    out = {}
    for name in ("allocated", "active", "resident", "mapped", "retained"):
        value = ctypes.c_size_t(0)
        size = ctypes.c_size_t(ctypes.sizeof(value))
        if mallctl(f"stats.{name}".encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0:
            out[name] = value.value // 1024
    return out


def allocator_stats() -> dict[str, Any]:
    je = _jemalloc_stats()
    if je is not None:
        return {"allocator": "jemalloc", **{f"je_{k}_kb": v for k, v in je.items()}}
    fn = _libc.mallinfo2
    fn.restype = _MallInfo2
    mi = fn()
    return {
        "allocator": "glibc",
        "in_use_kb": (mi.uordblks + mi.hblkhd) // 1024,  # allocated: arenas + mmapped chunks
        "free_kb": mi.fordblks // 1024,  # free inside the arenas (fragmentation / cache)
        "arena_kb": mi.arena // 1024,  # arenas' total (sbrk + mmapped heaps)
        "mmap_kb": mi.hblkhd // 1024,
    }


# ---------------------------------------------------------------- server


async def server_main(args: argparse.Namespace) -> None:
    import grpc
    from grpc import aio

    _raise_fd_limit()
    if args.tune_malloc:  # policyagent.server.memory: mallopt(M_MMAP_THRESHOLD) at run time, as the server would
        from policyagent.server.memory import tune_malloc

        assert tune_malloc(args.tune_malloc), "mallopt refused (or MALLOC_MMAP_THRESHOLD_ set)"
    options = []
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options.append((key, int(value)))
        except ValueError:
            options.append((key, value))
    open_streams = 0
    resumed = 0  # streams whose TLS session was resumed (--resume)
    reply = b"r" * args.reply_bytes
    traced: list[Any] = [None]

    async def stream(request_iterator: Any, context: Any) -> Any:
        nonlocal open_streams, resumed
        open_streams += 1
        if args.resume and context.auth_context().get("ssl_session_reused") == [b"true"]:
            resumed += 1
        try:
            async for _request in request_iterator:
                yield reply
        finally:
            open_streams -= 1

    server = aio.server(options=options)
    handler = grpc.method_handlers_generic_handler(
        "bench.Conn", {"Stream": grpc.stream_stream_rpc_method_handler(stream)}
    )
    server.add_generic_rpc_handlers((handler,))
    if args.insecure:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        cache = Path(args.cache_dir)
        key, chain = server_pair(cache, args.server_key)
        creds = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=(cache / "pki" / "ca.crt").read_bytes(), require_client_auth=True
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    print(f"port {port}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        if line == "trim":
            gc.collect()
            _libc.malloc_trim(0)
        if line == "profstart":  # with --profile: the interposer is preloaded (live bytes by call stack)
            _libc.memprof_start()
            if tracemalloc.is_tracing():
                tracemalloc.reset_peak()
                traced[0] = tracemalloc.take_snapshot()
        if line.startswith("smaps "):
            Path(line.split(" ", 1)[1]).write_text(Path("/proc/self/smaps").read_text())
        if line.startswith("profdump "):
            _libc.memprof_dump(line.split(" ", 1)[1].encode(), ctypes.c_long(1 << 16))
            if tracemalloc.is_tracing() and traced[0] is not None:
                top = tracemalloc.take_snapshot().compare_to(traced[0], "lineno")[:25]
                Path(line.split(" ", 1)[1] + ".py.txt").write_text("\n".join(map(str, top)) + "\n")
        if line in ("stats", "trim") or line.startswith(("prof", "smaps")):
            extra = {"py_traced_kb": tracemalloc.get_traced_memory()[0] // 1024} if tracemalloc.is_tracing() else {}
            print(
                "stats "
                + json.dumps(
                    {"streams": open_streams, "resumed": resumed, **_status_kb(), **allocator_stats(), **extra}
                ),
                flush=True,
            )
    await server.stop(0)


def server_pair(cache: Path, kind: str) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM) for 127.0.0.1/localhost, issued by the bench CA: EC P-256 or RSA 2048."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from policyagent.pki.ca import CertificateAuthority, cert_pem, key_pem

    ca, _ = CertificateAuthority.load_or_create(cache / "pki")
    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    issued = ca.issue(
        "server",
        "localhost",
        key.public_key(),
        dns_names=["localhost"],
        ip_addresses=[ipaddress.ip_address("127.0.0.1")],
    )
    return key_pem(key), cert_pem(issued.cert) + ca.cert_pem


# ---------------------------------------------------------------- client process


async def client_main(args: argparse.Namespace) -> None:
    import grpc
    from fanout import load_agents
    from grpc import aio

    _raise_fd_limit()
    gc.set_threshold(50_000, *gc.get_threshold()[1:])
    cache = Path(args.cache_dir)
    agents = load_agents(cache, args.start, args.count)
    ca_pem = (cache / "pki" / "ca.crt").read_bytes()
    connecting = asyncio.Semaphore(args.pace)
    done = asyncio.Event()
    ready = 0
    errors: dict[str, int] = {}
    channels: list[Any] = []
    request = b"q" * 64
    session_cache: Any = None
    if args.resume:  # TLS session resumption: a first connection gets a ticket, the measured one resumes it
        from grpc.experimental.session_cache import ssl_session_cache_lru

        session_cache = ssl_session_cache_lru(len(agents))

    async def one(agent: dict[str, str]) -> None:
        nonlocal ready
        async with connecting:
            while True:
                # Its own subchannel pool: channels with equal arguments (insecure ones) would otherwise
                # share one connection per process.
                options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
                if session_cache is not None:
                    # The client's cache is keyed by the SNI name: none is sent to an IP address.
                    options += [
                        ("grpc.ssl_session_cache", session_cache),
                        ("grpc.ssl_target_name_override", "localhost"),
                    ]
                    creds = grpc.ssl_channel_credentials(ca_pem, agent["key"].encode(), agent["cert"].encode())
                    primer = aio.secure_channel(args.address, creds, options=options)
                    await asyncio.wait_for(primer.channel_ready(), 60)
                    await asyncio.sleep(0.05)  # TLS 1.3: the tickets come after the handshake
                    await primer.close()
                if args.insecure:
                    channel = aio.insecure_channel(args.address, options=options)
                else:
                    creds = grpc.ssl_channel_credentials(ca_pem, agent["key"].encode(), agent["cert"].encode())
                    channel = aio.secure_channel(args.address, creds, options=options)
                try:
                    if args.no_stream:  # the connection alone: TCP (+ TLS handshake) + HTTP/2, no call
                        call = None
                        await asyncio.wait_for(channel.channel_ready(), 60)
                    else:
                        call = channel.stream_stream(METHOD)()
                        await call.write(request)
                        await call.read()
                    break
                except TimeoutError:
                    errors["TIMEOUT"] = errors.get("TIMEOUT", 0) + 1
                    await channel.close()
                    await asyncio.sleep(0.5)
                except grpc.RpcError as exc:
                    key = exc.code().name if isinstance(exc, aio.AioRpcError) else type(exc).__name__
                    errors[key] = errors.get(key, 0) + 1
                    await channel.close()
                    await asyncio.sleep(0.5)
        channels.append((channel, call))
        ready += 1
        if ready == len(agents):
            done.set()

    tasks = []
    for agent in agents:
        tasks.append(asyncio.create_task(one(agent)))
        await asyncio.sleep(0)
    await done.wait()
    print(f"connected {ready} errors {json.dumps(errors)}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.readline()  # "quit" or EOF
    for channel, _call in channels:
        await channel.close()


# ---------------------------------------------------------------- allocation profiler (--profile)

# An LD_PRELOAD malloc interposer: every allocation gets a 32-byte header; between memprof_start() and
# memprof_dump() it records the call stack (10 frames, libgcc's unwinder) and keeps live bytes per
# stack. gRPC core in the grpcio wheel is stripped: frames print as cygrpc+offset, so tell the
# buffers apart by size and count per connection. Built with gcc into the --profile directory.
MEMPROF_C = r"""
// LD_PRELOAD allocation profiler: live bytes by call stack, recorded between memprof_start() and memprof_dump().
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unwind.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

#define MAGIC 0x6d656d70726f6621ULL
#define NFRAMES 10
#define NSTACKS (1 << 16)

typedef struct { uint64_t magic; void *orig; uint32_t size; int32_t stack; uint64_t pad; } hdr_t;  // 32 bytes
typedef struct { uintptr_t frames[NFRAMES]; int n; uint64_t hash; long live_count, live_bytes, total_count; size_t min_size, max_size; } stack_t_;

static stack_t_ stacks[NSTACKS];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static volatile int enabled = 0;
static __thread int busy = 0;

struct bt { uintptr_t *frames; int n, skip; };
static _Unwind_Reason_Code cb(struct _Unwind_Context *ctx, void *arg) {
  struct bt *b = arg;
  if (b->skip > 0) { b->skip--; return _URC_NO_REASON; }
  if (b->n >= NFRAMES) return _URC_END_OF_STACK;
  b->frames[b->n++] = _Unwind_GetIP(ctx);
  return _URC_NO_REASON;
}

static int record(size_t size) {
  if (!enabled || busy) return -1;
  busy = 1;
  uintptr_t frames[NFRAMES];
  struct bt b = {frames, 0, 2};
  _Unwind_Backtrace(cb, &b);
  uint64_t h = 1469598103934665603ULL;
  for (int i = 0; i < b.n; i++) h = (h ^ frames[i]) * 1099511628211ULL;
  pthread_mutex_lock(&mu);
  int idx = (int)(h & (NSTACKS - 1)), found = -1;
  for (int probe = 0; probe < NSTACKS; probe++, idx = (idx + 1) & (NSTACKS - 1)) {
    if (stacks[idx].n == 0) { stacks[idx].n = b.n ? b.n : 1; stacks[idx].hash = h; memcpy(stacks[idx].frames, frames, sizeof(frames)); stacks[idx].min_size = size; found = idx; break; }
    if (stacks[idx].hash == h) { found = idx; break; }
  }
  if (found >= 0) {
    stack_t_ *s = &stacks[found];
    s->live_count++; s->live_bytes += size; s->total_count++;
    if (size < s->min_size) s->min_size = size;
    if (size > s->max_size) s->max_size = size;
  }
  pthread_mutex_unlock(&mu);
  busy = 0;
  return found;
}

static void unrecord(hdr_t *h) {
  if (h->stack < 0) return;
  pthread_mutex_lock(&mu);
  stacks[h->stack].live_count--; stacks[h->stack].live_bytes -= h->size;
  pthread_mutex_unlock(&mu);
}

static void *finish(void *raw, void *user, size_t size) {
  hdr_t *h = (hdr_t *)user - 1;
  h->magic = MAGIC; h->orig = raw; h->size = (uint32_t)size; h->stack = -1;
  h->stack = record(size);
  return user;
}

void *malloc(size_t size) {
  void *raw = __libc_malloc(size + sizeof(hdr_t));
  if (!raw) return NULL;
  return finish(raw, (char *)raw + sizeof(hdr_t), size);
}
void free(void *p) {
  if (!p) return;
  hdr_t *h = (hdr_t *)p - 1;
  if (h->magic != MAGIC) { __libc_free(p); return; }  // should not happen
  h->magic = 0;
  unrecord(h);
  __libc_free(h->orig);
}
void *calloc(size_t n, size_t m) {
  size_t size = n * m;
  void *p = malloc(size);
  if (p) memset(p, 0, size);
  return p;
}
size_t malloc_usable_size(void *p) { return p ? ((hdr_t *)p - 1)->size : 0; }
void *realloc(void *p, size_t size) {
  if (!p) return malloc(size);
  if (size == 0) { free(p); return NULL; }
  hdr_t *h = (hdr_t *)p - 1;
  void *q = malloc(size);
  if (!q) return NULL;
  memcpy(q, p, h->size < size ? h->size : size);
  free(p);
  return q;
}
void *memalign(size_t align, size_t size) {
  if (align < 16) align = 16;
  void *raw = __libc_malloc(size + align + sizeof(hdr_t));
  if (!raw) return NULL;
  uintptr_t u = ((uintptr_t)raw + sizeof(hdr_t) + align - 1) & ~(uintptr_t)(align - 1);
  return finish(raw, (void *)u, size);
}
int posix_memalign(void **out, size_t align, size_t size) { void *p = memalign(align, size); if (!p) return ENOMEM; *out = p; return 0; }
void *aligned_alloc(size_t align, size_t size) { return memalign(align, size); }
void *valloc(size_t size) { return memalign(4096, size); }
void *pvalloc(size_t size) { return memalign(4096, (size + 4095) & ~4095UL); }

void memprof_start(void) {
  pthread_mutex_lock(&mu);
  memset(stacks, 0, sizeof(stacks));
  pthread_mutex_unlock(&mu);
  enabled = 1;
}

void memprof_dump(const char *path, long min_bytes) {
  busy = 1;
  FILE *f = fopen(path, "w");
  pthread_mutex_lock(&mu);
  for (int i = 0; i < NSTACKS; i++) {
    stack_t_ *s = &stacks[i];
    if (!s->n || s->live_bytes < min_bytes) continue;
    fprintf(f, "STACK live_bytes=%ld live_count=%ld total_count=%ld min=%zu max=%zu\n", s->live_bytes, s->live_count, s->total_count, s->min_size, s->max_size);
    for (int j = 0; j < s->n; j++) {
      Dl_info info;
      if (dladdr((void *)s->frames[j], &info) && info.dli_fname) {
        const char *base = strrchr(info.dli_fname, '/');
        fprintf(f, "  %s+0x%lx %s\n", base ? base + 1 : info.dli_fname, (unsigned long)(s->frames[j] - (uintptr_t)info.dli_fbase), info.dli_sname ? info.dli_sname : "");
      } else fprintf(f, "  0x%lx\n", (unsigned long)s->frames[j]);
    }
  }
  pthread_mutex_unlock(&mu);
  fclose(f);
  busy = 0;
}
"""


def summarize_profile(path: Path, n: int, top: int = 15) -> list[str]:
    """The stacks holding the most live bytes, per connection (KiB, allocations, sizes, first frames)."""
    stacks: list[tuple[dict[str, int], list[str]]] = []
    for line in path.read_text().splitlines():
        if line.startswith("STACK"):
            stacks.append(({k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}, []))
        elif stacks:
            stacks[-1][1].append(line.split()[0].replace("cygrpc.cpython-311-x86_64-linux-gnu.so", "cygrpc"))
    stacks.sort(key=lambda s: -s[0]["live_bytes"])
    total = sum(s[0]["live_bytes"] for s in stacks) / n / 1024
    out = [f"  live allocations made since the idle measurement: {total:.1f} KiB per connection; largest:"]
    for st, frames in stacks[:top]:
        out.append(
            f"    {st['live_bytes'] / n / 1024:6.2f} KiB  {st['live_count'] / n:5.2f}/conn  size {st['min']}-{st['max']}  "
            + " < ".join(frames[:4])
        )
    return out


def build_memprof(directory: Path) -> Path:
    source, lib = directory / "memprof.c", directory / "memprof.so"
    source.write_text(MEMPROF_C)
    subprocess.run(
        ["gcc", "-O2", "-fno-builtin", "-shared", "-fPIC", "-o", str(lib), str(source), "-lpthread"], check=True
    )
    return lib


# ---------------------------------------------------------------- controller


def _readline(proc: subprocess.Popen[str], prefix: str, timeout: float = 900) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited waiting for {prefix!r}")
        if line.startswith(prefix):
            return line.strip()
    raise TimeoutError(prefix)


def _ask(server: subprocess.Popen[str], command: str) -> dict[str, Any]:
    assert server.stdin is not None
    server.stdin.write(command + "\n")
    server.stdin.flush()
    return json.loads(_readline(server, "stats ")[6:])


def run(args: argparse.Namespace) -> None:
    from fanout import ensure_certs

    steps = [int(s) for s in args.steps.split(",")]
    cache = Path(args.cache_dir)
    ensure_certs(cache, max(steps))
    env = dict(os.environ)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    if args.preload:
        env["LD_PRELOAD"] = args.preload
    if args.profile:  # live allocations by call stack: the malloc interposer above
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        lib = args.profile_lib or str(build_memprof(Path(args.profile)))
        env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD", ""), lib]))
    common = ["--cache-dir", str(cache), "--reply-bytes", str(args.reply_bytes)] + (
        ["--insecure"] if args.insecure else []
    )
    common += ["--no-stream"] if args.no_stream else []
    common += ["--resume"] if args.resume else []
    me = [sys.executable, __file__, *common]
    server = subprocess.Popen(
        [
            *me,
            "--role",
            "server",
            "--server-key",
            args.server_key,
            f"--tune-malloc={args.tune_malloc}",
            *(f"--option={o}" for o in args.option),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    clients: list[subprocess.Popen[str]] = []
    result: dict[str, Any] = {
        "label": args.label,
        "options": args.option,
        "env": args.env,
        "preload": args.preload,
        "insecure": args.insecure,
        "server_key": args.server_key,
        "steps": [],
    }
    try:
        port = int(_readline(server, "port ").split()[1])
        time.sleep(1.0)
        idle = _ask(server, "stats")
        result["idle"] = idle
        if args.profile:
            _ask(server, "profstart")
        have = 0
        prev_rss = idle["VmRSS"]
        for n in steps:
            started = time.monotonic()
            share = (n - have + args.clients - 1) // args.clients
            batch = [
                subprocess.Popen(
                    [
                        *me,
                        "--role",
                        "client",
                        "--address",
                        f"127.0.0.1:{port}",
                        "--start",
                        str(have + i * share),
                        "--count",
                        str(min(share, n - have - i * share)),
                        "--pace",
                        str(args.pace),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for i in range(args.clients)
                if have + i * share < n
            ]
            clients += batch
            errors = [_readline(p, "connected").split(" errors ")[1] for p in batch]
            connect_s = time.monotonic() - started
            time.sleep(3.0)
            stats = _ask(server, "stats")
            if args.profile:
                dump = Path(args.profile).resolve() / f"live-{n}.txt"
                _ask(server, f"profdump {dump}")
                result.setdefault("profile", []).extend(summarize_profile(dump, n))
            if args.smaps:
                Path(args.smaps).mkdir(parents=True, exist_ok=True)
                _ask(server, f"smaps {Path(args.smaps).resolve() / f'smaps-{n}.txt'}")
            step: dict[str, Any] = {
                "n": n,
                "connect_s": round(connect_s, 1),
                "errors": errors,
                "stats": stats,
                "per_conn_kib": round((stats["VmRSS"] - idle["VmRSS"]) / n, 1),
                "marginal_kib": round((stats["VmRSS"] - prev_rss) / (n - have), 1),
            }
            if stats["streams"] != (0 if args.no_stream else n):
                step["warning"] = f"{stats['streams']} streams open on the server, expected {n}"
            if args.trim:
                trimmed = _ask(server, "trim")
                step["trimmed"] = trimmed
                step["per_conn_kib_trimmed"] = round((trimmed["VmRSS"] - idle["VmRSS"]) / n, 1)
                stats = trimmed
            prev_rss = stats["VmRSS"]
            have = n
            result["steps"].append(step)
    finally:
        for proc in clients:
            try:
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            except BrokenPipeError:
                pass
        for proc in clients:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            assert server.stdin is not None
            server.stdin.write("quit\n")
            server.stdin.flush()
        except BrokenPipeError:
            pass
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    if args.json:
        print(json.dumps(result), flush=True)
    label = (
        args.label
        or " ".join([*args.option, *args.env, *(["LD_PRELOAD=" + args.preload] if args.preload else [])])
        or "default"
    )
    print(f"{label}: idle RSS {result['idle']['VmRSS'] / 1024:.1f} MiB ({result['idle']['Threads']} threads)")
    for line in result.get("profile", []):
        print(line)
    for step in result["steps"]:
        s = step["stats"]
        alloc = (
            f"in use {s['in_use_kb'] / 1024:.0f} MiB, free in arenas {s['free_kb'] / 1024:.0f} MiB"
            if s.get("allocator") == "glibc"
            else ", ".join(f"{k[3:-3]} {v / 1024:.0f} MiB" for k, v in s.items() if k.startswith("je_"))
        )
        line = (
            f"  N={step['n']:>5}: RSS {s['VmRSS'] / 1024:.1f} MiB = {step['per_conn_kib']:.1f} KiB/conn "
            f"(marginal {step['marginal_kib']:.1f}); {alloc}; {s['Threads']} threads, {s['maps']} maps, {s['fds']} fds; connect {step['connect_s']} s"
        )
        if "per_conn_kib_trimmed" in step:
            line += f"; after malloc_trim {step['trimmed']['VmRSS'] / 1024:.1f} MiB = {step['per_conn_kib_trimmed']:.1f} KiB/conn"
        if args.resume:
            line += f"; {s['resumed']} TLS sessions resumed"
        if step.get("warning"):
            line += f"; WARNING {step['warning']}"
        if any(e != "{}" for e in step["errors"]):
            line += f"; retried: {step['errors']}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=("controller", "server", "client"), default="controller")
    parser.add_argument("--steps", default="1000,3000", help="cumulative connection counts to measure at")
    parser.add_argument("--clients", type=int, default=4, help="client processes per step")
    parser.add_argument("--pace", type=int, default=32, help="handshakes in flight per client process")
    parser.add_argument("--option", action="append", default=[], help="server channel arg KEY=VALUE (repeatable)")
    parser.add_argument("--env", action="append", default=[], help="server environment KEY=VALUE (repeatable)")
    parser.add_argument("--preload", default="", help="LD_PRELOAD for the server (e.g. an allocator)")
    parser.add_argument("--trim", action="store_true", help="also measure after malloc_trim(0) in the server")
    parser.add_argument("--insecure", action="store_true", help="plain TCP instead of mTLS")
    parser.add_argument("--server-key", choices=("ec", "rsa"), default="ec")
    parser.add_argument("--no-stream", action="store_true", help="connections only (channel_ready), no call open")
    parser.add_argument(
        "--tune-malloc",
        type=int,
        default=0,
        metavar="BYTES",
        help="server calls policyagent.server.memory.tune_malloc(BYTES) (mallopt M_MMAP_THRESHOLD) at start",
    )
    parser.add_argument("--resume", action="store_true", help="clients resume a TLS session (grpc.ssl_session_cache)")
    parser.add_argument("--reply-bytes", type=int, default=64)
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--profile",
        default="",
        help="DIR: dump the server's live allocations by call stack after each step into DIR/live-N.txt "
        "(an LD_PRELOAD malloc interposer, MEMPROF_C, built with gcc; with --env PYTHONTRACEMALLOC=1 also "
        "the Python allocations by line, DIR/live-N.txt.py.txt). RSS figures are inflated meanwhile.",
    )
    parser.add_argument("--profile-lib", default="", help="a prebuilt interposer instead of building MEMPROF_C")
    parser.add_argument("--smaps", default="", help="DIR: save the server's /proc/self/smaps after each step")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--cache-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "policyagent-bench-certs")
    )
    parser.add_argument("--address", default="")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args()
    if args.role == "server":
        asyncio.run(server_main(args))
    elif args.role == "client":
        asyncio.run(client_main(args))
    else:
        run(args)


if __name__ == "__main__":
    main()
