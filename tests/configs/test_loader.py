import re
from pathlib import Path

import pytest
from flowspeed.configs import ConfigError, load_config

from tests.conftest import QUICKSTART, REPO


def test_unknown_key_names_the_valid_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "train.max_step" in msg
    for valid in ("max_steps", "nproc_per_node", "lr", "resume"):
        assert valid in msg


def test_unknown_top_level_section_lists_sections(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match=r"valid keys: data, eval, model, tracking, train, workdir"):
        load_config(bad)


def test_set_overrides_beat_the_file() -> None:
    file_only = load_config(QUICKSTART)
    assert file_only.train.max_steps == 30
    cfg = load_config(QUICKSTART, ["train.max_steps=20", "train.lr=1e-4", "data.decoder=pyav", "eval.prompts=[a, b]"])
    assert cfg.train.max_steps == 20
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.decoder == "pyav"
    assert cfg.eval.prompts == ["a", "b"]


def test_include_preset_is_merged_under_the_file() -> None:
    cfg = load_config(QUICKSTART)
    assert cfg.model.family == "cogvideox" and cfg.model.max_text_length == 128  # from presets/cogvideox-tiny.yaml


def test_bad_values_and_overrides_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(QUICKSTART, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(QUICKSTART, ["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_workdir_moves_every_default_output(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, workdir=tmp_path)
    for stage, folder in (("prep", cfg.prep_dir), ("train", cfg.train_dir), ("eval", cfg.eval_dir)):
        assert folder.parent == tmp_path / stage and re.fullmatch(r"cogvideox-[0-9a-f]{8}", folder.name)
    assert cfg.cache_dir == tmp_path / "prep" / "cache"  # content-addressed: one per workdir, every recipe's


def test_stage_folders_are_keyed_by_what_decides_their_content(tmp_path: Path) -> None:
    """Another family gets folders of its own in the same workdir (never the first one's checkpoints); what a
    resume may change (length, lr, layout) keeps the training folder; eval settings move only the eval folder."""
    base = load_config(QUICKSTART, workdir=tmp_path)
    sd3 = load_config(REPO / "configs" / "pipelines" / "sd3-t2i.yaml", workdir=tmp_path)
    assert sd3.prep_dir.name.startswith("sd3-") and sd3.train_dir.name.startswith("sd3-")
    assert {sd3.prep_dir, sd3.train_dir, sd3.eval_dir}.isdisjoint({base.prep_dir, base.train_dir, base.eval_dir})
    assert sd3.cache_dir == base.cache_dir and sd3.experiment == base.experiment == f"flowspeed-{tmp_path.name}"
    assert (sd3.tracking.recipe, base.tracking.recipe) == ("sd3-t2i", "quickstart")

    resumed = load_config(QUICKSTART, ["train.max_steps=60", "train.lr=1e-4", "train.nproc_per_node=2",
                                       "train.mixed_precision=bf16"], workdir=tmp_path)  # fmt: skip
    assert (resumed.prep_dir, resumed.train_dir) == (base.prep_dir, base.train_dir)
    lora = load_config(QUICKSTART, ["train.lora.enabled=true"], workdir=tmp_path)
    assert lora.prep_dir == base.prep_dir and lora.train_dir != base.train_dir
    frames = load_config(QUICKSTART, ["data.num_frames=5"], workdir=tmp_path)
    assert frames.prep_dir != base.prep_dir and frames.train_dir != base.train_dir
    more_steps = load_config(QUICKSTART, ["eval.num_inference_steps=8"], workdir=tmp_path)
    assert more_steps.train_dir == base.train_dir and more_steps.eval_dir != base.eval_dir

    explicit = load_config(QUICKSTART, [f"data.output_dir={tmp_path / 'p'}", f"train.output_dir={tmp_path / 't'}",
                                        f"eval.output_dir={tmp_path / 'e'}"], workdir=tmp_path)  # fmt: skip
    assert (explicit.prep_dir, explicit.cache_dir) == (tmp_path / "p", tmp_path / "p" / "cache")
    assert (explicit.train_dir, explicit.eval_dir) == (tmp_path / "t", tmp_path / "e")
