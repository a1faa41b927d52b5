"""Step caching while sampling (engines/torch_engine/step_cache.py, `eval.cache`) on a tiny CogVideoX export.

The cache must skip work (fewer token rows through the denoiser's Linear layers), change the video by a bounded
amount, change nothing with its skipping knob off, come off and back on for the eval's comparison on a kept-loaded
denoiser, and, on 2 real gloo ranks (CFG and context parallel), make the video one process makes with the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.configs.schema import EvalCacheConfig, PipelineConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.models.registry import float_frames, keep_loaded, sampling_setup
from flowspeed.engines.torch_engine.sampling import SamplingLayout, SamplingSetup, sampling_mesh
from flowspeed.engines.torch_engine.step_cache import apply_step_cache, sampling_extra, step_cache_off
from flowspeed.evaluation.directions import direction_of
from flowspeed.evaluation.generation_eval import cache_comparison, cache_metrics
from pydantic import ValidationError

from tests.distributed import run_ranks
from tests.engines.torch_engine.test_sampling_parallel import _export, _Rows

FAMILY, SHAPE, STEPS, GUIDANCE = "cogvideox", (5, 32, 32), 6, 6.0


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(FAMILY, tmp_path_factory.mktemp("step_cache") / "export", SHAPE[0])


def _generate(folder: Path, n: int = 1) -> np.ndarray:
    t, h, w = SHAPE
    kw = {"num_frames": t, "height": h, "width": w, "steps": STEPS, "guidance_scale": GUIDANCE, "seed": 3}
    with float_frames():
        return get_family(FAMILY).generate(folder, ["red bars", "blue bars"][:n], device=torch.device("cpu"), **kw)


def _cached(folder: Path, section: EvalCacheConfig | None) -> tuple[np.ndarray, int]:
    """The video and the token rows the denoiser's Linear layers processed, with `section`'s cache (None: none)."""
    rows = _Rows()

    def extra(model: torch.nn.Module) -> None:
        rows(model)
        if section is not None:
            apply_step_cache(model, section)

    with sampling_setup(SamplingSetup(SamplingLayout(), None, extra)):
        return _generate(folder), rows.rows


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="method"):
        EvalCacheConfig(method="teacache")
    with pytest.raises(ValidationError, match="cache_interval do not apply to method 'first_block'"):
        EvalCacheConfig(method="first_block", cache_interval=2)
    with pytest.raises(ValidationError, match="threshold"):
        EvalCacheConfig(method="first_block", threshold=-0.1)
    with pytest.raises(ValidationError, match="cache_interval"):
        EvalCacheConfig(method="taylorseer", cache_interval=0)
    assert EvalCacheConfig(method="first_block").describe() == "first_block(threshold=0.05)"
    saved = EvalCacheConfig(method="first_block", threshold=0.2).model_dump(mode="json")  # every field, as saved
    assert EvalCacheConfig.model_validate(saved).threshold == 0.2
    assert not EvalCacheConfig().on and EvalCacheConfig().describe() == "none"
    # no cache: the eval folder keeps the key it had before eval.cache existed; a cache gets a folder of its own
    plain = PipelineConfig()
    assert plain.eval_key() == PipelineConfig(eval={"cache": {"compare_samples": 3}}).eval_key()
    assert plain.eval_key() != PipelineConfig(eval={"cache": {"method": "first_block"}}).eval_key()
    assert sampling_extra(EvalCacheConfig(), None) is None
    assert [direction_of(f"eval/cache_{k}") for k in ("psnr", "max_abs_diff", "speedup")] == ["higher", "lower",
                                                                                              "higher"]  # fmt: skip
    with pytest.raises(ValueError, match="not a CacheMixin denoiser"):
        apply_step_cache(torch.nn.Linear(2, 2), EvalCacheConfig(method="taylorseer"))


def test_cache_skips_work_and_off_knobs_change_nothing(export: Path) -> None:
    ref, ref_rows = _cached(export, None)
    assert ref.max() - ref.min() > 0.1  # a video, not a constant
    cases = {
        "first_block": (EvalCacheConfig(method="first_block", threshold=0.5), EvalCacheConfig(method="first_block",
                                                                                               threshold=0)),
        "taylorseer": (EvalCacheConfig(method="taylorseer", cache_interval=2, warmup_steps=2),
                       EvalCacheConfig(method="taylorseer", warmup_steps=STEPS)),
    }  # fmt: skip
    for name, (on, off) in cases.items():
        got, rows = _cached(export, on)
        diff = float(np.abs(got - ref).max())
        assert rows < 0.9 * ref_rows, (name, rows, ref_rows)  # blocks were skipped
        assert 0 < diff < 0.5, (name, diff)  # an approximation of the video, not another one
        same, same_rows = _cached(export, off)
        assert same_rows == ref_rows and np.array_equal(same, ref), name


def test_comparison_on_a_kept_loaded_denoiser(export: Path) -> None:
    """The eval's comparison: the uncached run equals a plain generate, the cached one equals the cache's, and the
    cache is back on afterwards (the same loaded module, set up once)."""
    ref, _ = _cached(export, None)
    section = EvalCacheConfig(method="first_block", threshold=0.5)
    cached_ref, _ = _cached(export, section)
    with keep_loaded(), sampling_setup(SamplingSetup(SamplingLayout(), None, sampling_extra(section, None))):
        with float_frames():  # the eval's samples are uint8; float frames here to compare exactly
            videos, costs, wall = cache_comparison(lambda n: _generate(export, n), 1)
        with step_cache_off():
            plain = _generate(export)
        again = _generate(export)
    assert np.array_equal(videos, cached_ref) and np.array_equal(plain, ref) and np.array_equal(again, cached_ref)
    assert wall > 0 and len(costs) == 1
    c = costs[0]
    assert c["max_abs_diff"] == pytest.approx(float(np.abs(cached_ref - ref).max()))
    assert c["uncached_denoiser_s"] > 0 and c["cached_denoiser_s"] > 0
    m = cache_metrics([{"step_cache": c}, {"clip_score": 1.0}])
    assert m["eval/cache_psnr"] == pytest.approx(10 * np.log10(1 / c["mse"]))
    assert m["eval/cache_max_abs_diff"] == c["max_abs_diff"] and m["eval/cache_compared_samples"] == 1
    assert m["eval/cache_speedup"] == pytest.approx(c["uncached_denoiser_s"] / c["cached_denoiser_s"])
    assert cache_metrics([{"clip_score": 1.0}]) == {}


def _ranks(rank: int, world: int, folder: str, layouts: list[tuple[int, int]]) -> dict:
    section = EvalCacheConfig(method="first_block", threshold=0.3)
    with sampling_setup(SamplingSetup(SamplingLayout(), None, sampling_extra(section, None))):
        ref = _generate(Path(folder))
    out = {}
    for cfg, cp in layouts:
        layout = SamplingLayout(world // (cfg * cp), cfg, cp)
        mesh = sampling_mesh(layout, torch.device("cpu"))
        with sampling_setup(SamplingSetup(layout, mesh, sampling_extra(section, mesh))):
            out[layout.describe()] = float(np.abs(_generate(Path(folder)) - ref).max())
    return out


def test_first_block_cache_decides_alike_on_parallel_ranks(export: Path) -> None:
    """Under CFG and context parallelism every rank holds a piece of the call; the skip decision is reduced over
    them, so the cached video is the one-process cached video (and no rank waits in a collective another skipped)."""
    for r in run_ranks(_ranks, 2, str(export), [(2, 1), (1, 2)]):
        for key, diff in r.items():
            assert diff <= 1e-4, (key, diff)


def test_eval_reports_the_cache_cost(export: Path, tmp_path: Path) -> None:
    """generate_and_score with a cache: the first `compare_samples` samples are also made uncached and scored as
    eval/cache_*, the method is a run label, and the samples the eval keeps are the ones it makes without comparing."""
    from flowspeed.evaluation.generation_eval import generate_and_score
    from flowspeed.evaluation.sharded import Ranks

    t, h, w = SHAPE

    def run(compare: int) -> tuple[dict, list, dict]:
        cache = {"method": "first_block", "threshold": 0.3, "compare_samples": compare}
        ev = {"prompts": ["red bars", "blue bars", "green"], "batch_size": 2, "num_inference_steps": STEPS,
              "generation": {"vbench": False}, "cache": cache}  # fmt: skip
        cfg = PipelineConfig(workdir=tmp_path, model={"family": FAMILY, "max_text_length": 8},
                             data={"num_frames": t, "height": h, "width": w}, eval=ev)  # fmt: skip
        setup = SamplingSetup(SamplingLayout(), None, sampling_extra(cfg.eval.cache, None))
        with keep_loaded(), sampling_setup(setup):
            return generate_and_score(cfg, get_family(FAMILY), export, torch.device("cpu"), Ranks())

    metrics, rows, info = run(1)
    assert info["step_cache"] == "first_block(threshold=0.3)"
    assert [("step_cache" in r) for r in rows] == [True, False, False]  # batch [0, 1] split after the compared one
    assert 0 < metrics["eval/cache_max_abs_diff"] < 0.5 and metrics["eval/cache_psnr"] > 20
    assert metrics["eval/cache_speedup"] > 0 and metrics["eval/cache_compared_samples"] == 1
    _, plain_rows, _ = run(0)  # no comparison: the same cached samples
    assert [r["clip_score"] for r in rows] == [r["clip_score"] for r in plain_rows]
    assert "step_cache" not in plain_rows[0]
