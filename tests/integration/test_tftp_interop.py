"""bootd's TFTP server against clients nobody here wrote: curl, atftp, tftp-hpa and tftpy.

Each test starts a real TftpServer on an ephemeral loopback port, runs the
client as a subprocess (or tftpy in a thread) while the event loop keeps
serving, and compares the sha256 of what arrived with the file on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootd.net.tftp import TftpServer

HOST = "127.0.0.1"


@dataclass
class Served:
    server: TftpServer
    root: Path
    nbp: Path
    out: Path

    @property
    def port(self) -> int:
        return self.server.port


SIZES = {
    "empty.bin": 0,
    "b511.bin": 511,
    "b512.bin": 512,
    "b1468x3.bin": 1468 * 3,
    "odd.bin": 1_000_003,
    "k8192x5.bin": 8192 * 5,
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    root, nbp, out = tmp_path / "tftp", tmp_path / "nbp", tmp_path / "out"
    for d in (root, nbp, out):
        d.mkdir()
    rnd = random.Random(42)
    for name, size in SIZES.items():
        (root / name).write_bytes(rnd.randbytes(size))
    (root / "sub").mkdir()
    (root / "sub" / "pxelinux.0").write_bytes(rnd.randbytes(4321))
    (nbp / "undionly.kpxe").write_bytes(rnd.randbytes(70_000))
    (root / "text.cfg").write_bytes(b"DEFAULT linux\nLABEL linux\n  KERNEL vmlinuz\r\n  APPEND x\n")
    server = TftpServer(HOST, 0, [root, nbp], max_sessions=1000, timeout=1.0, retries=5)
    await server.start()
    try:
        yield Served(server, root, nbp, out)
    finally:
        await server.close()


async def run(*cmd: str, timeout: float = 60.0) -> tuple[int, str]:
    exe = shutil.which(cmd[0])
    if exe is None:
        pytest.skip(f"{cmd[0]} is not installed")
    proc = await asyncio.create_subprocess_exec(
        exe, *cmd[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{cmd} did not finish in {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(errors="replace")


async def wait_idle(server: TftpServer) -> None:
    """The client may exit before the server has processed the last ACK."""
    for _ in range(200):
        if server.active_transfers == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.active_transfers} transfers still active")


# ---------------------------------------------------------------- curl


@pytest.mark.parametrize("blksize", [512, 1468, 8192, 65464])
@pytest.mark.parametrize("name", sorted(set(SIZES) - {"empty.bin"}))
async def test_curl(served: Served, name: str, blksize: int) -> None:
    out = served.out / name
    rc, log = await run(
        "curl", "-sS", "--tftp-blksize", str(blksize), "-o", str(out), f"tftp://{HOST}:{served.port}/{name}"
    )
    assert rc == 0, log
    assert sha(out) == sha(served.root / name)
    await wait_idle(served.server)
    assert served.server.stats["failed"] == 0


async def test_curl_empty_file_without_options(served: Served) -> None:
    # curl 7.88 fails every empty file when it negotiates options ("getpeername() failed",
    # exit 71), against tftpd-hpa just the same; without options it works.
    out = served.out / "empty.bin"
    rc, log = await run("curl", "-sS", "--tftp-no-options", "-o", str(out), f"tftp://{HOST}:{served.port}/empty.bin")
    assert rc == 0, log
    assert out.read_bytes() == b""


async def test_curl_without_options_and_from_the_second_root(served: Served) -> None:
    out = served.out / "u.kpxe"
    rc, log = await run(
        "curl", "-sS", "--tftp-no-options", "-o", str(out), f"tftp://{HOST}:{served.port}/undionly.kpxe"
    )
    assert rc == 0, log
    assert sha(out) == sha(served.nbp / "undionly.kpxe")


async def test_curl_reports_our_reason_for_a_missing_file(served: Served) -> None:
    rc, log = await run("curl", "-sS", "-o", str(served.out / "x"), f"tftp://{HOST}:{served.port}/missing.efi")
    assert rc == 68, log  # CURLE_TFTP_NOTFOUND
    assert served.server.stats["error:not_found"] == 1


# ---------------------------------------------------------------- atftp


@pytest.mark.parametrize(
    ("blksize", "windowsize"), [(512, 1), (1468, 1), (1468, 16), (8192, 4), (65464, 8), (1468, 64)]
)
@pytest.mark.parametrize("name", ["odd.bin", "b1468x3.bin", "empty.bin", "k8192x5.bin"])
async def test_atftp_with_windowsize(served: Served, name: str, blksize: int, windowsize: int) -> None:
    out = served.out / name
    rc, log = await run(
        "atftp",
        "--option",
        f"blksize {blksize}",
        "--option",
        f"windowsize {windowsize}",
        "--option",
        "tsize 0",
        "-g",
        "-r",
        name,
        "-l",
        str(out),
        HOST,
        str(served.port),
    )
    assert rc == 0, log
    assert sha(out) == sha(served.root / name)
    await wait_idle(served.server)
    assert served.server.stats["failed"] == 0


@pytest.mark.slow
async def test_atftp_wraps_block_numbers_past_65535(served: Served) -> None:
    big = served.root / "big.bin"
    big.write_bytes(random.Random(7).randbytes(512 * 70_000 + 100))  # 70001 blocks of 512
    out = served.out / "big.bin"
    rc, log = await run(
        "atftp",
        "--option",
        "blksize 512",
        "--option",
        "windowsize 16",
        "-g",
        "-r",
        "big.bin",
        "-l",
        str(out),
        HOST,
        str(served.port),
        timeout=120,
    )
    assert rc == 0, log
    assert sha(out) == sha(big)


# ---------------------------------------------------------------- tftp-hpa


@pytest.mark.parametrize("name", ["odd.bin", "empty.bin", "b512.bin", "/sub/pxelinux.0"])
async def test_tftp_hpa_binary(served: Served, name: str) -> None:
    out = served.out / "hpa.bin"
    rc, log = await run("tftp", HOST, str(served.port), "-m", "binary", "-c", "get", name, str(out))
    assert rc == 0 and "Error" not in log, log
    assert sha(out) == sha(served.root / name.lstrip("/"))


async def test_tftp_hpa_netascii_round_trips_text(served: Served) -> None:
    out = served.out / "text.cfg"
    rc, log = await run("tftp", HOST, str(served.port), "-m", "netascii", "-c", "get", "text.cfg", str(out))
    assert rc == 0 and "Error" not in log, log
    # The client converts CR LF back to LF and CR NUL back to CR: the original bytes come back.
    assert out.read_bytes() == (served.root / "text.cfg").read_bytes()


async def test_tftp_hpa_put_is_refused_with_a_reason(served: Served) -> None:
    src = served.out / "upload.bin"
    src.write_bytes(b"nope")
    _rc, log = await run("tftp", HOST, str(served.port), "-m", "binary", "-c", "put", str(src), "upload.bin")
    assert "write requests are not accepted" in log
    assert not (served.root / "upload.bin").exists()


# ---------------------------------------------------------------- tftpy


@pytest.mark.parametrize("options", [{}, {"blksize": 1468}, {"blksize": 8192, "tsize": 0}, {"blksize": 65464}])
@pytest.mark.parametrize("name", ["odd.bin", "empty.bin", "b512.bin", "k8192x5.bin"])
async def test_tftpy(served: Served, name: str, options: dict[str, int]) -> None:
    import tftpy

    out = served.out / name
    port = served.port

    def download() -> None:
        tftpy.TftpClient(HOST, port, options=dict(options)).download(name, str(out), timeout=5)

    await asyncio.wait_for(asyncio.to_thread(download), 60)
    assert sha(out) == sha(served.root / name)


async def test_tftpy_is_refused_dotdot_with_access_violation(served: Served) -> None:
    import tftpy

    port = served.port

    def download() -> None:
        tftpy.TftpClient(HOST, port).download("../../etc/passwd", str(served.out / "p"), timeout=5)

    with pytest.raises(tftpy.TftpException, match="errorcode = 2"):
        await asyncio.wait_for(asyncio.to_thread(download), 30)


@pytest.mark.parametrize("use_gso", [True, False])
async def test_atftp_windows_with_and_without_udp_gso(tmp_path: Path, use_gso: bool) -> None:
    """Windows go out as one GSO send when the kernel allows it; the plain path must match."""
    data = random.Random(11).randbytes(3_000_001)
    (tmp_path / "f.bin").write_bytes(data)
    server = TftpServer(HOST, 0, [tmp_path], use_gso=use_gso)
    await server.start()
    try:
        for blksize, windowsize in [(1468, 16), (8192, 8), (512, 64)]:
            out = tmp_path / f"out-{blksize}"
            rc, log = await run(
                "atftp",
                "--option",
                f"blksize {blksize}",
                "--option",
                f"windowsize {windowsize}",
                "-g",
                "-r",
                "f.bin",
                "-l",
                str(out),
                HOST,
                str(server.port),
            )
            assert rc == 0, log
            assert out.read_bytes() == data
        await wait_idle(server)
        assert server.stats["completed"] == 3 and server.stats["retransmits"] == 0
    finally:
        await server.close()


async def test_atftp_tiny_blocks_in_windows_keep_oack_whole(served: Served) -> None:
    """With blksize 8 the OACK is longer than a block: it must not be cut like a GSO window."""
    out = served.out / "tiny.bin"
    rc, log = await run(
        "atftp",
        "--option",
        "blksize 8",
        "--option",
        "windowsize 4",
        "--option",
        "tsize 0",
        "-g",
        "-r",
        "b1468x3.bin",
        "-l",
        str(out),
        HOST,
        str(served.port),
    )
    assert rc == 0, log
    assert sha(out) == sha(served.root / "b1468x3.bin")
    await wait_idle(served.server)
    assert served.server.stats["failed"] == 0
