"""ChunkWriter: files written with O_DIRECT plus a page-cache tail hold exactly the frame."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootd.capsule.workers import ChunkWriter, direct_io_works

SIZES = [1, 511, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 5, (1 << 20) + 123, 5 << 20]


@pytest.mark.parametrize("direct", [True, False])
def test_written_file_is_exactly_the_data(tmp_path: Path, direct: bool) -> None:
    supported = direct_io_works(str(tmp_path))
    w = ChunkWriter(direct=direct and supported)
    for i, size in enumerate(SIZES):
        data = os.urandom(size)
        path = tmp_path / f"c{i}"
        assert w.create(str(path), data) is True
        assert path.read_bytes() == data
        assert path.stat().st_mode & 0o777 == 0o644
    assert not (tmp_path / ".direct-probe").exists()
    assert w.direct == (direct and supported)  # no silent fallback on this filesystem


def test_existing_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_bytes(b"first")
    assert ChunkWriter(direct=direct_io_works(str(tmp_path))).create(str(path), os.urandom(9000)) is False
    assert path.read_bytes() == b"first"


def test_direct_io_probe_leaves_nothing(tmp_path: Path) -> None:
    direct_io_works(str(tmp_path))
    assert os.listdir(tmp_path) == []
