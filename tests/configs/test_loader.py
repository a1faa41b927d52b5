from pathlib import Path

import pytest
from flowspeed.configs import ConfigError, load_config

from tests.conftest import QUICKSTART


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
    assert cfg.prep_dir == tmp_path / "prep" and cfg.train_dir == tmp_path / "train"
    assert cfg.eval_dir == tmp_path / "eval"
