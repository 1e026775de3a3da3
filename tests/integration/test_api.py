"""The admin API a front end drives, against a real `bootd serve` and a real `bootd helper`.

The daemon only queues capsule jobs; the helper (another process, as the
systemd unit runs it) claims and runs them, so these tests follow jobs to
completion the way a front end would: POST, then GET the job until it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bootd.net.http.admin import ADMIN_ROUTES
from tests.conftest import PYTHON, ROOT, free_port, run_cli, write_config
from tests.integration.test_capsule_build import CACHE, RECIPE


@dataclass
class Api:
    base: str
    token: str
    config: Path
    imports: Path
    state: Path

    def call(self, method: str, path: str, body: Any = None, *, token: str | None = "",
             content_type: str = "application/json") -> tuple[int, Any, dict[str, str]]:
        data = None
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        tok = self.token if token == "" else token
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw, status, headers = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raw, status, headers = exc.read(), exc.code, dict(exc.headers)
        text = raw.decode()
        try:
            return status, json.loads(text), headers
        except ValueError:
            return status, text, headers

    def wait_job(self, job_id: str, timeout: float = 900) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen_progress = False
        while True:
            status, job, _ = self.call("GET", f"/api/v1/jobs/{job_id}")
            assert status == 200, job
            seen_progress |= bool(job["progress"])
            if job["state"] in ("done", "failed"):
                job["seen_progress"] = seen_progress
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.3)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (OSError, urllib.error.HTTPError):
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    d = tmp_path_factory.mktemp("api")
    port, admin_port = free_port(), free_port()
    imports = d / "imports"
    imports.mkdir()
    config = write_config(d / "bootd.toml", {
        "server": {"state_dir": str(d / "state"), "address": "127.0.0.1", "graceful_timeout": 3},
        "http": {"listen": "127.0.0.1", "port": port},
        "admin": {"port": admin_port},
        "capsule": {"dir": str(d / "capsules"), "build_cache": str(CACHE), "import_dirs": [str(imports)]},
    })
    procs = []
    try:
        log = d / "serve.log"
        serve = subprocess.Popen([PYTHON, "-m", "bootd", "-c", str(config), "serve"], cwd=ROOT,
                                 stdout=log.open("w"), stderr=subprocess.STDOUT)
        procs.append(serve)
        _wait_http(f"http://127.0.0.1:{port}/healthz", serve, log)
        # Its own session: a build's mmdebstrap children go with it at the end (systemd kills the unit's cgroup).
        helper = subprocess.Popen([PYTHON, "-m", "bootd", "-c", str(config), "helper", "--poll", "0.2"], cwd=ROOT,
                                  stdout=(d / "helper.log").open("w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(helper)
        yield Api(f"http://127.0.0.1:{admin_port}", (d / "state" / "admin-token").read_text().strip(), config,
                  imports, d / "state")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(procs[-1].pid, signal.SIGKILL)  # what the helper's session started and left


def _doc_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}


def test_openapi_document_matches_the_router(api: Api) -> None:
    from bootd.compose import services
    from bootd.config import Config
    from bootd.metrics import HttpMetrics, make_registry
    from bootd.net.http.admin import AdminServer
    from bootd.store.memory import memory_store

    status, doc, _ = api.call("GET", "/api/v1/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    _, svc = services(Config(), store=memory_store())
    server = AdminServer(Config(), svc, HttpMetrics(make_registry()))
    routed = {(r.method, r.resource.canonical) for r in server.app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    # The status page's own routes (/status...) take its session cookie, not the API's credential; the
    # README's "Status page" documents them.
    api = {(m, p) for m, p in routed if not p.startswith("/status")}
    assert api == _doc_routes(doc), "routes and /api/v1/openapi.json disagree"
    # The public listener answers every admin API path, and the page, with where the admin API is.
    assert {path for _, path in api} | {"/status"} == set(ADMIN_ROUTES)
    for ref in json.dumps(doc).split('"$ref": "#/components/schemas/')[1:]:
        assert ref.split('"')[0] in doc["components"]["schemas"]


def test_every_route_but_the_document_needs_the_admin_credential(api: Api) -> None:
    _, doc, _ = api.call("GET", "/api/v1/openapi.json", token=None)
    for method, path in sorted(_doc_routes(doc)):
        if path == "/api/v1/openapi.json":
            continue
        concrete = (path.replace("{name}", "n0000").replace("{target}", "n0000")
                    .replace("{id}", "20260101000000-00000000"))
        if path == "/api/v1/events":
            continue  # a stream: checked below
        for token in (None, "wrong"):
            status, text, headers = api.call(method, concrete, {} if method in ("POST", "PUT") else None,
                                             token=token)
            assert status == 401, (method, path, status, text)
            assert "admin-token" in text and headers.get("WWW-Authenticate") == "Bearer"
    assert api.call("GET", "/api/v1/events", token=None)[0] == 401


def test_event_stream_for_programs(api: Api) -> None:
    """GET /api/v1/events with the admin credential: a hello, then the node updates as they happen."""
    req = urllib.request.Request(api.base + "/api/v1/events", headers={"Authorization": f"Bearer {api.token}"})
    with urllib.request.urlopen(req, timeout=30) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert b"event: hello" in stream.readline() + stream.readline() + stream.readline()
        status, _, _ = api.call("POST", "/api/v1/nodes", "ev1 52:54:00:0e:00:01\n", content_type="text/plain")
        assert status == 201
        assert api.call("POST", "/api/v1/nodes/ev1", {"enabled": False})[0] == 200
        seen = b""
        deadline = time.monotonic() + 20
        while b"ev1" not in seen and time.monotonic() < deadline:
            seen += stream.readline()
        assert b"ev1" in seen and b"disabled" in seen, seen[-500:]
    assert api.call("DELETE", "/api/v1/nodes/ev1")[0] == 200


def _rack(n: int, bad_line: int | None = None) -> str:
    lines = ["# rack 7, from the inventory export", ""]
    for i in range(n):
        mac = f"52:54:00:07:{i >> 8:02x}:{i & 255:02x}"
        ip = f"10.7.{i >> 8}.{(i & 255) + 1}" if (i & 255) < 250 else ""
        extra = f" ip={ip}" if ip else ""
        lines.append(f"r7n{i:04d} {mac}{extra} bmc=10.8.{i >> 8}.{i & 255} rack=r7")
    if bad_line is not None:
        lines[bad_line - 1] = "r7bad 52:54:00:zz:00:01"
    return "\n".join(lines) + "\n"


def test_bulk_create_is_all_or_nothing_and_names_the_line(api: Api) -> None:
    # 1,000 nodes with one bad MAC on line 503: refused, the error names the line, nothing applied.
    status, text, _ = api.call("POST", "/api/v1/nodes", _rack(1000, bad_line=503), content_type="text/plain")
    assert status == 400 and "line 503" in text and "mac" in text.lower(), text
    assert api.call("GET", "/api/v1/nodes")[1]["nodes"] == []
    # A duplicate inside the file names both lines; a conflict with the registry names the line too.
    dup = _rack(3) + "r7n0001 52:54:00:07:ff:01\n"
    status, text, _ = api.call("POST", "/api/v1/nodes", dup, content_type="text/plain")
    assert status == 400 and "line 6" in text and "line 4" in text, text
    status, text, _ = api.call("POST", "/api/v1/nodes", {"nodes": [{"name": "x1", "mac": "52:54:00:07:00:01",
                                                                     "group": "nosuch"}]})
    assert status == 400 and "line 1" in text and "nosuch" in text, text

    t0 = time.monotonic()
    status, body, _ = api.call("POST", "/api/v1/nodes", _rack(1000), content_type="text/plain")
    took = time.monotonic() - t0
    assert status == 201 and body["added"] == 1000, body
    page = api.call("GET", "/api/v1/nodes?limit=10000")[1]["nodes"]
    assert len(page) == 1000
    first = next(n for n in page if n["name"] == "r7n0000")
    assert first["ip"] == "10.7.0.1" and first["vars"] == {"bmc.address": "10.8.0.0", "rack": "r7"}
    print(f"bulk create of 1,000 nodes: {took:.2f} s")
    # The same names again: 409-free 400? No: a conflict with the registry is a 409 naming the line.
    again = api.call("POST", "/api/v1/nodes", {"nodes": [{"name": "new1", "mac": "52:54:00:07:99:99"},
                                                          {"name": "r7n0005", "mac": "52:54:00:07:99:98"}]})
    assert again[0] == 409 and "line 2" in again[1] and "r7n0005" in again[1], again
    assert api.call("GET", "/api/v1/nodes/new1")[0] == 404  # all or nothing

    status, body, _ = api.call("DELETE", "/api/v1/nodes/r7n[0000-0999]")
    assert status == 200 and body["deleted"] == "r7n[0000-0999]"
    assert api.call("GET", "/api/v1/nodes")[1]["nodes"] == []


def test_groups_through_the_api_and_the_cli_agree(api: Api) -> None:
    status, group, _ = api.call("PUT", "/api/v1/groups/gpu", {"kernel_args": "quiet", "vars": {"bmc.user": "admin"}})
    assert status == 200 and group["vars"] == {"bmc.user": "admin"}, group
    status, group, _ = api.call("PUT", "/api/v1/groups/gpu", {"capsule": "rocky9"})
    assert status == 200 and group["kernel_args"] == "quiet" and group["capsule"] == "rocky9"
    shown = json.loads(run_cli("group", "show", "gpu", "--json", config=api.config, check=True).stdout)
    assert shown["capsule"] == "rocky9" and shown["vars"] == {"bmc.user": "admin"}
    assert api.call("PUT", "/api/v1/groups/gpu", {"color": "red"})[0] == 400
    assert "gpu" in [g["name"] for g in api.call("GET", "/api/v1/groups")[1]]
    assert api.call("DELETE", "/api/v1/groups/gpu")[0] == 200
    assert api.call("GET", "/api/v1/groups/gpu")[0] == 404


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("template\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(300_000))
    return root


def test_capsule_import_job_runs_in_the_helper_with_progress(api: Api, tmp_path: Path) -> None:
    src = _tree(api.imports / "tiny")
    status, job, headers = api.call("POST", "/api/v1/capsules/tiny/import", {"source": str(src)})
    assert status == 202 and job["state"] == "queued" and headers["Location"] == f"/api/v1/jobs/{job['id']}"
    done = api.wait_job(job["id"], timeout=120)
    assert done["state"] == "done", done
    assert done["progress"]["done"] == done["progress"]["total"] > 300_000
    assert done["pid"] != os.getpid()  # ran in the helper process
    caps = {c["name"]: c for c in api.call("GET", "/api/v1/capsules")[1]}
    assert caps["tiny"]["version"] == done["result"]["version"]
    status, shown, _ = api.call("GET", "/api/v1/capsules/tiny")
    assert status == 200 and shown["history"][-1]["version"] == done["result"]["version"]
    assert done["id"] in [j["id"] for j in api.call("GET", "/api/v1/jobs")[1]]

    # Outside the import directories, directly or through a symlink: refused at once, nothing queued.
    outside = _tree(tmp_path / "outside")
    (api.imports / "sneaky").symlink_to(outside)
    before = len(api.call("GET", "/api/v1/jobs")[1])
    for source in (str(outside), str(api.imports / "sneaky"), str(api.imports / ".." / "state"), "relative/x"):
        status, text, _ = api.call("POST", "/api/v1/capsules/evil/import", {"source": source})
        assert status == 400 and ("outside the import directories" in text or "absolute path" in text), text
    assert len(api.call("GET", "/api/v1/jobs")[1]) == before
    assert api.call("POST", "/api/v1/capsules/bad%20name/import", {"source": str(src)})[0] == 400

    # A source that breaks in the job: failed, with the reason, and no capsule published.
    broken = api.imports / "broken.tar"
    broken.write_bytes(b"not a tar at all" * 100)
    job = api.call("POST", "/api/v1/capsules/broken/import", {"source": str(broken)})[1]
    failed = api.wait_job(job["id"], timeout=120)
    assert failed["state"] == "failed" and failed["error"], failed
    assert "broken" not in {c["name"] for c in api.call("GET", "/api/v1/capsules")[1]}

    # Delete, then gc as a job.
    assert api.call("DELETE", "/api/v1/capsules/tiny")[0] == 200
    assert api.call("GET", "/api/v1/capsules/tiny")[0] == 404
    gc = api.wait_job(api.call("POST", "/api/v1/gc")[1]["id"], timeout=120)
    assert gc["state"] == "done" and gc["result"]["removed_chunks"] >= 1, gc


def test_overlays_are_listed_without_rendered_secrets(api: Api) -> None:
    rows = {o["name"]: o for o in api.call("GET", "/api/v1/overlays")[1]}
    assert rows["ssh-host-keys"]["secret"] is True and rows["hosts"]["kind"] == "runtime"
    status, shown, _ = api.call("GET", "/api/v1/overlays/hostname")
    assert status == 200 and "etc/hostname" in shown["files"]
    assert api.call("GET", "/api/v1/overlays/nosuch")[0] == 404


@pytest.mark.timeout(1800)  # the package cache is shared (flocked) with other builds of the suite
@pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap root mode needs root")
def test_capsule_build_job_followed_to_completion(api: Api) -> None:
    if shutil.which("mmdebstrap") is None:
        pytest.fail("mmdebstrap is not installed; run tools/setup.sh (make test does)")
    (api.imports / "hello.sh").write_text("#!/bin/sh\necho hello from a recipe\n")
    recipe = api.imports / "mini.toml"
    recipe.write_text(RECIPE.format(packages="", extra="", commands='"echo api > /etc/built-by-recipe"'))
    status, job, _ = api.call("POST", "/api/v1/capsules/mini/build", {"recipe": str(recipe)})
    assert status == 202, job
    done = api.wait_job(job["id"])
    assert done["state"] == "done", done
    assert done["seen_progress"] and done["result"]["name"] == "mini"
    assert done["result"]["mmdebstrap_seconds"] > 0
    assert "mini" in {c["name"] for c in api.call("GET", "/api/v1/capsules")[1]}
    # Files the root helper wrote under the daemon's directories stay readable by the daemon's user.
    assert all(p.stat().st_uid == api.state.stat().st_uid for p in (api.state / "jobs").iterdir())


def test_cli_import_uses_the_same_definition_rules(api: Api, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("c1 52:54:00:0c:00:01\nc2 52:54:00:0c:00:01\n")
    r = run_cli("node", "import", str(bad), config=api.config)
    assert r.returncode == 1 and "line 2" in r.stderr and "line 1" in r.stderr, r.stderr
    good = tmp_path / "good.txt"
    good.write_text("c1 52:54:00:0c:00:01\nc2 52:54:00:0c:00:02 ip=10.12.0.2\n")
    r = run_cli("node", "import", str(good), config=api.config, check=True)
    assert "added 2 nodes: c[1-2]" in r.stdout
    assert api.call("GET", "/api/v1/nodes/c2")[1]["ip"] == "10.12.0.2"
    assert api.call("DELETE", "/api/v1/nodes/c[1-2]")[0] == 200
