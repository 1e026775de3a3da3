"""The `bootd` command against a real SQLite file: exit codes 0/1/2, --json, hostlists."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_node_commands_round_trip(loopback_config: Path) -> None:
    for i in range(4):
        run_cli("node", "add", f"n{i:04d}", "--mac", f"52:54:00:00:00:{i:02x}", config=loopback_config, check=True)
    run_cli("group", "add", "gpu", "--capsule", "rocky9", "--kernel-args", "quiet", config=loopback_config, check=True)
    run_cli("node", "set", "n[0001-0002]", "--group", "gpu", "--var", "role=worker", config=loopback_config, check=True)
    out = run_cli("node", "list", "n[0000-0003]", "--json", config=loopback_config, check=True)
    nodes = {n["name"]: n for n in json.loads(out.stdout)}
    assert nodes["n0001"]["group"] == "gpu" and nodes["n0001"]["vars"] == {"role": "worker"}
    assert nodes["n0000"]["group"] == "default" and nodes["n0000"]["state"] == "discovered"

    table = run_cli("node", "list", config=loopback_config, check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "MAC", "GROUP"] and "n0003" in table

    show = run_cli("group", "show", "gpu", "--json", config=loopback_config, check=True)
    assert json.loads(show.stdout)["nodes"] == ["n0001", "n0002"]

    deleted = run_cli("node", "delete", "n[0000-0003]", config=loopback_config, check=True)
    assert "deleted n[0000-0003]" in deleted.stdout
    assert json.loads(run_cli("node", "list", "--json", config=loopback_config, check=True).stdout) == []


def test_exit_codes_and_messages(loopback_config: Path, tmp_path: Path) -> None:
    usage = run_cli("node", "frobnicate", config=loopback_config)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr

    missing = run_cli("node", "show", "n[0000-0001]", config=loopback_config)
    assert missing.returncode == 1 and "no such node(s): n[0000-0001]" in missing.stderr

    bad_mac = run_cli("node", "add", "x", "--mac", "zz:zz", config=loopback_config)
    assert bad_mac.returncode == 1 and "not a MAC address" in bad_mac.stderr

    run_cli("node", "add", "a", "--mac", "52:54:00:00:00:aa", config=loopback_config, check=True)
    dup = run_cli("node", "add", "b", "--mac", "52-54-00-00-00-AA", config=loopback_config)
    assert dup.returncode == 1 and "already registered as a" in dup.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text("[dhcp]\nport = -1\n")
    cfg = run_cli("check-config", config=bad)
    assert cfg.returncode == 1 and f"{bad}: dhcp.port:" in cfg.stderr and "0 to 65535" in cfg.stderr

    ok = run_cli("check-config", "--json", config=loopback_config, check=True)
    assert json.loads(ok.stdout)["registry"]["name_pattern"] == "n{index:04d}"


def test_group_variables_are_inherited_and_shown_with_their_source(loopback_config: Path) -> None:
    run_cli("group", "add", "gpu", "--var", "role=gpu", "--var", "rack=r1", "--overlay", "hostname",
            "--overlay", "hosts", config=loopback_config, check=True)
    run_cli("node", "add", "g1", "--mac", "52:54:00:00:0d:01", "--group", "gpu", "--var", "rack=r9",
            config=loopback_config, check=True)
    [shown] = json.loads(run_cli("node", "show", "g1", "--json", config=loopback_config, check=True).stdout)
    assert shown["vars"] == {"rack": "r9"}  # the node's own
    assert shown["inherited"]["vars.role"] == {"value": "gpu", "from": "group gpu"}
    assert shown["inherited"]["vars.overlays"]["value"] == "hostname,hosts"
    assert "vars.rack" not in shown["inherited"]  # the node's own value wins, so nothing is inherited
    text = run_cli("node", "show", "g1", config=loopback_config, check=True).stdout
    assert "(from group gpu)" in text
    run_cli("group", "set", "gpu", "--unset", "role", config=loopback_config, check=True)
    group = json.loads(run_cli("group", "show", "gpu", "--json", config=loopback_config, check=True).stdout)
    assert group["vars"] == {"rack": "r1", "overlays": "hostname,hosts"}
    bad = run_cli("group", "set", "gpu", "--var", "bad key=1", config=loopback_config)
    assert bad.returncode == 1 and "not a valid variable name" in bad.stderr
