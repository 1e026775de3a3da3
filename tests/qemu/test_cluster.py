"""`make cluster`'s path: three QEMU nodes boot the debian-hpc capsule from `bootd serve` at once, the
lab user (synced by the users overlay from the lab's own passwd) logs in by name with the lab key, and
`mpirun` started on the first node runs one rank on each node.

One three-node cluster (module scope) serves every assert: TCG nodes are slow, so the boot is paid once.
The capsule is built once per recipe (kept under ~/.cache/bootd/cluster with the recipe's hash; the
package cache is BOOTD_BUILD_CACHE's), so only the first run on a machine pays for mmdebstrap.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from bootd.lab.cluster import USER, Cluster, ClusterError
from bootd.stage1.build import BuildResult
from tests.qemu.conftest import need_lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

NODES = 3
READY_TIMEOUT = 900.0  # power-on to three `ready`: measured 3-5 min here; TCG under load is much slower
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, stage1: BuildResult) -> Iterator[Cluster]:
    need_lab()
    for tool in ("mmdebstrap", "ssh", "ssh-keygen", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (tools/setup.sh installs it)")
    lines: list[str] = []
    cl = Cluster(work=tmp_path_factory.mktemp("cluster"), stage1_dir=stage1.out_dir, nodes=NODES,
                 say=lines.append)
    try:
        cl.prepare()
    except ClusterError as exc:
        cl.down()
        if "mirror unreachable" in str(exc):
            pytest.skip(f"the Debian mirror cannot be reached to build the capsule: {exc}")
        raise
    with cl:  # starts the lab, bootd and the nodes
        if not cl.wait_ready(READY_TIMEOUT):
            pytest.fail(f"not every node reached ready within {READY_TIMEOUT:.0f}s:\n" + "\n".join(lines[-40:])
                        + "\n" + "\n".join(m.tail(15) for m in cl.machines))
        FIGURES["ready_s"] = cl.ready_seconds
        cl.wait_logins()
        yield cl
        print("\ncluster figures: " + ", ".join(f"{k}={v:.1f}" for k, v in FIGURES.items()))


@pytest.mark.timeout(1800)
def test_three_nodes_ready_with_distinct_names_and_addresses(cluster: Cluster) -> None:
    assert sorted(cluster.hosts) == [f"n{i:04d}" for i in range(NODES)]
    ips = [h.ip for h in cluster.hosts.values()]
    assert all(ips) and len(set(ips)) == NODES, cluster.hosts
    assert cluster.bootd is not None
    states = {n["name"]: n["state"] for n in cluster.bootd.nodes()}
    assert all(states[name] == "ready" for name in cluster.hosts), states


@pytest.mark.timeout(600)
def test_ssh_fanout_by_name_with_the_overlays_keys(cluster: Cluster) -> None:
    """pdsh-style: every node answers by name, as the synced user, host keys checked against bootd's."""
    answers = cluster.fanout("echo $(hostname) $(id -un) $(id -u) $(stat -c %U:%a $HOME/.ssh)")
    for name, (rc, text) in answers.items():
        assert rc == 0 and text == f"{name} {USER} 20001 {USER}:700", answers
    # Each node presented the host key bootd made for it (ssh-host-keys overlay): known_hosts holds
    # bootd's keys only, and the config checks them strictly.
    known = (cluster.ssh_dir / "known_hosts").read_text().splitlines()
    assert sorted(line.split(",")[0] for line in known) == sorted(cluster.hosts)
    assert cluster.ssh_config.read_text().count("StrictHostKeyChecking yes") == NODES
    # Between nodes too (what mpirun does): by name, through the hosts overlay's /etc/hosts.
    first, *others = sorted(cluster.hosts)
    res = cluster.ssh(first, " && ".join(f"ssh -o BatchMode=yes {o} hostname" for o in others))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == others


@pytest.mark.timeout(600)
def test_mpirun_runs_one_rank_on_every_node_as_the_lab_user(cluster: Cluster) -> None:
    ranks, took, text = cluster.mpirun()
    FIGURES["mpirun_s"] = took
    assert [r[:2] for r in ranks] == [(i, NODES) for i in range(NODES)], text
    assert sorted(r[2] for r in ranks) == sorted(cluster.hosts), text


@pytest.mark.timeout(300)
def test_memory_after_boot_is_reported(cluster: Cluster) -> None:
    mem = cluster.memory()
    for name, m in mem.items():
        assert 0 < m["free_used_mib"] < m["total_mib"], (name, m)
        assert m.get("agent_used_mib", 0) > 0, (name, m)  # the node agent's mem_used_kb reached bootd
    FIGURES["mem_used_mib_max"] = max(m["free_used_mib"] for m in mem.values())
