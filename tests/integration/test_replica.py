"""Chunk replicas: real `bootd serve` processes on loopback, one the other's replica (capsule.upstream).

The replica fetches what it lacks from its upstream on first request, verifies it, stores it and
serves it; concurrent misses make one upstream request; an upstream that lies or is gone gives the
node a clear error and stores nothing.  `bootd capsule sync` warms a store, survives a kill -9 and
resumes.  Where the upstream must misbehave, it is a small aiohttp server of the test's own in front
of the real primary (slow, or sending wrong bytes)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bootd.capsule.objects import CapsuleStore
from bootd.lab.netns import kill_pid
from tests.conftest import PYTHON, ROOT, free_port, run_cli, write_config

CHUNKS = {"chunk_min": 65536, "chunk_avg": 131072, "chunk_max": 262144}


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    url: str
    state: Path
    config: Path
    log: Path

    @property
    def store(self) -> Path:
        return self.state / "capsules"

    def metric(self, name: str, **labels: str) -> float:
        text = get(self.url + "/metrics")[1].decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"{name}(?:_total)?(?:{{(.*)}})? ([0-9.e+]+)$", line)
            if m and (not labels or ",".join(sorted((m.group(1) or "").split(","))) == want):
                total += float(m.group(2))
        return total


def get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def config_for(tmp: Path, name: str, port: int, **capsule: object) -> tuple[Path, Path]:
    state = tmp / name
    state.mkdir()
    cfg = write_config(tmp / f"{name}.toml", {
        "server": {"state_dir": str(state), "address": "127.0.0.1", "graceful_timeout": 3},
        "http": {"enabled": True, "listen": "127.0.0.1", "port": port},
        "capsule": {**CHUNKS, **capsule},
    })
    return cfg, state


class Servers:
    """`bootd serve` processes started by a test (or a module), stopped with SIGTERM at its end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Serve] = []

    def __call__(self, name: str, **capsule: object) -> Serve:
        tmp_path = self.tmp
        port = free_port()
        cfg, state = config_for(tmp_path, name, port, **capsule)
        log = tmp_path / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen([PYTHON, "-m", "bootd", "-c", str(cfg), "serve"], cwd=ROOT, stdout=fh,
                                    stderr=subprocess.STDOUT)
        s = Serve(proc, f"http://127.0.0.1:{port}", state, cfg, log)
        self.procs.append(s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return s
            time.sleep(0.05)
        raise AssertionError(f"bootd serve {name} did not listen: {log.read_text()}")

    def stop(self) -> None:
        for s in self.procs:
            kill_pid(s.proc.pid, grace=10)
            s.proc.wait()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Servers]:
    servers = Servers(tmp_path)
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def capsule_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree of incompressible files: about 3 MiB, two dozen chunks at the test's chunk sizes."""
    root = tmp_path_factory.mktemp("tree")
    rnd = __import__("random").Random(18)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("replica-test\n")
    for i in range(6):
        (root / f"data{i}.bin").write_bytes(rnd.randbytes(512 * 1024))
    (root / "boot").mkdir()
    (root / "boot/vmlinuz-6.1.0-1").write_bytes(rnd.randbytes(300_000))
    return root


@dataclass
class Primary:
    serve: Serve
    vid: str
    chunks: list[str]


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory, capsule_tree: Path) -> Iterator[Primary]:
    """The first `bootd serve`, with capsule demo imported; shared by the module's tests (never stopped by one)."""
    servers = Servers(tmp_path_factory.mktemp("primary"))
    try:
        first = servers("primary")
        run_cli("capsule", "import", "demo", str(capsule_tree), "--no-hygiene", config=first.config, check=True)
        store = CapsuleStore(first.store)
        vid = store.resolve("demo")
        assert vid is not None
        yield Primary(first, vid, [c.sha256 for c in store.load_manifest(vid).chunks])
    finally:
        servers.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- an upstream of the test's own: the primary's bytes, slowly or wrongly ------------------------------

@dataclass
class Proxy:
    """Forwards to ``target``; counts requests per path; delays or corrupts chunk bodies when told."""

    target: str
    delay: float = 0.0
    corrupt: bool = False
    requests: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests[request.path] += 1
        async with aiohttp.ClientSession() as s, s.get(self.target + request.path) as r:
            body = await r.read()
            status = r.status
        if request.path.startswith("/chunks/"):
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.corrupt and status == 200:
                body = bytes(b ^ 0x55 for b in body)
        return web.Response(status=status, body=body)

    def start(self) -> Proxy:
        ready = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            app = web.Application()
            app.router.add_get("/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._loop = None
        if self._thread is not None:
            self._thread.join(10)


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    made: list[Proxy] = []
    yield made
    for p in made:
        p.stop()


# ---- tests --------------------------------------------------------------------------------------------

def test_replica_fetches_verifies_stores_and_serves(serve: Servers, primary: Primary, capsule_tree: Path) -> None:
    vid, chunks = primary.vid, primary.chunks
    replica = serve("replica", upstream=primary.serve.url)
    assert not (replica.store / "manifests" / vid).exists()

    status, manifest = get(f"{replica.url}/capsules/{vid}/manifest")
    assert status == 200 and sha(manifest) == vid
    assert (replica.store / "manifests" / vid).read_bytes() == manifest
    for h in chunks:
        status, body = get(f"{replica.url}/chunks/{h}")
        assert status == 200 and sha(body) == h
        stored = replica.store / "chunks" / h[:2] / h
        assert stored.read_bytes() == body and stored.stat().st_mode & 0o077 == 0
    unique = len(set(chunks))
    assert replica.metric("bootd_upstream_fetches", kind="chunk", result="fetched") == unique
    assert replica.metric("bootd_upstream_fetches", kind="manifest", result="fetched") == 1
    # The kernel too (iPXE asks for it before the stage one asks for anything).
    status, kernel = get(f"{replica.url}/capsules/{vid}/kernel")
    assert status == 200 and kernel == (capsule_tree / "boot/vmlinuz-6.1.0-1").read_bytes()
    assert replica.metric("bootd_upstream_fetches", kind="kernel", result="fetched") == 1
    assert replica.metric("bootd_upstream_bytes", kind="chunk") == sum(
        (primary.serve.store / "chunks" / h[:2] / h).stat().st_size for h in set(chunks))

    # Warm now: served from its own store, nothing more asked of the upstream.
    for h in chunks[:3]:
        status, body = get(f"{replica.url}/chunks/{h}")
        assert status == 200 and sha(body) == h
    assert replica.metric("bootd_upstream_fetches", kind="chunk", result="fetched") == unique

    # A name no held manifest lists is not asked of the upstream at all.
    status, body = get(f"{replica.url}/chunks/{'ab' * 32}")
    assert status == 404 and b"no capsule manifest this replica holds names it" in body
    # A version the upstream does not have either: 404, saying so.
    status, body = get(f"{replica.url}/capsules/{'cd' * 32}/manifest")
    assert status == 404 and b"neither here nor on the upstream" in body


def test_cold_replica_boots_a_capsule_name_it_never_synced(serve: Servers, primary: Primary,
                                                          capsule_tree: Path) -> None:
    """A node's capsule NAME on a replica that holds nothing: resolved from the upstream's /capsules/refs
    (once for nodes asking together), the manifest fetched and verified, the script names that version;
    the name is not published here (only a sync makes a whole capsule).  A name the upstream lacks, and an
    upstream that is gone, each give the node a wait script that says why."""
    vid = primary.vid
    replica = serve("replica", upstream=primary.serve.url)
    macs = [f"52:54:00:00:18:{i:02x}" for i in range(6)]
    for i, mac in enumerate(macs):
        run_cli("node", "add", f"r{i}", "--mac", mac, "--capsule", "demo", config=replica.config, check=True)
    assert not (replica.store / "manifests" / vid).exists()
    with ThreadPoolExecutor(len(macs)) as pool:
        answers = list(pool.map(lambda m: get(f"{replica.url}/boot/{m.replace(':', '-')}.ipxe"), macs))
    for status, body in answers:
        script = body.decode()
        assert status == 200 and f"bootd.capsule={vid}" in script, script
        assert f"kernel {replica.url}/capsules/{vid}/kernel " in script, script
    assert sha((replica.store / "manifests" / vid).read_bytes()) == vid
    assert replica.metric("bootd_upstream_fetches", kind="refs", result="fetched") == 1
    assert replica.metric("bootd_upstream_fetches", kind="manifest", result="fetched") == 1
    assert "no capsules" in run_cli("capsule", "list", config=replica.config, check=True).stdout
    # What the script names is served: the kernel and the chunks, fetched on miss and verified.
    status, kernel = get(f"{replica.url}/capsules/{vid}/kernel")
    assert status == 200 and kernel == (capsule_tree / "boot/vmlinuz-6.1.0-1").read_bytes()
    status, body = get(f"{replica.url}/chunks/{primary.chunks[0]}")
    assert status == 200 and sha(body) == primary.chunks[0]
    assert "event=upstream-resolved name=demo" in replica.log.read_text()

    run_cli("node", "add", "r9", "--mac", "52:54:00:00:18:99", "--capsule", "nosuch", config=replica.config,
            check=True)
    status, body = get(f"{replica.url}/boot/52-54-00-00-18-99.ipxe")
    assert status == 200 and b"capsule 'nosuch' of node r9 does not exist here or on the upstream" in body, body
    assert b"bootd.token=" not in body

    gone = serve("orphan", upstream=f"http://127.0.0.1:{free_port()}")
    run_cli("node", "add", "o1", "--mac", "52:54:00:00:18:a1", "--capsule", "demo", config=gone.config, check=True)
    status, body = get(f"{gone.url}/boot/52-54-00-00-18-a1.ipxe")
    assert status == 200 and b"not booting" in body and b"/capsules/refs" in body, body
    assert gone.metric("bootd_upstream_fetches", kind="refs", result="failed") == 1


def test_manifest_held_from_before_a_restart_serves_its_chunks_to_a_crowd(serve: Servers, primary: Primary) -> None:
    """A replica restarted after fetching a manifest holds it on disk but has not read it yet: the first
    chunk requests, all at once, wait for the one reading of the manifests and are served (none refused as
    a chunk no manifest names, as happened when a second request took the first one's index for done)."""
    vid, chunks = primary.vid, primary.chunks
    replica = serve("replica", upstream=primary.serve.url)
    # Damaged manifests sorted before the good one (skipped with a warning each): reading them all takes a
    # while, the window in which the crowd's requests arrive.
    for i in range(1000):
        (replica.store / "manifests" / f"{i:064x}").write_bytes(b"not a manifest")
    held = replica.store / "manifests" / vid
    tmp = held.with_name(".incoming")
    tmp.write_bytes((primary.serve.store / "manifests" / vid).read_bytes())
    tmp.rename(held)
    wanted = list(dict.fromkeys(chunks))
    with ThreadPoolExecutor(len(wanted)) as pool:
        answers = list(pool.map(lambda h: (h, *get(f"{replica.url}/chunks/{h}")), wanted))
    assert [(h, status, body[:200]) for h, status, body in answers if status != 200] == []
    assert all(sha(body) == h for h, _, body in answers)
    assert replica.metric("bootd_upstream_fetches", kind="chunk", result="refused") == 0


def test_concurrent_misses_fetch_once(serve: Servers, primary: Primary, proxies: list[Proxy]) -> None:
    vid, chunks = primary.vid, primary.chunks
    slow = Proxy(primary.serve.url, delay=0.5).start()
    proxies.append(slow)
    replica = serve("replica", upstream=slow.url)
    assert get(f"{replica.url}/capsules/{vid}/manifest")[0] == 200
    h = chunks[0]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: get(f"{replica.url}/chunks/{h}"), range(16)))
    assert all(status == 200 and sha(body) == h for status, body in answers)
    assert slow.requests[f"/chunks/{h}"] == 1
    assert replica.metric("bootd_upstream_fetches", kind="chunk", result="fetched") == 1
    assert replica.metric("bootd_upstream_shared_waits") >= 1


def test_corrupt_or_gone_upstream_is_refused_and_nothing_stored(serve: Servers, primary: Primary,
                                                                 proxies: list[Proxy]) -> None:
    vid, chunks = primary.vid, primary.chunks
    liar = Proxy(primary.serve.url, corrupt=True).start()
    proxies.append(liar)
    replica = serve("replica", upstream=liar.url)
    assert get(f"{replica.url}/capsules/{vid}/manifest")[0] == 200  # the manifest is passed on unchanged
    h = chunks[1]
    for _ in range(2):  # asked again, fetched again (a bad copy is never kept), refused again
        status, body = get(f"{replica.url}/chunks/{h}")
        assert status == 502, body
        assert b"the upstream sent bad bytes" in body and b"not stored" in body and h.encode() in body
    assert not (replica.store / "chunks" / h[:2] / h).exists()
    assert liar.requests[f"/chunks/{h}"] == 2
    assert replica.metric("bootd_upstream_fetches", kind="chunk", result="corrupt") == 2
    leftovers = [p for p in (replica.store / "tmp").rglob("*") if p.is_file() and p.name != "lock"]
    assert leftovers == []

    # The upstream gone: 502 naming it, nothing stored, counted.
    liar.stop()
    status, body = get(f"{replica.url}/chunks/{chunks[2]}")
    assert status == 502 and liar.url.encode() in body and b"could not be fetched from the upstream" in body
    assert not (replica.store / "chunks" / chunks[2][:2] / chunks[2]).exists()
    assert replica.metric("bootd_upstream_fetches", kind="chunk", result="failed") == 1


def test_sync_is_resumable_after_kill_and_idempotent(primary: Primary, proxies: list[Proxy],
                                                     tmp_path: Path) -> None:
    vid, chunks = primary.vid, primary.chunks
    slow = Proxy(primary.serve.url, delay=0.3).start()
    proxies.append(slow)
    cfg, state = config_for(tmp_path, "warm", free_port(), upstream_connections=2)
    store = state / "capsules"
    proc = subprocess.Popen([PYTHON, "-m", "bootd", "-c", str(cfg), "capsule", "sync", "demo", "--from", slow.url],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            have = [p for p in (store / "chunks").rglob("*") if p.is_file()] if (store / "chunks").exists() else []
            if len(have) >= 4:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = {p.name for p in (store / "chunks").rglob("*") if p.is_file()}
    assert 4 <= len(partial) < len(set(chunks))
    kernel_there = any((store / "kernels").iterdir())
    # Nothing half visible: no name, and what is there is whole and verified.
    assert "no capsules" in run_cli("capsule", "list", config=cfg, check=True).stdout
    for h in partial:
        assert sha((store / "chunks" / h[:2] / h).read_bytes()) == h

    r = run_cli("capsule", "sync", "demo", "--from", primary.serve.url, "--json", config=cfg, check=True)
    import json

    (report,) = json.loads(r.stdout)
    assert report["published"] and report["version"] == vid
    # What the killed run stored (chunks, the manifest, perhaps the kernel) is reused, the rest fetched.
    assert report["present"] == len(partial) + 1 + kernel_there
    assert report["fetched"] == len(set(chunks)) - len(partial) + (not kernel_there)
    objects = len(set(chunks)) + 1
    assert "sync demo:" in r.stderr and f"{objects}/{objects} objects" in r.stderr
    assert run_cli("capsule", "verify", "demo", config=cfg).returncode == 0
    history = run_cli("capsule", "history", "demo", "--json", config=cfg, check=True).stdout
    assert '"sync"' in history and primary.serve.url in history

    again = run_cli("capsule", "sync", "--from", primary.serve.url, config=cfg, check=True)
    assert re.search(r"synced demo \w+ from .*: 0 object\(s\) fetched .* already current", again.stdout), again.stdout

    missing = run_cli("capsule", "sync", "nosuch", "--from", primary.serve.url, config=cfg)
    assert missing.returncode != 0 and "has no capsule named 'nosuch' (it has: demo)" in missing.stderr
    down = run_cli("capsule", "sync", "demo", "--from", f"http://127.0.0.1:{free_port()}", config=cfg)
    assert down.returncode != 0 and "ClientConnectorError" in down.stderr
