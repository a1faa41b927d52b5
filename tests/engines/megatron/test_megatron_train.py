"""megatron-core training on 2 gloo CPU ranks: TP, TP+SP, PP (1F1B), PP+VPP (interleaved 1F1B) and DP with the
distributed optimizer each reproduce the single-process losses over 5 optimizer steps."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from flowspeed.engines.megatron.training import Layout

from tests.distributed import run_ranks
from tests.engines.megatron.test_megatron_convert import _hf_model

LAYOUTS: dict[str, dict] = {
    "tp2+distributed_optimizer": {"tp": 2, "distributed_optimizer": True},
    "tp2": {"tp": 2},
    "tp2+sp": {"tp": 2, "sequence_parallel": True},
    "pp2": {"pp": 2},
    "pp2+vpp2": {"pp": 2, "vpp": 2},
    "dp2+distributed_optimizer": {"distributed_optimizer": True},
    "tp2+full_recompute": {"tp": 2, "recompute": "full"},
    "tp2+bf16": {"tp": 2, "bf16": True},
}
STEPS, MICRO, MBS, SEQ = 5, 4, 2, 16
# fp32 under TP sums the same numbers in another order, and which order depends on the CPU's BLAS kernels: a few
# ulp per step, which Adam at lr 1e-2 grows to ~2e-5 after 5 steps on some machines (CI's). A wrongly sharded or
# misloaded weight moves the loss by 1e-2 or more, so 1e-4 still tells them apart.
FP32_TOLERANCE = 1e-4
# bf16 keeps 8 mantissa bits (unit roundoff u = 2^-8): TP=2 rounds its partial sums at other points than one process,
# and 3 Adam steps at lr 1e-2 carry that into the weights; the losses then stay within a few u of the single process's
# (1.4 u on one 2-core machine, under 1.2 u on the one where 2e-2 held). 4 u relative bounds it; the sharding itself
# is held to FP32_TOLERANCE by the fp32 layouts, so this only checks the mixed-precision path on top of it.
BF16_RELATIVE_TOLERANCE = 4 * 2.0**-8


def _global_batch(seed: int) -> list[dict[str, torch.Tensor]]:
    """MICRO micro-batches of next-token data; the first quarter of each row is unlabelled (a prompt). The
    tests train on the same batch every step, so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(MICRO):
        ids = torch.randint(0, 128, (MBS, SEQ + 1), generator=g)
        mask = torch.ones(MBS, SEQ, dtype=torch.long)
        mask[:, : SEQ // 4] = 0
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask,
                    "position_ids": torch.arange(SEQ).expand(MBS, SEQ)})  # fmt: skip
    return out


def _train(layout: Layout, steps: int = STEPS, load: str | None = None, save: str | None = None) -> list[float]:
    """`steps` steps of the tiny Qwen2 (converted from the same HF weights) on this rank's share of the batch;
    first restoring the checkpoint `load`, then writing `save`."""
    from flowspeed.engines.megatron.convert import hf_to_megatron
    from flowspeed.engines.megatron.gpt import DecoderShape, build_gpt, transformer_config
    from flowspeed.engines.megatron.setup import init_model_parallel
    from flowspeed.engines.megatron.training import build_chunks, load_state, make_optimizer, save_state, train_step
    from megatron.core import parallel_state as ps

    hf = _hf_model("qwen2", layers=4)
    shape = DecoderShape.from_hf(hf.config)
    layout.check(torch.distributed.get_world_size(), shape.num_layers, MICRO)
    init_model_parallel(tp=layout.tp, pp=layout.pp, vpp=layout.vpp)
    config = transformer_config(shape, **layout.config_fields())
    state = hf.state_dict()
    stages = layout.pp * (layout.vpp or 1)

    def make(pre: bool, post: bool, vp: int | None) -> torch.nn.Module:
        model = build_gpt(shape, config, pre_process=pre, post_process=post, vp_stage=vp)
        stage = (vp or 0) * layout.pp + ps.get_pipeline_model_parallel_rank()  # megatron's virtual stage order
        part = hf_to_megatron(state, shape, layout.tp, ps.get_tensor_model_parallel_rank(), stages, stage)
        missing, unexpected = model.load_state_dict(part, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        return model

    chunks = build_chunks(make, config, layout, torch.device("cpu"))
    optimizer = make_optimizer(chunks, layout, lr=1e-2, weight_decay=0.01, clip_grad=1.0)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = MICRO // dp
    if load:
        load_state(chunks, optimizer, load)
    losses = []
    for _ in range(steps):
        mine = _global_batch(0)[dp_rank * per : (dp_rank + 1) * per]
        result = train_step(chunks, optimizer, mine, seq_length=SEQ, micro_batch_size=MBS)
        assert not result.skipped and result.tokens == MICRO * MBS * (SEQ - SEQ // 4)
        losses.append(result.loss)
    if save:
        save_state(chunks, optimizer, save)
    ps.destroy_model_parallel()
    return losses


@pytest.fixture(scope="module")
def single() -> tuple[list[float], list[float]]:
    """The uninterrupted one-process losses (fp32, bf16) both tests compare against: one spawn for the module."""
    return run_ranks(_train_one, 1, True)[0]


LAYOUT_NAMES = [n for n in LAYOUTS if n != "tp2+distributed_optimizer"]
RESHARD_PAIRS = [("dp2+distributed_optimizer", "tp2+distributed_optimizer"), ("tp2", "pp2")]


def _two_rank_jobs(rank: int, world: int, root: str) -> dict[str, Any]:
    """Every layout, then every checkpoint reshard, in one pair of processes (megatron's parallel state is torn
    down in between), which keeps the module at one 2-rank spawn instead of one per layout or test. Also the
    rank's child processes at its end, which the harness must end: megatron's checkpointing starts some, and a
    plain `sleep` stands in for any other helper a rank leaves running."""
    layouts = {name: _train(Layout(**LAYOUTS[name])) for name in LAYOUT_NAMES}
    reshard = _reshard(rank, world, RESHARD_PAIRS, root)
    subprocess.Popen(["sleep", "600"])  # never waited for here
    children = [(c.pid, c.create_time()) for c in psutil.Process().children(recursive=True)]
    return {"layouts": layouts, "reshard": reshard, "children": children}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_two_rank_jobs, 2, str(tmp_path_factory.mktemp("reshard")))


def test_parallel_layouts_reproduce_the_single_process_losses(
    two_ranks: list[dict[str, Any]], single: tuple[list[float], list[float]]
) -> None:
    fp32, bf16 = single
    assert fp32[-1] < fp32[0], f"the tiny model did not learn: {fp32}"
    for rank_results in two_ranks:
        rank_losses = rank_results["layouts"]
        for name in LAYOUT_NAMES:
            got = rank_losses[name]
            assert len(got) == STEPS
            # bf16 rounds activations to 8 mantissa bits, and TP sums in another order: close, not equal
            if "bf16" in name:
                want = bf16
                tolerance = max(BF16_RELATIVE_TOLERANCE * abs(v) for v in want)
            else:
                want, tolerance = fp32, FP32_TOLERANCE
            diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
            assert diff < tolerance, f"{name}: losses {got} differ from the single process's {want} by {diff:.2e}"


def _train_one(rank: int, world: int, with_bf16: bool = False) -> list[float] | tuple[list[float], list[float]]:
    if with_bf16:
        return _train(Layout()), _train(Layout(bf16=True))
    return _train(Layout())


def _reshard(rank: int, world: int, pairs: list[tuple[str, str]], root: str) -> dict[str, list[float]]:
    out = {}
    for i, (first, second) in enumerate(pairs):
        directory = f"{root}/ckpt{i}"
        if rank == 0:
            Path(directory).mkdir()
        torch.distributed.barrier()
        head = _train(Layout(**LAYOUTS[first]), steps=3, save=directory)
        out[f"{first} -> {second}"] = head + _train(Layout(**LAYOUTS[second]), steps=STEPS - 3, load=directory)
    return out


def test_checkpoints_resume_on_another_layout(
    two_ranks: list[dict[str, Any]], single: tuple[list[float], list[float]]
) -> None:
    """3 steps on one layout, a megatron dist checkpoint (model + optimizer), 2 more steps on another layout: the
    5 losses are the uninterrupted single process's. The distributed optimizer's state moves from 2 DP shards to
    a TP=2 layout; the plain optimizer's from TP=2 to PP=2."""
    fp32 = single[0]
    assert list(two_ranks[0]["reshard"]) == [f"{a} -> {b}" for a, b in RESHARD_PAIRS]
    for name, got in two_ranks[0]["reshard"].items():
        diff = max(abs(a - b) for a, b in zip(got, fp32, strict=True))
        assert diff < FP32_TOLERANCE, f"{name}: losses {got} differ from the uninterrupted {fp32} by {diff:.2e}"


def test_no_child_process_of_a_rank_outlives_it(two_ranks: list[dict[str, Any]]) -> None:
    """megatron's dist checkpointing left multiprocessing helpers (~800 MB each) alive after the rank's os._exit:
    tests/distributed.py ends them (and fails a run where one survives); here, the ones it saw are all gone."""
    children = [child for rank_results in two_ranks for child in rank_results["children"]]
    assert len(children) >= len(two_ranks), children  # at least each rank's `sleep`
    alive = []
    for pid, started in children:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"child processes {alive} of the ranks are still running"


@pytest.mark.parametrize(
    ("layout", "world", "layers", "micro", "message"),
    [
        (Layout(tp=2, pp=2), 2, 4, 4, "does not divide the 2 ranks"),
        (Layout(pp=2), 2, 3, 4, "3 layers do not split"),
        (Layout(pp=2, vpp=2), 2, 4, 3, "multiple of pp=2"),
        (Layout(sequence_parallel=True), 2, 4, 4, "needs tp > 1"),
    ],
)
def test_impossible_layouts_are_refused_with_the_numbers(
    layout: Layout, world: int, layers: int, micro: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        layout.check(world, layers, micro)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for processes without CUDA")
def test_context_parallel_on_cpu_says_it_needs_transformer_engine() -> None:
    with pytest.raises(ValueError, match="Transformer Engine"):
        Layout(cp=2).check(2, 4, 4)
