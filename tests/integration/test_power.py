"""Power control against real IPMI 2.0 BMCs on loopback (bootd/lab/bmc.py: pyghmi's server class).

The simulator runs in its own process and logs every chassis command it receives with its arrival
time: that log, and ipmitool (a client written by others) against the same BMCs, are what the
assertions read.  The service runs in-process over a real SQLite registry where timing is measured;
the CLI and the admin API run as `bootd` processes where their contract is the point.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bootd import compose
from bootd.config import Config, from_dict
from bootd.lab.bmc import Simulator, simulator
from bootd.service.nodes import Invalid
from bootd.service.services import Services
from bootd.store.sqlite import SqliteNodeStore
from tests.conftest import PYTHON, ROOT, free_port, need_tool, run_cli, write_config

PASSWORD = "s3cret-Bmc-pw"  # a test BMC's password: the point is that it never shows up
WHO = "test"


def closed_udp_port() -> int:
    """A UDP port nothing listens on (the kernel answers port-unreachable; pyghmi hears only silence)."""
    return free_port(socket.SOCK_DGRAM)


def ipmitool(port: int, *args: str, password: str = PASSWORD) -> str:
    need_tool("ipmitool")
    proc = subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(port), "-U", "admin",
                           "-P", password, *args], capture_output=True, text=True, timeout=30)
    return proc.stdout + proc.stderr


async def open_env(tmp_path: Path, **power: Any) -> tuple[Services, SqliteNodeStore, Config]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    config = from_dict({"server": {"state_dir": str(state)}, "power": {"timeout": 4.0, **power}})
    store = SqliteNodeStore(config.db_path)
    _, services = compose.services(config, store=store)
    return services, store, config


async def add_nodes(services: Services, ports: list[int], *, group: str = "rack1") -> list[str]:
    """One node per BMC port; address and user on the group, the port on the node, the password on the group."""
    await services.nodes.put_group(group, {"vars": {"bmc.address": "127.0.0.1", "bmc.user": "admin"}},
                                   create=True, who=WHO)
    names = [f"n{i:02d}" for i in range(len(ports))]
    for i, (name, port) in enumerate(zip(names, ports, strict=True)):
        await services.nodes.add(name, f"52:54:00:00:01:{i:02x}", {"group": group, "vars": {"bmc.port": str(port)}},
                                 who=WHO)
    await services.power.set_password(f"@{group}", PASSWORD, who=WHO)
    return names


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Services, Config]]:
    services, store, config = await open_env(tmp_path)
    try:
        yield services, config
    finally:
        await store.close()


# -- the service over real BMCs -------------------------------------------------------------------------
async def test_on_off_cycle_status_and_pxe_as_the_bmc_and_ipmitool_see_them(env: Any, tmp_path: Path) -> None:
    services, _ = env
    with simulator(3, password=PASSWORD, log=tmp_path / "bmc.log") as sim:
        names = await add_nodes(services, sim.ports)
        power = services.power

        status = await power.run("n[00-02]", "status", who=WHO)
        assert [(r.node, r.ok, r.state) for r in status] == [(n, True, "off") for n in names], status

        on = await power.run("n[00-01]", "on", who=WHO, pxe=True)
        assert all(r.ok and r.state == "on" and "next boot from the network" in r.message for r in on), on
        # The BMC got the boot device before the power-on, and only the two nodes named were touched.
        for port in sim.ports[:2]:
            mine = [r["what"] for r in sim.records() if r["port"] == port]
            assert mine == ["bootdev", "on"], mine
            assert [r["device"] for r in sim.records("bootdev") if r["port"] == port] == ["network"]
            assert "Chassis Power is on" in ipmitool(port, "power", "status")
            assert "Force PXE" in ipmitool(port, "chassis", "bootparam", "get", "5")
        assert "Chassis Power is off" in ipmitool(sim.ports[2], "power", "status")

        # ipmitool and bootd agree on every BMC.
        for r in await power.run("n[00-02]", "status", who=WHO):
            assert f"Chassis Power is {r.state}" in ipmitool(sim.ports[names.index(r.node)], "power", "status")

        [cycled, was_off] = await power.run("n00,n02", "cycle", who=WHO)
        assert cycled.ok and cycled.message == "power cycled", cycled
        assert was_off.ok and was_off.message == "was off: powered on", was_off  # a BMC refuses cycle when off
        assert [r["port"] for r in sim.records("cycle")] == [sim.ports[0]]

        off = await power.run("n00", "off", who=WHO)
        assert off[0].ok and off[0].state == "off"
        assert "Chassis Power is off" in ipmitool(sim.ports[0], "power", "status")
        [reset_off] = await power.run("n00", "reset", who=WHO)
        assert not reset_off.ok and "is off" in reset_off.message
        [reset_on] = await power.run("n01", "reset", who=WHO)
        assert reset_on.ok and [r["port"] for r in sim.records("reset")] == [sim.ports[1]]

        # Audited: who, what, which nodes; status (a read) is not.
        audit = [json.loads(x) for x in (services.power.secrets.dir.parent / "audit.log").read_text().splitlines()]
        power_lines = [(a["action"], a["target"]) for a in audit if a["action"].startswith("power.")]
        assert power_lines == [("power.on", "n[00-01]"), ("power.cycle", "n[00,02]"), ("power.off", "n00"),
                               ("power.reset", "n00"), ("power.reset", "n01")]


async def test_bad_credentials_and_an_unreachable_bmc_fail_alone_within_the_timeout(tmp_path: Path) -> None:
    services, store, config = await open_env(tmp_path, timeout=4.0)
    try:
        with simulator(4, password=PASSWORD) as sim:
            ports = [*sim.ports, closed_udp_port()]
            await add_nodes(services, ports)
            await services.power.set_password("n01", "not-the-password", who=WHO)  # the node's own wins
            await services.nodes.change("n02", {"vars": {"bmc.user": "nobody"}}, who=WHO)
            await services.nodes.change("n03", {"unset": ["bmc.port"], "vars": {"bmc.address": ""}}, who=WHO)
            started = time.monotonic()
            results = {r.node: r for r in await services.power.run("n[00-04]", "status", who=WHO)}
            elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert results["n00"].ok and results["n00"].state == "off"
    assert not results["n01"].ok and results["n01"].message == (
        f"BMC 127.0.0.1:{ports[1]}: wrong password for user 'admin'")
    assert not results["n02"].ok and "knows no user 'nobody'" in results["n02"].message
    assert not results["n03"].ok and results["n03"].message.startswith("no BMC address (bmc.address)")
    assert not results["n04"].ok and f"BMC 127.0.0.1:{ports[4]}: no answer" in results["n04"].message
    # The unreachable BMC is reported within the timeout, and the others did not wait for it.
    assert results["n04"].seconds <= config.power.timeout + 0.5, results["n04"]
    assert elapsed <= config.power.timeout + 1.5, elapsed
    assert results["n00"].seconds < 2.0, results["n00"]


async def test_stagger_bounds_the_rate_of_power_ons(env: Any, tmp_path: Path) -> None:
    services, _ = env
    rate, count = 5, 12
    with simulator(count, password=PASSWORD, log=tmp_path / "bmc.log") as sim:
        await add_nodes(services, sim.ports)
        results = await services.power.run(f"n[00-{count - 1:02d}]", "on", who=WHO, stagger=rate, parallel=count)
        assert all(r.ok for r in results), [r for r in results if not r.ok]
        times = sorted(r["ts"] for r in sim.records("on"))
    assert len(times) == count
    # At most `rate` power-ons reached the BMCs in any window shorter than a second (the slack is the
    # jitter of one loopback round trip), and the whole job took the time the rate implies.
    slack = 0.05
    for i in range(count - rate):
        assert times[i + rate] - times[i] >= 1.0 - slack, (i, [round(t - times[0], 3) for t in times])
    assert times[-1] - times[0] >= (count - 1) / rate - slack
    # The time waited for a slot is not counted against the timeout (4 s; the last waited ~2.2 s).
    assert max(r.seconds for r in results) >= (count - 1) / rate - slack


async def test_parallel_is_a_bound_on_bmc_processes(env: Any) -> None:
    services, _ = env
    with simulator(9, password=PASSWORD) as sim:
        await add_nodes(services, sim.ports)
        peak = 0
        done = False

        async def watch() -> None:
            nonlocal peak
            while not done:
                live = [p for p in multiprocessing.active_children() if p.name.startswith("bmc-")]
                peak = max(peak, len(live))
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        results = await services.power.run("n[00-08]", "on", who=WHO, parallel=3, stagger=20)
        done = True
        await watcher
    assert all(r.ok for r in results)
    assert 1 <= peak <= 3, peak


async def test_requests_are_checked_before_any_bmc_is_touched(env: Any) -> None:
    services, _ = env
    power = services.power
    with pytest.raises(Invalid, match="action: expected one of on, off, cycle, reset, status"):
        await power.run("n00", "boot", who=WHO)
    with pytest.raises(Invalid, match=r"pxe: .* not to off"):
        await power.run("n00", "off", who=WHO, pxe=True)
    with pytest.raises(Invalid, match="stagger"):
        await power.run("n00", "on", who=WHO, stagger=-1)
    with pytest.raises(Invalid, match="parallel"):
        await power.run("n00", "on", who=WHO, parallel=0)
    with pytest.raises(Invalid, match="at most 20"):
        await power.set_password("@default", "x" * 21, who=WHO)
    with pytest.raises(Invalid, match="not a variable"):
        await services.nodes.put_group("g", {"vars": {"bmc.password": "x"}}, create=True, who=WHO)


# -- the CLI: one line per node, exit codes, --json, secrets ------------------------------------------------
@pytest.fixture
def cli_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "bootd.toml", {"server": {"state_dir": str(tmp_path / "state")},
                                                  "power": {"timeout": 4.0}})


def setup_cli_nodes(config: Path, ports: list[int]) -> None:
    run_cli("group", "add", "rack1", "--var", "bmc.address=127.0.0.1", "--var", "bmc.user=admin",
            config=config, check=True)
    for i, port in enumerate(ports):
        run_cli("node", "add", f"n{i}", "--mac", f"52:54:00:00:02:{i:02x}", "--group", "rack1",
                "--var", f"bmc.port={port}", config=config, check=True)


def test_cli_power_lines_exit_codes_json_and_secrets(cli_config: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with simulator(2, password=PASSWORD, log=tmp_path / "bmc.log") as sim:
        setup_cli_nodes(cli_config, [*sim.ports, closed_udp_port()])
        # The password from stdin (a pipe: no prompt), for the group; never echoed.
        proc = subprocess.run([PYTHON, "-m", "bootd", "-c", str(cli_config), "bmc", "set-password", "@rack1"],
                              input=PASSWORD + "\n", capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 0 and PASSWORD not in proc.stdout + proc.stderr, proc
        secret = state / "bmc" / "group.rack1"
        assert secret.read_text() == PASSWORD
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700

        ok = run_cli("power", "on", "n[0-1]", "--pxe", config=cli_config)
        assert ok.returncode == 0, ok.stderr
        lines = sorted(ok.stdout.splitlines())
        assert len(lines) == 2 and all(" ok " in x and "powered on; next boot from the network" in x for x in lines)
        assert "2 ok, 0 failed" in ok.stderr
        assert [r["bootdev"] for r in sim.records("on")] == ["network", "network"]

        mixed = run_cli("power", "status", "n[0-2]", "--json", config=cli_config)
        assert mixed.returncode == 1, mixed.stderr  # one node failed: the command failed
        rows = {r["node"]: r for r in json.loads(mixed.stdout)}
        assert rows["n0"]["ok"] and rows["n0"]["state"] == "on" and rows["n1"]["state"] == "on"
        assert not rows["n2"]["ok"] and "no answer" in rows["n2"]["message"]
        assert "2 ok, 1 failed (n2)" in mixed.stderr

        shown = run_cli("bmc", "show", "n[0-2]", "--json", config=cli_config, check=True)
        described = json.loads(shown.stdout)
        assert [d["password"] for d in described] == ["group rack1"] * 3
        assert described[0]["address"] == "127.0.0.1" and described[0]["port"] == sim.ports[0]

        # The password is in no output and no record.
        node_show = run_cli("node", "show", "n[0-2]", "--json", config=cli_config, check=True)
        group_show = run_cli("group", "show", "rack1", "--json", config=cli_config, check=True)
        for text in (ok.stdout, ok.stderr, mixed.stdout, mixed.stderr, shown.stdout, node_show.stdout,
                     group_show.stdout, (state / "audit.log").read_text()):
            assert PASSWORD not in text
        refused = run_cli("node", "set", "n0", "--var", "bmc.password=x", config=cli_config)
        assert refused.returncode == 1 and "bootd bmc set-password" in refused.stderr

        bad = run_cli("power", "on", "n[0-1]", "--stagger", "-1", config=cli_config)
        assert bad.returncode == 1 and "stagger" in bad.stderr
        unknown = run_cli("power", "status", "n7", config=cli_config)
        assert unknown.returncode == 1 and "no such node(s): n7" in unknown.stderr


def test_console_over_sol_and_a_clear_refusal(cli_config: Path, tmp_path: Path) -> None:
    with simulator(1, password=PASSWORD) as sim, simulator(1, password=PASSWORD, sol=False) as nosol:
        setup_cli_nodes(cli_config, [sim.ports[0], nosol.ports[0]])
        (tmp_path / "pw").write_text(PASSWORD + "\n")
        run_cli("bmc", "set-password", "@rack1", "--file", str(tmp_path / "pw"), config=cli_config, check=True)
        proc = subprocess.run([PYTHON, "-m", "bootd", "-c", str(cli_config), "console", "n0"],
                              input=b"echo through SOL\n", capture_output=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.decode()
        assert "[bmc0 serial console]" in out and "echo through SOL" in out, out

        refused = run_cli("console", "n1", config=cli_config)
        assert refused.returncode == 1
        assert f"n1: BMC 127.0.0.1:{nosol.ports[0]} does not give a Serial-over-LAN console: SOL is disabled" \
            in refused.stderr


# -- the admin API ------------------------------------------------------------------------------------------
def call(url: str, body: Any | None = None, token: str | None = None, method: str = "POST") -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _refuses_anonymous(url: str) -> bool:
    """The admin listener is up and asks for a token. The token file is written before the listener binds
    (build, then start): a refused connection in between only means "not yet" (it failed CI once)."""
    try:
        return call(url, {})[0] == 401
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return False
        raise


def test_power_through_the_admin_api(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    state = tmp_path / "state"
    config = write_config(tmp_path / "bootd.toml", {
        "server": {"state_dir": str(state), "address": "127.0.0.1", "graceful_timeout": 3},
        "http": {"listen": "127.0.0.1", "port": port},
        "admin": {"port": admin_port},
        "power": {"timeout": 4.0},
    })
    with simulator(2, password=PASSWORD, log=tmp_path / "bmc.log") as sim:
        setup_cli_nodes(config, [*sim.ports, closed_udp_port()])
        log = (tmp_path / "serve.log").open("w")
        proc = subprocess.Popen([PYTHON, "-m", "bootd", "-c", str(config), "serve"], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            admin = f"http://127.0.0.1:{admin_port}"
            deadline = time.monotonic() + 60
            while not (state / "admin-token").exists() or not _refuses_anonymous(admin + "/api/v1/power"):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
            token = (state / "admin-token").read_text().strip()
            request = {"hostlist": "n[0-2]", "action": "cycle", "pxe": True, "stagger": 10}

            assert call(admin + "/api/v1/power", request)[0] == 401
            assert call(admin + "/api/v1/power", request, "wrong-token")[0] == 401
            assert not sim.records()  # refused requests touched no BMC
            # Not on the node-facing listener at all.
            status, text = call(f"http://127.0.0.1:{port}/api/v1/power", request, token)
            assert status == 404 and "admin API" in text

            status, text = call(admin + "/api/v1/bmc/@rack1/password", {"password": PASSWORD}, token, "PUT")
            assert status == 200 and PASSWORD not in text, text
            status, text = call(admin + "/api/v1/power", request, token)
            assert status == 200, text
            answer = json.loads(text)
            assert (answer["ok"], answer["failed"]) == (2, 1)
            by_node = {r["node"]: r for r in answer["results"]}
            assert by_node["n0"]["message"] == "was off: powered on; next boot from the network"
            assert "no answer" in by_node["n2"]["message"]
            assert [r["bootdev"] for r in sim.records("on")] == ["network", "network"]

            for bad, words in (({"hostlist": "n0", "action": "boot"}, "action: expected one of"),
                               ({"hostlist": "n0", "action": "off", "pxe": True}, "pxe:"),
                               ({"hostlist": "n0", "action": "on", "password": "x"}, "unknown key(s) password"),
                               ({"action": "on"}, "hostlist:")):
                status, text = call(admin + "/api/v1/power", bad, token)
                assert status == 400 and words in text, (bad, status, text)
            status, text = call(admin + "/api/v1/power", {"hostlist": "n9", "action": "on"}, token)
            assert status == 404 and "n9" in text

            status, node = call(admin + "/api/v1/nodes/n0", None, token, "GET")
            assert status == 200 and "bmc.port" in node
            assert PASSWORD not in node
            audit = (state / "audit.log").read_text()
            assert PASSWORD not in audit
            assert any(a["action"] == "power.cycle" and a["who"].startswith("api:") and a["target"] == "n[0-2]"
                       for a in map(json.loads, audit.splitlines()))
        finally:
            proc.terminate()
            proc.wait(timeout=15)
            log.close()


def test_simulator_fixture_reports_its_ports(tmp_path: Path) -> None:
    """The simulator answers ipmitool with the password it was given, and refuses another."""
    with simulator(1, password=PASSWORD) as sim:
        assert isinstance(sim, Simulator) and len(sim.ports) == 1
        assert "Chassis Power is off" in ipmitool(sim.ports[0], "power", "status")
        assert "Unable to establish IPMI v2" in ipmitool(sim.ports[0], "power", "status", password="wrong")
