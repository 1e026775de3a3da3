"""Rendering: the shipped set, the sandbox, errors with node/overlay/file/line, the tar and its ETag."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from bootd.errors import OverlayError, TemplateError
from bootd.overlay import RUNTIME_OVERLAYS, SYSTEM_OVERLAYS, FileMeta, OverlayStore, RenderCache, render
from bootd.overlay.meta import DirSpec
from tests.unit.overlay.helpers import MASTER, cluster, context, make, members, tree

SHIPPED = [*SYSTEM_OVERLAYS, *RUNTIME_OVERLAYS, "users-shadow"]


@pytest.fixture
def store(tmp_path: Path) -> OverlayStore:
    return OverlayStore(tmp_path / "overlays")


def test_shipped_set_renders_every_file_with_its_mode(store: OverlayStore) -> None:
    ctx = context(2, view=cluster(6))
    out = render(store.load_many(SHIPPED), ctx)
    m = members(out.data)
    assert m["etc/hostname"][1] == b"n0002\n"
    hosts = m["etc/hosts"][1].decode()
    assert all(f"10.1.0.{i + 1}\tn{i:04d} n{i:04d}.cluster" in hosts for i in range(6))
    assert "10.1.255.254\tmaster" in hosts
    assert m["etc/machine-id"][1] == f"{2:032x}\n".encode() and m["etc/machine-id"][0].mode == 0o444
    key = m["etc/ssh/ssh_host_ed25519_key"]
    assert key[0].mode == 0o600 and b"n0002-ed25519" in key[1] and key[1].endswith(b"KEY-----\n")
    assert m["etc/ssh/ssh_host_rsa_key.pub"][0].mode == 0o644
    assert m["root/.ssh"][0].isdir() and m["root/.ssh"][0].mode == 0o700
    assert m["root/.ssh/authorized_keys"][1].endswith(b"ssh-ed25519 AAAAC3Nz root@master\n")
    assert b"MACAddress=52:54:00:00:00:02" in m["etc/systemd/network/10-bootd-boot.network"][1]
    assert b"server 10.1.255.254 iburst" in m["etc/chrony/conf.d/bootd.conf"][1]
    assert m["etc/bootd/users/passwd"][1] == (b"alice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
                                              b"bob:x:1001:1001::/home/bob:/bin/sh\n")
    assert m["etc/bootd/users/group"][1] == b"alice:x:1000:alice\nhpc:x:1500:alice,bob\n"
    shadow = m["etc/bootd/users/shadow"]
    assert shadow[1].startswith(b"alice:$6$salt$hash:") and shadow[0].mode == 0o600
    home = m["home/alice"][0]
    assert home.isdir() and (home.mode, home.uid, home.gid) == (0o700, 1000, 1000)
    assert m["usr/lib/bootd/apply.d/50-users"][0].mode == 0o755
    assert out.secret  # ssh-host-keys and users-shadow are secret
    assert not render(store.load_many(RUNTIME_OVERLAYS), ctx).secret


def test_network_follows_what_the_node_agent_reported(store: OverlayStore) -> None:
    ov = [store.load("network")]
    both = members(render(ov, context(1)).data)
    assert b"DHCP=ipv4" in both["etc/systemd/network/10-bootd-boot.network"][1]
    assert b"iface" not in both["etc/network/interfaces.d/bootd-boot"][1]  # the name is not known yet
    ctx = context(1, network="ifupdown")
    assert ctx.node.nic is not None
    ifup = replace(ctx, node=replace(ctx.node, nic=replace(ctx.node.nic, name="eth0")))
    m = members(render(ov, ifup).data)
    assert b"iface eth0 inet dhcp" in m["etc/network/interfaces.d/bootd-boot"][1]
    assert b"Unmanaged=yes" in m["etc/systemd/network/10-bootd-boot.network"][1]
    nd = members(render(ov, context(1, network="networkd")).data)
    assert b"DHCP=ipv4" in nd["etc/systemd/network/10-bootd-boot.network"][1]


def test_output_is_deterministic_and_the_etag_follows_content(store: OverlayStore) -> None:
    ovs = store.load_many(SHIPPED)
    a, b = render(ovs, context(3)), render(ovs, context(3))
    assert a.data == b.data and a.etag == b.etag and a.etag.startswith('"') and len(a.sha256) == 64
    assert render(ovs, context(4)).etag != a.etag
    cache = RenderCache()
    ctx = context(3)
    assert render(ovs, ctx, cache=cache).data == a.data
    assert render(ovs, ctx, cache=cache).data == a.data and cache.hits > 0  # hosts, users: rendered once per batch
    other = context(3, view=cluster(5))  # a new cluster view invalidates the shared renderings
    assert render(ovs, other, cache=cache).data == render(ovs, other).data != a.data
    assert len(a.data) % 512 == 0 and a.data.endswith(b"\0" * 1024)
    assert all(m.mtime == 0 for m, _ in members(a.data).values())


def test_node_vars_win_over_group_vars(store: OverlayStore) -> None:
    ov = make(store, "motd", {"etc/motd.j2": "{{ vars.site }} {{ vars.rack }} {{ group.vars.rack }}\n"})
    out = render([ov], context(1, node_vars={"rack": "r7"}, group_vars={"rack": "r1", "site": "lab"}))
    assert members(out.data)["etc/motd"][1] == b"lab r7 r1\n"


def test_binary_and_literal_files_are_copied_byte_for_byte(store: OverlayStore) -> None:
    blob = bytes(range(256)) * 9 + b"\0{{ node.name }}\xff"
    literal = b"{{ not a template }}\n"
    ov = make(store, "bin", {"opt/blob.bin": blob, "etc/raw.j2": literal},
              files={"etc/raw.j2": FileMeta(template=False, mode=0o640, owner=1000, group="staff")})
    m = members(render([ov], context(1)).data)
    assert m["opt/blob.bin"][1] == blob
    info, data = m["etc/raw.j2"]
    assert data == literal and info.mode == 0o640 and info.uid == 1000 and info.gname == "staff"


def test_owners_and_modes_are_kept(store: OverlayStore) -> None:
    ov = make(store, "own", {"srv/a": "a", "srv/b.j2": "{{ node.name }}", "srv/c": "c"},
              files={"srv/a": FileMeta(mode=0o4755, owner=0, group=0),
                     "srv/b.j2": FileMeta(mode=0o600, owner=1234, group=4321),
                     "srv/c": FileMeta(mode=0o644, owner="www-data", group="www-data")})
    m = members(render([ov], context(1)).data)
    assert (m["srv/a"][0].mode, m["srv/a"][0].uid) == (0o4755, 0)
    assert (m["srv/b"][0].mode, m["srv/b"][0].uid, m["srv/b"][0].gid, m["srv/b"][1]) == (0o600, 1234, 4321, b"n0001")
    assert (m["srv/c"][0].uname, m["srv/c"][0].gname) == ("www-data", "www-data")


@pytest.mark.parametrize("expr", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('id') }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ node.__class__ }}",
    "{{ node._secret }}",
    "{{ '{0.__class__}'.format(node) }}",
    "{{ ''|attr('__class__') }}",
    "{{ vars.__class__.__base__ }}",
    "{{ 'x' * 100000000 }}",
    "{{ 2 ** 100000 }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ node.name.center(width=1000000000) }}",
    "{{ '{:>1000000000}'.format(node.name) }}",
    "{{ '%1000000000s' % node.name }}",
    "{% for i in range(100000000) %}{% endfor %}",
])
def test_sandbox_escapes_are_refused(store: OverlayStore, expr: str) -> None:
    ov = make(store, "evil", {"etc/evil.j2": f"line one\n{expr}\n"})
    with pytest.raises(TemplateError) as err:
        render([ov], context(7))
    msg = str(err.value)
    assert err.value.node == "n0007" and err.value.file == "etc/evil.j2" and err.value.line == 2, msg
    assert "node n0007: overlay evil:etc/evil.j2:2:" in msg
    assert "uid=" not in msg  # nothing ran


def test_undefined_variables_are_named_with_file_and_line(store: OverlayStore) -> None:
    ov = make(store, "typo", {"etc/app.conf.j2": "# app\nname={{ node.name }}\nrack={{ vars.rack }}\n"})
    with pytest.raises(TemplateError) as err:
        render([ov], context(5))
    assert "node n0005: overlay typo:etc/app.conf.j2:3:" in str(err.value) and "'rack'" in str(err.value)
    ov2 = make(store, "typo2", {"a.j2": "\n\n\n{% if true %}\n{{ node.nmae }}\n{% endif %}\n"})
    with pytest.raises(TemplateError) as err:
        render([ov2], context(5))
    assert err.value.line == 5 and "nmae" in str(err.value)


def test_bad_templates_are_refused_when_stored(store: OverlayStore) -> None:
    with pytest.raises(TemplateError) as err:
        make(store, "broken", {"etc/ok.j2": "{{ node.name }}\n", "etc/bad.j2": "one\n{% if node.name %}\nno end\n"})
    assert err.value.file == "etc/bad.j2" and err.value.line is not None and err.value.line >= 2
    assert "syntax error" in str(err.value)
    with pytest.raises(TemplateError) as err:
        make(store, "unknown", {"etc/x.j2": "fine\n{{ nod.name }}\n"})
    assert err.value.line == 2 and "'nod'" in str(err.value)
    with pytest.raises(TemplateError, match="UTF-8"):
        make(store, "latin", {"etc/x.j2": b"caf\xe9 {{ node.name }}"})
    assert "broken" not in store.names() and "unknown" not in store.names()
    assert not list((store.root / ".v").iterdir())  # refused stages are cleaned up


def test_later_overlays_replace_files_and_conflicts_are_named(store: OverlayStore) -> None:
    a = make(store, "a", {"etc/motd": "from a\n", "etc/only-a": "a"})
    b = make(store, "b", {"etc/motd.j2": "from b on {{ node.name }}\n"})
    m = members(render([a, b], context(1)).data)
    assert m["etc/motd"][1] == b"from b on n0001\n" and m["etc/only-a"][1] == b"a"
    d = make(store, "dirs", {}, directories=(DirSpec(path="etc/motd"),))
    with pytest.raises(OverlayError, match="makes /etc/motd a directory"):
        render([a, d], context(1))


def test_directories_for_each_item(store: OverlayStore) -> None:
    ov = make(store, "homes", {}, directories=(
        DirSpec(path="{{ item.home }}", mode="0750", owner="{{ item.uid }}", group="{{ item.gid }}",
                each="master.users"),
        DirSpec(path="scratch/{{ node.name }}", mode="1777")))
    m = members(render([ov], context(9)).data)
    assert (m["home/bob"][0].uid, m["home/bob"][0].mode) == (1001, 0o750)
    assert m["scratch/n0009"][0].mode == 0o1777
    bad = make(store, "badeach", {}, directories=(DirSpec(path="{{ item }}", each="master.nothing"),))
    with pytest.raises(TemplateError, match="nothing"):
        render([bad], context(9))
    with pytest.raises(OverlayError, match="bad directory path"):
        render([make(store, "up", {}, directories=(DirSpec(path="{{ '../' + node.name }}"),))], context(9))


@pytest.mark.parametrize("tar", ["tar", "busybox"])
def test_real_tar_programs_unpack_it(store: OverlayStore, tmp_path: Path, tar: str) -> None:
    exe = shutil.which(tar)
    assert exe is not None, f"{tar} is not installed"
    long = "opt/" + "/".join(["d" * 40] * 4) + "/file.txt"  # > 100 chars: needs the ustar prefix field
    ov = make(store, "tree", {"etc/hostname.j2": "{{ node.name }}\n", long: "deep\n", "bin/x": b"\x7fELF\0"},
              files={"bin/x": FileMeta(mode=0o755)})
    out = render([*store.load_many(["hosts"]), ov], context(1))
    dest = tmp_path / f"root-{tar}"
    dest.mkdir()
    cmd = [exe, "tar", "-xf", "-", "-C", str(dest)] if tar == "busybox" else [exe, "-xf", "-", "-C", str(dest)]
    proc = subprocess.run(cmd, input=out.data, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    files = tree(dest)
    assert files["etc/hostname"] == b"n0001\n" and files[long] == b"deep\n" and files["bin/x"] == b"\x7fELF\0"
    assert (dest / "bin/x").stat().st_mode & 0o777 == 0o755
    assert b"n0003" in files["etc/hosts"]


def test_users_hook_merges_accounts(store: OverlayStore, tmp_path: Path) -> None:
    """The shipped apply hook, run by dash and by busybox sh on a capsule-like root."""
    out = render(store.load_many(["users"]), context(1))
    for shell in ("sh", "busybox"):
        root = tmp_path / f"root-{shell}"
        (root / "etc").mkdir(parents=True)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                         "_chrony:x:100:101::/run/chrony:/usr/sbin/nologin\n"
                                         "olduser:x:1005:1005::/home/old:/bin/sh\nalice:x:2000:2000::/x:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\nhpc:x:2500:\nstale:x:1400:\n")
        (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\nolduser:$6$old:1::::::\n")
        (root / "etc/shadow").chmod(0o640)
        subprocess.run(["tar", "-xf", "-", "-C", str(root)], input=out.data, check=True, timeout=60)
        hook = root / "usr/lib/bootd/apply.d/50-users"
        cmd = ["busybox", "sh", str(hook)] if shell == "busybox" else ["sh", str(hook)]
        proc = subprocess.run(cmd, env={"BOOTD_ROOT": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert (root / "etc/passwd").read_text() == (
            "root:x:0:0:root:/root:/bin/bash\n_chrony:x:100:101::/run/chrony:/usr/sbin/nologin\n"
            "alice:x:1000:1000:Alice:/home/alice:/bin/bash\nbob:x:1001:1001::/home/bob:/bin/sh\n")
        assert (root / "etc/group").read_text() == "root:x:0:\nalice:x:1000:alice\nhpc:x:1500:alice,bob\n"
        assert (root / "etc/shadow").read_text() == ("root:*:19000:0:99999:7:::\nalice:*::0:99999:7:::\n"
                                                     "bob:*::0:99999:7:::\n")
        assert (root / "etc/shadow").stat().st_mode & 0o777 == 0o640
        assert not list((root / "etc").glob("*.bootd-new"))


def test_runtime_overlay_size_is_small(store: OverlayStore) -> None:
    out = render(store.load_many(["hosts", "authorized-keys"]), context(1, view=cluster(4)))
    assert len(out.data) <= 4 * 512 + 1024 + 1024  # headers + data blocks + end, no 10 KiB record padding


def test_a_master_without_users_renders_empty_fragments(store: OverlayStore) -> None:
    out = render(store.load_many(["users", "authorized-keys"]), context(1, master=replace(MASTER, users=(), groups=(),
                                                                                       authorized_keys=())))
    m = members(out.data)
    assert m["etc/bootd/users/passwd"][1] == b"" and not any(p.startswith("home/") for p in m)


def test_registry_nodes_become_template_values(store: OverlayStore) -> None:
    from bootd.model import Node
    from bootd.overlay import GroupInfo, node_info
    from bootd.overlay.context import Context, cluster_view

    nodes = [Node(mac="52:54:00:00:00:0b", name="n0011", group="gpu", ip="10.2.0.11", vars={"rack": "r2"}),
             Node(mac="52:54:00:00:00:0a", name="n0010", group="default", ip=None)]
    view = cluster_view(nodes, domain="lab")
    assert [n.name for n in view.nodes] == ["n0010", "n0011"]
    info = node_info(nodes[0], machine_id="ab" * 16, network="networkd", nic_name="enp1s0")
    assert info.nic is not None and (info.nic.mac, info.nic.name, info.nic.ip) == ("52:54:00:00:00:0b", "enp1s0",
                                                                                  "10.2.0.11")
    ov = make(store, "v", {"etc/v.j2": "{{ node.name }} {{ vars.rack }} {{ node.nic.name }}\n"})
    out = render([ov], Context(info, GroupInfo("gpu"), view, MASTER))
    assert members(out.data)["etc/v"][1] == b"n0011 r2 enp1s0\n"
    hosts = members(render(store.load_many(["hosts"]), Context(info, GroupInfo("gpu"), view, MASTER)).data)
    assert b"n0010" not in hosts["etc/hosts"][1] and b"10.2.0.11\tn0011 n0011.lab" in hosts["etc/hosts"][1]
    with pytest.raises(ValueError, match=r"node\.network"):
        node_info(nodes[0], network="netplan")


def test_rendered_host_keys_are_keys_ssh_reads(store: OverlayStore, tmp_path: Path) -> None:
    """Real keys from ssh-keygen, through the template and the tar, still load in ssh-keygen."""
    from bootd.overlay.hostkeys import generate_host_keys

    keys = generate_host_keys(tmp_path / "made", ["ed25519"], comment="root@n0001")
    ctx = context(1)
    ctx = replace(ctx, node=replace(ctx.node, host_keys={**ctx.node.host_keys, **keys}))  # rsa stays a fake
    out = render(store.load_many(["ssh-host-keys"]), ctx, cache=None)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "-xf", "-", "-C", str(root)], input=out.data, check=True, timeout=60)
    private = root / "etc/ssh/ssh_host_ed25519_key"
    assert private.read_text() == keys["ed25519"].private and private.stat().st_mode & 0o777 == 0o600
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, timeout=60,
                             check=True).stdout.split()[:2]
    assert derived == (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2]
