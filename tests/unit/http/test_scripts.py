"""iPXE script rendering, node tokens and the secret file."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from bootd.model import Node
from bootd.service.scripts import (
    BootScript,
    load_or_create_secret,
    render_boot_script,
    render_wait_script,
)

NODE = Node(mac="52:54:00:12:34:56", name="n0007", group="default")
VID = "ab" * 32


def test_boot_script_contract() -> None:
    text = render_boot_script(BootScript(NODE, "http://10.0.0.1:8080/", VID, True, "console=ttyS0",
                                         "quiet\nshell", "tok"))
    lines = text.splitlines()
    assert lines[0] == "#!ipxe"
    kernel = next(line for line in lines if line.startswith("kernel "))
    assert kernel.startswith(f"kernel http://10.0.0.1:8080/capsules/{VID}/kernel initrd=initramfs.img console=ttyS0 "
                             "quiet shell bootd.url=http://10.0.0.1:8080 bootd.node=n0007 ")
    assert f"bootd.capsule={VID} bootd.token=tok bootd.mac=52:54:00:12:34:56 || goto failed" in kernel
    assert "initrd http://10.0.0.1:8080/stage1/initramfs.img || goto failed" in lines
    assert "chain --replace http://10.0.0.1:8080/boot/52-54-00-12-34-56.ipxe" in lines
    assert "shell" not in [line.strip() for line in lines]  # the newline did not become a command


def test_boot_script_without_kernel_or_capsule() -> None:
    text = render_boot_script(BootScript(NODE, "http://h", VID, False, "", "", "tok"))
    assert "kernel http://h/stage1/vmlinuz initrd=initramfs.img bootd.url=http://h" in text
    text = render_boot_script(BootScript(NODE, "http://h", None, False, "", "", "tok"))
    assert "kernel " not in text and "no capsule assigned" in text


def test_boot_script_names_every_source_in_order() -> None:
    """A node whose server dies mid-boot goes on from the next source: iPXE for its files, the stage one
    (bootd.sources) for its manifest and chunks; this server first, each other source once."""
    text = render_boot_script(BootScript(NODE, "http://a:8080", VID, True, "", "", "tok", modules="cd" * 32,
                                         sources=("http://b:8080/", "http://a:8080", "http://c")))
    lines = text.splitlines()
    kernel = next(line for line in lines if line.startswith("kernel "))
    alternatives = kernel.removesuffix(" || goto failed").split(" || ")
    assert [a.split()[1] for a in alternatives] == [f"{u}/capsules/{VID}/kernel"
                                                    for u in ("http://a:8080", "http://b:8080", "http://c")]
    assert len({a.split(" ", 2)[2] for a in alternatives}) == 1  # the same command line from each source
    assert " bootd.url=http://a:8080 " in kernel and " bootd.sources=http://b:8080,http://c " in kernel + " "
    assert ("initrd http://a:8080/stage1/initramfs.img || initrd http://b:8080/stage1/initramfs.img || "
            "initrd http://c/stage1/initramfs.img || goto failed") in lines
    assert (f"initrd --name modules.img http://a:8080/chunks/{'cd' * 32} || initrd --name modules.img "
            f"http://b:8080/chunks/{'cd' * 32} || initrd --name modules.img http://c/chunks/{'cd' * 32} || "
            "goto failed") in lines
    # One server: no bootd.sources, one URL per line (the contract above).
    assert "bootd.sources" not in render_boot_script(BootScript(NODE, "http://a", VID, True, "", "", "t",
                                                                sources=("http://a/",)))


def test_wait_script_loops_back() -> None:
    text = render_wait_script("52:54:00:12:34:56", "http://h", "waits for approval\n#evil", delay=5)
    assert "sleep 5 || prompt --timeout 5000 || echo" in text
    assert text.rstrip().endswith("chain --replace http://h/boot/52-54-00-12-34-56.ipxe")
    assert "\n#evil" not in text


def _create(path: str, q: multiprocessing.Queue[bytes]) -> None:
    q.put(load_or_create_secret(Path(path)))


def test_secret_created_once_0600_even_by_racing_processes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "secret"
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue[bytes] = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(path), q)) for _ in range(8)]
    for p in procs:
        p.start()
    got = {q.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(30)
    assert len(got) == 1
    assert path.stat().st_mode & 0o777 == 0o600
    assert got == {path.read_bytes()} and len(path.read_bytes()) == 64
    assert [p.name for p in path.parent.iterdir()] == ["secret"]
    assert load_or_create_secret(path) == got.pop()


def test_other_sources_are_the_live_servers_then_the_configured_ones() -> None:
    """The iPXE script's sources: the other live servers (Cluster.live_urls, this server's first), then
    boot.sources, each once, never the URL the node already uses."""
    from types import SimpleNamespace

    from bootd.service.boot import BootService

    boot = SimpleNamespace(peers=lambda: ["http://me:8080", "http://b:8080", "http://c:8080"],
                           sources=("http://r:8080", "http://b:8080/"))
    assert BootService.other_sources(boot, "http://me:8080/") == (  # type: ignore[arg-type]
        "http://b:8080", "http://c:8080", "http://r:8080")
    alone = SimpleNamespace(peers=None, sources=())
    assert BootService.other_sources(alone, "http://me:8080") == ()  # type: ignore[arg-type]
