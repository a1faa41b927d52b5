"""Seconds per video of parallel sampling (`eval.parallel`): one process vs 2 ranks, side by side in one run.

    python benchmarks/bench_parallel_sampling.py                  # CPU: sized-up tiny CogVideoX, 4 prompts, 2 rounds
    python benchmarks/bench_parallel_sampling.py --frames 5 --height 32 --width 32 --steps 2 --prompts 2 \\
        --rounds 1 --transformer ""                               # smoke test of the script itself (seconds)
    python benchmarks/bench_parallel_sampling.py --device cuda --cache first_block   # GPU: one device, cache off/on

Why: a video eval (or a served request) spends its time in the denoiser's calls; `eval.parallel` splits one
sample's calls across a group of ranks (CFG halves, context-parallel token shards) or splits the prompts (dp). This
measures what each split buys per video on the same export, prompts and seeds, every layout set up exactly as
evaluation/run.py does it (`registry.sampling_setup(SamplingSetup(layout, sampling_mesh(layout, device)))`, the
export kept loaded, `family.generate` unchanged):

  [a]  one process, torch threads = 2 (the whole 2-core machine), and [a1] the same with 1 thread
  [cp] 2 gloo ranks (1 thread each), cp=2, Ulysses (`--cp-mode ring`): every call's tokens split in two
  [cfg] 2 gloo ranks, cfg=2: every guided call's doubled batch split in two
  [dp] 2 gloo ranks, dp=2: the prompts split in two (eval's contiguous blocks), each rank makes whole videos

The export is the family's tiny preset with the transformer widened through its own config (`--transformer
KEY=VALUE,...`, the family's diffusers config keys; CogVideoX's tiny is 2 heads x 16 wide and 2 layers, far too
small for the denoiser to dominate), at a video size larger than the tests'. Each mode loads the export and makes a
warm-up video first (2 steps, untimed), then the prompts one `generate` call each. Printed per mode: the median
seconds per video made (latency), the seconds per video of the whole batch (wall / N, what an eval of many prompts
pays; the ratio vs [a] is on this), the share of that time inside the denoiser's calls (the rest, text encoding
and the VAE decode, runs whole on every rank of a cfg/cp group), and the largest |frame difference| from [a] (float
frames, `float_frames`). Rounds alternate the one-process and the 2-rank launches; figures are medians over rounds.

`--cache METHOD` (first_block | taylorseer, `eval.cache`'s methods at their defaults) adds mode [cache]: [a] with
the eval's step cache (engines/torch_engine/step_cache.py `sampling_extra`, as evaluation/run.py installs it); its
max |diff| vs [a] is the cache's quality cost. `--device cuda`: one device, modes [a] and, with `--cache`, [cache]
(the GPU figure the issue asks for); the 2-rank modes need 2 devices and `--modes`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

#: mode -> (ranks, threads per rank, dp, cfg, cp)
MODES: dict[str, tuple[int, int, int, int, int]] = {
    "a": (1, 2, 1, 1, 1),
    "a1": (1, 1, 1, 1, 1),
    "cp": (2, 1, 1, 1, 2),
    "cfg": (2, 1, 1, 2, 1),
    "dp": (2, 1, 2, 1, 1),
    "cache": (1, 2, 1, 1, 1),  # [a] with --cache's step cache
}
#: CogVideoX's tiny transformer widened (6 heads x 64 = 384 wide, 8 layers): at the tiny preset's 32 wide the tiny
#: VAE's decode, which every rank of a cfg/cp group runs whole, took ~90% of a video; a real DiT's denoiser dominates
DEFAULT_WIDEN = {"cogvideox": "num_attention_heads=6,attention_head_dim=64,num_layers=8,time_embed_dim=128"}
PROMPTS = ["a red ball rolls left", "blue bars scroll up", "a green square grows", "waves under a grey sky"]


@dataclass
class Job:
    """What every launched process needs (picklable: it crosses the spawn)."""

    family: str
    export: str
    modes: list[str]
    shape: tuple[int, int, int]
    prompts: list[str]
    steps: int
    guidance: float
    seed: int
    device: str
    cp_mode: str = "ulysses"
    cache: str = "none"


@dataclass
class Measured:
    """One mode's figures from one launch, as its first rank saw them."""

    wall: float  # seconds for all prompts (barrier to barrier on 2 ranks)
    latencies: list[float] = field(default_factory=list)  # seconds per generate call (one video) on this rank
    denoiser: float = 0.0  # seconds inside the denoiser's calls on this rank
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # prompt index -> float frames this group wrote


class DenoiserClock:
    """Seconds spent inside the denoiser's calls (a SamplingSetup `extra`): the pre-hook is prepended so it starts
    before the CFG split, the post-hook runs after the CFG gather, so the collectives count as denoiser time."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._t0 = device, 0.0, 0.0

    def __call__(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._start, prepend=True)
        model.register_forward_hook(self._stop)

    def _start(self, module: nn.Module, args: tuple) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def _stop(self, module: nn.Module, args: tuple, output: Any) -> None:
        _sync(self.device)
        self.seconds += time.perf_counter() - self._t0


def chain(setups: list[Callable[[nn.Module], None]]) -> Callable[[nn.Module], None]:
    """One SamplingSetup `extra` applying `setups` in order (the step cache, then the clock)."""

    def apply(model: nn.Module) -> None:
        for setup in setups:
            setup(model)

    return apply


def _sync(device: torch.device) -> None:
    from flowspeed.engines.common.device import synchronize

    synchronize(device)


def parse_widen(text: str) -> dict[str, int]:
    """`key=value,...` -> config overrides (integers): how far the tiny transformer is widened."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise SystemExit(f"--transformer: {item!r} is not KEY=INTEGER (e.g. num_layers=4,num_attention_heads=4)")
        out[key.strip()] = int(value)
    return out


def widen(model: nn.Module, overrides: dict[str, int], seed: int) -> nn.Module:
    """The same transformer class built from its own config with `overrides` (random init, seeded): presets are
    named, so a bigger-than-tiny shape for a CPU benchmark comes from the model's config, not a new preset."""
    if not overrides:
        return model
    if not hasattr(type(model), "from_config") or not hasattr(model, "config"):
        raise SystemExit(
            f"--transformer: {type(model).__name__} has no diffusers config to widen; pass --transformer ''"
        )
    known = sorted(k for k in model.config if not k.startswith("_"))
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise SystemExit(f"--transformer: {type(model).__name__} has no config keys {unknown}; known: {known}")
    from flowspeed.engines.models.registry import seeded_init

    with seeded_init(seed):
        return type(model).from_config({**model.config, **overrides})


def export(family: str, folder: Path, shape: tuple[int, int, int], overrides: dict[str, int], text_len: int) -> Path:
    """The family's tiny preset (transformer widened) as an export, sized by what prep would cache for a clip of
    `shape` (as tests/engines/torch_engine/test_sampling_parallel.py writes its exports)."""
    from flowspeed.configs.schema import ModelConfig
    from flowspeed.engines.models import get_family

    fam = get_family(family)
    cfg = ModelConfig(family=family, max_text_length=text_len)
    t, h, w = shape
    with torch.no_grad():
        latents = fam.encode_video(fam.load_vae(cfg), torch.zeros(1, t, h, w, 3, dtype=torch.uint8))
        text = fam.encode_text(*fam.load_text_encoder(cfg), ["bars"], text_len)
    text = text["text_embeds"] if isinstance(text, dict) else text
    record = {"latent_shape": list(latents.shape[1:]), "text_shape": list(text.shape[1:])}
    model = widen(fam.load_transformer(cfg, **fam.model_args(record)), overrides, cfg.seed + 3)
    fam.save_pretrained(folder, cfg, model)
    return folder


def _generate(fam: Any, job: Job, device: torch.device, prompts: list[str], seed: int, steps: int) -> np.ndarray:
    from flowspeed.engines.models.registry import float_frames

    t, h, w = job.shape
    with float_frames():
        return fam.generate(Path(job.export), prompts, num_frames=t, height=h, width=w, steps=steps,
                            guidance_scale=job.guidance, seed=seed, device=device)  # fmt: skip


def measure(job: Job, mode: str, rank: int, world: int, device: torch.device) -> Measured:
    """One mode on this process: set up as evaluation/run.py does, warm up, then one generate call per prompt of
    this rank's dp block (seed = seed + global prompt index, as eval seeds items)."""
    from flowspeed.engines.models import get_family
    from flowspeed.engines.models.registry import keep_loaded, sampling_setup
    from flowspeed.engines.torch_engine.sampling import SamplingLayout, SamplingSetup, sampling_mesh
    from flowspeed.evaluation.sharded import Ranks, block

    _, threads, dp, cfg, cp = MODES[mode]
    torch.set_num_threads(threads)
    layout = SamplingLayout(dp, cfg, cp, job.cp_mode)
    ranks = Ranks(rank, world, layout.group)
    mine = list(block(len(job.prompts), ranks.shards()))
    clock = DenoiserClock(device)
    mesh = sampling_mesh(layout, device)
    extra: list[Callable[[nn.Module], None]] = [clock]
    if mode == "cache":  # imported only here: the other modes run on a tree without eval.cache
        from flowspeed.configs.schema import EvalCacheConfig
        from flowspeed.engines.torch_engine.step_cache import sampling_extra

        cache = sampling_extra(EvalCacheConfig(method=job.cache), mesh)
        assert cache is not None  # main() refuses --cache none with mode cache
        extra.insert(0, cache)  # the cache's hooks inside the clock's: the clock times the cached calls

    fam = get_family(job.family)
    with keep_loaded(), sampling_setup(SamplingSetup(layout, mesh, chain(extra))):
        _generate(fam, job, device, job.prompts[:1], job.seed, min(2, job.steps))  # load, set up, first calls: untimed
        clock.seconds = 0.0
        if world > 1:
            dist.barrier()
        _sync(device)
        start = time.perf_counter()
        got = Measured(0.0)
        for i in mine:
            t0 = time.perf_counter()
            video = _generate(fam, job, device, [job.prompts[i]], job.seed + i, job.steps)[0]
            _sync(device)
            got.latencies.append(time.perf_counter() - t0)
            if ranks.writes:
                got.frames[i] = video
        if world > 1:
            dist.barrier()
        got.wall, got.denoiser = time.perf_counter() - start, clock.seconds
    if world > 1:  # every rank's frames to the first: the dp groups made different prompts
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, got.frames)
        got.frames = {i: v for part in parts for i, v in part.items()}
    return got


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, job: Job) -> None:
    """One spawned rank: joins gloo (nccl on GPUs) when world > 1, measures its modes, rank 0 saves them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # one loading bar per mode and rank would bury the figures
    transformers_logging.disable_progress_bar()
    device = torch.device(job.device if job.device == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))  # fmt: skip
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=rank, world_size=world,
                                timeout=timedelta(minutes=20))  # fmt: skip
    results = {mode: measure(job, mode, rank, world, device) for mode in job.modes}
    if rank == 0:
        tmp = Path(out) / "rank0.pt.tmp"
        torch.save(results, tmp)
        tmp.replace(Path(out) / "rank0.pt")  # atomic: a crashed rank leaves no half-written result
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip teardown: gloo's C++ threads can abort the process while being destroyed at exit


def launch(job: Job, world: int) -> dict[str, Measured]:
    """`job.modes` measured on `world` fresh spawned processes (torch.multiprocessing); rank 0's figures."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(world, _free_port(), out, job), nprocs=world, start_method="spawn")
        result = Path(out) / "rank0.pt"
        if not result.is_file():
            raise RuntimeError(f"the {world}-process launch of {job.modes} ended without a result; see its output")
        return torch.load(result, weights_only=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="cogvideox")
    ap.add_argument("--frames", type=int, default=13, help="video frames (the family's 4k+1 / 8k+1 rule)")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps per video")
    ap.add_argument("--guidance", type=float, default=6.0, help="> 1: a doubled (CFG) batch per call")
    ap.add_argument("--prompts", type=int, default=4, help="videos per mode and round (even: dp splits them)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--text-length", type=int, default=32, help="text tokens (model.max_text_length)")
    ap.add_argument("--transformer", default=None,
                    help="KEY=INT,... overrides widening the tiny transformer ('' keeps the preset)")  # fmt: skip
    ap.add_argument("--cp-mode", default="ulysses", choices=["ulysses", "ring"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cache", default="none", choices=["none", "first_block", "taylorseer"],
                    help="eval.cache method for mode cache (its defaults)")  # fmt: skip
    ap.add_argument("--modes", default=None,
                    help=f"comma list of {', '.join(MODES)} (default: all but cache on cpu, a on cuda; cache with "
                    "--cache)")  # fmt: skip
    args = ap.parse_args()

    default = ["a"] if args.device == "cuda" else [m for m in MODES if m != "cache"]
    modes = args.modes.split(",") if args.modes else default + (["cache"] if args.cache != "none" else [])
    unknown = [m for m in modes if m not in MODES]
    if unknown or "a" not in modes:
        raise SystemExit(f"--modes: {unknown or 'a missing'}; choose from {', '.join(MODES)}, with a (the baseline)")
    if "cache" in modes and args.cache == "none":
        raise SystemExit("--modes cache needs --cache first_block or --cache taylorseer")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device; run on a GPU machine or use --device cpu")
        if any(MODES[m][0] > torch.cuda.device_count() for m in modes):
            raise SystemExit(f"--modes {modes}: 2-rank modes need 2 GPUs, {torch.cuda.device_count()} visible")
    if args.prompts < 2 or args.prompts % 2:
        raise SystemExit("--prompts must be even and >= 2: dp=2 splits them between its ranks")
    overrides = parse_widen(DEFAULT_WIDEN.get(args.family, "") if args.transformer is None else args.transformer)
    shape = (args.frames, args.height, args.width)
    prompts = [
        PROMPTS[i % len(PROMPTS)] + (f" {i // len(PROMPTS)}" if i >= len(PROMPTS) else "") for i in range(args.prompts)
    ]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = export(args.family, Path(tmp) / "export", shape, overrides, args.text_length)
        print(f"{args.family} tiny export, transformer {overrides or 'as preset'}, {shape[0]} frames at {shape[1]}x"
              f"{shape[2]}, {args.steps} steps, guidance {args.guidance}, {args.prompts} prompts x {args.rounds} "
              f"rounds, device {args.device} (export {time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
        base = dict(family=args.family, export=str(folder), shape=shape, prompts=prompts, steps=args.steps,
                    guidance=args.guidance, seed=0, device=args.device, cp_mode=args.cp_mode,
                    cache=args.cache)  # fmt: skip
        runs: dict[str, list[Measured]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for world in (1, 2):  # rounds alternate the one-process and the 2-rank launches
                group = [m for m in modes if MODES[m][0] == world]
                if group:
                    for mode, got in launch(Job(modes=group, **base), world).items():
                        runs[mode].append(got)
                        print(f"  round {r + 1} {mode:4s}: {got.wall / args.prompts:8.3f} s per video", flush=True)
    report(runs, args.prompts, args.cp_mode, args.cache)


def report(runs: dict[str, list[Measured]], n: int, cp_mode: str, cache: str) -> None:
    """Median figures per mode, ratios vs [a] and the videos' agreement with [a]'s (first round's frames)."""
    names = {"a": "[a]  1 process, 2 threads", "a1": "[a1] 1 process, 1 thread", "cp": f"[cp] 2 ranks cp=2 {cp_mode}",
             "cfg": "[cfg] 2 ranks cfg=2", "dp": "[dp] 2 ranks dp=2 (prompts split)",
             "cache": f"[cache] [a] + step cache {cache}"}  # fmt: skip
    ref = runs["a"][0].frames
    per_video = {m: statistics.median(g.wall / n for g in got) for m, got in runs.items()}
    for mode, got in runs.items():
        latency = statistics.median(t for g in got for t in g.latencies)
        share = statistics.median(g.denoiser / g.wall for g in got)
        diff = max(float(np.abs(got[0].frames[i] - ref[i]).max()) for i in ref)
        ratio = per_video["a"] / per_video[mode]
        print(f"{names[mode]:36s}: {per_video[mode]:8.3f} s per video (latency {latency:8.3f} s, denoiser "
              f"{share:5.1%}); {ratio:5.2f}x vs [a]; max |diff| vs [a] {diff:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
