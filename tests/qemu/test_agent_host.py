"""The stage-one agent on the build host (host mode: no mounts, no DHCP, no switch_root) against the
stand-in server over loopback. These run in a second each, so every fault path the QEMU tests cannot
afford to repeat is covered here with the real busybox, zstd and GNU tar.

Chunks go through the compiled fetcher (bootd-fetch, built from fetch.c as the stage one builds it);
the fault paths also run through the agent's shell-worker fallback (no bootd-fetch in the image)."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bootd.stage1.build import HERE as STAGE1_SRC
from bootd.stage1.build import Stage1Error, compile_fetcher
from tests.qemu import standin
from tests.qemu.conftest import STANDIN, SampleCapsule, StandinProc, StartStandin, need_host_tools

AGENT = STAGE1_SRC / "agent.sh"
SHELL = "shell workers"  # the fetch_mode of an image without bootd-fetch


@pytest.fixture(scope="session")
def fetcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return compile_fetcher(tmp_path_factory.mktemp("fetch") / "bootd-fetch")
    except Stage1Error as exc:
        pytest.skip(f"cannot compile bootd-fetch here: {exc}")


@pytest.fixture(params=["bootd-fetch", SHELL])
def fetch_mode(request: pytest.FixtureRequest, fetcher: Path) -> str:
    """Both ways the agent fetches chunks: the compiled fetcher, and the shell-worker fallback."""
    return str(fetcher) if request.param == "bootd-fetch" else SHELL


def agent_env(tmp_path: Path, server: StandinProc, vid: str, fetch: str, *, node: str = "n0001",
              retries: int = 6, extra: str = "") -> tuple[dict[str, str], Path]:
    need_host_tools()
    token = standin.node_token(b"standin-secret", node)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 bootd.url={server.base} bootd.node={node} bootd.capsule={vid} "
                       f"bootd.token={token} bootd.mac=52:54:00:00:00:01 bootd.retries={retries} {extra}\n")
    target = tmp_path / "target"
    env = dict(os.environ, BOOTD_HOST_MODE="1", BOOTD_CMDLINE_FILE=str(cmdline),
               BOOTD_WORK=str(tmp_path / "work"), BOOTD_TARGET=str(target),
               BOOTD_FETCH="/nonexistent/bootd-fetch" if fetch == SHELL else fetch)
    return env, target


def run_agent(tmp_path: Path, server: StandinProc, vid: str, fetch: str, *, node: str = "n0001",
              timeout: float = 60, retries: int = 6, extra: str = "") -> tuple[subprocess.CompletedProcess[str], Path]:
    env, target = agent_env(tmp_path, server, vid, fetch, node=node, retries=retries, extra=extra)
    proc = subprocess.run(["busybox", "sh", str(AGENT)], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    fetch_line = "fetch with shell workers" if fetch == SHELL else "fetch with bootd-fetch"
    assert fetch_line in proc.stderr or "manifest ok" not in proc.stderr, proc.stderr
    return proc, target


@contextmanager
def agent_until(env: dict[str, str], needle: str, lines: list[str]) -> Iterator[subprocess.Popen[str]]:
    """The agent running, its console read into ``lines`` up to the first line containing ``needle``;
    killed at the end if still running."""
    agent = subprocess.Popen(["busybox", "sh", str(AGENT)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert agent.stderr is not None
        for line in agent.stderr:
            lines.append(line)
            if needle in line:
                break
        assert lines and needle in lines[-1], "".join(lines)
        yield agent
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    stack = [cmp]
    while stack:
        c = stack.pop()
        if c.left_only or c.diff_files or c.funny_files:
            return False
        stack.extend(c.subdirs.values())
    return True


def test_agent_fetches_verifies_and_unpacks(tmp_path: Path, loopback_standin: StartStandin,
                                            sample_capsule: SampleCapsule, fetch_mode: str) -> None:
    server = loopback_standin()
    proc, target = run_agent(tmp_path, server, sample_capsule.vid, fetch_mode,
                             extra="bootd.var.ROLE=compute bootd.var.MOTD=it's$(reboot) bootd.var.9bad=x")
    assert proc.returncode == 0, proc.stderr
    count = len(standin.chunk_hashes(sample_capsule.store, sample_capsule.vid))
    assert f"BOOTD-STAGE1 verified {count}/{count} chunks" in proc.stderr
    assert f"BOOTD-STAGE1 fetching {count}/{count}" in proc.stderr
    assert same_tree(sample_capsule.root, target)
    assert (target / "etc/hostname").read_text() == "n0001\n"
    env = (target / "etc/bootd/node.env").read_text()
    token = standin.node_token(b"standin-secret", "n0001")
    assert f"BOOTD_NODE='n0001'\nBOOTD_TOKEN='{token}'" in env
    # node.env is shell syntax: sourcing it gives back the values, the odd ones included.
    probe = subprocess.run(["busybox", "sh", "-c", f". {target}/etc/bootd/node.env; echo \"$ROLE|$MOTD\""],
                           capture_output=True, text=True, check=True)
    assert probe.stdout == "compute|it's$(reboot)\n"
    events = [e["event"] for e in server.event_lines()]
    assert events[0] == "stage1" and events[-2:] == ["verified", "booted"]
    assert all(e["token_ok"] for e in server.event_lines())


def test_corrupted_chunk_is_reported_by_hash_and_never_booted(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetch_mode: str) -> None:
    bad = standin.chunk_hashes(sample_capsule.store, sample_capsule.vid)[-1]
    server = loopback_standin("--corrupt", bad)
    proc, target = run_agent(tmp_path, server, sample_capsule.vid, fetch_mode)
    assert proc.returncode == 1
    assert f"BOOTD-STAGE1 FAILED chunk {bad} failed verification (got sha256 " in proc.stderr
    assert f"chunk {bad} failed verification, fetching it again" in proc.stderr  # refetched once
    events = server.event_lines()
    assert events[-1]["event"] == "failed" and bad in str(events[-1]["reason"])
    assert not any(e["event"] in ("verified", "booted") for e in events)
    assert not (target / "etc/bootd/node.env").exists()


def test_manifest_not_matching_version_id_is_refused(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetcher: Path) -> None:
    fake_vid = "0" * 64
    store = sample_capsule.store
    (store / "manifests" / fake_vid).write_bytes((store / "manifests" / sample_capsule.vid).read_bytes())
    try:
        server = loopback_standin()
        proc, _ = run_agent(tmp_path, server, fake_vid, str(fetcher))
    finally:
        (store / "manifests" / fake_vid).unlink()
    assert proc.returncode == 1
    assert "manifest failed verification" in proc.stderr
    assert server.event_lines()[-1]["event"] == "failed"


def test_busy_server_503_is_retried(tmp_path: Path, loopback_standin: StartStandin,
                                    sample_capsule: SampleCapsule, fetch_mode: str) -> None:
    server = loopback_standin("--busy", "3")
    proc, target = run_agent(tmp_path, server, sample_capsule.vid, fetch_mode)
    assert proc.returncode == 0, proc.stderr
    assert "in 1s (server busy, 503)" in proc.stderr  # Retry-After was read and honoured
    assert same_tree(sample_capsule.root, target)


def test_dropped_connection_resumes_with_range(tmp_path: Path, loopback_standin: StartStandin,
                                               sample_capsule: SampleCapsule, fetch_mode: str) -> None:
    server = loopback_standin("--drop", "2")
    proc, target = run_agent(tmp_path, server, sample_capsule.vid, fetch_mode)
    assert proc.returncode == 0, proc.stderr
    assert same_tree(sample_capsule.root, target)
    assert "range=bytes=" in server.log.read_text(), "the retry should continue the partial chunk"


def test_missing_chunk_is_fatal_at_once_and_named(tmp_path: Path, loopback_standin: StartStandin,
                                                  sample_capsule: SampleCapsule, fetch_mode: str) -> None:
    """A 404 is not retried (nor are 403/410/500): the node fails fast, naming the chunk."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data.bin").write_bytes(os.urandom(600_000))
    stream = subprocess.run(["tar", "--format=pax", "-C", str(tree), "-cf", "-", "."], capture_output=True,
                            check=True).stdout
    vid = standin.make_capsule_from_tar(stream, sample_capsule.store, "missing")
    gone = standin.chunk_hashes(sample_capsule.store, vid)[1]
    (sample_capsule.store / "chunks" / gone[:2] / gone).unlink()
    server = loopback_standin()
    t0 = time.monotonic()
    proc, target = run_agent(tmp_path, server, vid, fetch_mode, retries=10)
    assert proc.returncode == 1
    assert f"BOOTD-STAGE1 FAILED chunk {gone} could not be fetched: " in proc.stderr
    assert "404" in proc.stderr
    assert f"retry http://127.0.0.1:{server.base.rsplit(':', 1)[1]}/chunks/{gone}" not in proc.stderr
    assert time.monotonic() - t0 < 20, "a 404 must not be retried with backoff"
    assert gone in str(server.event_lines()[-1]["reason"])
    assert not (target / "data.bin").exists() or (target / "data.bin").stat().st_size < 600_000


def test_sources_on_the_command_line_take_over_bad_bytes_and_a_dead_server(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetch_mode: str) -> None:
    """bootd.sources: the node's server sends one chunk wrong, and later it is gone (before the node
    reports `verified`); the chunk comes right from the second source, and the events go there too."""
    bad = standin.chunk_hashes(sample_capsule.store, sample_capsule.vid)[1]
    first = loopback_standin("--corrupt", bad)
    second = loopback_standin()
    env, target = agent_env(tmp_path, first, sample_capsule.vid, fetch_mode, extra=f"bootd.sources={second.base}")
    lines: list[str] = []
    with agent_until(env, "failed verification", lines) as agent:
        first.proc.kill()  # kill -9 of the node's server mid-boot
        first.proc.wait(timeout=10)
        assert agent.stderr is not None
        lines.extend(agent.stderr)
        assert agent.wait(timeout=90) == 0, "".join(lines)
    err = "".join(lines)
    assert same_tree(sample_capsule.root, target)
    assert f"chunk {bad} failed verification" in err, err
    got = [e["event"] for e in second.event_lines()]
    assert got[-2:] == ["verified", "booted"], (got, err)
    assert f"BOOTD_URL='{second.base}'" in (target / "etc/bootd/node.env").read_text()


def test_node_agent_heartbeats_fail_over_when_the_booting_server_is_killed(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetch_mode: str) -> None:
    """The stage one boots from its server (bootd.sources names a second one) and writes node.env; the node
    agent it installed reports `ready` and heartbeats there; after a kill -9 of that server its heartbeats
    go to the second source and stay there (bootd-fetch -p, or busybox wget in an image without it)."""
    first = loopback_standin()
    second = loopback_standin()
    env, target = agent_env(tmp_path, first, sample_capsule.vid, fetch_mode, extra=f"bootd.sources={second.base}")
    env["BOOTD_NODE_AGENT"] = str(STAGE1_SRC / "node-agent.sh")
    proc = subprocess.run(["busybox", "sh", str(AGENT)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    node_env = target / "etc/bootd/node.env"
    assert f"BOOTD_SOURCES='{first.base},{second.base}'" in node_env.read_text()
    lib = target / "usr/lib/bootd"
    assert (lib / "bootd-fetch").exists() == (fetch_mode != SHELL)

    def beats(server: StandinProc) -> int:
        return sum(1 for e in server.event_lines() if e["route"] == "heartbeat")

    def wait_beats(server: StandinProc, count: int, what: str) -> None:
        deadline = time.monotonic() + 30
        while beats(server) < count:
            assert agent.poll() is None, f"the node agent exited ({agent.returncode})"
            assert time.monotonic() < deadline, f"{what}: {server.event_lines()[-5:]}"
            time.sleep(0.1)

    # Overlays off (they would be applied to this host's root): this test is about the reports.
    agent_env_ = dict(os.environ, BOOTD_NODE_ENV=str(node_env), BOOTD_AGENT_LIB=str(lib), BOOTD_HEARTBEAT="1",
                      BOOTD_AGENT_STATE=str(tmp_path / "agent-state"), BOOTD_OVERLAY_INTERVAL="0",
                      BOOTD_OVERLAY_ROOT=str(target))
    agent = subprocess.Popen(["busybox", "sh", str(lib / "node-agent")], env=agent_env_, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        first.wait_event("ready", timeout=30)
        wait_beats(first, 1, "no heartbeat reached the booting server")
        first.proc.kill()  # kill -9 of the server that booted the node
        first.proc.wait(timeout=10)
        before = len(second.event_lines())
        wait_beats(second, 3, "no heartbeats reached the second source after the first was killed")
    finally:
        agent.terminate()
        out, _ = agent.communicate(timeout=10)
    assert f"now reporting to {second.base}" in out, out
    assert out.count("now reporting to") == 1, out  # it stays on the second source: no switch per beat
    after = second.event_lines()[before:]
    assert after and all(e["route"] == "heartbeat" and e["token_ok"] for e in after), after
    assert "heartbeat to" not in out, out  # no failed heartbeat: the failover happened within the beat


def test_server_restarted_mid_fetch_is_retried_until_it_is_back(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, stage1_or_none: Path,
        fetcher: Path) -> None:
    """The server process goes away while bootd-fetch holds keep-alive connections and has chunks left
    to fetch (one is waiting out a 503), and a new one starts on the same port: the fetcher reconnects,
    retries with backoff and completes, and its progress events carry the node's token."""
    server = loopback_standin("--busy", "1")
    env, target = agent_env(tmp_path, server, sample_capsule.vid, str(fetcher))
    second: subprocess.Popen[bytes] | None = None
    lines: list[str] = []
    try:
        with agent_until(env, "(server busy, 503)", lines) as agent:
            server.proc.terminate()  # the restart: the old process is gone before the 503's wait ends
            server.proc.wait(timeout=10)
            time.sleep(2.0)
            port = server.base.rsplit(":", 1)[1]
            log = (tmp_path / "standin-second.log").open("wb")
            second = subprocess.Popen(
                [sys.executable, str(STANDIN), "serve", "--bind", "127.0.0.1", "--port", port, "--store",
                 str(sample_capsule.store), "--stage1", str(stage1_or_none), "--events", str(server.events)],
                stdout=log, stderr=subprocess.STDOUT)
            log.close()
            assert agent.stderr is not None
            lines.extend(agent.stderr)
            assert agent.wait(timeout=60) == 0, "".join(lines)
    finally:
        if second is not None:
            second.terminate()
            second.wait(timeout=10)
    err = "".join(lines)
    assert "BOOTD-STAGE1 retry http://" in err and "Connection refused" in err, err
    assert same_tree(sample_capsule.root, target)
    assert "range=" in (tmp_path / "standin-second.log").read_text(), "the new server served the rest"
    events = server.event_lines()
    assert all(e["token_ok"] for e in events)
    assert [e["event"] for e in events][-2:] == ["verified", "booted"]
    assert all(e["event"] != "failed" for e in events)


def chunk_table(store: Path, vid: str, path: Path) -> list[int]:
    """The agent's chunk table ("<sha256> <stored size hex> <raw size hex>" lines); returns the sizes."""
    manifest = (store / "manifests" / vid).read_bytes()
    off = 16 + int.from_bytes(manifest[8:12], "big")
    recs = [manifest[off + 40 * i : off + 40 * (i + 1)] for i in range(len(standin.chunk_hashes(store, vid)))]
    path.write_text("".join(f"{r[:32].hex()} {r[32:36].hex()} {r[36:40].hex()}\n" for r in recs))
    return [int.from_bytes(r[32:36], "big") for r in recs]


def test_fetcher_reports_progress_at_most_once_a_second(tmp_path: Path, loopback_standin: StartStandin,
                                                        sample_capsule: SampleCapsule, fetcher: Path) -> None:
    """A slow unpacker: bootd-fetch prints "fetching i/N" and POSTs the `fetching` event with the node's
    token, at most once a second, and ends with "fetching N/N"."""
    sizes = chunk_table(sample_capsule.store, sample_capsule.vid, tmp_path / "table")
    server = loopback_standin()
    token = standin.node_token(b"standin-secret", "n0001")
    proc = subprocess.Popen([str(fetcher), "-u", server.base, "-n", "n0001", str(tmp_path / "table")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, BOOTD_TOKEN=token))
    assert proc.stdout is not None and proc.stderr is not None
    t0 = time.monotonic()
    got = 0
    while chunk := proc.stdout.read(64 * 1024):  # about 3.5 s for the sample capsule
        got += len(chunk)
        time.sleep(0.07)
    elapsed = time.monotonic() - t0
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=10) == 0, err
    assert got == sum(sizes)
    count = len(sizes)
    lines = [ln for ln in err.splitlines() if ln.startswith("BOOTD-STAGE1 fetching ")]
    assert lines[-1] == f"BOOTD-STAGE1 fetching {count}/{count}", err
    mid = [int(ln.split()[-1].split("/")[0]) for ln in lines[:-1]]
    assert mid and all(0 < d < count for d in mid) and mid == sorted(mid), err
    assert len(mid) <= elapsed + 1
    events = server.event_lines()
    assert [e["done"] for e in events if e["event"] == "fetching"] == mid
    assert all(e["token_ok"] and e["total"] == count for e in events)
    # Stored bytes, for the status page: the bytes of the chunks written so far, of all of them.
    assert all(e["bytes_total"] == sum(sizes) and e["bytes"] == sum(sizes[: e["done"]]) for e in events), events


def test_fetcher_stays_within_its_window_of_the_writer(tmp_path: Path, loopback_standin: StartStandin,
                                                      sample_capsule: SampleCapsule, fetcher: Path) -> None:
    """RAM stays bounded: while nobody reads its output, bootd-fetch fetches no more than WINDOW chunks."""
    hashes = standin.chunk_hashes(sample_capsule.store, sample_capsule.vid)
    assert len(hashes) > 4
    table = tmp_path / "table"
    sizes = chunk_table(sample_capsule.store, sample_capsule.vid, table)
    server = loopback_standin()
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([str(fetcher), "-u", server.base, "-w", "4", "-W", "2", str(table)], stdout=write_end,
                            stderr=subprocess.PIPE)
    os.close(write_end)
    try:
        time.sleep(1.5)
        # The pipe takes 64 KiB; the writer is stuck on the first chunk that does not fit in it.
        fit = next(i for i in range(len(sizes)) if sum(sizes[: i + 1]) > 65536)
        served = server.log.read_text().count("chunk ")
        assert served == min(len(hashes), fit + 2), server.log.read_text()
        data = b""
        while chunk := os.read(read_end, 1 << 20):
            data += chunk
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)
    store = sample_capsule.store / "chunks"
    assert data == b"".join((store / h[:2] / h).read_bytes() for h in hashes)
    assert server.log.read_text().count("chunk ") == len(hashes)


def test_server_down_fails_with_reason(tmp_path: Path, sample_capsule: SampleCapsule, fetcher: Path) -> None:
    from tests.qemu.conftest import free_port

    dead = StandinProc(proc=None, base=f"http://127.0.0.1:{free_port()}",  # type: ignore[arg-type]
                       events=tmp_path / "none", log=tmp_path / "none.log")
    proc, _ = run_agent(tmp_path, dead, sample_capsule.vid, str(fetcher), timeout=60, retries=3)
    assert proc.returncode == 1
    assert "FAILED manifest could not be fetched" in proc.stderr


@pytest.mark.parametrize("vid", ["", "xyz", "A" * 64])
def test_bad_version_id_on_command_line(tmp_path: Path, loopback_standin: StartStandin, vid: str,
                                        fetcher: Path) -> None:
    server = loopback_standin()
    proc, _ = run_agent(tmp_path, server, vid, str(fetcher))
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr


def test_xattrs_such_as_file_capabilities_survive_the_unpack(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetcher: Path) -> None:
    """GNU tar in the stage one keeps SCHILY.xattr records; busybox tar would drop them silently."""
    if os.geteuid() != 0:
        pytest.skip("setting security.capability needs root")
    tree = tmp_path / "tree"
    (tree / "sbin").mkdir(parents=True)
    ping = tree / "sbin/ping"
    ping.write_bytes(b"#!/bin/sh\n")
    # cap_net_raw+ep, as `setcap cap_net_raw+ep` writes it (VFS_CAP_REVISION_2).
    cap = bytes.fromhex("0100000200200000000000000000000000000000")
    try:
        os.setxattr(ping, "security.capability", cap)
    except OSError as exc:
        pytest.skip(f"this filesystem cannot hold security.capability: {exc}")
    stream = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--format=pax", "-C", str(tree),
                             "-cf", "-", "."], capture_output=True, check=True).stdout
    vid = standin.make_capsule_from_tar(stream, sample_capsule.store, "xattr")
    server = loopback_standin()
    proc, target = run_agent(tmp_path, server, vid, str(fetcher))
    assert proc.returncode == 0, proc.stderr
    assert os.getxattr(target / "sbin/ping", "security.capability") == cap
