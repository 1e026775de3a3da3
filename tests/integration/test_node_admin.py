"""One node change through the admin API and through the CLI: the same stored result, the same refusals.

A real `bootd serve` owns the registry; the CLI (another process, with the daemon running) builds the
same services over the same SQLite file.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ROOT, free_port, run_cli, write_config


def _call(url: str, body: Any | None = None, token: str | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def served(tmp_path: Path) -> Any:
    port, admin_port = free_port(), free_port()
    state = tmp_path / "state"
    config = write_config(tmp_path / "bootd.toml", {
        "server": {"state_dir": str(state), "address": "127.0.0.1", "graceful_timeout": 3},
        "http": {"listen": "127.0.0.1", "port": port},
        "admin": {"port": admin_port},
    })
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([PYTHON, "-m", "bootd", "-c", str(config), "serve"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if _call(base + "/healthz")[0] == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
        time.sleep(0.1)
    try:
        # The admin API listens on its own port ([admin]), on localhost.
        yield config, f"http://127.0.0.1:{admin_port}", (state / "admin-token").read_text().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _stored(config: Path, name: str) -> dict[str, Any]:
    [node] = json.loads(run_cli("node", "show", name, "--json", config=config, check=True).stdout)
    return {k: node[k] for k in ("group", "capsule", "kernel_args", "enabled", "approved", "state", "vars")}


def test_same_change_same_result_same_error(served: Any) -> None:
    config, base, token = served
    run_cli("group", "add", "gpu", config=config, check=True)
    for i in (1, 2):
        run_cli("node", "add", f"c{i}", "--mac", f"52:54:00:00:0a:0{i}", config=config, check=True)

    change = {"group": "gpu", "capsule": "rocky9", "kernel_args": "quiet", "enabled": False,
              "vars": {"role": "worker"}}
    status, text = _call(f"{base}/api/v1/nodes/c1", change, token)
    assert status == 200, text
    run_cli("node", "set", "c2", "--group", "gpu", "--capsule", "rocky9", "--kernel-args", "quiet",
            "--disable", "--var", "role=worker", config=config, check=True)
    one, two = _stored(config, "c1"), _stored(config, "c2")
    assert one == two
    assert one["state"] == "disabled" and one["enabled"] is False  # the rule, applied by the one service

    # Bad values: the same words from both, and nothing applied.
    for body, args in (
        ({"mac": "zz:zz"}, ["--mac", "zz:zz"]),
        ({"group": "nosuch"}, ["--group", "nosuch"]),
        ({"vars": {"bad key": "x"}}, ["--var", "bad key=x"]),
    ):
        status, api_error = _call(f"{base}/api/v1/nodes/c1", body, token)
        assert status in (400, 404), api_error
        cli = run_cli("node", "set", "c1", *args, config=config)
        assert cli.returncode == 1
        assert cli.stderr.strip() == f"bootd: error: {api_error.strip()}"
    assert _stored(config, "c1") == one

    # Types are checked: the string "false" does not enable (or disable) anything.
    status, text = _call(f"{base}/api/v1/nodes/c1", {"enabled": "false"}, token)
    assert status == 400 and "enabled: expected true or false" in text

    # Enabling starts the node over at `discovered`, whichever way it comes.
    assert _call(f"{base}/api/v1/nodes/c1", {"enabled": True}, token)[0] == 200
    run_cli("node", "set", "c2", "--enable", config=config, check=True)
    assert _stored(config, "c1") == _stored(config, "c2")
    assert _stored(config, "c1")["state"] == "discovered"

    # Every admin write is on record: who (the API caller's address, the CLI's user), what, when.
    state = Path(str(config)).parent / "state"
    audit = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
    assert (state / "audit.log").stat().st_mode & 0o777 == 0o600
    api = [a for a in audit if a["who"].startswith("api:127.0.0.1") and a["target"] == "c1"]
    cli = [a for a in audit if a["who"].startswith("cli:") and a["target"] == "c2"]
    assert [a["action"] for a in api] == ["node.set", "node.set"] and api[0]["details"]["vars"] == ["role"]
    assert [a["action"] for a in cli] == ["node.add", "node.set", "node.set"]
    assert "worker" not in (state / "audit.log").read_text()  # variable values (secrets) are not logged
