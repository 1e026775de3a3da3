"""`make cluster` builds the debian-hpc capsule once per recipe: the built version is reused while the
recipe directory's bytes are the same, and built again when any of them changes.

Fast: a small tree imported with the real `bootd capsule import` stands in for a build; a changed recipe
that does not validate proves a rebuild was attempted (bootd refuses it in a second, before mmdebstrap).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bootd.lab.cluster import ClusterError, ensure_capsule, recipe_key
from bootd.lab.netns import Lab
from bootd.lab.serve import BootdServer


def _recipe(d: Path, text: str = 'suite = "bookworm"\nvariant = "essential"\n') -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "files").mkdir(exist_ok=True)
    (d / "files" / "hello.c").write_text("int main(void) { return 0; }\n")
    (d / "recipe.toml").write_text(text)
    return d / "recipe.toml"


def test_recipe_key_covers_the_recipe_and_its_files(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "r")
    key = recipe_key(recipe)
    assert key == recipe_key(recipe)
    (recipe.parent / "files" / "hello.c").write_text("int main(void) { return 1; }\n")
    assert recipe_key(recipe) != key
    changed = recipe_key(recipe)
    (recipe.parent / "files" / "hello.c").rename(recipe.parent / "files" / "hello2.c")
    assert recipe_key(recipe) != changed  # a renamed file counts too


def test_a_build_of_the_same_recipe_is_reused_and_a_changed_recipe_is_built(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "recipe")
    lab = Lab(workdir=tmp_path / "lab", prefix="bd-clc")  # never brought up: the CLI needs only its config
    bootd = BootdServer(lab, state_dir=tmp_path / "state", stage1_dir=tmp_path / "stage1",
                        overrides={"capsule": {"dir": str(tmp_path / "cache" / "capsules")}})
    bootd.write_config()
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=test\n")
    vid = bootd.import_capsule("hpc", tree)
    # As a finished build leaves it: the stamp names the recipe's hash and the version it made.
    (tmp_path / "cache" / "hpc.recipe").write_text(f"{recipe_key(recipe)} {vid}\n")
    said: list[str] = []
    log = tmp_path / "build.log"
    assert ensure_capsule(bootd, said.append, log, recipe=recipe, name="hpc") == (vid, True)
    assert said == [] and not log.exists()

    # Any change to the recipe directory means a build; this recipe is refused at validation.
    recipe.write_text('suite = "bookworm"\nvariant = "huge"\n')
    with pytest.raises(ClusterError) as info:
        ensure_capsule(bootd, said.append, log, recipe=recipe, name="hpc")
    assert "variant" in str(info.value) and "huge" in str(info.value)
    assert said and "building capsule hpc" in said[0]
    assert "huge" in log.read_text()
    # The stamp still names the old build: a failed build changes nothing.
    assert (tmp_path / "cache" / "hpc.recipe").read_text().split()[1] == vid
