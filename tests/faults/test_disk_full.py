"""A full disk during cache, checkpoint and eval writes: one paragraph naming the disk, nothing corrupted.

The disk is real: a small tmpfs mounted in a private mount namespace (`unshare --user --map-root-user
--mount`, no privileges needed on the host and nothing mounted outside the child). A filler file takes
the free space right before the write in question; deleting it is "freeing space", after which the next
run must pick up what the failed one left (the previous cache and checkpoint) rather than start over.

The stages run in-process in that child (what Prefect would run inside its task): the error's text is
the CLI's `_fail` panel for the real exception, torch's CheckpointException included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART, REPO

_CHILD = r'''
import io, json, os, sys
from pathlib import Path

disk, manifest, quickstart = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
from rich.console import Console
import typer
from flowspeed.configs import load_config
from flowspeed.datasets_prep.cache import LatentCache
from flowspeed.engines.common.io import read_jsonl
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.torch_engine import checkpoint as ckpt
from flowspeed.engines.launch import launch
from flowspeed.evaluation.run import run_eval
from flowspeed.flows import cli

work = disk / "work"
filler = disk / "filler"
out = {}


def fill(leave):
    """Take all but `leave` bytes of the tmpfs."""
    filler.unlink(missing_ok=True)
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - leave
    if size > 0:
        with open(filler, "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, size)


def cfg(man, *more):
    return load_config(quickstart, [f"data.manifest={man}", "train.gpu_slots.enabled=false",
                                    "train.checkpoint_every=1", "train.batch_size=1", *more], workdir=work)


def failure(stage, call, where):
    """Run `call`, which must fail; return the panel `flowspeed <stage>` prints for its exception."""
    try:
        call()
    except (Exception, *cli._checkpoint_exception()) as exc:
        buf = io.StringIO()
        cli.console = Console(file=buf, width=400)
        try:
            cli._fail(stage, exc, False, where)
        except typer.Exit as e:
            assert e.exit_code == 1
        return {"panel": buf.getvalue(), "type": type(exc).__name__}
    return {"panel": None, "type": None}


def temp_files(root):
    return sorted(str(p) for p in root.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")
                  or p.name.startswith(".tmp") or p.name.startswith(".step-"))


# prep: half the manifest cached, then the whole manifest with no room for the new shards
half = manifest.parent / "half.jsonl"
lines = manifest.read_text().splitlines()
half.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
small = cfg(half)
run_prep(small)
before = (small.prep_dir / "samples.jsonl").read_text()
fill(leave=0)
full = cfg(manifest)
out["prep"] = failure("prep", lambda: run_prep(full), full.cache_dir)
out["prep"]["samples_kept"] = (small.prep_dir / "samples.jsonl").read_text() == before
out["prep"]["cache_problems"] = LatentCache(full.cache_dir).verify()
out["prep"]["temp_files"] = temp_files(work)
filler.unlink()
res = run_prep(full)
out["prep"]["rerun"] = {"cached": res.num_cached, "encoded": res.num_encoded, "samples": res.num_samples,
                        "records": len(lines)}

# train: two checkpoints, then no room for the third
launch(cfg(manifest, "train.max_steps=2"), None, None)
fill(leave=64 * 1024)  # config and state files fit; the checkpoint's tensors (~1 MB) do not
three = cfg(manifest, "train.max_steps=3")
out["train"] = failure("train", lambda: launch(three, None, None), three.train_dir)
latest = ckpt.latest_intact(three.train_dir)
out["train"]["latest_intact"] = latest.name if latest else None
out["train"]["checkpoints"] = sorted(p.name for p in (three.train_dir / "checkpoints").iterdir())
out["train"]["temp_files"] = temp_files(work)
filler.unlink()
res = launch(three, None, None)
out["train"]["rerun"] = {"resumed_from": res.resumed_from, "steps": res.steps}

# eval: no room for the sample videos
fill(leave=4 * 1024)
out["eval"] = failure("eval", lambda: run_eval(three), three.eval_dir)
out["eval"]["temp_files"] = temp_files(work)
out["eval"]["metrics_written"] = (three.eval_dir / "metrics.json").exists()
filler.unlink()
res = run_eval(three)
out["eval"]["rerun"] = sorted(res.metrics)
print("RESULT " + json.dumps(out))
'''


def _unshare_works() -> str | None:
    """None if this machine gives an unprivileged private mount namespace with a tmpfs, else why not."""
    if shutil.which("unshare") is None:
        return "no `unshare` binary (util-linux)"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    if probe.returncode != 0:
        return f"no private tmpfs for a test (user namespaces disabled?): {probe.stderr.strip()}"
    return None


@pytest.mark.slow
def test_a_full_disk_is_one_paragraph_naming_it_and_nothing_finished_is_lost(
    tmp_path: Path, demo_manifest: Path
) -> None:
    why = _unshare_works()
    if why:
        pytest.skip(why)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    mount = f'mount -t tmpfs -o size=16m tmpfs {disk} && exec "$0" "$@"'
    run = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount,
         sys.executable, str(script), str(disk), str(demo_manifest), str(QUICKSTART)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    result = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and result, run.stderr[-4000:]
    out = json.loads(result[0].removeprefix("RESULT "))

    for stage, where in (("prep", "prep/cache"), ("train", "train"), ("eval", "eval")):
        panel = out[stage]["panel"]
        assert panel, f"{stage} did not fail on a full disk"
        text = " ".join(panel.split())
        assert f"flowspeed {stage} failed: disk full" in text, panel
        assert "no space left on the device holding" in text and f"tmpfs mounted at {disk}," in text, panel
        assert str(disk / "work" / where) in text, panel  # the path written, or the stage's folder
        assert "free space or point the workdir elsewhere" in text and "Traceback" not in panel, panel
        assert out[stage]["temp_files"] == [], f"{stage} left temp files: {out[stage]['temp_files']}"

    prep = out["prep"]
    assert prep["samples_kept"] and prep["cache_problems"] == [], prep
    rerun = prep["rerun"]  # the shards finished before the disk filled are reused, not re-encoded
    assert rerun["cached"] >= 1 and rerun["cached"] + rerun["encoded"] == rerun["samples"], rerun

    train = out["train"]
    assert train["latest_intact"] == "step-00000002", train
    assert all(name.startswith("step-") for name in train["checkpoints"]), train  # nothing half-written
    assert train["rerun"] == {"resumed_from": 2, "steps": 3}, train

    ev = out["eval"]
    assert not ev["metrics_written"] and ev["rerun"], ev
