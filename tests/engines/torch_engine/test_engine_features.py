"""Recomputation, regional compile, HSDP, the profiler window and the collective timeout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from flowspeed.configs import PipelineConfig
from flowspeed.engines.launch import launch
from flowspeed.engines.torch_engine.parallel_dims import ParallelDims
from flowspeed.engines.torch_engine.parallelize import apply_ac, apply_fsdp, block_lists
from torch import nn

from tests.conftest import make_config
from tests.distributed import run_ranks


def _cfg(tmp: Path, prepped: PipelineConfig, *overrides: str) -> PipelineConfig:
    return make_config(tmp, prepped.data.manifest, f"data.output_dir={prepped.prep_dir}",
                       f"data.cache_dir={prepped.cache_dir}", "train.max_steps=3", "train.checkpoint_every=100",
                       *overrides)  # fmt: skip


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, prepped: PipelineConfig) -> list[float]:
    """The losses without recomputation or compile, which both tests compare against: one run for the module."""
    return launch(_cfg(tmp_path_factory.mktemp("plain"), prepped), None, None).losses


def test_recomputation_changes_memory_not_results(tmp_path: Path, prepped: PipelineConfig, plain: list[float]) -> None:
    for mode in ("full", "selective"):
        res = launch(_cfg(tmp_path / mode, prepped, f"train.activation_checkpointing={mode}"), None, None)
        assert res.losses == pytest.approx(plain, abs=1e-6), mode


def test_checkpoint_wrappers_wrap_every_block_and_unknown_modes_are_refused() -> None:
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, num_layers=3,
                                        time_embed_dim=16, text_embed_dim=16, in_channels=4)  # fmt: skip
    keys = set(model.state_dict())
    apply_ac(model, "selective")
    assert all(type(b).__name__ == "CheckpointWrapper" for b in model.transformer_blocks)
    assert set(model.state_dict()) == keys  # checkpoints and exports keep the model's own names
    with pytest.raises(ValueError, match="none, full or selective"):
        apply_ac(model, "some")
    with pytest.raises(ValueError, match="block lists"):
        block_lists(nn.Linear(2, 2))


@pytest.mark.slow
def test_regional_compile_trains_the_same_and_fills_a_persistent_cache(
    tmp_path: Path, prepped: PipelineConfig, plain: list[float]
) -> None:
    cache = tmp_path / "inductor"
    cfg = _cfg(tmp_path / "compiled", prepped, "train.compile=true", f"train.compile_cache_dir={cache}")
    res = launch(cfg, None, None)
    assert res.losses == pytest.approx(plain, rel=1e-4)
    assert any(cache.rglob("*")), "inductor wrote nothing to the configured cache directory"


def test_profiler_writes_a_trace_of_the_window(tmp_path: Path, prepped: PipelineConfig) -> None:
    cfg = _cfg(tmp_path, prepped, "train.profile.enabled=true", "train.profile.start_step=1",
               "train.profile.warmup_steps=0", "train.profile.active_steps=1")  # fmt: skip
    launch(cfg, None, None)
    trace = json.loads((cfg.train_dir / "profile" / "rank-00000.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("ProfilerStep#1" in n for n in names) and any(n.startswith("aten::") for n in names)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](nn.functional.gelu(self.layers[0](x)))


def _hsdp_vs_single(rank: int, world: int) -> list[float]:
    """HSDP's code path (a 2-D replicate x shard mesh) against a one-process model, 5 AdamW steps."""
    mesh = ParallelDims(1, 2, 1, 1, 1, world).build_mesh("cpu")
    torch.manual_seed(0)
    ref = _Mlp()
    model = _Mlp()
    model.load_state_dict(ref.state_dict())
    apply_fsdp(model, mesh["dp_replicate", "dp_shard"], "float32", "float32", reshard=True)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(5, 4, 8, generator=g), torch.randn(5, 4, 8, generator=g)
    diffs = []
    for x, y in zip(xs, ys, strict=True):
        mine = slice(rank * 2, rank * 2 + 2)  # each rank its half of the batch
        loss = nn.functional.mse_loss(model(x[mine]), y[mine])
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_loss = nn.functional.mse_loss(ref(x), y)
        ref_loss.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        diffs.append(abs(mean.item() / world - ref_loss.item()))
    final = {k: v.full_tensor() for k, v in model.state_dict().items()}
    diffs.append(max((final[k] - v).abs().max().item() for k, v in ref.state_dict().items()))
    return diffs


def test_hsdp_on_a_2d_mesh_matches_one_process() -> None:
    for diffs in run_ranks(_hsdp_vs_single, 2):
        assert max(diffs) < 1e-6


@pytest.mark.slow
def test_a_hanging_rank_fails_the_job_after_the_collective_timeout() -> None:
    import time

    from flowspeed.engines.common.torchrun import DistributedJobFailed, run_torchrun

    t0 = time.monotonic()
    with pytest.raises(DistributedJobFailed) as err:
        run_torchrun("tests.engines.torch_engine.hang_job", ["10"], 2)
    assert time.monotonic() - t0 < 120  # the timeout, not rank 1's 600 s sleep, ended it
    assert "rank: 0" in str(err.value) and "timed out" in str(err.value).lower()
