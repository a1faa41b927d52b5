"""The export folder as a registered MLflow pyfunc model: signature, registry round trip, predictions.

Exports come from the trainer's own `export_weights` on untrained tiny presets: the release layout
is what serving depends on, not what the weights learned, and skipping training keeps this file fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from flowspeed.configs import PipelineConfig, load_config
from flowspeed.datasets_prep.mp4 import write_mp4
from flowspeed.datasets_prep.probe import probe
from flowspeed.engines.export import export_weights
from flowspeed.engines.models import get_family
from flowspeed.engines.models.cogvideox import TEXT_PRESETS, VAE_PRESETS
from flowspeed.engines.models.sequence import SequenceFamily
from flowspeed.engines.tracking.serving import MLMODEL, SETTINGS, _load_pyfunc, signature_for, write_mlmodel
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import QUICKSTART, REPO

RECIPES: dict[str, tuple[Path, list[str]]] = {  # family -> (config, overrides)
    "cogvideox": (QUICKSTART, []),
    "cogvideox_i2v": (QUICKSTART, ["model.family=cogvideox_i2v"]),
    "qwen2_vl": (REPO / "configs" / "pipelines" / "qwen2_vl-sft.yaml", []),
    "whisper": (REPO / "configs" / "pipelines" / "whisper-asr.yaml", []),
}


def _export(family_name: str, workdir: Path) -> tuple[Path, PipelineConfig]:
    """`train/final` as the trainer writes it, from the seeded random init."""
    path, overrides = RECIPES[family_name]
    cfg = load_config(path, overrides, workdir=workdir)
    family = get_family(family_name)
    args = {} if isinstance(family, SequenceFamily) else {
        "text_embed_dim": TEXT_PRESETS["tiny"]["d_model"], "latent_channels": VAE_PRESETS["tiny"]["latent_channels"]
    }  # fmt: skip
    state = family.load_transformer(cfg.model, **args).state_dict()
    return export_weights(family, cfg, args, state, cfg.train_dir / "final"), cfg


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, PipelineConfig]]:
    """One export per family, with its MLmodel written, shared by the tests below (read-only)."""
    out = {}
    for name in RECIPES:
        final, cfg = _export(name, tmp_path_factory.mktemp(name))
        write_mlmodel(final, cfg)
        out[name] = (final, cfg)
    return out


@contextmanager
def registry_at(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking and registry URIs at `uri`, and put them (and their env vars) back."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in keys}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None clears it
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _register(tmp_path: Path, name: str, source: str) -> str:
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    client.create_registered_model(name)
    assert str(client.create_model_version(name, source=source).version) == "1"
    return uri


@pytest.mark.parametrize("family_name", sorted(RECIPES))
def test_mlmodel_in_the_export_carries_the_family_signature(tmp_path: Path, family_name: str) -> None:
    final, cfg = _export(family_name, tmp_path)
    before = {p.relative_to(final) for p in final.rglob("*")}
    family = get_family(family_name)

    write_mlmodel(final, cfg)
    write_mlmodel(final, cfg)  # idempotent: a rerun rewrites the same description

    info = mlflow.models.get_model_info(str(final))
    assert info.signature == signature_for(family_name)
    assert info.flavors["python_function"]["loader_module"] == "flowspeed.engines.tracking.serving"
    assert info.flavors["python_function"]["data"] == "."  # the weights where they are
    # Small files added (the description, its settings, MLflow's environment files), nothing copied or moved,
    # and the export still counts as whole.
    added = {p.relative_to(final) for p in final.rglob("*")} - before
    assert added == {Path(n) for n in (MLMODEL, SETTINGS, "requirements.txt", "python_env.yaml", "conda.yaml")}
    assert all(p.is_file() for p in family.export_files(final))
    settings = json.loads((final / SETTINGS).read_text())
    assert settings["family"] == family_name
    assert (settings["num_frames"], settings["height"], settings["width"]) == (
        cfg.data.num_frames,
        cfg.data.height,
        cfg.data.width,
    )
    assert settings["num_inference_steps"] == cfg.eval.num_inference_steps
    assert settings["max_text_length"] == cfg.model.max_text_length


def test_signatures_name_the_media_each_family_reads() -> None:
    cols = {n: signature_for(n).inputs.input_names() for n in ("cogvideox", "cogvideox_i2v", "sdxl", "qwen2_vl")}
    assert cols == {
        "cogvideox": ["prompt"],
        "cogvideox_i2v": ["prompt", "image"],
        "sdxl": ["prompt"],
        "qwen2_vl": ["prompt", "image"],
    }
    assert [c.required for c in signature_for("qwen2_vl").inputs.inputs] == [True, False]
    assert signature_for("whisper").inputs.input_names() == ["audio"]
    assert signature_for("whisper").outputs.input_names() == ["response"]
    assert signature_for("cogvideox").outputs.input_names() == ["prompt", "path"]
    with pytest.raises(ValueError, match="unknown model family"):
        signature_for("sora")


def test_registered_cogvideox_generates_videos_of_the_trained_frame_count(exports, tmp_path: Path) -> None:
    final, cfg = exports["cogvideox"]
    uri = _register(tmp_path, "t2v", str(final))
    prompts = ["a red circle moving right", "a blue square"]
    with registry_at(uri):
        model = mlflow.pyfunc.load_model("models:/t2v/1")
        params = {"output_dir": str(tmp_path / "out"), "num_inference_steps": 2}  # fewer steps than eval's 4
        out = model.predict(pd.DataFrame({"prompt": prompts}), params=params)
        again = model.predict([{"prompt": prompts[0]}], params=params)
    assert list(out.columns) == ["prompt", "path"] and out["prompt"].tolist() == prompts
    for path in out["path"]:
        info = probe(Path(path))
        assert Path(path).suffix == ".mp4" and Path(path).is_relative_to(tmp_path / "out")
        assert (info.num_frames, info.height, info.width) == (cfg.data.num_frames, cfg.data.height, cfg.data.width)
    assert Path(again["path"][0]).parent != Path(out["path"][0]).parent  # calls never overwrite each other


def test_image_to_video_takes_a_first_frame_per_row_or_none(exports, tmp_path: Path) -> None:
    final, cfg = exports["cogvideox_i2v"]
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    model = mlflow.pyfunc.load_model(str(final))
    rows = pd.DataFrame({"prompt": ["it moves", "it stays"], "image": [str(image), str(image)]})
    out = model.predict(rows, params={"num_inference_steps": 1, "output_dir": str(tmp_path)})
    assert [probe(Path(p)).num_frames for p in out["path"]] == [cfg.data.num_frames] * 2
    plain = model.predict(
        [{"prompt": "no image: a grey first frame"}], params={"num_inference_steps": 1, "output_dir": str(tmp_path)}
    )
    assert Path(plain["path"][0]).is_file()
    with pytest.raises(ValueError, match="some rows have an `image`"):
        model.predict(pd.DataFrame({"prompt": ["a", "b"], "image": [str(image), None]}))


def test_registered_qwen2_vl_answers_with_an_image_a_video_or_text_only(exports, tmp_path: Path) -> None:
    final, _ = exports["qwen2_vl"]
    rng = np.random.default_rng(0)
    image, video = tmp_path / "still.png", tmp_path / "clip.mp4"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    write_mp4(video, rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), 8)
    uri = _register(tmp_path, "vlm", final.as_uri())
    rows = pd.DataFrame(
        {"prompt": ["What is this?", "Does it move?", "Say hi."], "image": [str(image), str(video), None]}
    )
    with registry_at(uri):
        model = mlflow.pyfunc.load_model("models:/vlm/1")
        out = model.predict(rows, params={"max_new_tokens": 4})
        listed = model.predict([{"prompt": "Say hi."}], params={"max_new_tokens": 4})
    assert list(out.columns) == ["response"] and len(out) == 3
    assert all(isinstance(r, str) for r in out["response"])
    assert listed["response"].tolist() == out["response"].tolist()[2:]  # greedy: the same prompt, the same answer


def test_media_are_loaded_as_prep_loads_them(exports, tmp_path: Path) -> None:
    final, cfg = exports["qwen2_vl"]
    rng = np.random.default_rng(1)
    image, video = tmp_path / "still.png", tmp_path / "clip.mp4"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    write_mp4(video, rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), 8)
    impl = _load_pyfunc(str(final))
    still, clip, text = impl._samples([{"prompt": "a", "image": str(image)}, {"prompt": "b", "image": str(video)},
                                       {"prompt": "c"}])  # fmt: skip
    d = cfg.data
    assert [i.shape for i in still.images] == [(d.height, d.width, 3)] and not still.videos
    assert [v.shape for v in clip.videos] == [(d.num_frames, d.height, d.width, 3)] and not clip.images
    assert text.messages == [{"role": "user", "content": "c"}] and not (text.images or text.videos)
    with pytest.raises(ValueError, match="have no 'prompt'"):
        impl.predict(pd.DataFrame({"image": [str(image)]}))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        impl.predict([{"prompt": "a", "image": str(tmp_path / "nope.png")}])


def test_whisper_transcribes_audio_paths(exports, tmp_path: Path) -> None:
    from flowspeed.datasets_prep.demo import make_demo_audio

    final, _ = exports["whisper"]
    make_demo_audio(tmp_path, num_clips=2)
    wavs = sorted(str(p) for p in (tmp_path / "audio").glob("*.wav"))
    out = mlflow.pyfunc.load_model(str(final)).predict(pd.DataFrame({"audio": wavs}), params={"max_new_tokens": 4})
    assert list(out.columns) == ["response"] and len(out) == 2 and all(isinstance(r, str) for r in out["response"])


def test_write_mlmodel_refuses_a_folder_without_an_export(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, [], workdir=tmp_path)
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        write_mlmodel(tmp_path, cfg)
    assert not (tmp_path / MLMODEL).exists()
