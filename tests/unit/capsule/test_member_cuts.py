"""Member cuts: where the chunker cuts an archive stream, and what an update costs because of it."""

from __future__ import annotations

import io
import itertools
import os
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from bootd import config
from bootd.capsule.archive import ArchiveStream, walk_directory
from bootd.capsule.chunker import ChunkCutter, ChunkParams
from bootd.capsule.importer import ImportOptions, import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.cli.capsule import import_options
from tests.unit.capsule.test_archive import archive_bytes
from tests.unit.capsule.test_chunker import Dribble
from tests.unit.capsule.trees import fix_times, text_bytes

KiB, MiB = 1 << 10, 1 << 20
PARAMS = ChunkParams(16 * KiB, 64 * KiB, 256 * KiB, solo_min=8 * KiB, join_max=2 * KiB)


def mixed_tree(root: Path, seed: int, files: int, total: int, smallest: int = 100) -> Path:
    """Files of log-uniform sizes (``smallest``..~100x the mean) in a few directories, half text."""
    rng = random.Random(seed)
    raw = [2 ** rng.uniform(0, 13) for _ in range(files)]
    sizes = [max(smallest, int(s * total / sum(raw))) for s in raw]
    for i, size in enumerate(sizes):
        d = root / ("bin", "etc", "usr/lib", "usr/share")[i % 4]
        d.mkdir(parents=True, exist_ok=True)
        name = f"file{i:03d}" if i != 5 else "n" * 120  # one long name: a pax header before the ustar one
        (d / name).write_bytes(text_bytes(rng, size) if i % 2 else rng.randbytes(size))
    fix_times(root)
    return root


def cut(root: Path, params: ChunkParams, block_size: int = 0, seed: int = 0) -> tuple[bytes, list[int]]:
    """The archive of ``root`` and its chunk lengths, read in dribbles of random length.

    Here the whole stream is read (and all boundaries known) before cutting; the importer cuts as
    it reads. The cutter must not care: it only needs a boundary before the bytes it points into.
    """
    stream = ArchiveStream(iter(walk_directory(root)), solo_min=params.solo, join_max=params.join_max)
    data = archive_bytes(stream)
    cutter = ChunkCutter(Dribble(data, random.Random(seed)), params, block_size=block_size,
                         boundaries=stream.boundaries)
    lengths = []
    for view, block in cutter:
        lengths.append(len(view))
        cutter.release(block)
    return bytes(data), lengths


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    return mixed_tree(tmp_path / "tree", seed=3, files=60, total=3 * MiB)


def test_solo_files_have_their_own_chunks_and_headers_stay_small(mixed: Path, tmp_path: Path) -> None:
    data, lengths = cut(mixed, PARAMS)
    assert sum(lengths) == len(data) and max(lengths) <= PARAMS.max_size
    starts = {0}
    for n in lengths:
        starts.add(max(starts) + n)
    archive = tmp_path / "a.tar"
    archive.write_bytes(data)
    solo = 0
    data_spans = []  # (start, end) of every solo file's data
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            if not (m.isreg() and m.size >= PARAMS.solo):
                continue
            solo += 1
            end = m.offset_data + m.size + (-m.size % 512)
            data_spans.append((m.offset_data, end))
            assert m.offset_data in starts and end in starts, m.name  # data starts and ends a chunk
            # The chunk holding its (first) header: at most join_max of a run, join_max of headers of
            # members without data (directories, links), and its own header.
            head = max(s for s in starts if s <= m.offset)
            assert m.offset_data - head <= 2 * PARAMS.join_max + (m.offset_data - m.offset), m.name
            inside = sorted(s for s in starts if m.offset_data <= s <= end)
            pieces = [b - a for a, b in itertools.pairwise(inside)]
            # A short last piece joins the one before it whenever both fit in max_size.
            assert all(p >= PARAMS.min_size for p in pieces[:-1]), (m.name, pieces)
            if len(pieces) > 1 and pieces[-1] < PARAMS.min_size:
                assert pieces[-2] + pieces[-1] > PARAMS.max_size
    assert solo >= 20
    # Chunks of the runs of small members between solo files are cut with the smaller run sizes.
    data_starts = {a for a, _ in data_spans}
    chunks = list(itertools.pairwise(sorted(starts)))
    runs = [b - a for a, b in chunks if b not in data_starts and not any(s <= a < e for s, e in data_spans)]
    assert runs and max(runs) <= PARAMS.run_sizes()[2] < PARAMS.max_size


@pytest.mark.parametrize("block_size", [0, 4 * 256 * KiB + 1, 7 << 20])
def test_cuts_do_not_depend_on_reads_or_blocks(mixed: Path, block_size: int) -> None:
    _data, lengths = cut(mixed, PARAMS)
    assert cut(mixed, PARAMS, block_size=block_size, seed=block_size)[1] == lengths


def test_plain_cuts_keep_their_meta_and_ids(mixed: Path, tmp_path: Path) -> None:
    """Capsules imported before member cuts keep their version ids when imported the old way."""
    old = ChunkParams(16 * KiB, 64 * KiB, 256 * KiB, members=False)
    assert "members" not in old.as_meta() and PARAMS.as_meta()["members"]["solo_min"] == 8 * KiB
    a = import_capsule(CapsuleStore(tmp_path / "s1"), "t", mixed, options=ImportOptions(chunk=old, durable=False))
    b = import_capsule(CapsuleStore(tmp_path / "s2"), "t", mixed, options=ImportOptions(chunk=PARAMS, durable=False))
    assert a.version != b.version and a.raw_size == b.raw_size  # same stream, other cuts


def golden_tar(path: Path) -> Path:
    """A tar with fixed owners and times, so its version id is the same for every user and machine."""
    rng = random.Random(4)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(30):
            data = rng.randbytes(int(2 ** rng.uniform(6, 19)))
            ti = tarfile.TarInfo(f"d{i % 3}/f{i:02d}")
            ti.size, ti.mtime, ti.mode = len(data), 1_700_000_000, 0o644
            tf.addfile(ti, io.BytesIO(data))
    return path


def test_stream_cuts_give_the_ids_of_earlier_bootd(tmp_path: Path) -> None:
    """chunk_cut = "stream" keeps the version ids of capsules imported before member cuts: this id is
    what bootd 4f4762a (the last commit without member cuts) gives this tar."""
    params = ChunkParams(16 * KiB, 64 * KiB, 256 * KiB, members=False)
    r = import_capsule(CapsuleStore(tmp_path / "s"), "g", golden_tar(tmp_path / "g.tar"),
                       options=ImportOptions(chunk=params, durable=False))
    assert (r.version, r.chunks) == ("7b4a89068183c30bb577e10f96b9ffbaedbdf8d737ec4ef34fdf44b38ba426f0", 12)


def test_config_chooses_the_cutting(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[capsule]\nchunk_cut = "stream"\n')
    (tmp_path / "b.toml").write_text("")
    old, new = (import_options(config.load(tmp_path / f"{n}.toml")).chunk for n in "ab")
    assert not old.members and "members" not in old.as_meta() and new.members and new.as_meta()["members"]


def test_same_tree_same_id_and_chunks(mixed: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(mixed, copy, symlinks=True)
    fix_times(copy)
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(mixed, arcname=".")
    opts = ImportOptions(chunk=PARAMS, durable=False)
    runs = [import_capsule(CapsuleStore(tmp_path / f"s{i}"), "t", src, options=opts)
            for i, src in enumerate((mixed, copy, archive))]
    assert len({r.version for r in runs}) == 1
    lists = [CapsuleStore(tmp_path / f"s{i}").load_manifest(r.version).chunks for i, r in enumerate(runs)]
    assert lists[0] == lists[1] == lists[2]


# ---- the byte targets, on the bench's tree scaled down 10x (bench/delta runs the full size)

SCALE = 10
SCALED = ChunkParams(256 * KiB // 8, MiB // 8, 4 * MiB // 8, join_max=16 * KiB // SCALE)  # solo: min_size
PLAIN = ChunkParams(SCALED.min_size, SCALED.avg_size, SCALED.max_size, members=False)


def added(store_dir: Path, root: Path, params: ChunkParams) -> int:
    """Stored bytes a re-import adds: new chunks plus the new manifest."""
    store = CapsuleStore(store_dir)
    r = import_capsule(store, "t", root, options=ImportOptions(chunk=params, durable=False))
    return r.new_bytes + store.manifest_path(r.version).stat().st_size


@pytest.mark.parametrize("change", ["insert", "chmod", "dir-mtime", "chown"])
def test_update_bounds(tmp_path: Path, change: str) -> None:
    root = mixed_tree(tmp_path / "tree", seed=20261201, files=40, total=48 * MiB // SCALE, smallest=16 * KiB // SCALE)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    files = sorted(p for p in root.rglob("*") if p.is_file())
    middle, mdir = files[len(files) // 2], sorted(p for p in root.rglob("*") if p.is_dir())[2]
    base: dict[bool, Path] = {}
    for members, params in ((False, PLAIN), (True, SCALED)):
        base[members] = tmp_path / f"base-{members}"
        import_capsule(CapsuleStore(base[members]), "t", root, options=ImportOptions(chunk=params, durable=False))
    if change == "insert":
        (mdir / "inserted.bin").write_bytes(os.urandom(MiB // SCALE))
        bound = MiB // SCALE + size // 20
    else:
        if change == "chmod":
            middle.chmod(0o755)
        elif change == "chown":
            os.chown(middle, 1000, 1000) if os.geteuid() == 0 else pytest.skip("chown needs root")
        else:
            os.utime(mdir, (1_700_003_600, 1_700_003_600))
        bound = 64 * KiB // SCALE
    got = {}
    for members, params in ((False, PLAIN), (True, SCALED)):
        store = tmp_path / f"s-{members}"
        shutil.copytree(base[members], store, copy_function=os.link)
        got[members] = added(store, root, params)
    print(f"{change}: {got[True]} B with member cuts, {got[False]} B with plain cuts, bound {bound} B")
    assert got[True] <= bound and got[True] < got[False]


def test_directory_headers_share_the_next_solo_header_chunk(tmp_path: Path) -> None:
    """A directory right before a solo file is archived in that file's small header chunk, also when
    small files with data come before it (they stay in their run)."""
    root = tmp_path / "t"
    rng = random.Random(9)
    (root / "a").mkdir(parents=True)
    (root / "a" / "small").write_bytes(rng.randbytes(40 * KiB))
    for d in ("b", "b/c"):
        (root / d).mkdir()
    (root / "b" / "c" / "big").write_bytes(rng.randbytes(600 * KiB))
    fix_times(root)
    data, lengths = cut(root, PARAMS)
    offsets = list(itertools.accumulate([0, *lengths]))
    chunk_of = {data.index(name + b"\0"): name for name in (b"./b/", b"./b/c/", b"./b/c/big")}
    starts_before = {name: max(o for o in offsets if o <= at) for at, name in chunk_of.items()}
    assert starts_before[b"./b/"] == starts_before[b"./b/c/"] == starts_before[b"./b/c/big"]
    first = offsets.index(starts_before[b"./b/"])
    assert lengths[first] <= 3 * 512  # three headers, nothing else
