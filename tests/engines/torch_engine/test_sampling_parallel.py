"""Parallel sampling (engines/torch_engine/sampling.py, `eval.parallel`) on 2 real gloo ranks against one process.

Each family's tiny export is written once by the parent; every rank first generates the one-process reference
itself (no setup), then the same prompts under each layout, so the comparisons are rank-local. Frames are compared
as float32 (`float_frames`): the issue's bar is 1e-4 on the video, and a uint8 frame can flip a level under 1e-7.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.configs.schema import ModelConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.models.registry import float_frames, sampling_setup
from flowspeed.engines.torch_engine.sampling import SamplingLayout, SamplingSetup, sampling_mesh

from tests.distributed import run_ranks

TOL = 1e-4
TEXT = 8


def _export(family: str, folder: Path, frames: int) -> Path:
    """The family's tiny preset as an export, sized by what prep would cache for a 32 x 32 clip (or image)."""
    fam = get_family(family)
    cfg = ModelConfig(family=family, max_text_length=TEXT)
    with torch.no_grad():
        latents = fam.encode_video(fam.load_vae(cfg), torch.zeros(1, frames, 32, 32, 3, dtype=torch.uint8))
        text = fam.encode_text(*fam.load_text_encoder(cfg), ["bars"], TEXT)
    text = text["text_embeds"] if isinstance(text, dict) else text
    record = {"latent_shape": list(latents.shape[1:]), "text_shape": list(text.shape[1:])}
    fam.save_pretrained(folder, cfg, fam.load_transformer(cfg, **fam.model_args(record)))
    return folder


class _Rows:
    """Counts the token rows every Linear layer of the denoiser processes: a split layout must process about half."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, model: torch.nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.rows += args[0].numel() // args[0].shape[-1]


def _generate(family: str, folder: Path, shape: tuple[int, int, int], guidance: float) -> np.ndarray:
    t, h, w = shape
    with float_frames():
        return get_family(family).generate(folder, ["red bars", "blue bars"], num_frames=t, height=h, width=w,
                                           steps=2, guidance_scale=guidance, seed=3, device=torch.device("cpu"))  # fmt: skip


def _ranks(rank: int, world: int, family: str, folder: str, shape: tuple, guidance: float,
           layouts: list[tuple[int, int, str]]) -> dict:  # fmt: skip
    counter = _Rows()
    with sampling_setup(SamplingSetup(SamplingLayout(), None, counter)):
        ref = _generate(family, Path(folder), shape, guidance)
    out = {"ref_range": float(ref.max() - ref.min())}
    for cfg, cp, mode in layouts:
        layout = SamplingLayout(world // (cfg * cp), cfg, cp, mode)
        split = _Rows()
        with sampling_setup(SamplingSetup(layout, sampling_mesh(layout, torch.device("cpu")), split)):
            got = _generate(family, Path(folder), shape, guidance)
        out[layout.describe()] = (float(np.abs(got - ref).max()), split.rows / counter.rows)
    return out


# family -> (frames, height, width) generated, guidance, layouts (cfg, cp, cp_mode) on 2 ranks
CASES = {
    "cogvideox": ((5, 32, 32), 6.0, [(2, 1, "ulysses"), (1, 2, "ulysses"), (1, 2, "ring")]),
    "opensoraplan": ((9, 32, 64), 4.0, [(2, 1, "ulysses"), (1, 2, "ulysses"), (1, 2, "ring")]),
    "opensora1.2": ((13, 32, 64), 4.0, [(2, 1, "ulysses"), (1, 2, "dsp"), (1, 2, "ulysses")]),
}


@pytest.mark.parametrize("family", list(CASES))
def test_cfg_and_context_parallel_sampling_equal_one_process(family: str, tmp_path: Path) -> None:
    shape, guidance, layouts = CASES[family]
    folder = _export(family, tmp_path / "export", shape[0])
    results = run_ranks(_ranks, 2, family, str(folder), shape, guidance, layouts)
    print(family, results)
    for r in results:
        assert r["ref_range"] > 0.1  # a video, not a constant
        for key, (diff, work) in ((k, v) for k, v in r.items() if k != "ref_range"):
            assert diff <= TOL, (key, diff)
            assert work < 0.65, (key, work)  # each rank did about half the denoiser's work: the split happened
