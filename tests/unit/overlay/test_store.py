"""The overlay store, metadata validation, accounts and host keys."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from bootd.errors import NotFound, OverlayError, TemplateError
from bootd.overlay import FileMeta, OverlayMeta, OverlayStore
from bootd.overlay.accounts import read_accounts, read_authorized_keys
from bootd.overlay.hostkeys import check_machine_id, generate_host_keys, needed_host_keys, new_machine_id
from bootd.overlay.meta import parse_meta
from tests.unit.overlay.helpers import make


@pytest.fixture
def store(tmp_path: Path) -> OverlayStore:
    return OverlayStore(tmp_path / "overlays")


@pytest.mark.parametrize(("text", "needle"), [
    ('{"kind": "sometimes"}', "kind 'sometimes' is not valid; expected one of: system, runtime"),
    ('{"secret": "yes"}', "secret must be true or false"),
    ('{"colour": 1}', "unknown key 'colour'; valid keys are"),
    ('{"defaults": {"mode": "0999"}}', "mode '0999' is not valid"),
    ('{"defaults": {"mode": 70000}}', "out of range"),
    ('{"files": {"../etc/passwd": {}}}', "bad overlay.json: files key '../etc/passwd'"),
    ('{"files": {"etc/x": {"owner": "Bad Name"}}}', "owner 'Bad Name' is not valid"),
    ('{"directories": [{"path": "/"}]}', "bad overlay.json: directories[0]: path '/'"),
    ('{"kind": "system",\n "secret": tru}', "overlay.json:2: not valid JSON"),
])
def test_metadata_errors_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(OverlayError) as err:
        parse_meta(text)
    assert needle in str(err.value)


def test_metadata_round_trips() -> None:
    meta = OverlayMeta(kind="runtime", secret=True, description="d", defaults=FileMeta(mode=0o600),
                       files={"etc/a.j2": FileMeta(mode=0o644, owner=1000, group="users", template=False)})
    assert parse_meta(meta.dumps()) == meta


def test_store_is_private_and_lists_site_over_builtin(store: OverlayStore, tmp_path: Path) -> None:
    with pytest.raises(OverlayError, match=r"already exists \(builtin\)"):
        make(store, "hosts", {})
    (tmp_path / "t/etc").mkdir(parents=True)
    (tmp_path / "t/etc/hosts").write_text("static\n")
    store.import_tree("hosts", tmp_path / "t")  # a site overlay shadows the shipped one
    make(store, "mine", {"etc/motd.j2": "{{ node.name }}\n"})
    names = store.names()
    assert names["hosts"] == "site" and names["mine"] == "site" and names["hostname"] == "builtin"
    assert store.load("hosts").entries[0].data == b"static\n"
    assert store.root.stat().st_mode & 0o777 == 0o700
    target = (store.root / "mine").resolve()
    for p in [target, *target.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p
    with pytest.raises(OverlayError, match="already exists"):
        make(store, "mine", {})
    store.delete("hosts")
    assert store.names()["hosts"] == "builtin"
    with pytest.raises(OverlayError, match="shipped with bootd"):
        store.delete("hosts")
    with pytest.raises(NotFound, match="no overlay 'nope'"):
        store.load("nope")
    with pytest.raises(OverlayError, match="bad overlay name"):
        store.load("../etc")


def test_export_import_round_trip_and_plain_trees(store: OverlayStore, tmp_path: Path) -> None:
    make(store, "src", {"etc/a.j2": "{{ node.name }}\n", "bin/tool": b"\x00\x01"},
         files={"bin/tool": FileMeta(mode=0o755)}, kind="runtime")
    buf = io.BytesIO()
    store.export("src", buf)
    again = io.BytesIO()
    store.export("src", again)
    assert buf.getvalue() == again.getvalue()  # deterministic
    (tmp_path / "src.tar").write_bytes(buf.getvalue())
    copy = store.import_tree("copy", tmp_path / "src.tar")
    assert copy.digest == store.load("src").digest and copy.kind == "runtime"
    with pytest.raises(OverlayError, match="--replace"):
        store.import_tree("copy", tmp_path / "src.tar")
    # A plain directory becomes files/, keeping the executable bit.
    plain = tmp_path / "plain"
    (plain / "etc").mkdir(parents=True)
    (plain / "etc/issue.j2").write_text("Welcome to {{ node.name }}\n")
    (plain / "run.sh").write_text("#!/bin/sh\n")
    (plain / "run.sh").chmod(0o755)
    ov = store.import_tree("plain", plain)
    assert {e.dest: e.meta.mode for e in ov.entries} == {"etc/issue": 0o644, "run.sh": 0o755}


def test_import_refuses_unsafe_archives_and_trees(store: OverlayStore, tmp_path: Path) -> None:
    def tar(name: str, members: list[tarfile.TarInfo]) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w") as tf:
            for m in members:
                tf.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
        return path

    up = tarfile.TarInfo("files/../../evil")
    up.size = 1
    with pytest.raises(OverlayError, match=r"bad .*member"):
        store.import_tree("a", tar("up.tar", [up]))
    link = tarfile.TarInfo("files/etc/shadow")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    with pytest.raises(OverlayError, match="only regular files"):
        store.import_tree("b", tar("link.tar", [link]))
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "shadow").symlink_to("/etc/shadow")
    with pytest.raises(OverlayError, match="symlink"):
        store.import_tree("c", tree)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(OverlayError, match="not a tar archive"):
        store.import_tree("d", tmp_path / "junk.tar")
    assert set(store.names()) & {"a", "b", "c", "d"} == set()


def test_a_refused_change_keeps_the_old_overlay(store: OverlayStore, tmp_path: Path) -> None:
    make(store, "keep", {"etc/motd.j2": "hello {{ node.name }}\n"})
    before = store.load("keep").digest
    work = store.checkout("keep", tmp_path)
    (work / "files/etc/motd.j2").write_text("hello\n{{ node.name \n")
    with pytest.raises(TemplateError) as err:
        store.commit("keep", work)
    assert err.value.file == "etc/motd.j2" and err.value.line == 2
    assert store.load("keep").digest == before
    assert len(list((store.root / ".v").iterdir())) == 1  # only the published version
    (work / "files/etc/motd.j2").write_text("bye {{ node.name }}\n")
    assert store.commit("keep", work).digest != before
    assert len(list((store.root / ".v").iterdir())) == 1  # the old version was removed


def test_metadata_must_name_existing_files(store: OverlayStore) -> None:
    with pytest.raises(OverlayError, match=r"sets files\['etc/gone'\]"):
        make(store, "m", {"etc/x": "x"}, files={"etc/gone": FileMeta()})
    with pytest.raises(OverlayError, match="would both write /etc/x"):
        make(store, "m", {"etc/x": "x", "etc/x.j2": "{{ node.name }}"})


def test_read_accounts_takes_the_uid_range(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:A:/home/alice:/bin/bash\n"
                                     "nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
                                     "carol:x:1200:100::/home/carol:/bin/zsh\n+ldap\n")
    (tmp_path / "group").write_text("root:x:0:\nusers:x:100:carol\nalice:x:1000:\nhpc:x:1500:alice,carol,root\n")
    (tmp_path / "shadow").write_text("root:$6$r:1::::::\nalice:$6$a:1::::::\n")
    users, groups = read_accounts(tmp_path / "passwd", tmp_path / "group", uid_min=1000, uid_max=2000)
    assert [(u.name, u.uid, u.hash) for u in users] == [("alice", 1000, None), ("carol", 1200, None)]
    assert [(g.name, g.members) for g in groups] == [("alice", ()), ("hpc", ("alice", "carol"))]
    users, _ = read_accounts(tmp_path / "passwd", tmp_path / "group", uid_min=1000, uid_max=2000,
                             shadow=tmp_path / "shadow")
    assert [u.hash for u in users] == ["$6$a", None]
    (tmp_path / "broken").write_text("alice:x:1000\n")
    with pytest.raises(OverlayError, match="broken:1: expected 7"):
        read_accounts(tmp_path / "broken", tmp_path / "group")
    (tmp_path / "keys").write_text("# comment\n\nssh-ed25519 AAAA a@b\n")
    assert read_authorized_keys(tmp_path / "keys") == ("ssh-ed25519 AAAA a@b",)
    assert read_authorized_keys(tmp_path / "missing") == ()


def test_host_keys_are_made_once_per_node(tmp_path: Path) -> None:
    assert needed_host_keys({}) == ["ed25519", "rsa"]
    a = generate_host_keys(tmp_path / "a", needed_host_keys([]), comment="root@n0001")
    b = generate_host_keys(tmp_path / "b", ["ed25519"], comment="root@n0002")
    assert needed_host_keys(a) == [] and needed_host_keys(b) == ["rsa"]
    assert a["ed25519"].private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert a["ed25519"].public.startswith("ssh-ed25519 ") and a["ed25519"].public.strip().endswith("root@n0001")
    assert a["rsa"].public.startswith("ssh-rsa ")
    assert a["ed25519"].public != b["ed25519"].public
    assert (tmp_path / "a/ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    with pytest.raises(OverlayError, match="refusing to overwrite"):
        generate_host_keys(tmp_path / "a", ["ed25519"])
    with pytest.raises(OverlayError, match="unknown host key type"):
        generate_host_keys(tmp_path / "c", ["dsa"])
    mid = new_machine_id()
    assert check_machine_id(mid) == mid and mid != new_machine_id()
    with pytest.raises(OverlayError):
        check_machine_id("not-an-id")


def test_shipped_overlays_all_load_and_are_documented(store: OverlayStore) -> None:
    from bootd.overlay import RUNTIME_OVERLAYS, SYSTEM_OVERLAYS

    names = store.names()
    assert set(SYSTEM_OVERLAYS) | set(RUNTIME_OVERLAYS) | {"users-shadow"} == set(names)
    for name in names:
        ov = store.load(name)
        assert ov.meta.description, name
        assert ov.kind == ("system" if name in SYSTEM_OVERLAYS else "runtime"), name
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    assert all(f"`{n}`" in readme for n in names)
    assert json.loads((store.builtin / "users/overlay.json").read_text())["kind"] == "runtime"  # type: ignore[operator]
    assert os.access(store.builtin / "users/files/usr/lib/bootd/apply.d/50-users", os.R_OK)  # type: ignore[operator]


def test_store_reloads_only_a_changed_overlay(store: OverlayStore, tmp_path: Path) -> None:
    make(store, "c", {"etc/c.j2": "{{ node.name }}\n"})
    first = store.load("c")
    assert store.load("c") is first
    work = store.checkout("c", tmp_path)
    (work / "files/etc/c.j2").write_text("{{ node.ip }}\n")
    store.commit("c", work)
    assert store.load("c") is not first and store.load("c").digest != first.digest


def test_overlay_config_section(tmp_path: Path) -> None:
    from bootd.config import from_dict
    from bootd.errors import ConfigError

    cfg = from_dict({"server": {"state_dir": str(tmp_path)}})
    assert cfg.overlay.dir == tmp_path / "overlays" and (cfg.overlay.uid_min, cfg.overlay.uid_max) == (1000, 59999)
    assert not cfg.overlay.password_hashes
    cfg = from_dict({"overlay": {"dir": "/srv/ov", "password_hashes": True, "uid_min": 5000, "uid_max": 6000}})
    assert cfg.overlay.dir == Path("/srv/ov") and cfg.overlay.password_hashes
    with pytest.raises(ConfigError, match=r"overlay\.uid_max: 10 is below uid_min 1000"):
        from_dict({"overlay": {"uid_max": 10}})
    with pytest.raises(ConfigError, match=r"overlay\.colour: unknown key"):
        from_dict({"overlay": {"colour": "blue"}})


def test_an_overlay_reading_secrets_must_be_marked_secret(store: OverlayStore) -> None:
    with pytest.raises(TemplateError, match="reads host_keys, which are secrets"):
        make(store, "leak", {"etc/k.j2": "{{ node.host_keys.ed25519.private }}"})
    with pytest.raises(TemplateError, match="reads hash"):
        make(store, "leak2", {"etc/s.j2": "{% for u in master.users %}{{ u['hash'] }}{% endfor %}"})
    assert make(store, "ok", {"etc/k.j2": "{{ node.host_keys.ed25519.public }}"}, secret=True).secret
