"""Recipes are checked completely before anything runs; errors name the file, the key and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootd.capsule.build import BuildError, check_packages, diagnose, mmdebstrap_command
from bootd.capsule.recipe import RecipeError, load_recipe, machine_sources

ROOT = Path(__file__).resolve().parents[3]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.toml"
    p.write_text(text)
    (tmp_path / "hello.sh").write_text("echo hi\n")
    return p


GOOD = '''suite = "bookworm"
mirror = "http://deb.example.org/debian"
variant = "essential"
packages = ["bash", "hello=2.10-3"]
commands = ["echo ok > /etc/ok"]
[[files]]
src = "hello.sh"
dest = "/usr/local/bin/hello"
mode = "0755"
'''


def test_good_recipe_and_its_mmdebstrap_command(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, GOOD))
    assert r.sources == ("deb http://deb.example.org/debian bookworm main",)
    assert r.files[0].mode == 0o755 and r.files[0].src == (tmp_path / "hello.sh").resolve()
    cmd = mmdebstrap_command(r, tmp_path / "out.tar", tmp_path / "cache")
    assert cmd[0] == "mmdebstrap" and "--variant=essential" in cmd and "--include=bash,hello=2.10-3" in cmd
    assert cmd[-3:] == ["bookworm", str(tmp_path / "out.tar"), "deb http://deb.example.org/debian bookworm main"]
    hooks = [c for c in cmd if c.startswith("--customize-hook=")]
    # The cache is saved before the recipe's own steps, so a failing command keeps what was downloaded.
    assert hooks[0].startswith("--customize-hook=sync-out /var/cache/apt/archives")
    assert any("upload" in h and "/usr/local/bin/hello" in h for h in hooks)
    assert any("chmod 755 /usr/local/bin/hello" in h for h in hooks)
    assert "echo ok > /etc/ok" in hooks[-2] and "bootd-step: command 1" in hooks[-2]
    assert hooks[-1].endswith("rm -f \"$1\"/etc/dpkg/dpkg.cfg.d/99mmdebstrap")  # no force-unsafe-io left behind
    assert "--dpkgopt=force-unsafe-io" in cmd


def test_shipped_debian_hpc_recipe_loads() -> None:
    r = load_recipe(ROOT / "capsules" / "debian-hpc" / "recipe.toml")
    for pkg in ("systemd-sysv", "openssh-server", "openmpi-bin", "chrony", "iproute2", "isc-dhcp-client"):
        assert pkg in r.packages
    assert not any(p.startswith("linux-image") for p in r.packages)
    assert "libopenmpi-dev" in r.build_packages and any("mpicc" in c for c in r.commands)


@pytest.mark.parametrize(("text", "key", "says"), [
    ("suite = [1\n", "-", "not valid TOML"),
    ("pakages = []\n", "pakages", "unknown key; valid keys are: suite, mirror"),
    ('variant = "tiny"\n', "variant", "expected one of: essential, apt, required, minbase"),
    ('packages = ["Bad Name"]\n', "packages", "expected Debian package names"),
    ("packages = \"bash\"\n", "packages", "expected a list of Debian package names"),
    ('mirror = "deb.debian.org"\n', "mirror", "expected an http://, https:// or file:// URL"),
    ('suite = "Bookworm!"\n', "suite", "expected a Debian suite"),
    ("epoch = -1\n", "epoch", "SOURCE_DATE_EPOCH"),
    ('commands = [""]\n', "commands", "non-empty strings"),
    ('[[files]]\nsrc = "missing.sh"\ndest = "/x"\n', "files[0].src", "is not a file"),
    ('[[files]]\nsrc = "hello.sh"\ndest = "usr/x"\n', "files[0].dest", "absolute file path"),
    ('[[files]]\nsrc = "hello.sh"\ndest = "/../x"\n', "files[0].dest", "without '..'"),
    ('[[files]]\nsrc = "hello.sh"\ndest = "/x"\nmode = "rwx"\n', "files[0].mode", "octal mode"),
    ('[[files]]\nsrc = "hello.sh"\ndest = "/x"\nowner = "root"\n', "files[0].owner", "valid keys are: src"),
])
def test_malformed_recipes_name_file_key_and_valid_values(tmp_path: Path, text: str, key: str, says: str) -> None:
    path = write(tmp_path, 'mirror = "http://deb.example.org/debian"\n' + text if "mirror" not in text
                 and "[[files]]" not in text and key != "-" else text.replace("[[files]]",
                 'mirror = "http://x.example/debian"\n[[files]]'))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: {key}: "), str(info.value)
    assert says in str(info.value)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_default_mirror_is_what_apt_on_the_master_uses(tmp_path: Path) -> None:
    apt = tmp_path / "etc" / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text("# old style\ndeb [arch=amd64] http://mirror.local/debian bookworm main\n"
                                      "deb-src http://mirror.local/debian bookworm main\n")
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.example\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb\nURIs: http://other.example\nSuites: trixie\n")
    assert machine_sources("bookworm", tmp_path) == [
        ("http://mirror.local/debian", "bookworm"), ("http://deb.debian.org/debian", "bookworm"),
        ("http://deb.debian.org/debian", "bookworm-updates"),
        ("http://deb.debian.org/debian-security", "bookworm-security")]
    r = load_recipe(write(tmp_path, 'suite = "bookworm"\n'), apt_root=tmp_path)
    assert r.sources[0] == "deb http://mirror.local/debian bookworm main" and len(r.sources) == 4
    with pytest.raises(RecipeError, match=r"mirror: not set, and apt on this machine has no source for sid"):
        load_recipe(write(tmp_path, 'suite = "sid"\n'), apt_root=tmp_path)


def test_failures_are_named_by_step(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, GOOD))
    log = ["I: running apt-get update...", "I: downloading packages with apt...",
           "E: Unable to locate package bootd-nope", "E: apt-get --yes install failed"]
    assert diagnose(log, r) == ("downloading packages with apt", "package not found: bootd-nope (suite bookworm)")
    log = ["I: running apt-get update...\n", "Err:1 http://127.0.0.1:9/debian bookworm InRelease",
           "  Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)",
           "E: apt-get update failed"]
    step, reason = diagnose(log, r)
    assert step == "running apt-get update"
    assert reason.startswith("mirror unreachable (http://deb.example.org/debian)")
    log = ["I: installing remaining packages inside the chroot...", "bootd-step: command 1: exit 7",
           "E: command failed: ..."]
    assert diagnose(log, r) == ("command 1: exit 7", "the command exited with an error (its output is above)")


def test_unknown_packages_are_refused_from_the_cached_lists(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, GOOD))  # bash, hello=2.10-3 from deb.example.org
    cache = tmp_path / "cache"
    (cache / "lists").mkdir(parents=True)
    check_packages("x", r, cache)  # no lists for these sources: apt decides later
    lists = cache / "lists" / "deb.example.org_debian_dists_bookworm_main_binary-amd64_Packages"
    lists.write_text("Package: bash\nVersion: 5\n\nPackage: mawk\nProvides: awk, hello (= 1)\n")
    check_packages("x", r, cache)  # bash by name, hello as a virtual package
    lists.write_text("Package: bash\nVersion: 5\n\nPackage: hello-traditional\n")
    with pytest.raises(BuildError, match=r"at step 'check packages': package not found: hello \(suite bookworm"):
        check_packages("x", r, cache)
