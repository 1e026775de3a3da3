"""bootd's HTTP transport against a real server on loopback, with the real SQLite store and capsule store.

Every route is exercised with aiohttp's client and with curl (an independent HTTP implementation).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bootd import compose
from bootd.capsule.importer import ImportOptions, import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.config import Config, from_dict
from bootd.model import Group, Node, State
from bootd.net.http.admin import AdminServer
from bootd.net.http.app import HttpServer
from bootd.service.credentials import Issued
from bootd.store.sqlite import SqliteNodeStore

MAC = "52:54:00:12:34:56"
SECRET_TEXT = b"TOP-SECRET-DO-NOT-SERVE"


@dataclass
class Env:
    server: HttpServer
    store: SqliteNodeStore
    capsules: CapsuleStore
    config: Config
    vid: str
    base: str
    root: Path

    def url(self, path: str) -> str:
        return self.base + path

    tokens: dict[str, str]
    admin: AdminServer

    def admin_url(self, path: str) -> str:
        return self.admin.base_url + path

    def token(self, name: str) -> str:
        """The credential the node's last script carried (recorded as it was issued), or a made-up one."""
        return self.tokens.get(name, "0" * 32)

    def manifest(self) -> Any:
        return self.capsules.load_manifest(self.vid)

    async def metric(self, session: aiohttp.ClientSession, name: str, **labels: str) -> float:
        async with session.get(self.url("/metrics")) as r:
            text = await r.text()
        return metric_value(text, name, **labels)


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def make_tree(root: Path) -> Path:
    """A small root tree with a kernel in /boot and a few MiB of incompressible data (several chunks)."""
    tree = root / "tree"
    (tree / "boot").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "boot" / "vmlinuz-6.1.0-test").write_bytes(b"KERNEL" + os.urandom(200_000))
    (tree / "etc" / "hostname").write_text("capsule\n")
    rnd = hashlib.sha256(b"seed").digest()
    blob = bytearray()
    while len(blob) < 3 * 1024 * 1024:
        rnd = hashlib.sha256(rnd).digest()
        blob += rnd * 4 + os.urandom(128)
    (tree / "data.bin").write_bytes(bytes(blob))
    return tree


async def start_env(tmp_path: Path, **http: Any) -> tuple[Env, SqliteNodeStore]:
    state = tmp_path / "state"
    stage1 = tmp_path / "stage1"
    nbp = tmp_path / "nbp"
    for d in (state, stage1, nbp):
        d.mkdir(parents=True, exist_ok=True)
    (stage1 / "initramfs.img").write_bytes(b"INITRAMFS" + os.urandom(5000))
    (stage1 / "vmlinuz").write_bytes(b"STAGE1KERNEL" + os.urandom(1000))
    (nbp / "snponly.efi").write_bytes(b"MZ-EFI" + os.urandom(3000))
    (tmp_path / "secret.txt").write_bytes(SECRET_TEXT)
    config = from_dict({
        "server": {"state_dir": str(state), "address": "127.0.0.1"},
        # Every simulated node connects from 127.0.0.1: trusted, as a replica would be, so the per-source
        # caps (tests/integration/test_bounds.py) do not count them as one host.
        "http": {"listen": "127.0.0.1", "port": 0, "trusted": ["127.0.0.1"], **http},
        "admin": {"port": 0},
        "boot": {"stage1_dir": str(stage1)},
        "tftp": {"nbp_dir": str(nbp)},
        "capsule": {"dir": str(tmp_path / "capsules")},
    })
    capsules = CapsuleStore(config.capsule.dir)
    opts = ImportOptions(durable=False, workers=1)
    result = await asyncio.to_thread(import_capsule, capsules, "tiny", make_tree(tmp_path), options=opts)
    store = SqliteNodeStore(state / "bootd.sqlite")
    await store.put_group(Group("default", capsule="tiny", kernel_args="quiet"))
    _, services = compose.services(config, store=store)
    tokens: dict[str, str] = {}
    issue = services.credentials.issue

    async def recording_issue(node: Node, *args: Any, **kwargs: Any) -> Issued:
        issued = await issue(node, *args, **kwargs)
        if issued.token is not None:
            tokens[node.name] = issued.token
        return issued

    services.credentials.issue = recording_issue  # type: ignore[method-assign]
    server = HttpServer(config, services)
    await server.start()
    admin = AdminServer(config, services, server.metrics)
    await admin.start()
    env = Env(server, store, capsules, config, result.version, f"http://127.0.0.1:{server.port}", tmp_path,
              tokens, admin)
    return env, store


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e, store = await start_env(tmp_path)
    try:
        yield e
    finally:
        await e.admin.close()
        await e.server.close()
        await store.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=300)) as s:
        yield s


async def curl(*args: str) -> tuple[int, bytes, str]:
    """Run curl without blocking the loop the server runs on; returns (status, body, headers)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--path-as-is", "-D", "/dev/stderr", "-o", "-", "-w", "", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    headers = err.decode(errors="replace")
    m = re.search(r"^HTTP/1\.1 (\d{3})", headers, re.M)
    assert m, f"curl got no HTTP response: {headers!r}"
    return int(m.group(1)), out, headers


# ---------------------------------------------------------------------------------------------- script


async def test_script_registers_node_and_passes_boot_parameters(env: Env, session: aiohttp.ClientSession) -> None:
    async with session.get(env.url("/boot/52-54-00-12-34-56.ipxe")) as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-store"
        script = await r.text()
    node = await env.store.get_node_by_mac(MAC)
    assert node is not None and node.state is State.PXE
    assert script.startswith("#!ipxe\n")
    kernel_line = next(line for line in script.splitlines() if line.startswith("kernel "))
    assert f"{env.base}/capsules/{env.vid}/kernel " in kernel_line
    for part in ("initrd=initramfs.img", "console=ttyS0", "quiet", f"bootd.url={env.base}",
                 f"bootd.node={node.name}", f"bootd.capsule={env.vid}",
                 f"bootd.token={env.token(node.name)}", f"bootd.mac={MAC}"):
        assert f" {part}" in kernel_line, part
    assert f"initrd {env.base}/stage1/initramfs.img" in script
    assert "\nboot " in script
    # Colons work too and resolve to the same node.
    status, body, _ = await curl(env.url(f"/boot/{MAC}.ipxe"))
    assert status == 200 and f"bootd.node={node.name}".encode() in body
    assert len(await env.store.list_nodes()) == 1


async def test_script_without_capsule_kernel_uses_stage1_kernel(env: Env, session: aiohttp.ClientSession) -> None:
    tree = env.root / "nokernel"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "x").write_text("x")
    res = await asyncio.to_thread(import_capsule, env.capsules, "bare", tree,
                                  options=ImportOptions(durable=False, workers=1))
    await env.store.put_group(Group("default", capsule="bare"))
    async with session.get(env.url("/boot/52-54-00-00-00-01.ipxe")) as r:
        script = await r.text()
    assert f"kernel {env.base}/stage1/vmlinuz " in script
    assert f"bootd.capsule={res.version}" in script
    async with session.get(env.url(f"/capsules/{res.version}/kernel")) as r:
        assert r.status == 404
        assert "no kernel" in await r.text()


async def test_script_for_missing_capsule_or_refused_node_waits(env: Env, session: aiohttp.ClientSession) -> None:
    await env.store.put_group(Group("default", capsule="nope"))
    async with session.get(env.url("/boot/52-54-00-00-00-02.ipxe")) as r:
        assert r.status == 200
        script = await r.text()
    assert "kernel" not in script and "'nope'" in script and "chain --replace" in script
    node = await env.store.get_node_by_mac("52:54:00:00:00:02")
    assert node is not None
    await env.store.update_node(node.name, enabled=False)
    async with session.get(env.url("/boot/52-54-00-00-00-02.ipxe")) as r:
        assert "disabled" in await r.text()


async def test_script_bad_mac_is_400(env: Env, session: aiohttp.ClientSession) -> None:
    for bad in ("nonsense", "52-54-00-12-34", "zz-54-00-12-34-56"):
        async with session.get(env.url(f"/boot/{bad}.ipxe")) as r:
            assert r.status == 400, bad
            assert "MAC" in await r.text()
    assert await env.store.list_nodes() == []


async def test_unknown_mac_registered_exactly_once_under_200_concurrent_requests(
    env: Env, session: aiohttp.ClientSession
) -> None:
    async def one() -> str:
        async with session.get(env.url("/boot/52-54-00-aa-bb-cc.ipxe")) as r:
            assert r.status == 200
            text = await r.text()
            m = re.search(r"bootd\.node=(\S+)", text)
            assert m, text
            return m.group(1)

    names = await asyncio.gather(*(one() for _ in range(200)))
    assert len(set(names)) == 1
    nodes = await env.store.list_nodes()
    assert [n.mac for n in nodes] == ["52:54:00:aa:bb:cc"]
    assert await env.metric(session, "bootd_http_registrations_total") == 1
    # ...and distinct MACs at once get distinct names.
    macs = [f"52-54-00-00-10-{i:02x}" for i in range(50)]
    results = await asyncio.gather(*(session.get(env.url(f"/boot/{m}.ipxe")) for m in macs))
    for r in results:
        assert r.status == 200
        r.release()
    nodes = await env.store.list_nodes()
    assert len(nodes) == 51 and len({n.name for n in nodes}) == 51


# ---------------------------------------------------------------------------------------------- objects


async def test_chunk_get_head_range_etag(env: Env, session: aiohttp.ClientSession) -> None:
    chunk = max(env.manifest().chunks, key=lambda c: c.stored_size)
    url = env.url(f"/chunks/{chunk.sha256}")
    async with session.get(url) as r:
        assert r.status == 200
        body = await r.read()
        assert r.headers["ETag"] == f'"{chunk.sha256}"'
        assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert r.headers["Content-Type"] == "application/octet-stream"
        assert r.headers["Accept-Ranges"] == "bytes"
        assert int(r.headers["Content-Length"]) == chunk.stored_size
    assert hashlib.sha256(body).hexdigest() == chunk.sha256
    async with session.head(url) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == chunk.stored_size
        assert await r.read() == b""
    async with session.get(url, headers={"Range": "bytes=10-19"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 10-19/{chunk.stored_size}"
        assert await r.read() == body[10:20]
    async with session.get(url, headers={"Range": "bytes=-7"}) as r:
        assert r.status == 206 and await r.read() == body[-7:]
    async with session.get(url, headers={"Range": "bytes=100-"}) as r:
        assert r.status == 206 and await r.read() == body[100:]
    async with session.get(url, headers={"Range": f"bytes={chunk.stored_size}-"}) as r:
        assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{chunk.stored_size}"
    async with session.get(url, headers={"Range": "bytes=0-1,5-6"}) as r:  # multi-range: served whole
        assert r.status == 200 and await r.read() == body
    async with session.get(url, headers={"If-None-Match": f'"{chunk.sha256}"'}) as r:
        assert r.status == 304 and await r.read() == b""
        assert r.headers["ETag"] == f'"{chunk.sha256}"'
    async with session.get(url, headers={"If-None-Match": '"other"'}) as r:
        assert r.status == 200
        await r.read()
    async with session.get(url, headers={"Range": "bytes=0-3", "If-Range": '"stale"'}) as r:
        assert r.status == 200 and await r.read() == body
    async with session.get(url, headers={"Range": "bytes=0-3", "If-Range": f'"{chunk.sha256}"'}) as r:
        assert r.status == 206 and await r.read() == body[:4]
    # curl agrees, including a range.
    status, cbody, headers = await curl(url)
    assert status == 200 and cbody == body and "immutable" in headers
    status, cbody, headers = await curl("-r", "5-9", url)
    assert status == 206 and cbody == body[5:10]
    status, cbody, headers = await curl("-I", url)
    assert status == 200 and f"Content-Length: {chunk.stored_size}" in headers
    status, cbody, _ = await curl("-H", f'If-None-Match: "{chunk.sha256}"', url)
    assert status == 304 and cbody == b""


async def test_chunk_framing_http10_pipelining_and_close(env: Env) -> None:
    """The chunk fast path writes its own header block: check keep-alive rules and pipelined requests."""
    chunks = sorted(env.manifest().chunks, key=lambda c: c.stored_size)[:2]
    bodies = [env.capsules.chunk_path(c.sha256).read_bytes() for c in chunks]

    async def exchange(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(), 10)  # the server must close for read() to end
        writer.close()
        return data

    def split(data: bytes) -> list[tuple[str, bytes]]:
        out = []
        while data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?im)^content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            out.append((head.decode(), rest[:length]))
            data = rest[length:]
        return out

    one, two = (f"GET /chunks/{c.sha256} HTTP/1.1\r\nHost: x\r\n" for c in chunks)
    got = split(await exchange((one + "\r\n" + two + "Connection: close\r\n\r\n").encode()))
    assert [b for _, b in got] == bodies
    assert "Connection: close" not in got[0][0] and "Connection: close" in got[1][0]
    assert got[0][0].startswith("HTTP/1.1 200 OK") and "Date: " in got[0][0]
    # HTTP/1.0 without keep-alive: answered, then closed.
    got = split(await exchange(f"GET /chunks/{chunks[0].sha256} HTTP/1.0\r\n\r\n".encode()))
    assert [b for _, b in got] == bodies[:1]
    # HTTP/1.0 asking for keep-alive gets it (and the next request on the same connection).
    got = split(await exchange(
        f"GET /chunks/{chunks[0].sha256} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        f"GET /chunks/{chunks[1].sha256} HTTP/1.0\r\nRange: bytes=1-4\r\n\r\n".encode()))
    assert "Connection: keep-alive" in got[0][0] and got[1][0].startswith("HTTP/1.1 206 Partial Content")
    assert [b for _, b in got] == [bodies[0], bodies[1][1:5]]


async def test_object_404_and_400(env: Env, session: aiohttp.ClientSession) -> None:
    cases = {
        "/chunks/" + "0" * 64: 404,
        "/chunks/abc": 400,
        "/chunks/" + "g" * 64: 400,
        "/chunks/" + "a" * 65: 400,
        "/capsules/" + "0" * 64 + "/manifest": 404,
        "/capsules/" + "0" * 64 + "/kernel": 404,
        "/capsules/xyz/manifest": 400,
        "/capsules/xyz/kernel": 400,
        "/stage1/missing.img": 404,
        "/nbp/ipxe.efi": 404,
        "/no/such/route": 404,
    }
    for path, want in cases.items():
        async with session.get(env.url(path)) as r:
            assert r.status == want, (path, r.status)
            assert (await r.text()).strip(), f"refusal without a reason: {path}"
        status, _, _ = await curl(env.url(path))
        assert status == want, path


async def test_manifest_kernel_stage1_nbp(env: Env, session: aiohttp.ClientSession) -> None:
    manifest_bytes = env.capsules.read_manifest_bytes(env.vid)
    kernel = env.manifest().kernel
    assert kernel is not None
    for path, want, immutable in (
        (f"/capsules/{env.vid}/manifest", manifest_bytes, True),
        (f"/capsules/{env.vid}/kernel", env.capsules.kernel_path(kernel.sha256).read_bytes(), True),
        ("/stage1/initramfs.img", (env.config.boot.stage1_dir / "initramfs.img").read_bytes(), False),
        ("/stage1/vmlinuz", (env.config.boot.stage1_dir / "vmlinuz").read_bytes(), False),
        ("/nbp/snponly.efi", (env.config.tftp.nbp_dir / "snponly.efi").read_bytes(), False),
    ):
        async with session.get(env.url(path)) as r:
            assert r.status == 200, path
            assert await r.read() == want, path
            assert ("immutable" in r.headers["Cache-Control"]) is immutable, path
            etag = r.headers["ETag"]
        async with session.get(env.url(path), headers={"If-None-Match": etag}) as r:
            assert r.status == 304, path
        status, body, _ = await curl(env.url(path))
        assert status == 200 and body == want, path
    async with session.get(env.url(f"/capsules/{env.vid}/manifest")) as r:
        assert r.headers["ETag"] == f'"{env.vid}"'
    async with session.get(env.url(f"/capsules/{env.vid}/kernel")) as r:
        assert r.headers["ETag"] == f'"{kernel.sha256}"'


async def test_stage1_file_replaced_is_served_fresh(env: Env, session: aiohttp.ClientSession) -> None:
    path = env.config.boot.stage1_dir / "initramfs.img"
    async with session.get(env.url("/stage1/initramfs.img")) as r:
        old_etag = r.headers["ETag"]
        await r.read()
    tmp = path.with_name("new.tmp")
    tmp.write_bytes(b"NEW STAGE ONE")
    tmp.rename(path)  # how a rebuild replaces it: atomically
    async with session.get(env.url("/stage1/initramfs.img")) as r:
        assert await r.read() == b"NEW STAGE ONE"
        assert r.headers["ETag"] != old_etag


TRAVERSALS = [
    "/stage1/../secret.txt",
    "/stage1/..%2fsecret.txt",
    "/stage1/..%2Fsecret.txt",
    "/stage1/%2e%2e%2fsecret.txt",
    "/stage1/%2E%2E/secret.txt",
    "/stage1/%2e%2e",
    "/stage1/..",
    "/stage1/.%2e/secret.txt",
    "/stage1/%252e%252e%252fsecret.txt",
    "/stage1/..%5csecret.txt",
    "/stage1/%00secret.txt",
    "/nbp/../secret.txt",
    "/nbp/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/nbp/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/nbp/....//....//etc/passwd",
    "/nbp/.hidden",
]


async def test_path_traversal_is_refused(env: Env, session: aiohttp.ClientSession) -> None:
    async def raw(path: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status = int(data.split(b" ", 2)[1])
        return status, data

    passwd = Path("/etc/passwd").read_bytes()[:20]
    for path in TRAVERSALS:
        status, data = await raw(path)
        assert status in (400, 404), (path, status, data[:200])
        assert SECRET_TEXT not in data and passwd not in data, path
        cstatus, body, _ = await curl(env.url(path))
        assert cstatus in (400, 404), (path, cstatus)
        assert SECRET_TEXT not in body and passwd not in body, path
    async with session.get(env.url("/stage1/%2e%2e%2fsecret.txt")) as r:
        assert r.status in (400, 404)
    # A symlink out of the directory is a file an administrator put there on purpose; a dot name is not.
    (env.config.boot.stage1_dir / ".env").write_bytes(SECRET_TEXT)
    async with session.get(env.url("/stage1/.env")) as r:
        assert r.status == 400


# ---------------------------------------------------------------------------------------------- node API


async def _register(env: Env, session: aiohttp.ClientSession, mac: str) -> str:
    async with session.get(env.url(f"/boot/{mac}.ipxe")) as r:
        m = re.search(r"bootd\.node=(\S+)", await r.text())
    assert m
    return m.group(1)


async def test_node_events_and_heartbeat_need_own_token(env: Env, session: aiohttp.ClientSession) -> None:
    a = await _register(env, session, "52-54-00-00-00-0a")
    b = await _register(env, session, "52-54-00-00-00-0b")
    url = env.url(f"/api/v1/nodes/{a}/events")
    ev = {"event": "fetching", "done": 10, "total": 100}
    async with session.post(url, json=ev) as r:
        assert r.status == 403 and "X-Bootd-Token" in await r.text()
    async with session.post(url, json=ev, headers={"X-Bootd-Token": env.token(b)}) as r:
        assert r.status == 403  # b's token does not move a
    async with session.post(url, json=ev, headers={"X-Bootd-Token": env.token(a)}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["state"] == "fetching"
    node_a, node_b = await env.store.get_node(a), await env.store.get_node(b)
    assert node_a is not None and node_a.state is State.FETCHING
    assert node_b is not None and node_b.state is State.PXE
    events = await env.store.events(a)
    assert json.loads(events[-1].detail) == {"done": 10, "total": 100}
    for bad in ({"event": "dead"}, {"event": "disabled"}, {"event": "nonsense"}, {}):
        async with session.post(url, json=bad, headers={"X-Bootd-Token": env.token(a)}) as r:
            assert r.status == 400, bad
    async with session.post(url, data=b"{not json", headers={"X-Bootd-Token": env.token(a)}) as r:
        assert r.status == 400
    for state in ("verified", "booted"):
        async with session.post(url, json={"event": state}, headers={"X-Bootd-Token": env.token(a)}) as r:
            assert r.status == 200
    hb = env.url(f"/api/v1/nodes/{a}/heartbeat")
    async with session.post(hb, headers={"X-Bootd-Token": env.token(a)}) as r:
        assert r.status == 200 and (await r.json())["state"] == "ready"
    async with session.post(hb, headers={"X-Bootd-Token": "0" * 32}) as r:
        assert r.status == 403
    status, body, _ = await curl("-X", "POST", "-H", f"X-Bootd-Token: {env.token(a)}", hb)
    assert status == 200 and json.loads(body)["state"] == "ready"
    status, _, _ = await curl("-X", "POST", "-H", f"X-Bootd-Token: {env.token(b)}", hb)
    assert status == 403
    # failed with a reason, via curl
    status, _, _ = await curl("-X", "POST", "-H", f"X-Bootd-Token: {env.token(a)}", "-H",
                                 "Content-Type: application/json", "--data",
                                 '{"event":"failed","reason":"chunk 3 hash mismatch"}', url)
    assert status == 200
    node_a = await env.store.get_node(a)
    assert node_a is not None and node_a.state is State.FAILED and node_a.reason == "chunk 3 hash mismatch"
    # a valid token for a node that does not exist
    ghost = env.url("/api/v1/nodes/ghost/heartbeat")
    async with session.post(ghost, headers={"X-Bootd-Token": env.token("ghost")}) as r:
        assert r.status == 404


async def test_admin_reads_and_token_guarded_writes(env: Env, session: aiohttp.ClientSession) -> None:
    name = await _register(env, session, "52-54-00-00-00-0c")
    admin = (env.config.server.state_dir / "admin-token").read_text().strip()
    auth = {"Authorization": f"Bearer {admin}"}
    # The admin API is not on the node-facing listener at all: it says where it is.
    for path in ("/api/v1/nodes", f"/api/v1/nodes/{name}"):
        async with session.get(env.url(path), headers=auth) as r:
            assert r.status == 404 and "[admin]" in await r.text()
    # Reads are admin routes too: node variables hold site secrets, and MACs are what a spoofer needs.
    for path in ("/api/v1/nodes", f"/api/v1/nodes/{name}"):
        async with session.get(env.admin_url(path)) as r:
            assert r.status == 401 and "admin-token" in await r.text()
    async with session.get(env.admin_url("/api/v1/nodes"), headers=auth) as r:
        data = await r.json()
    assert [n["name"] for n in data["nodes"]] == [name]
    assert data["nodes"][0]["state"] == "pxe" and data["nodes"][0]["mac"] == "52:54:00:00:00:0c"
    status, body, _ = await curl("-H", f"Authorization: Bearer {admin}", env.admin_url(f"/api/v1/nodes/{name}"))
    one = json.loads(body)
    assert status == 200 and one["name"] == name and [e["state"] for e in one["events"]][:1] == ["discovered"]
    async with session.get(env.admin_url("/api/v1/nodes/ghost"), headers=auth) as r:
        assert r.status == 404
    url = env.admin_url(f"/api/v1/nodes/{name}")
    async with session.post(url, json={"capsule": "other"}) as r:
        assert r.status == 401
    async with session.post(url, json={"capsule": "other"}, headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401
    async with session.post(url, json={"capsule": "other", "kernel_args": "debug"}, headers=auth) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["capsule"] == "other"
    async with session.post(url, json={"state": "ready"}, headers=auth) as r:
        assert r.status == 400 and "cannot set state" in await r.text()
    async with session.post(url, json={"enabled": False}, headers=auth) as r:
        assert (await r.json())["state"] == "disabled"
    node = await env.store.get_node(name)
    assert node is not None and node.capsule == "other" and not node.enabled and node.kernel_args == "debug"
    status, _, _ = await curl("-X", "POST", "-H", f"Authorization: Bearer {admin}", "--data",
                              '{"approve": true, "enabled": true}', url)
    assert status == 200
    # node tokens do not open admin writes
    async with session.post(url, json={"capsule": "x"}, headers={"Authorization": f"Bearer {env.token(name)}"}) as r:
        assert r.status == 401


USAGE = {"mem_used_kb": 81234, "mem_total_kb": 1012345, "root_size_kb": 400000, "root_used_kb": 310000,
         "image_ram_kb": 123456}


async def _usage(env: Env, session: aiohttp.ClientSession, name: str) -> Any:
    admin = (env.config.server.state_dir / "admin-token").read_text().strip()
    async with session.get(env.admin_url(f"/api/v1/nodes/{name}"), headers={"Authorization": f"Bearer {admin}"}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["usage"]


async def test_heartbeat_usage_is_kept_shown_and_a_bad_body_is_still_a_heartbeat(
        env: Env, session: aiohttp.ClientSession) -> None:
    name = await _register(env, session, "52-54-00-00-00-0e")
    other = await _register(env, session, "52-54-00-00-00-0f")
    own = {"X-Bootd-Token": env.token(name)}
    hb = env.url(f"/api/v1/nodes/{name}/heartbeat")
    async with session.post(env.url(f"/api/v1/nodes/{name}/events"), json={"event": "ready", **USAGE},
                            headers=own) as r:
        assert r.status == 200
    assert await _usage(env, session, name) is None  # events go to the timeline; usage is the heartbeat's
    sub = env.server.services.lifecycle.events.subscribe()
    async with session.post(hb, json=USAGE, headers=own) as r:
        assert r.status == 200 and (await r.json())["state"] == "ready"
    first = await _usage(env, session, name)
    assert {k: first[k] for k in USAGE} == USAGE and set(first) == {*USAGE, "at"}
    assert abs(first["at"] - env.server.clock()) < 60
    contact = [u for u in sub.take() if u["t"] == "contact"]
    assert contact and contact[-1]["node"] == name and contact[-1]["usage"] == first  # the status page hears it
    env.server.services.lifecycle.events.unsubscribe(sub)
    assert await _usage(env, session, other) is None  # kept per node
    # Fields that are not whole numbers (or not ours) are dropped; the rest of the report is kept.
    odd = {"mem_used_kb": "5", "mem_total_kb": 1.5, "root_size_kb": True, "root_used_kb": -1, "image_ram_kb": 2**64,
           "evil": 7}
    async with session.post(hb, json={**odd, "image_ram_kb": 99}, headers=own) as r:
        assert r.status == 200
    assert {k: v for k, v in (await _usage(env, session, name)).items() if k != "at"} == {"image_ram_kb": 99}
    async with session.post(hb, json=odd, headers=own) as r:
        assert r.status == 200  # nothing usable: a heartbeat, and the last report stays
    kept = await _usage(env, session, name)
    assert kept["image_ram_kb"] == 99
    # Garbage, an array, too long a body (over 4 KiB), no body at all (an old agent): each still a heartbeat.
    before = await env.metric(session, "bootd_node_events_total", event="heartbeat")
    padded = json.dumps({**USAGE, "pad": "x" * 5000}).encode()
    for body in (b"{not json", b"\xff\xfe", b"[1, 2]", padded, b"9" * 100_000, b""):
        async with session.post(hb, data=body, headers=own) as r:
            assert r.status == 200, (body[:20], await r.text())
    assert await env.metric(session, "bootd_node_events_total", event="heartbeat") == before + 6
    assert await _usage(env, session, name) == kept
    node = await env.store.get_node(name)
    assert node is not None and node.state is State.READY and node.last_contact >= kept["at"]
    status, _, _ = await curl("-X", "POST", "-H", f"X-Bootd-Token: {env.token(name)}", "--data",
                              json.dumps({"image_ram_kb": 77}), hb)
    assert status == 200 and (await _usage(env, session, name))["image_ram_kb"] == 77
    # Someone else's token changes nothing.
    async with session.post(hb, json={"image_ram_kb": 1}, headers={"X-Bootd-Token": env.token(other)}) as r:
        assert r.status == 403
    assert (await _usage(env, session, name))["image_ram_kb"] == 77
    # Booting again forgets the last boot's report; so does deleting the node.
    async with session.post(env.url(f"/api/v1/nodes/{name}/events"), json={"event": "stage1"}, headers=own) as r:
        assert r.status == 200
    assert await _usage(env, session, name) is None
    async with session.post(hb, json=USAGE, headers=own) as r:
        assert r.status == 200
    assert (await _usage(env, session, name))["image_ram_kb"] == USAGE["image_ram_kb"]
    await env.server.services.nodes.delete(name, who="test")
    assert env.server.services.lifecycle.usage(name) is None


async def test_node_agent_heartbeat_usage_reaches_the_admin_api(env: Env, session: aiohttp.ClientSession) -> None:
    """The real node agent (node-agent.sh under dash or sh, posting with wget or curl) against the real server."""
    if shutil.which("wget") is None and shutil.which("curl") is None:
        pytest.skip("neither wget nor curl")
    name = await _register(env, session, "52-54-00-00-00-10")
    lib, state = env.root / "agent-lib", env.root / "agent-state"
    lib.mkdir()  # no bootd-fetch: the agent falls back to wget, then curl
    agent_env = dict(os.environ, BOOTD_URL=env.base, BOOTD_NODE=name, BOOTD_TOKEN=env.token(name),
                     BOOTD_HEARTBEAT="1", BOOTD_OVERLAY_INTERVAL="0", BOOTD_AGENT_LIB=str(lib),
                     BOOTD_AGENT_STATE=str(state), BOOTD_NODE_ENV=str(env.root / "no-node.env"),
                     BOOTD_ROOT_RAM=str(env.root / "no-root-ram"))
    agent = Path(__file__).resolve().parents[2] / "bootd" / "stage1" / "node-agent.sh"
    proc = await asyncio.create_subprocess_exec(shutil.which("dash") or "sh", str(agent), env=agent_env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        usage = None
        for _ in range(150):  # 15 s at most: ready, then a heartbeat every second
            usage = await _usage(env, session, name)
            if usage is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert usage is not None, out.decode(errors="replace")
    assert set(usage) == {"mem_used_kb", "mem_total_kb", "root_size_kb", "root_used_kb", "image_ram_kb", "at"}
    assert usage["mem_total_kb"] > usage["mem_used_kb"] > 0
    assert usage["root_size_kb"] >= usage["root_used_kb"] > 0
    assert usage["image_ram_kb"] >= 0  # 0 unless this host's own root is a tmpfs
    node = await env.store.get_node(name)
    assert node is not None and node.state is State.READY


async def test_secret_and_admin_token_files_are_private(env: Env) -> None:
    for name in ("admin-token",):  # node credentials are per boot, in the store (only their digests)
        mode = (env.config.server.state_dir / name).stat().st_mode & 0o777
        assert mode == 0o600, (name, oct(mode))


# ---------------------------------------------------------------------------------------------- ops


async def test_metrics_and_healthz(env: Env, session: aiohttp.ClientSession) -> None:
    async with session.get(env.url("/healthz")) as r:
        assert r.status == 200 and await r.text() == "ok\n"
    assert (await curl(env.url("/healthz")))[:2] == (200, b"ok\n")
    chunk = env.manifest().chunks[0]
    route = "/chunks/{hash}"
    before = await env.metric(session, "bootd_http_requests_total", route=route, status="200")
    bytes_before = await env.metric(session, "bootd_http_sent_bytes_total", route=route)
    hits_before = await env.metric(session, "bootd_http_open_file_cache_total", result="hit")
    for _ in range(3):
        async with session.get(env.url(f"/chunks/{chunk.sha256}")) as r:
            await r.read()
    await _register(env, session, "52-54-00-00-00-0d")
    async with session.get(env.url("/metrics")) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    assert metric_value(text, "bootd_http_requests_total", route=route, status="200") == before + 3
    assert metric_value(text, "bootd_http_sent_bytes_total", route=route) == bytes_before + 3 * chunk.stored_size
    assert metric_value(text, "bootd_http_open_file_cache_total", result="hit") >= hits_before + 2
    assert metric_value(text, "bootd_nodes", state="pxe") == 1
    assert metric_value(text, "bootd_nodes", state="dead") == 0
    assert metric_value(text, "bootd_http_requests_total", route="unmatched") == 0
    async with session.get(env.url("/nope")) as r:
        assert r.status == 404
    assert await env.metric(session, "bootd_http_requests_total", route="unmatched", status="404") == 1
    status, body, _ = await curl(env.url("/metrics"))
    assert status == 200 and b"bootd_http_requests_total" in body


async def test_client_vanishing_mid_stream_releases_everything(env: Env) -> None:
    big = os.urandom(24 * 1024 * 1024)
    h = hashlib.sha256(big).hexdigest()
    path = env.capsules.chunk_path(h)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(big)
    for _ in range(5):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", env.server.port))
        await asyncio.get_running_loop().sock_sendall(s, f"GET /chunks/{h} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await asyncio.sleep(0.1)
        s.close()
    deadline = asyncio.get_running_loop().time() + 10
    while env.server.admission.active and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert env.server.admission.active == 0
    async with aiohttp.ClientSession() as s2, s2.get(env.url(f"/chunks/{h}")) as r:
        assert hashlib.sha256(await r.read()).hexdigest() == h


def test_curl_is_installed() -> None:
    assert shutil.which("curl"), "curl is needed by these tests (Debian package curl)"


async def test_env_route_gives_a_node_its_own_key_values_only(env: Env, session: aiohttp.ClientSession) -> None:
    a = await _register(env, session, "52-54-00-00-00-1a")
    b = await _register(env, session, "52-54-00-00-00-1b")
    await env.store.set_vars(a, {"ROLE": "gpu worker", "bad-key": "x", "LINES": "one\ntwo"})
    url = env.url(f"/api/v1/nodes/{a}/env")
    async with session.get(url, headers={"X-Bootd-Token": env.token(a)}) as r:
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        assert await r.text() == "LINES=one two\nROLE=gpu worker\n"
    async with session.get(url, headers={"X-Bootd-Token": env.token(b)}) as r:
        assert r.status == 403
    status, body, _ = await curl("-H", f"X-Bootd-Token: {env.token(a)}", url)
    assert status == 200 and b"ROLE=gpu worker" in body


async def test_corrupt_chunk_on_disk_is_never_served(env: Env, session: aiohttp.ClientSession) -> None:
    manifest = env.capsules.load_manifest(env.vid)
    digest = manifest.chunks[0].sha256
    path = env.capsules.chunk_path(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    async with session.get(env.url(f"/chunks/{digest}")) as r:
        assert r.status == 500
        assert "corrupt" in await r.text()
    status, _, _ = await curl(env.url(f"/chunks/{digest}"))
    assert status == 500
    async with session.get(env.url("/metrics")) as r:
        assert "bootd_http_corrupt_objects_total 2.0" in await r.text()


async def test_node_list_is_paged(env: Env, session: aiohttp.ClientSession) -> None:
    for i in range(25):
        await _register(env, session, f"52-54-00-00-1e-{i:02x}")
    auth = {"Authorization": f"Bearer {(env.config.server.state_dir / 'admin-token').read_text().strip()}"}
    seen: list[str] = []
    after = ""
    while True:
        async with session.get(env.admin_url(f"/api/v1/nodes?limit=10&after={after}"), headers=auth) as r:
            page = await r.json()
        seen += [n["name"] for n in page["nodes"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 25
    async with session.get(env.admin_url("/api/v1/nodes?limit=0"), headers=auth) as r:
        assert r.status == 400 and "limit" in await r.text()


async def test_a_wave_of_first_requests_for_one_chunk_hashes_it_once(env: Env, session: aiohttp.ClientSession) -> None:
    """Nodes booting together ask for the same chunk at once: one read-and-hash serves them all."""
    big = os.urandom(16 * 1024 * 1024)  # hashing it takes long enough for every request to arrive meanwhile
    h = hashlib.sha256(big).hexdigest()
    path = env.capsules.chunk_path(h)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(big)
    files = env.server.sender.files
    hashed: list[str] = []
    prepare = files.prepare

    def counted(key: str, path: str, sha256: str | None = None, root: str | None = None) -> Any:
        hashed.append(key)
        return prepare(key, path, sha256, root)

    files.prepare = counted  # type: ignore[method-assign]  # counts, and calls the real one

    async def get() -> tuple[int, bytes]:
        async with session.get(env.url(f"/chunks/{h}")) as r:
            return r.status, await r.read()

    got = await asyncio.gather(*(get() for _ in range(8)))
    assert [s for s, _ in got] == [200] * 8 and all(b == big for _, b in got)
    assert hashed == [h]


async def test_a_chunk_rotting_in_place_is_refused_once_the_cache_rechecks_it(
        env: Env, session: aiohttp.ClientSession) -> None:
    """README, "Not promised": a chunk corrupted while open is served for at most the cache's ``valid``
    (60 s), even when its size and mtime did not change: past it the chunk is hashed again."""
    digest = env.manifest().chunks[0].sha256
    path = env.capsules.chunk_path(digest)
    async with session.get(env.url(f"/chunks/{digest}")) as r:
        assert r.status == 200  # open and verified now
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.chmod(0o644)
    with path.open("r+b") as f:  # in place: same inode, size and (restored) mtime, as bit rot leaves it
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    async with session.get(env.url(f"/chunks/{digest}")) as r:
        assert r.status == 200  # inside valid: the open entry is trusted
    env.server.files.valid = 0.0
    async with session.get(env.url(f"/chunks/{digest}")) as r:
        assert r.status == 500 and "corrupt" in await r.text()
