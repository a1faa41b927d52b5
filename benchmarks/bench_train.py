"""Side-by-side training benchmarks on the tiny CogVideoX preset (same model, batch and input).

    python benchmarks/bench_train.py [--steps 40] [--height 64 --width 64] [--layers 4 --heads 4 --head-dim 32]

1. cached vs on-the-fly: a training step on the prep stage's cached latents against a step that
   decodes the clips and runs the VAE and text encoder first (what a trainer without a cache does).
2. engine vs plain loop: our engine's `train()` (data order, grad clipping, LR schedule, metrics,
   step-time split, checkpoints at the end) against the hand-written loop of diffusers' example
   training scripts (read a cached batch, loss, backward, clip, step, schedule) on the same data.
Prints samples/s for each side and the ratio; record the output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from flowspeed.configs import load_config  # noqa: E402
from flowspeed.datasets_prep.cache import CachedLatents, collate  # noqa: E402
from flowspeed.datasets_prep.decode import decode, resize_center_crop  # noqa: E402
from flowspeed.datasets_prep.demo import make_demo_dataset  # noqa: E402
from flowspeed.datasets_prep.prep import load_samples, run_prep  # noqa: E402
from flowspeed.datasets_prep.probe import probe  # noqa: E402
from flowspeed.engines.models import get_family  # noqa: E402
from flowspeed.engines.torch_engine.trainer import step_generator, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed_steps(step_fn, steps: int, warmup: int = 3) -> float:
    """Median seconds per step after warm-up."""
    for _ in range(warmup):
        step_fn(-1)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step_fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=0, help="0: the tiny preset; else a wider denoiser with this depth")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    args = ap.parse_args()
    overrides = []
    if args.layers:
        # A bigger denoiser than the tiny preset, so a step costs what per-step bookkeeping is measured against.
        from flowspeed.engines.models import cogvideox

        dims = dict(num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim)
        cogvideox.TRANSFORMER_PRESETS["bench"] = {**cogvideox.TRANSFORMER_PRESETS["tiny"], **dims}
        overrides.append("model.transformer.preset=bench")
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="flowspeed-bench-"))
    manifest = make_demo_dataset(work / "data", num_videos=8, num_images=0)
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            f"data.manifest={manifest}",
            f"data.height={args.height}",
            f"data.width={args.width}",
            f"train.batch_size={args.batch_size}",
            "train.val_fraction=0",
            f"train.max_steps={args.steps}",
            f"train.checkpoint_every={args.steps}",
            *overrides,
        ],
        workdir=work / "run",
    )
    run_prep(cfg)
    family = get_family(cfg.model.family)
    records = load_samples(cfg.prep_dir)
    data = CachedLatents(cfg.cache_dir, records)
    bs = args.batch_size
    first = records[0]
    model = family.load_transformer(cfg.model, first["text_shape"][-1], first["latent_shape"][0] // 2)
    sched = family.load_scheduler(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_on(batch: dict[str, torch.Tensor], i: int) -> None:
        loss = family.training_loss(model, sched, batch, step_generator(0, i, 0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # ---- 1. cached latents vs encoding on the fly -------------------------------------------
    def cached_step(i: int) -> None:
        idx = [(i * bs + k) % len(data) for k in range(bs)]
        train_on(collate([data[j] for j in idx]), i)

    vae = family.load_vae(cfg.model)
    tok, enc = family.load_text_encoder(cfg.model)
    infos = [probe(Path(r["source"])) for r in records]

    def on_the_fly_step(i: int) -> None:
        idx = [(i * bs + k) % len(records) for k in range(bs)]
        frames = torch.stack(
            [
                resize_center_crop(
                    decode(infos[j], records[j]["frame_indices"], cfg.data.decoder)[0], cfg.data.height, cfg.data.width
                )
                for j in idx
            ]
        )
        with torch.no_grad():
            lat = family.encode_video(vae, frames)
            txt = family.encode_text(tok, enc, [records[j]["caption"] for j in idx], cfg.model.max_text_length)
        scale = torch.full((bs,), float(vae.config.scaling_factor))
        train_on({"latent_params": lat, "text_embeds": txt, "scaling_factor": scale}, i)

    t_cached = timed_steps(cached_step, args.steps)
    t_fly = timed_steps(on_the_fly_step, args.steps)
    print(f"[1] cached latents : {bs / t_cached:8.1f} samples/s ({t_cached * 1e3:.1f} ms/step)")
    print(f"[1] on-the-fly     : {bs / t_fly:8.1f} samples/s ({t_fly * 1e3:.1f} ms/step)")
    print(f"[1] ratio cached / on-the-fly throughput: {t_fly / t_cached:.2f}x")

    # ---- 2. engine vs a plain hand-written loop ----------------------------------------------
    # The loop of diffusers' example training scripts: read a batch, loss, backward, clip, step, schedule.
    plain_model = family.load_transformer(cfg.model, first["text_shape"][-1], first["latent_shape"][0] // 2)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3)
    plain_sched = torch.optim.lr_scheduler.LambdaLR(plain_opt, lambda s: 1.0)

    def plain_step(i: int) -> None:
        batch = collate([data[(max(i, 0) * bs + k) % len(data)] for k in range(bs)])
        loss = family.training_loss(plain_model, sched, batch, step_generator(0, i, 0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        plain_opt.step()
        plain_sched.step()
        plain_opt.zero_grad(set_to_none=True)

    # Alternate the two sides so drift in machine load (other jobs, thermal) hits both alike.
    plain_times, engine_times = [], []
    for r in range(args.rounds):
        plain_times.append(timed_steps(plain_step, args.steps))
        run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": work / f"train{r}"})})
        t0 = time.perf_counter()
        res = train(run_cfg)
        wall = time.perf_counter() - t0
        engine_times.append(res.median_step_s)  # median, like the plain loop; metrics buffering included
        print(
            f"[2] round {r}: engine {res.median_step_s * 1e3:.1f} ms/step ({wall:.2f} s wall for {args.steps} "
            f"steps incl. model build, checkpoint and export), plain {plain_times[-1] * 1e3:.1f} ms/step"
        )
    t_engine, t_plain = statistics.median(engine_times), statistics.median(plain_times)
    print(f"[2] engine         : {bs / t_engine:8.1f} samples/s ({t_engine * 1e3:.1f} ms/step)")
    print(f"[2] plain loop     : {bs / t_plain:8.1f} samples/s ({t_plain * 1e3:.1f} ms/step)")
    print(f"[2] ratio engine / plain step time: {t_engine / t_plain:.3f}x (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
