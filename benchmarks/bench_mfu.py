"""MFU of a CogVideoX-2b-shaped DiT on one accelerator: our engine's layout vs a plain loop.

    python benchmarks/bench_mfu.py                    # GPU/NPU: the 2b preset, bf16, 49 frames at 480x720
    python benchmarks/bench_mfu.py --tiny --steps 3   # CPU smoke test of the script itself (MFU n/a)

Side by side in one process, on the same model shape and the same synthetic batch:
  plain   : the model, AdamW, bf16 autocast: the diffusers training-script loop
  engine  : FSDP2 (bf16 params, fp32 reduce) via flowspeed.engines.torch_engine.parallelize, with
            compile and recomputation off/on
Prints step time, model TFLOPS and MFU per variant (FLOPs from flowspeed.engines.common.flops).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from flowspeed.engines.common.device import device_name, peak_memory_bytes, resolve_device, set_current, synchronize
from flowspeed.engines.common.flops import mfu, peak_tflops, train_flops
from flowspeed.engines.models import get_family
from flowspeed.engines.models.cogvideox import TRANSFORMER_PRESETS
from flowspeed.engines.torch_engine.parallel_dims import ParallelDims
from flowspeed.engines.torch_engine.parallelize import apply_ac, apply_compile, apply_fsdp, compile_cache


def build(preset: str, device: torch.device):  # noqa: ANN201
    from diffusers import CogVideoXTransformer3DModel

    dims = {**TRANSFORMER_PRESETS[preset], "text_embed_dim": 4096 if preset == "2b" else 32, "in_channels": 16}
    with torch.device(device):
        return CogVideoXTransformer3DModel(**dims, out_channels=16)


def batch(preset: str, bs: int, device: torch.device) -> dict[str, torch.Tensor]:
    t, h, w = (13, 60, 90) if preset == "2b" else (3, 8, 8)  # latent frames and size (49 frames at 480x720)
    text = 226  # CogVideoX's max_text_seq_length: its position table covers 226 text tokens
    g = torch.Generator().manual_seed(0)
    return {
        "latent_params": torch.randn(bs, 32, t, h, w, generator=g).to(device),  # (B, 2*C, T', H', W')
        "text_embeds": torch.randn(bs, text, 4096 if preset == "2b" else 32, generator=g).to(device),
        "scaling_factor": torch.full((bs,), 0.7, device=device),
    }


def measure(name: str, model, b, steps: int, device: torch.device, peak, autocast: bool) -> None:  # noqa: ANN001
    family = get_family("cogvideox")
    sched = family.load_scheduler(None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = family.latent_tokens(model.config, tuple(b["latent_params"].shape[1:]))
    times = []
    torch.manual_seed(0)
    for i in range(steps + 2):
        synchronize(device)
        t0 = time.perf_counter()
        ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
        with ctx:
            loss = family.training_loss(model, sched, b, torch.Generator().manual_seed(i))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= 2:  # two warm-up steps (compile, allocator)
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    flops = train_flops(n_params, model.config, tokens, b["latent_params"].shape[0])
    m = mfu(flops, dt, peak, 1)
    print(f"{name:28s} {dt * 1e3:9.1f} ms/step  {flops / dt / 1e12:8.2f} TFLOPS  "
          f"MFU {'n/a' if m is None else f'{m:.1%}'}  peak mem {peak_memory_bytes(device) / 2**30:.1f} GiB",
          flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--variants", default="plain,engine,engine+ac,engine+compile,engine+compile+ac")
    args = ap.parse_args()
    preset = "tiny" if args.tiny else "2b"
    device = resolve_device("cpu" if args.tiny else "auto")
    set_current(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("gloo" if device.type == "cpu" else None, rank=0, world_size=1,
                            timeout=timedelta(minutes=10))  # fmt: skip
    peak = peak_tflops(device, "bfloat16")
    print(f"device: {device_name(device)}; peak bf16 {peak} TFLOPS; preset {preset}; torch {torch.__version__}")
    b = batch(preset, args.batch_size, device)
    compile_cache(None, Path(".cache/inductor"))
    mesh = ParallelDims(1, 1, 1, 1, 1, 1).build_mesh(device.type)
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        model = build(preset, device)
        if variant == "plain":
            measure(variant, model, b, args.steps, device, peak, autocast=True)
        else:
            # One rank: FSDP2 over a 1-rank mesh, so the engine's own wrapping cost is in the figure.
            apply_ac(model, "full" if "ac" in variant else "none")
            if "compile" in variant:
                apply_compile(model)
            apply_fsdp(model, mesh["dp_shard"], "bfloat16", "float32", reshard=True)
            measure(variant, model, b, args.steps, device, peak, autocast=False)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
