"""The pyfunc's `eval.parallel` layout: a served generation made by a 2-rank torchrun job equals one process.

One tiny CogVideoX image-to-video export carries a 2-rank CFG-parallel layout in its settings; a pointer model to the
same weights carries settings without `parallel` (an older file), which serves in process. Both predict the same
prompts and first frames (the images travel to the ranks as paths in the request file).

What is compared: the written files against the frames one `generate` call makes in this process. The job's ranks are
real processes (torchrun, gloo), so their float frames cannot be taken out without a test-only channel; the files are
what a client gets. The export generates one frame, which serving writes as a lossless PNG: an mp4 could only be
bounded by a PSNR, as x264 even encodes the same uint8 frames of these tiny noise-like clips to different files from
one call to the next. CFG parallelism changes a denoiser call's batch, which moves a float by ~1e-6 (the 1e-4 float
parity is tests/engines/torch_engine/test_sampling_parallel.py's) and can flip a uint8 level at a rounding boundary:
the decoded pixels may differ by 1, and almost all are exact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from flowspeed.configs import PipelineConfig, load_config
from flowspeed.engines.export import export_weights
from flowspeed.engines.models import get_family
from flowspeed.engines.models.cogvideox import TEXT_PRESETS, VAE_PRESETS
from flowspeed.engines.torch_engine.sampling import SamplingLayout
from flowspeed.engines.tracking import parallel_predict
from flowspeed.engines.tracking.parallel_predict import prompt_block, read_rgb
from flowspeed.engines.tracking.serving import SETTINGS, _load_pyfunc, write_mlmodel, write_pointer_model
from PIL import Image

from tests.conftest import QUICKSTART

# one 32 x 32 frame in 2 steps: a png per prompt, what the cheapest CFG-guided generation writes
SMALL = ["data.num_frames=1", "data.height=32", "data.width=32", "eval.num_inference_steps=2"]


def _export(workdir: Path, *overrides: str) -> tuple[Path, PipelineConfig]:
    """`train/final` as the trainer writes it, from the seeded random init (as tests/engines/tracking/test_serving)."""
    cfg = load_config(QUICKSTART, [*SMALL, *overrides], workdir=workdir)
    family = get_family(cfg.model.family)
    tiny_vae = VAE_PRESETS["tiny"]
    args = {"text_embed_dim": TEXT_PRESETS["tiny"]["d_model"], "latent_channels": tiny_vae["latent_channels"]}
    state = family.load_transformer(cfg.model, **args).state_dict()
    return export_weights(family, cfg, args, state, cfg.train_dir / "final"), cfg


def test_a_two_rank_layout_serves_what_one_process_serves(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    final, cfg = _export(tmp_path, "model.family=cogvideox_i2v", "eval.nproc_per_node=2", "eval.parallel.cfg=2")
    write_mlmodel(final, cfg)
    stored = json.loads((final / SETTINGS).read_text())["parallel"]
    assert stored == {"dp": None, "cfg": 2, "cp": 1, "cp_mode": "ulysses", "nproc": 2}
    assert _load_pyfunc(str(final)).layout == SamplingLayout(1, 2, 1)

    # The same weights through settings written before `parallel` existed: one process, in this one.
    older = write_pointer_model(final, tmp_path / "older")
    settings = json.loads((older / SETTINGS).read_text())
    del settings["parallel"]
    (older / SETTINGS).write_text(json.dumps(settings))
    assert _load_pyfunc(str(older)).layout.world == 1

    prompts = ["a red circle moving right", "a blue square"]
    images = [tmp_path / "red.png", tmp_path / "noise.png"]
    Image.new("RGB", (40, 30), (200, 20, 20)).save(images[0])
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(images[1])
    rows = pd.DataFrame({"prompt": prompts, "image": [str(p) for p in images]})
    params = {"output_dir": str(tmp_path / "out")}
    one = mlflow.pyfunc.load_model(str(older)).predict(rows, params=params)
    with caplog.at_level(logging.INFO, logger=parallel_predict.__name__):
        two = mlflow.pyfunc.load_model(str(final)).predict(rows, params=params)
    ranks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("predict rank")]
    assert len(ranks) == 2 and all("2 prompts" in r and "peak memory" in r for r in ranks)  # both made both videos

    assert two["prompt"].tolist() == prompts and list(two.columns) == ["prompt", "path"]
    assert [Path(p).name for p in two["path"]] == ["sample_00.png", "sample_01.png"]
    assert Path(two["path"][0]).parent.parent == tmp_path / "out"
    assert sorted(p.name for p in Path(two["path"][0]).parent.iterdir()) == ["sample_00.png", "sample_01.png"]
    # What both wrote: the frames one generate call makes here (prompt i from seed + i).
    videos = get_family("cogvideox_i2v").generate(
        final, prompts, images=[read_rgb(p) for p in images], num_frames=1, height=32, width=32, steps=2,
        guidance_scale=cfg.eval.guidance_scale, seed=cfg.eval.seed, device=torch.device("cpu"),
    )  # fmt: skip
    assert np.abs(videos[0].astype(int) - videos[1]).mean() > 5  # two different pictures
    for i, video in enumerate(videos):
        assert np.array_equal(read_rgb(Path(one.path[i])), video[0])  # one process: the same call
        diff = np.abs(read_rgb(Path(two.path[i])).astype(int) - video[0])
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (i, diff.max(), (diff == 0).mean())


def test_prompts_split_in_contiguous_blocks_shared_by_a_group() -> None:
    layout = SamplingLayout(dp=3, cfg=2, cp=1)
    blocks = [prompt_block(7, layout, rank) for rank in range(layout.world)]
    assert blocks == [range(0, 3), range(0, 3), range(3, 5), range(3, 5), range(5, 7), range(5, 7)]
    assert [prompt_block(1, SamplingLayout(dp=2), r) for r in range(2)] == [range(0, 1), range(1, 1)]


def test_a_stored_layout_that_does_not_fit_fails_at_load(tmp_path: Path) -> None:
    final, cfg = _export(tmp_path)
    write_mlmodel(final, cfg)
    settings = json.loads((final / SETTINGS).read_text())
    assert settings["parallel"]["nproc"] == 1
    (final / SETTINGS).write_text(json.dumps({**settings, "parallel": {"cfg": 2, "cp": 1, "nproc": 3}}))
    with pytest.raises(ValueError, match="is not a layout"):
        _load_pyfunc(str(final))


def test_a_failed_job_raises_its_error_and_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's side of a failure (the job's own report is run_torchrun's, tested with the training engine): the
    launcher is replaced by one that fails as torchrun does, so no ranks are started for it."""
    from flowspeed.engines.common import torchrun

    final, cfg = _export(tmp_path, "eval.nproc_per_node=2", "eval.parallel.cfg=2")
    write_mlmodel(final, cfg)

    def failing(module: str, args: list[str], nproc: int) -> None:
        request = json.loads(Path(args[args.index("--request") + 1]).read_text())
        Path(request["folder"], "sample_00.mp4").write_bytes(b"half")  # a rank wrote before another one failed
        raise torchrun.DistributedJobFailed(f"torchrun {module} with {nproc} ranks exited with status 1.\nRoot Cause")

    monkeypatch.setattr(torchrun, "run_torchrun", failing)
    with pytest.raises(torchrun.DistributedJobFailed, match="with 2 ranks exited"):
        mlflow.pyfunc.load_model(str(final)).predict([{"prompt": "a"}], params={"output_dir": str(tmp_path / "out")})
    assert not any((tmp_path / "out").iterdir())  # no half-answered request left behind
