"""A served generation on several ranks of this machine: the pyfunc's `eval.parallel` layout.

Why a torchrun job: CFG and context parallelism split one video's denoiser calls across ranks (see
engines/torch_engine/sampling.py), and the ranks must be processes with their own device and a process group; a
pyfunc `predict` is one process inside MLflow's server. So when the model's stored layout has more than one rank,
`predict` writes the request to a JSON file (atomically) and runs this module with `run_torchrun`; it returns the
paths the job wrote and the DataFrame is built as in one process.

Inside the job the ranks form the (dp, cfg, cp) mesh as the eval does: the prompts are split in contiguous blocks
across the dp groups, a block starting at global index `start` is generated with `seed + start` (so prompt i gets
`seed + i`, as in one process), and the first rank of each group writes its videos (`sample_XX.mp4`, XX = the global
prompt index) into the predict's output folder. Rank 0 gathers the paths and each rank's peak memory and seconds
into a result file the parent reads and logs.

This module imports neither MLflow nor flowspeed.evaluation: every rank pays only for the family's own imports.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from flowspeed.datasets_prep.mp4 import write_sample
from flowspeed.engines.common.device import init_process_group, peak_memory_bytes, resolve_device
from flowspeed.engines.common.io import atomic_write_text
from flowspeed.engines.torch_engine.sampling import SamplingLayout, contiguous_block
from torch.distributed.elastic.multiprocessing.errors import record

log = logging.getLogger(__name__)
MODULE = "flowspeed.engines.tracking.parallel_predict"


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8, any size: image-to-video pipelines resize the first frame themselves."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def prompt_block(n: int, layout: SamplingLayout, rank: int) -> range:
    """The global prompt indices `rank`'s dp group makes: contiguous blocks whose sizes differ by at most one (as
    the eval splits samples), so a block generated from `seed + start` gives every prompt the seed it gets in one
    process. All cfg x cp ranks of a group get the same block: they make the same videos together."""
    return contiguous_block(n, layout.dp, rank // layout.group)


def accelerators(device: torch.device) -> int | None:
    """How many devices of `device`'s kind this machine has; None on CPU, where gloo ranks share the cores."""
    if device.type == "cuda":
        return torch.cuda.device_count()
    if device.type == "npu":
        return torch.npu.device_count()  # type: ignore[attr-defined]
    return None


def predict_parallel(
    family: str,
    export_dir: Path,
    prompts: list[str],
    images: list[str] | None,
    sampling: dict[str, Any],
    fps: int,
    folder: Path,
    layout: SamplingLayout,
) -> list[str]:
    """Generate `prompts` as a torchrun job of `layout.world` ranks; returns one written path per prompt, in order.

    `images`: local paths of the first frames (image-to-video), or None. `sampling`: the keyword arguments of
    `generate` besides prompts, images and device (num_frames, height, width, steps, guidance_scale, seed).
    Raises DistributedJobFailed (with the failing rank's error) when a rank fails.
    """
    from flowspeed.engines.common.torchrun import run_torchrun

    have = accelerators(resolve_device("auto"))
    if have is not None and have < layout.world:
        raise ValueError(
            f"this model serves with {layout.describe()} = {layout.world} ranks (flowspeed_serving.json `parallel`, "
            f"from the eval's eval.parallel and eval.nproc_per_node), but this machine has {have} accelerators: "
            "serve it on a machine with enough, or rewrite the settings with write_mlmodel from a config whose "
            f"eval.nproc_per_node is at most {have}"
        )
    with tempfile.TemporaryDirectory(prefix="flowspeed-parallel-predict-") as scratch:
        request = {
            "family": family,
            "export_dir": str(export_dir),
            "prompts": prompts,
            "images": images,
            "sampling": sampling,
            "fps": fps,
            "folder": str(folder),
            "layout": {"dp": layout.dp, "cfg": layout.cfg, "cp": layout.cp, "cp_mode": layout.cp_mode},
            "result": str(Path(scratch) / "result.json"),
        }
        path = atomic_write_text(Path(scratch) / "request.json", json.dumps(request))
        log.info("predict: %d prompts on %d ranks (%s)", len(prompts), layout.world, layout.describe())
        run_torchrun(MODULE, ["--request", str(path)], layout.world)
        result = json.loads(Path(request["result"]).read_text())
    for r in result["ranks"]:
        log.info("predict rank %d: %d prompts, %.1f s, peak memory %.2f GiB", r["rank"], r["prompts"], r["seconds"],
                 r["peak_memory_bytes"] / 2**30)  # fmt: skip
    paths = result["paths"]
    if len(paths) != len(prompts) or not all(Path(p).is_file() for p in paths):
        raise RuntimeError(f"the parallel predict job wrote {len(paths)} files for {len(prompts)} prompts in {folder}")
    return paths


def run(request: dict[str, Any]) -> None:
    """One rank: join the group, build the mesh, make this group's block of prompts, its first rank writes them."""
    from flowspeed.engines.models import get_family
    from flowspeed.engines.models.registry import sampling_setup
    from flowspeed.engines.torch_engine.sampling import SamplingSetup, sampling_mesh

    t0 = time.perf_counter()
    device = resolve_device("auto")
    init_process_group(device)
    layout = SamplingLayout(**request["layout"])
    setup = SamplingSetup(layout, sampling_mesh(layout, device))
    rank = dist.get_rank()
    prompts, images = request["prompts"], request["images"]
    mine = prompt_block(len(prompts), layout, rank)
    paths: list[tuple[int, str]] = []  # (global prompt index, file)
    if len(mine):
        sampling = {**request["sampling"], "seed": request["sampling"]["seed"] + mine.start}
        kwargs = {"images": [read_rgb(Path(images[i])) for i in mine]} if images else {}
        with sampling_setup(setup):
            videos = get_family(request["family"]).generate(
                Path(request["export_dir"]), prompts[mine.start : mine.stop], device=device, **sampling, **kwargs
            )
        if rank % layout.group == 0:
            folder = Path(request["folder"])
            paths = [(i, str(write_sample(folder, i, v, request["fps"]))) for i, v in zip(mine, videos, strict=True)]
    stats = {"rank": rank, "prompts": len(mine), "seconds": time.perf_counter() - t0,
             "peak_memory_bytes": peak_memory_bytes(device)}  # fmt: skip
    parts: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((paths, stats), parts, dst=0)
    if rank == 0:
        assert parts is not None
        written = sorted(p for part, _ in parts for p in part)
        result = {"paths": [p for _, p in written], "ranks": [s for _, s in parts]}
        atomic_write_text(Path(request["result"]), json.dumps(result, indent=2))


@record
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one rank of a parallel pyfunc predict (launched by predict)")
    parser.add_argument("--request", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(json.loads(args.request.read_text()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from flowspeed.engines.common.lifetime import run_rank

    run_rank(main)
