"""Overlays on the node side, on the build host against the stand-in server over loopback (seconds each):
the stage one writes the system and runtime overlays into the new root and runs the apply hooks; a render
error is a `failed` boot naming the template; the node agent refreshes the runtime overlay with one 304
while it is unchanged and applies a change file by file (rename), then the hooks. The QEMU test
(test_overlay_boot.py) shows the same with bootd's shipped overlays on a Debian capsule."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from bootd.stage1.build import HERE as STAGE1_SRC
from tests.qemu import standin
from tests.qemu.conftest import SampleCapsule, StandinProc, StartStandin, need_host_tools
from tests.qemu.test_agent_host import fetch_mode, fetcher, run_agent  # noqa: F401  (fixtures)

NODE_AGENT = STAGE1_SRC / "node-agent.sh"
OVERLAY = STAGE1_SRC / "overlay.sh"


def overlay_requests(server: StandinProc) -> list[dict[str, str]]:
    log = server.events.with_suffix(".overlay.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_stage_one_writes_both_overlays_and_runs_the_hooks(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetch_mode: str) -> None:  # noqa: F811
    runtime = tmp_path / "runtime.txt"
    runtime.write_text("first\n")
    server = loopback_standin("--runtime-file", str(runtime))
    proc, target = run_agent(tmp_path, server, sample_capsule.vid, fetch_mode)
    assert proc.returncode == 0, proc.stderr
    assert "BOOTD-STAGE1 overlay system applied etag=" in proc.stderr
    assert "BOOTD-STAGE1 overlay runtime applied etag=" in proc.stderr
    d = target / "etc/bootd-standin"
    assert (target / "etc/hostname").read_text() == "n0001\n"
    assert stat.S_IMODE(d.stat().st_mode) == 0o750  # a directory entry's mode, as the tar says
    assert stat.S_IMODE((d / "system").stat().st_mode) == 0o640
    assert (d / "system").read_text() == "system overlay of n0001\n"
    assert stat.S_IMODE((d / "runtime").stat().st_mode) == 0o600
    assert (d / "hooked").read_text() == "first\n", "the runtime overlay's apply hook ran with BOOTD_ROOT"
    # The ETags applied, for the node agent's first conditional request; the applier is installed with it.
    requests = overlay_requests(server)
    assert [r["kind"] for r in requests] == ["system", "runtime"] and not any(r["inm"] for r in requests)
    assert (target / "var/lib/bootd/overlay-runtime.etag").read_text().strip() == requests[1]["etag"]
    assert os.access(target / "usr/lib/bootd/overlay", os.X_OK)
    assert not list(target.rglob("*.bootd-new")), "no temporary file is left behind"
    events = [e["event"] for e in server.event_lines()]
    assert events[-2:] == ["verified", "booted"]


def test_a_render_error_fails_the_boot_with_the_template_named(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetcher: Path) -> None:  # noqa: F811
    server = loopback_standin("--overlay-fail")
    proc, _ = run_agent(tmp_path, server, sample_capsule.vid, str(fetcher))
    assert proc.returncode == 1
    line = next(x for x in proc.stderr.splitlines() if "FAILED" in x)
    assert line.startswith("BOOTD-STAGE1 FAILED overlay system refused by bootd: ") and \
        "500 Internal Server Error: cannot render the overlays of n0001" in line and "etc/site.j2:3" in line, line
    events = server.event_lines()
    assert events[-1]["event"] == "failed" and "etc/site.j2:3" in str(events[-1]["reason"])
    assert "booted" not in [e["event"] for e in events]


def test_fetcher_get_mode(tmp_path: Path, loopback_standin: StartStandin, fetcher: Path) -> None:  # noqa: F811
    """-g: 200 writes the tar and prints the ETag, a matching If-None-Match gets 304 (exit 4), a wrong token
    is a refusal with bootd's reason (exit 5), no server is worth a retry (exit 1), bad use exits 2."""
    server = loopback_standin()
    out = tmp_path / "o.tar"

    def get(*extra: str, token: str = standin.node_token(b"standin-secret", "n0003")
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(fetcher), "-g", "system", "-o", str(out), "-u", server.base, "-n", "n0003",
                               "-t", "5", *extra], env=dict(os.environ, BOOTD_TOKEN=token),
                              capture_output=True, text=True, timeout=30)

    ok = get()
    assert ok.returncode == 0 and ok.stdout.startswith('"') and len(ok.stdout.strip()) == 66, ok
    assert out.read_bytes()[:12] == b"etc/bootd-st"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    same = get("-e", ok.stdout.strip())
    assert same.returncode == 4 and same.stdout == "", same
    refused = get(token="0" * 32)
    assert refused.returncode == 5 and "403" in refused.stderr and "wrong X-Bootd-Token" in refused.stderr
    gone = subprocess.run([str(fetcher), "-g", "runtime", "-o", str(out), "-u", "http://127.0.0.1:9", "-n", "n1",
                           "-t", "2"], env=dict(os.environ, BOOTD_TOKEN="t"), capture_output=True, text=True)
    assert gone.returncode == 1 and "GET overlay/runtime" in gone.stderr
    bad = get("-g", "../etc")
    assert bad.returncode == 2 and "system or runtime" in bad.stderr


@pytest.mark.parametrize("shell", ["busybox sh", "dash"])
def test_node_agent_refreshes_the_runtime_overlay(
        tmp_path: Path, loopback_standin: StartStandin, fetcher: Path, shell: str) -> None:  # noqa: F811
    need_host_tools()
    if shutil.which(shell.split()[0]) is None:
        pytest.skip(f"{shell} missing")
    runtime = tmp_path / "runtime.txt"
    runtime.write_text("one\n")
    server = loopback_standin("--runtime-file", str(runtime))
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(fetcher, lib / "bootd-fetch")
    (lib / "overlay").write_text(f"#!/bin/sh\nexec {shell} {OVERLAY} \"$@\"\n")
    (lib / "overlay").chmod(0o755)
    root = tmp_path / "root"
    (root / "etc/bootd-standin").mkdir(parents=True)
    (root / "etc/bootd-standin/runtime").write_text("stale\n")
    # As on a node: who it is and the interval come from node.env (shell assignments, not exported).
    node_env = tmp_path / "node.env"
    node_env.write_text(f"BOOTD_URL='{server.base}'\nBOOTD_NODE='n0042'\n"
                        f"BOOTD_TOKEN='{standin.node_token(b'standin-secret', 'n0042')}'\n"
                        "BOOTD_HEARTBEAT='1'\nBOOTD_OVERLAY_INTERVAL='1'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTD_")}
    env |= dict(BOOTD_NODE_ENV=str(node_env), BOOTD_OVERLAY_ROOT=str(root), BOOTD_AGENT_LIB=str(lib),
                BOOTD_AGENT_STATE=str(tmp_path / "state"))
    proc = subprocess.Popen([*shell.split(), str(NODE_AGENT)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    target = root / "etc/bootd-standin/runtime"
    try:
        deadline = time.monotonic() + 20
        while (not target.exists() or target.read_text() != "one\n") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert target.read_text() == "one\n"
        first = target.stat().st_ino
        time.sleep(3)  # about three rounds, each a conditional request answered 304
        inms = [r["inm"] for r in overlay_requests(server)]
        assert len(inms) >= 3 and inms[0] is None and all(i == overlay_requests(server)[0]["etag"] for i in inms[1:])
        assert target.stat().st_ino == first, "an unchanged overlay rewrites nothing"
        runtime.write_text("two\n")
        t0 = time.monotonic()
        while target.read_text() != "two\n" and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        assert target.read_text() == "two\n"
        assert target.stat().st_ino != first, "replaced by a rename, not rewritten in place"
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        deadline = time.monotonic() + 5
        while (root / "etc/bootd-standin/hooked").read_text() != "two\n" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (root / "etc/bootd-standin/hooked").read_text() == "two\n"
        # bootd away: logged and retried, never fatal.
        server.proc.terminate()
        server.proc.wait(timeout=10)
        time.sleep(2.5)
        assert proc.poll() is None, "the agent keeps running without bootd"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert "overlay runtime applied etag=" in out and "changed=" in out
    assert "overlay runtime unchanged etag=" in out
    assert "note: overlay runtime not applied (retry in 1s): bootd-fetch: GET overlay/runtime" in out, out
    assert not list(root.rglob("*.bootd-new"))


def test_stage_one_from_a_static_loader_config_asks_bootd_for_its_boot_line(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetcher: Path) -> None:  # noqa: F811
    """PXELINUX with one pxelinux.cfg/default for all nodes passes only bootd.url and BOOTIF (IPAPPEND 2):
    the stage one takes the node's name, capsule and token from bootd's per-node script."""
    server = loopback_standin()
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 bootd.url={server.base} BOOTIF=01-52-54-00-00-12-34\n")
    env = dict(os.environ, BOOTD_HOST_MODE="1", BOOTD_CMDLINE_FILE=str(cmdline), BOOTD_WORK=str(tmp_path / "work"),
               BOOTD_TARGET=str(tmp_path / "target"), BOOTD_FETCH=str(fetcher))
    proc = subprocess.run(["busybox", "sh", str(STAGE1_SRC / "agent.sh")], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"BOOTD-STAGE1 boot line from {server.base}/boot: node=n1234 capsule={sample_capsule.vid}" in proc.stderr
    assert (tmp_path / "target/etc/hostname").read_text() == "n1234\n"
    env_file = (tmp_path / "target/etc/bootd/node.env").read_text()
    assert "BOOTD_MAC='52:54:00:00:12:34'" in env_file
    assert all(e["token_ok"] and e["node"] == "n1234" for e in server.event_lines())
