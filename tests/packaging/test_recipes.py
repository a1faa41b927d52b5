"""The shipped recipes, read as package data: names, `recipes init` copies that run alone, and a recipe
name wherever a config path is taken (`flowspeed run quickstart`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flowspeed.configs import ConfigError, dump_config, load_config
from flowspeed.configs.recipes import init_recipe, recipe_files, recipe_path, recipes, resolve_config
from flowspeed.flows.cli import app
from typer.testing import CliRunner

from tests.conftest import REPO

CONFIGS = REPO / "configs"


def test_every_shipped_yaml_but_the_include_fragments_is_a_recipe() -> None:
    files = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if p.parent.name != "presets"}
    listed = recipes()
    assert {r.relpath for r in listed.values()} == files
    assert listed["quickstart"].relpath == "quickstart.yaml" and listed["quickstart"].kind == "quickstart"
    assert listed["sd3-t2i"].relpath == "pipelines/sd3-t2i.yaml"
    assert listed["published/opensora-v1.2"].relpath == "pipelines/published/opensora-v1.2.yaml"
    assert listed["eval/qwen2_vl"].kind == "eval"
    assert all(r.summary for r in listed.values())  # each file opens with a comment saying what it is


def test_init_copies_a_recipe_with_its_includes_and_the_copy_loads_the_same(tmp_path: Path) -> None:
    assert recipe_files("eval/sd3") == [
        "eval/sd3.yaml",
        "pipelines/sd3-t2i.yaml",
        "quickstart.yaml",
        "presets/sd3-tiny.yaml",
        "presets/cogvideox-tiny.yaml",
    ]
    copy = init_recipe("eval/sd3", tmp_path / "mine")
    assert copy == tmp_path / "mine" / "eval" / "sd3.yaml"
    assert sorted(p.relative_to(tmp_path / "mine").as_posix() for p in (tmp_path / "mine").rglob("*.yaml")) == sorted(
        recipe_files("eval/sd3")
    )
    assert dump_config(load_config(copy)) == dump_config(load_config(CONFIGS / "eval" / "sd3.yaml"))

    # the user's edit is kept unless --force; an unchanged file is simply rewritten
    edited = tmp_path / "mine" / "quickstart.yaml"
    edited.write_text(edited.read_text() + "# mine\n")
    with pytest.raises(ConfigError, match="already exist.*--force"):
        init_recipe("sd3-t2i", tmp_path / "mine")
    assert edited.read_text().endswith("# mine\n")
    init_recipe("sd3-t2i", tmp_path / "mine", force=True)
    assert edited.read_text() == (CONFIGS / "quickstart.yaml").read_text()


def test_a_recipe_name_works_where_a_config_path_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert recipe_path("quickstart") == CONFIGS / "quickstart.yaml"  # the editable install's package data
    assert resolve_config("eval/sd3.yaml") == CONFIGS / "eval" / "sd3.yaml"
    by_name = load_config("sd3-t2i", ["train.max_steps=3"])
    assert dump_config(by_name) == dump_config(
        load_config(CONFIGS / "pipelines" / "sd3-t2i.yaml", ["train.max_steps=3"])
    )

    Path("quickstart").write_text("include: sd3-t2i.yaml\n")  # a file of that name here wins over the recipe
    assert resolve_config("quickstart") == Path("quickstart")
    with pytest.raises(
        ConfigError, match=r"neither a config file here nor a recipe. Did you mean: sd3-t2i.*recipes list"
    ):
        load_config("sd3-t2x")
    with pytest.raises(ConfigError, match=r"config file configs/sd3-t2i.yaml does not exist"):
        load_config("configs/sd3-t2i.yaml")  # a path (here, no checkout): a missing file, not a recipe


def test_recipes_commands() -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["recipes", "list", "--kind", "eval"])
    assert listed.exit_code == 0
    assert {line.split()[0] for line in listed.stdout.splitlines()} == {n for n in recipes() if n.startswith("eval/")}
    shown = runner.invoke(app, ["recipes", "show", "sd3-t2i"])
    assert shown.exit_code == 0 and shown.stdout == (CONFIGS / "pipelines" / "sd3-t2i.yaml").read_text()
    resolved = runner.invoke(app, ["recipes", "show", "sd3-t2i", "--resolved"])
    assert resolved.exit_code == 0 and "family: sd3" in resolved.stdout
    unknown = runner.invoke(app, ["recipes", "show", "nope"])
    assert unknown.exit_code == 1 and "no recipe named 'nope'" in unknown.stderr
    assert runner.invoke(app, ["config", "validate", "quickstart", "--no-paths"]).stdout.strip() == "ok"
