"""bootd-fetch (fetch.c) against a hostile server: a scripted TCP server on loopback (not bootd) answers
each request with a malformed, truncated, oversized, slow or lying reply. The fetcher runs as an
AddressSanitizer + UBSan build (dynamically linked: static ASan is not possible), and every run checks:
no sanitizer report, an exit status and a one-line reason naming the chunk, a bounded run time, and
that stdout holds only whole verified chunks, in order (a prefix of the table's chunks)."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bootd.stage1.build import Stage1Error, compile_fetcher

SAN_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g",
             "-Werror")
SAN_ENV = {"ASAN_OPTIONS": "halt_on_error=1:detect_leaks=0:exitcode=99",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=98"}
SAN_MARKS = ("AddressSanitizer", "UndefinedBehaviorSanitizer", "runtime error:", "LeakSanitizer", "==ERROR")


@pytest.fixture(scope="module")
def san_fetcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return compile_fetcher(tmp_path_factory.mktemp("fetch-san") / "bootd-fetch", extra_flags=SAN_FLAGS,
                               static=False)
    except Stage1Error as exc:
        pytest.skip(f"cannot compile bootd-fetch with ASan/UBSan here: {exc}")


# ---- the scripted server ------------------------------------------------------------------------------

@dataclass
class Req:
    hash: str
    range_start: int | None
    conn_no: int  # which accepted connection carried it (0, 1, ...)


# A plan is what the server does for one request: bytes are sent, a float sleeps, "drip" sends the next
# bytes one at a time 0.2 s apart, "close" ends the connection (otherwise it stays open for the next).
Plan = list[object]
Script = Callable[[Req, int], Plan]  # (request, index of the request) -> plan


class Server:
    def __init__(self, script: Script, chunks: dict[str, bytes], *, accept: bool = True) -> None:
        self.script = script
        self.chunks = chunks
        self.requests: list[Req] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0 if not accept else 64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        if accept:
            self.sock.settimeout(0.1)
            t = threading.Thread(target=self._accept, daemon=True)
            t.start()
            self.threads.append(t)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.conns.append(conn)
                n = len(self.conns) - 1
            t = threading.Thread(target=self._serve, args=(conn, n), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket, conn_no: int) -> None:
        buf = b""
        try:
            while not self.stop.is_set():
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                m = re.match(rb"GET /chunks/([0-9a-f]{64}) HTTP/1\.1\r\n", head)
                assert m, head
                rm = re.search(rb"\r\nRange: bytes=(\d+)-(\r\n|$)", head)
                req = Req(m.group(1).decode(), int(rm.group(1)) if rm else None, conn_no)
                with self.lock:
                    self.requests.append(req)
                    index = len(self.requests) - 1
                if not self._play(conn, self.script(req, index)):
                    return
        except OSError:
            pass
        finally:
            conn.close()

    def _play(self, conn: socket.socket, plan: Plan) -> bool:
        drip = False
        for step in plan:
            if self.stop.is_set():
                return False
            if step == "close":
                return False
            if step == "drip":
                drip = True
            elif isinstance(step, float):
                time.sleep(step)
            elif isinstance(step, bytes) and drip:
                for i in range(len(step)):
                    if self.stop.wait(0.2):
                        return False
                    conn.sendall(step[i : i + 1])
            elif isinstance(step, bytes):
                conn.sendall(step)
        return True

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self.threads:
            t.join(timeout=5)


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(script: Script, chunks: dict[str, bytes], **kw: bool) -> Server:
        s = Server(script, chunks, **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def make_chunks(tag: str, sizes: Sequence[int]) -> list[bytes]:
    rng = random.Random(tag)
    return [rng.randbytes(n) for n in sizes]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body


def partial(body: bytes, start: int, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n%s\r\n"
            % (start, len(body) - 1, len(body), len(body) - start, extra) + body[start:])


@dataclass
class Run:
    rc: int
    out: bytes
    err: str
    reason: str
    elapsed: float
    written: int = field(default=0)  # how many whole chunks stdout holds


def run_fetch(fetcher: Path, tmp: Path, url: str, chunks: Sequence[bytes], *args: str,
              timeout: float = 30) -> Run:
    tmp.mkdir(parents=True, exist_ok=True)
    table = tmp / "table"
    table.write_text("".join(f"{sha(c)} {len(c):x} {len(c):x}\n" for c in chunks))
    fail = tmp / "fail"
    if fail.exists():
        fail.unlink()
    opts = {"-t": "2", "-r": "1", "-w": "1"}
    it = iter(args)
    opts.update(zip(it, it, strict=True))
    cmd = [str(fetcher), "-u", url, "-f", str(fail), *[x for kv in opts.items() for x in kv], str(table)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, env=dict(os.environ, **SAN_ENV))
    elapsed = time.monotonic() - t0
    err = proc.stderr.decode(errors="replace")
    assert not any(m in err for m in SAN_MARKS), err
    assert proc.returncode in (0, 1), (proc.returncode, err)
    # Only whole, verified chunks, in table order.
    prefixes = [b"".join(chunks[:k]) for k in range(len(chunks) + 1)]
    assert proc.stdout in prefixes, f"unverified output: {len(proc.stdout)} bytes\n{err}"
    written = prefixes.index(proc.stdout)
    assert (proc.returncode == 0) == (written == len(chunks)), err
    reason = ""
    if proc.returncode == 1:
        reason = fail.read_text()
        assert reason.endswith("\n") and reason.count("\n") == 1, repr(reason)
        reason = reason[:-1]
        assert reason.isprintable() and reason.isascii(), repr(reason)
        assert re.search(r"chunk [0-9a-f]{64} ", reason), reason
    return Run(proc.returncode, proc.stdout, err, reason, elapsed, written)


# ---- one malformed reply each -------------------------------------------------------------------------

BODY = make_chunks("body", [3000])[0]
N = len(BODY)
HALF = N // 2


def always(*plan: object) -> Script:
    return lambda req, i: list(plan)


def head(status: bytes, *headers: bytes) -> bytes:
    return status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


CL = b"Content-Length: %d" % N
CHUNKED = b"%x\r\n" % N + BODY + b"\r\n0\r\n\r\n"

# (id, script, fetcher options, expected words in the reason, most seconds it may take)
REFUSED: list[tuple[str, Script, tuple[str, ...], str, float]] = [
    ("huge status line", always(b"HTTP/1.1 200 " + b"x" * 20000), (), "reply headers longer than 16384 bytes", 1.5),
    ("huge headers", always(head(b"HTTP/1.1 200 OK", CL, *[b"X-Pad-%d: %s" % (i, b"y" * 60) for i in range(300)])
                            + BODY), (), "reply headers longer than 16384 bytes", 1.5),
    ("LF line ends", always(b"HTTP/1.1 200 OK\nContent-Length: %d\n\n" % N + BODY), (), "CRLF", 1.5),
    ("bare CR", always(head(b"HTTP/1.1 200 OK", CL, b"X-A: a\rb") + BODY), (), "CRLF", 1.5),
    ("NUL in a header", always(head(b"HTTP/1.1 200 OK", b"X-A: a\0b", CL) + BODY), (), "control byte", 1.5),
    ("NUL in the status line", always(head(b"HTTP/1.1 200\0OK", CL) + BODY), (), "control byte", 1.5),
    ("conflicting Content-Length", always(head(b"HTTP/1.1 200 OK", b"Content-Length: %d" % (N + 5), CL) + BODY
                                          + b"12345"), (), "conflicting Content-Length", 1.5),
    ("negative Content-Length", always(head(b"HTTP/1.1 200 OK", b"Content-Length: -1") + BODY), (),
     "malformed Content-Length", 1.5),
    ("overflowing Content-Length", always(head(b"HTTP/1.1 200 OK", b"Content-Length: 99999999999999999999999")
                                          + BODY), (), "malformed Content-Length", 1.5),
    ("non-numeric Content-Length", always(head(b"HTTP/1.1 200 OK", b"Content-Length: abc") + BODY), (),
     "malformed Content-Length", 1.5),
    ("Content-Length list", always(head(b"HTTP/1.1 200 OK", b"Content-Length: %d, %d" % (N, N)) + BODY), (),
     "malformed Content-Length", 1.5),
    ("no Content-Length", always(head(b"HTTP/1.1 200 OK", b"Connection: close") + BODY, "close"), (),
     "no Content-Length", 1.5),
    ("chunked", always(head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked") + CHUNKED), (),
     "Transfer-Encoding", 1.5),
    ("chunked with Content-Length", always(head(b"HTTP/1.1 200 OK", CL, b"Transfer-Encoding: chunked") + CHUNKED),
     (), "Transfer-Encoding", 1.5),
    ("206 to a request without Range", always(partial(BODY, 0)), (), "206 Partial Content to a request without Range",
     1.5),
    ("Content-Range not what was asked", lambda req, i: [ok(BODY)[: -HALF], "close"] if i == 0 else
     [partial(BODY, 0)], ("-r", "2"), "206 for bytes 0-2999/3000 where 1500- was asked", 4),
    ("Content-Range backwards", lambda req, i: [ok(BODY)[: -HALF], "close"] if i == 0 else
     [head(b"HTTP/1.1 206 Partial Content", b"Content-Range: bytes 1500-10/3000", b"Content-Length: 1500")
      + BODY[HALF:]], ("-r", "2"), "malformed Content-Range", 4),
    ("Content-Range of another size", lambda req, i: [ok(BODY)[: -HALF], "close"] if i == 0 else
     [head(b"HTTP/1.1 206 Partial Content", b"Content-Range: bytes 1500-2999/999999", b"Content-Length: 1500")
      + BODY[HALF:]], ("-r", "2"), "206 for bytes 1500-2999/999999 where 1500- was asked", 4),
    ("body always short", always(ok(BODY)[: -HALF], "close"), ("-r", "2"),
     "connection closed by the server after 1500 of 3000 bytes (after 2 attempts)", 4),
    ("closed mid-header", always(b"HTTP/1.1 200 OK\r\nContent-Le", "close"), (),
     "reply headers cut short after 27 bytes: connection closed by the server", 1.5),
    ("closed before replying", always("close"), ("-r", "2"), "connection closed by the server (after 2 attempts)",
     4),
    ("slow-drip headers", always("drip", ok(BODY)), (), "timed out", 4),
    ("slow-drip body", always(head(b"HTTP/1.1 200 OK", CL), "drip", BODY), (), "timed out after", 4),
    ("status 2000", always(head(b"HTTP/1.1 2000 OK", CL) + BODY), (), "not an HTTP reply: HTTP/1.1 2000 OK", 1.5),
    ("status 200x", always(head(b"HTTP/1.1 200x OK", CL) + BODY), (), "not an HTTP reply", 1.5),
    ("status -200", always(head(b"HTTP/1.1 -200 OK", CL) + BODY), (), "not an HTTP reply", 1.5),
    ("HTTP/1.-1", always(head(b"HTTP/1.-1 200 OK", CL) + BODY), (), "not an HTTP reply", 1.5),
    ("not HTTP", always(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"), (), "not an HTTP reply: SSH-2.0-OpenSSH_9.2", 1.5),
    ("escape codes and UTF-8 in the reason phrase", always(head(b"HTTP/1.1 404 Not \xc2\x9b2J\xe2\x80\xae Found")),
     (), "server returned HTTP/1.1 404 Not ??2J??? Found", 1.5),
    ("ESC in the reason phrase", always(head(b"HTTP/1.1 404 Not \x1b[2J Found")), (), "control byte", 1.5),
    ("wrong bytes", always(ok(bytes(N))), (), "failed verification (got sha256 ", 1.5),
    ("wrong length", always(ok(BODY + b"x")), (), "failed verification (got 3001 bytes where the manifest says 3000)",
     1.5),
    ("missing", always(head(b"HTTP/1.1 404 Not Found", b"Content-Length: 0")), ("-r", "5"),
     "server returned HTTP/1.1 404 Not Found", 1.5),
]


@pytest.mark.parametrize(("script", "args", "words", "seconds"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_malformed_reply_is_refused_with_a_reason(san_fetcher: Path, tmp_path: Path, serve: Callable[..., Server],
                                                  script: Script, args: tuple[str, ...], words: str,
                                                  seconds: float) -> None:
    server = serve(script, {sha(BODY): BODY})
    run = run_fetch(san_fetcher, tmp_path, server.url, [BODY], *args)
    assert run.rc == 1 and run.out == b"", run.err
    assert run.reason.startswith(f"chunk {sha(BODY)} "), run.reason
    assert words in run.reason, run.reason
    assert run.elapsed < seconds, (run.elapsed, run.err)


def test_server_that_never_accepts_times_out(san_fetcher: Path, tmp_path: Path,
                                            serve: Callable[..., Server]) -> None:
    server = serve(always(), {}, accept=False)
    # The listen backlog completes a connection or two in the kernel; nothing ever answers.
    run = run_fetch(san_fetcher, tmp_path, server.url, [BODY], "-t", "1", "-r", "2")
    assert run.rc == 1 and "timed out" in run.reason and "(after 2 attempts)" in run.reason, run.reason
    assert run.elapsed < 4.5, run.elapsed


# ---- malformed, but the fetcher gets there ------------------------------------------------------------

def test_short_body_resumes_with_range(san_fetcher: Path, tmp_path: Path, serve: Callable[..., Server]) -> None:
    server = serve(lambda req, i: [ok(BODY)[:-HALF], "close"] if i == 0 else [partial(BODY, req.range_start or 0)],
                   {})
    run = run_fetch(san_fetcher, tmp_path, server.url, [BODY], "-r", "2")
    assert run.rc == 0, run.err
    assert [r.range_start for r in server.requests] == [None, HALF]


def test_200_to_a_range_request_restarts_the_chunk(san_fetcher: Path, tmp_path: Path,
                                                   serve: Callable[..., Server]) -> None:
    server = serve(lambda req, i: [ok(BODY)[:-HALF], "close"] if i == 0 else [ok(BODY)], {})
    run = run_fetch(san_fetcher, tmp_path, server.url, [BODY], "-r", "2")
    assert run.rc == 0, run.err
    assert [r.range_start for r in server.requests] == [None, HALF]


def test_bytes_beyond_content_length_are_not_read_as_the_next_reply(
        san_fetcher: Path, tmp_path: Path, serve: Callable[..., Server]) -> None:
    """A body longer than announced, on a keep-alive connection: the surplus (here a whole forged reply) is
    never taken as the answer to the next request; the connection is dropped and the next chunk fetched
    on a new one."""
    a, b = make_chunks("surplus", [2000, 2000])
    forged = ok(bytes(len(b)))
    server = serve(lambda req, i: [ok(a) + forged] if req.hash == sha(a) else [ok(b)], {})
    run = run_fetch(san_fetcher, tmp_path, server.url, [a, b], "-r", "1")
    assert run.rc == 0, run.err
    assert "failed verification" not in run.err
    assert [r.conn_no for r in server.requests] == [0, 1]


@pytest.mark.parametrize(("value", "said"), [(b"99999999999999999999999", "in 1s"), (b"-5", "in backoff"),
                                             (b"soon", "in backoff"), (b"", "in backoff"), (b"1x", "in backoff")])
def test_odd_retry_after_is_bounded(san_fetcher: Path, tmp_path: Path, serve: Callable[..., Server], value: bytes,
                                    said: str) -> None:
    """503 with Retry-After huge, negative or garbage: the wait never exceeds the timeout (-t 1 here) plus
    its jitter; garbage means plain backoff."""
    server = serve(lambda req, i: [head(b"HTTP/1.1 503 Busy", b"Retry-After: " + value, b"Content-Length: 0")]
                   if i == 0 else [ok(BODY)], {})
    run = run_fetch(san_fetcher, tmp_path, server.url, [BODY], "-t", "1", "-r", "2")
    assert run.rc == 0, run.err
    assert f"{said} (server busy, 503)" in run.err, run.err
    assert run.elapsed < 3, run.elapsed


def test_reply_split_at_every_byte_boundary(san_fetcher: Path, tmp_path: Path,
                                            serve: Callable[..., Server]) -> None:
    """One keep-alive connection; the reply for the k-th chunk arrives in two pieces split after byte k."""
    size = 40
    reply_len = len(ok(bytes(size), b"Connection: keep-alive\r\n"))
    chunks = make_chunks("split", [size] * (reply_len + 1))
    by_hash = {sha(c): c for c in chunks}

    def script(req: Req, i: int) -> Plan:
        reply = ok(by_hash[req.hash], b"Connection: keep-alive\r\n")
        return [reply[:i], 0.003, reply[i:]]

    server = serve(script, by_hash)
    run = run_fetch(san_fetcher, tmp_path, server.url, chunks, "-r", "1")
    assert run.rc == 0, run.err
    assert len(server.requests) == len(chunks) and {r.conn_no for r in server.requests} == {0}


# ---- fuzz-ish: random mutations of a valid reply -------------------------------------------------------

NASTY = [b"Transfer-Encoding: chunked", b"Content-Length: -1", b"Content-Length: 99999999999999999999",
         b"Content-Length: 0", b"Content-Length: 1", b"Content-Length: abc", b"Content-Range: bytes 0-0/1",
         b"Content-Range: bytes -5--1/-1", b"Content-Range: bytes 9223372036854775807-1/2", b"Retry-After: -1",
         b"Retry-After: 99999999999999999999", b"Connection: close", b"X: \0", b"X: a\nb", b"X: a\rb",
         b"X-Long: " + b"z" * 17000, b"Content-Length:", b":", b"Content-Length: 5\r\nContent-Length: 5"]


def mutate(rng: random.Random, reply: bytes) -> bytes:
    data = bytearray(reply)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(data))
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:
            del data[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            del data[pos:]
        elif op == 4:
            end = min(len(data), pos + rng.randint(1, 64))
            data[pos:pos] = data[pos:end]
        elif op == 5:
            i = data.find(b"\r\n") + 2
            data[i:i] = rng.choice(NASTY) + b"\r\n"
        elif op == 6:
            data[9:12] = rng.choice([b"206", b"503", b"404", b"416", b"100", b"999", b"000", b"20", b"2000"])
        else:
            m = re.search(rb"Content-Length: (\d+)", bytes(data))
            if m:
                n = int(m.group(1))
                data[m.start(1) : m.end(1)] = b"%d" % rng.choice([0, n - 1, n + 1, 2 * n, 1 << 31, 1 << 63])
    return bytes(data)


def test_random_mutations_of_a_valid_reply(san_fetcher: Path, tmp_path: Path,
                                           serve: Callable[..., Server]) -> None:
    rng = random.Random(20261126)
    good = make_chunks("fuzz-good", [700])[0]
    cases: list[tuple[bytes, bytes]] = []
    for i in range(300):
        body = make_chunks(f"fuzz-{i}", [rng.choice([0, 1, 100, 5000])])[0]
        valid = partial(body, 0) if rng.random() < 0.1 else ok(body, rng.choice([b"", b"Connection: close\r\n"]))
        cases.append((body, mutate(rng, valid)))
    replies = {sha(body): (body, reply) for body, reply in cases}
    pieces = {sha(body): sorted(rng.sample(range(len(reply) + 1), min(3, len(reply) + 1))) for body, reply in cases}

    def script(req: Req, i: int) -> Plan:
        if req.hash == sha(good):
            return [ok(good)]
        _, reply = replies[req.hash]
        cuts = [0, *pieces[req.hash], len(reply)]
        plan: Plan = []
        for a, b in itertools.pairwise(cuts):
            plan += [reply[a:b], 0.001]
        return [*plan, "close"]

    server = serve(script, {})

    def one(i: int) -> tuple[int, bytes, int]:
        body, reply = cases[i]
        run = run_fetch(san_fetcher, tmp_path / str(i), server.url, [good, body], "-t", "2", "-r", "1")
        if run.rc == 1:
            assert sha(body) in run.reason, run.reason
        assert run.elapsed < 6, (run.elapsed, reply[:200], run.err)
        return run.rc, reply, run.written

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(len(cases))))
    # The mutations do reach both outcomes: the sanity of the fuzzing itself.
    assert {rc for rc, _, _ in results} == {0, 1}


# ---- several sources: the next one on a lost connection, a timeout, bad bytes; each chunk still verified --

SOURCED = make_chunks("sources", [40000] * 6)
BY_HASH = {sha(c): c for c in SOURCED}


def honest(req: Req, i: int) -> Plan:
    """A good server: the chunk, or the rest of it for a Range request (the bytes are the same everywhere)."""
    body = BY_HASH[req.hash]
    return [partial(body, req.range_start) if req.range_start else ok(body)]


def test_second_source_takes_over_when_the_first_dies_mid_transfer(
        san_fetcher: Path, tmp_path: Path, serve: Callable[..., Server]) -> None:
    second = serve(honest, {})
    first: list[Server] = []

    def dies(req: Req, i: int) -> Plan:
        if i < 2:
            return honest(req, i)
        # The third request gets half its chunk, then the server is gone (kill -9: no more connections).
        threading.Thread(target=first[0].close, daemon=True).start()
        return [ok(BY_HASH[req.hash])[:20000], "close"]

    first.append(serve(dies, {}))
    run = run_fetch(san_fetcher, tmp_path, f"{first[0].url},{second.url}", SOURCED, "-w", "2", "-r", "4",
                    "-t", "2", timeout=60)
    assert run.rc == 0, run.err
    assert run.out == b"".join(SOURCED)
    assert f"from 127.0.0.1:{second.port}" in run.err
    assert len(first[0].requests) >= 3 and len(second.requests) >= 3
    # The cut chunk went on at the second source with Range where the first stopped (or whole).
    cut = first[0].requests[2].hash
    assert any(r.hash == cut for r in second.requests)


def test_bad_bytes_from_the_first_source_come_right_from_the_second(
        san_fetcher: Path, tmp_path: Path, serve: Callable[..., Server]) -> None:
    bad = sha(SOURCED[3])

    def liar(req: Req, i: int) -> Plan:
        body = BY_HASH[req.hash]
        return [ok(bytes(b ^ 1 for b in body))] if req.hash == bad else honest(req, i)

    first, second = serve(liar, {}), serve(honest, {})
    run = run_fetch(san_fetcher, tmp_path, first.url, SOURCED, "-u", second.url, "-r", "3")
    assert run.rc == 0, run.err
    assert run.out == b"".join(SOURCED)
    assert (f"chunk {bad} failed verification from 127.0.0.1:{first.port}, fetching it from "
            f"127.0.0.1:{second.port}") in run.err
    # One worker: it stays with the source that last served it, so the lying one is not asked again.
    assert [r.hash for r in first.requests] == [sha(c) for c in SOURCED[:4]]
    assert [r.hash for r in second.requests] == [sha(c) for c in SOURCED[3:]]

    # Bad bytes everywhere: refused, named, never written.
    third = serve(liar, {})
    run = run_fetch(san_fetcher, tmp_path / "all-bad", first.url, SOURCED, "-u", third.url, "-r", "3")
    assert run.rc == 1 and run.written == 3
    assert f"chunk {bad} failed verification (got sha256" in run.reason


def test_unreachable_first_source_and_a_404_move_on(san_fetcher: Path, tmp_path: Path,
                                                    serve: Callable[..., Server]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
    missing = sha(SOURCED[0])

    def lacks_one(req: Req, i: int) -> Plan:
        if req.hash == missing:
            return [b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"]
        return honest(req, i)

    plain, full = serve(lacks_one, {}), serve(honest, {})
    run = run_fetch(san_fetcher, tmp_path, f"{dead},{plain.url},{full.url}", SOURCED, "-r", "5")
    assert run.rc == 0, run.err
    # Refused at the first source: the worker moved to the second; the chunk the second lacks came from the
    # third, and the next chunks went back to the second (a 404 is about one chunk, not the source's health).
    assert [r.hash for r in full.requests] == [missing]
    assert [r.hash for r in plain.requests] == [sha(c) for c in SOURCED]
    # A source bootd-fetch cannot use (a host name) is skipped with a note; the others serve.
    run = run_fetch(san_fetcher, tmp_path / "named", f"{plain.url},http://replica.example:8080,{full.url}",
                    SOURCED, "-r", "5")
    assert run.rc == 0 and "source http://replica.example:8080 skipped" in run.err, run.err
    # A 404 at every source is fatal for the chunk, with the last source's answer.
    run = run_fetch(san_fetcher, tmp_path / "nowhere", plain.url, SOURCED, "-u", plain.url, "-r", "5")
    assert run.rc == 1 and missing in run.reason and "404" in run.reason
