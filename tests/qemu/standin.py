"""Stand-ins for the parts of bootd the stage one talks to, so the agent can be proved on its own.

* ``make_busybox_root`` builds a tiny root tree whose /sbin/init reports ``ready`` and heartbeats.
* ``make_capsule`` writes a capsule store following the contract (pax tar, zstd frames, BDCAPS01
  manifest) without bootd.capsule, so this proof does not depend on the capsule helper's code.
* ``python standin.py serve ...`` is a threaded HTTP server with the contract routes the stage one uses,
  recording every node event as a JSON line; ``--corrupt HASH`` flips a byte of one chunk. Its overlay
  route serves a small system and runtime tar (the runtime one carries ``--runtime-file``'s current text
  and an apply hook), with ETag and 304 as bootd does; ``--overlay-fail`` answers 500 with a render error.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import socket
import struct
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import zstandard

from bootd.lab.sample import CAPSULE_INIT, make_busybox_root

__all__ = ["CAPSULE_INIT", "chunk_hashes", "make_busybox_root", "make_capsule", "node_token"]

def _pax_tar(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix())
        for path in paths:
            info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if info.isfile():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    return buf.getvalue()


def make_capsule(root: Path, store: Path, name: str, *, chunk_size: int = 256 * 1024) -> str:
    """Import ``root`` into a contract-format capsule store; returns the version id."""
    return make_capsule_from_tar(_pax_tar(root), store, name, chunk_size=chunk_size)


def make_capsule_from_tar(stream: bytes, store: Path, name: str, *, chunk_size: int = 256 * 1024) -> str:
    """The same from a ready pax stream (e.g. GNU tar --xattrs output)."""
    cctx = zstandard.ZstdCompressor(level=3)
    records = []
    stored_total = 0
    for off in range(0, len(stream), chunk_size):
        raw = stream[off : off + chunk_size]
        frame = cctx.compress(raw)
        digest = hashlib.sha256(frame).hexdigest()
        path = store / "chunks" / digest[:2] / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(frame)
        records.append(bytes.fromhex(digest) + struct.pack(">II", len(frame), len(raw)))
        stored_total += len(frame)
    meta = {"format": 1, "compression": "zstd", "archive": "pax", "kernel": None, "raw_size": len(stream),
            "stored_size": stored_total, "chunks": len(records)}
    meta_b = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    manifest = b"BDCAPS01" + struct.pack(">I", len(meta_b)) + meta_b + struct.pack(">I", len(records))
    manifest += b"".join(records)
    vid = hashlib.sha256(manifest).hexdigest()
    (store / "manifests").mkdir(parents=True, exist_ok=True)
    (store / "manifests" / vid).write_bytes(manifest)
    (store / "refs").mkdir(parents=True, exist_ok=True)
    (store / "refs" / name).write_text(vid + "\n")
    return vid


def chunk_hashes(store: Path, vid: str) -> list[str]:
    data = (store / "manifests" / vid).read_bytes()
    (meta_len,) = struct.unpack(">I", data[8:12])
    off = 12 + meta_len
    (count,) = struct.unpack(">I", data[off : off + 4])
    off += 4
    return [data[off + 40 * i : off + 40 * i + 32].hex() for i in range(count)]


def node_token(secret: bytes, name: str) -> str:
    return hmac.new(secret, name.encode(), hashlib.sha256).hexdigest()[:32]


class Standin:
    def __init__(self, args: argparse.Namespace) -> None:
        self.store = Path(args.store)
        self.stage1 = Path(args.stage1)
        self.base = ""
        self.capsule = args.capsule
        self.kernel_args = args.kernel_args
        self.events = Path(args.events)
        self.corrupt = set(args.corrupt or [])
        self.busy = args.busy  # this many chunk requests get 503 + Retry-After: 1
        self.last_busy = 0.0
        self.drop = args.drop  # this many chunk requests are cut off half-way
        self.secret = b"standin-secret"
        self.runtime_file = Path(args.runtime_file) if args.runtime_file else None
        self.overlay_fail = args.overlay_fail
        self.lock = threading.Lock()

    def record(self, node: str, path: str, body: bytes, token: str | None) -> None:
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            payload = {"invalid": body.decode(errors="replace")}
        ok = token == node_token(self.secret, node)
        line = json.dumps({"node": node, "route": path.rsplit("/", 1)[-1], "token_ok": ok, **payload})
        with self.lock, self.events.open("a") as fh:
            fh.write(line + "\n")

    def overlay(self, node: str, kind: str) -> bytes:
        """A deterministic tar like bootd's: same inputs, same bytes, so the ETag says "unchanged"."""
        files: list[tuple[str, bytes, int]] = []
        if kind == "system":
            files = [("etc/hostname", f"{node}\n".encode(), 0o644),
                     ("etc/bootd-standin/system", f"system overlay of {node}\n".encode(), 0o640)]
        else:
            text = self.runtime_file.read_bytes() if self.runtime_file and self.runtime_file.exists() else b""
            hook = b'#!/bin/sh\ncat "$BOOTD_ROOT/etc/bootd-standin/runtime" > "$BOOTD_ROOT/etc/bootd-standin/hooked"\n'
            files = [("etc/bootd-standin/runtime", text, 0o600), ("usr/lib/bootd/apply.d/50-standin", hook, 0o755)]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            d = tarfile.TarInfo("etc/bootd-standin/")
            d.type, d.mode, d.uname, d.gname = tarfile.DIRTYPE, 0o750, "root", "root"
            tar.addfile(d)
            for name, data, mode in files:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.uname, info.gname = len(data), mode, "root", "root"
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    def script(self, mac: str) -> str:
        mac = mac.replace("-", ":").lower()
        name = "n" + mac.replace(":", "")[-4:]
        vid = (self.store / "refs" / self.capsule).read_text().strip()
        tok = node_token(self.secret, name)
        return (
            "#!ipxe\n"
            f"echo BOOTD-IPXE node={name} platform=${{platform}}\n"
            f"kernel {self.base}/stage1/vmlinuz initrd=initramfs.img {self.kernel_args} bootd.url={self.base} "
            f"bootd.node={name} bootd.capsule={vid} bootd.token={tok} bootd.mac={mac}\n"
            f"initrd {self.base}/stage1/initramfs.img\n"
            "boot\n"
        )


def make_handler(st: Standin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: object) -> None:
            sys.stderr.write("standin: " + (fmt % args) + "\n")

        def _send(self, code: int, body: bytes, ctype: str = "application/octet-stream",
                  extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _file(self, path: Path, mutate: bool = False) -> None:
            if not path.is_file():
                self._send(404, b"not found\n", "text/plain")
                return
            data = path.read_bytes()
            if mutate:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start_s, _, end_s = rng[6:].partition("-")
                start = int(start_s or 0)
                end = int(end_s) if end_s else len(data) - 1
                if start >= len(data):
                    self._send(416, b"", extra={"Content-Range": f"bytes */{len(data)}"})
                    return
                self._send(206, data[start : end + 1],
                           extra={"Content-Range": f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"})
                return
            self._send(200, data)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts == ["boot.ipxe"]:
                self._send(200, b"#!ipxe\nchain /boot/${mac:hexhyp}.ipxe\n", "text/plain")
            elif len(parts) == 2 and parts[0] == "boot" and parts[1].endswith(".ipxe"):
                self._send(200, st.script(parts[1][:-5]).encode(), "text/plain")
            elif len(parts) == 2 and parts[0] == "stage1" and "/" not in parts[1]:
                self._file(st.stage1 / parts[1])
            elif len(parts) == 3 and parts[0] == "capsules" and parts[2] == "manifest":
                self._file(st.store / "manifests" / parts[1])
            elif len(parts) == 2 and parts[0] == "chunks" and len(parts[1]) == 64:
                with st.lock:
                    if self.command == "HEAD":  # the agent's Retry-After probe sees the same overload
                        busy = time.monotonic() - st.last_busy < 1.0
                    else:
                        busy = st.busy > 0
                        st.busy -= busy
                        if busy:
                            st.last_busy = time.monotonic()
                    drop = st.drop > 0 and not busy and self.command == "GET"
                    st.drop -= drop
                if busy:
                    self._send(503, b"busy\n", "text/plain", {"Retry-After": "1"})
                    return
                if drop:
                    data = (st.store / "chunks" / parts[1][:2] / parts[1]).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.log_message("chunk %s range=%s", parts[1][:12], self.headers.get("Range"))
                self._file(st.store / "chunks" / parts[1][:2] / parts[1], mutate=parts[1] in st.corrupt)
            elif len(parts) == 6 and parts[:3] == ["api", "v1", "nodes"] and parts[4] == "overlay":
                self._overlay(parts[3], parts[5])
            else:
                self._send(404, b"no such route\n", "text/plain")

        def _overlay(self, node: str, kind: str) -> None:
            if self.headers.get("X-Bootd-Token") != node_token(st.secret, node):
                self._send(403, f"missing or wrong X-Bootd-Token for node {node!r}\n".encode(), "text/plain")
                return
            if kind not in ("system", "runtime") or st.overlay_fail:
                self._send(500, f"cannot render the overlays of {node}: node {node}: overlay site: etc/site.j2:3: "
                                "undefined: 'dict object' has no attribute 'rack'\n".encode(), "text/plain")
                return
            data = st.overlay(node, kind)
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            with st.lock, st.events.with_suffix(".overlay.jsonl").open("a") as fh:  # not node events
                fh.write(json.dumps({"node": node, "kind": kind, "etag": etag,
                                     "inm": self.headers.get("If-None-Match")}) + "\n")
            if self.headers.get("If-None-Match") == etag:
                self._send(304, b"", extra={"ETag": etag})
                return
            self._send(200, data, "application/x-tar", {"ETag": etag})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            parts = self.path.strip("/").split("/")
            if len(parts) == 5 and parts[:3] == ["api", "v1", "nodes"] and parts[4] in ("events", "heartbeat"):
                st.record(parts[3], self.path, body, self.headers.get("X-Bootd-Token"))
                self._send(200, b"{}", "application/json")
            else:
                self._send(404, b"no such route\n", "text/plain")

    return Handler


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("--bind", required=True)
    sv.add_argument("--port", type=int, required=True)
    sv.add_argument("--store", required=True)
    sv.add_argument("--stage1", required=True)
    sv.add_argument("--capsule", default="busybox")
    sv.add_argument("--kernel-args", default="console=ttyS0 quiet panic=-1")
    sv.add_argument("--events", required=True)
    sv.add_argument("--corrupt", action="append")
    sv.add_argument("--busy", type=int, default=0)
    sv.add_argument("--drop", type=int, default=0)
    sv.add_argument("--runtime-file")
    sv.add_argument("--overlay-fail", action="store_true")
    args = ap.parse_args()
    st = Standin(args)
    st.base = f"http://{args.bind}:{args.port}"
    server = ThreadingHTTPServer((args.bind, args.port), make_handler(st))
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
