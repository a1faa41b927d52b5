"""The training stage as a Slurm job (`train.launcher: slurm`), from inside the `train-model` task.

The flow stays where it runs (a login node, or a Prefect worker on one) and does what it does for a local
training: opens the MLflow run, then waits on the training. The training itself is one `sbatch` allocation
(engines/common/slurm.py renders the script) whose ranks log their metrics into the same MLflow run, as
torchrun ranks do locally. The run carries where it trained: `flowspeed.slurm.job_id`, `.nodes`, `.state`,
`.exit_code`, and the batch script as an artifact (`slurm/`).

Cancelling the flow cancels the job: Prefect cancels a flow run by SIGTERM (raised here as its
TerminationSignal), Ctrl-C is a KeyboardInterrupt; either leaves the wait through `scancel`, so an
allocation of many GPU nodes is never left training for a flow nobody waits on. A flow process killed
outright (SIGKILL) cannot cancel anything: the job id is recorded in `<train_dir>/slurm-job.json`, and the
next train stage of the same config waits on that job while it still lives instead of submitting a second
one into the same checkpoint folder.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from flowspeed.configs import PipelineConfig, save_config
from flowspeed.engines.common import slurm
from flowspeed.engines.common.io import atomic_write_text
from flowspeed.engines.common.progress import relay_progress
from flowspeed.engines.launch import ENGINES
from flowspeed.engines.loop import TrainResult
from flowspeed.tasks import tracking as tr

log = logging.getLogger("flowspeed")

JOB_RECORD = "slurm-job.json"
SCRIPT = "slurm-train.sbatch"


def _tags(cfg: PipelineConfig, run_id: str | None, tags: dict[str, Any]) -> None:
    if run_id:
        tr.set_tags(cfg, run_id, {f"flowspeed.slurm.{k}": v for k, v in tags.items()})


def _live_job(record: Path) -> str | None:
    """The job an earlier train stage of this folder submitted, when it is still queued or running (its flow
    process died without cancelling it): waited on, not submitted again beside it."""
    try:
        job_id = str(json.loads(record.read_text())["job_id"])
    except (OSError, ValueError, KeyError):
        return None
    try:
        return None if slurm.status(job_id).terminal else job_id
    except slurm.SlurmError:
        return None  # long gone from the controller and from accounting


def train_on_slurm(cfg: PipelineConfig, run_id: str | None, tracking_uri: str | None) -> dict[str, Any]:
    """Submit the training as one allocation, wait on it (its state and nodes tagged on the MLflow run as they
    change) and return what a local training returns; a cancelled wait cancels the job."""
    t = cfg.train
    engine = ENGINES[t.engine]
    module, func = engine.validate.split(":")
    getattr(importlib.import_module(module), func)(cfg)  # the layout refused here, not after minutes in the queue
    train_dir = Path(cfg.train_dir).resolve()
    cfg_path = save_config(cfg, train_dir, "launch_config.yaml")
    args = ["--config", str(cfg_path)]
    if run_id:
        args += ["--run-id", run_id, "--tracking-uri", tracking_uri or ""]
    script = atomic_write_text(train_dir / SCRIPT, slurm.batch_script(cfg, engine.module, args))
    record = train_dir / JOB_RECORD
    with relay_progress(train_dir / "progress.log"):  # rank 0's step lines, through the shared filesystem
        job_id = _live_job(record)
        if job_id is None:
            job_id = slurm.sbatch(script)
            atomic_write_text(record, json.dumps({"job_id": job_id, "submitted": time.time(), "script": str(script)}))
            log.info("submitted the training as Slurm job %s (%s)", job_id, script)
        else:
            log.info("waiting on Slurm job %s, submitted by an earlier train stage and still queued or running", job_id)
        _tags(cfg, run_id, {"job_id": job_id, "script": script})
        if run_id:
            tr.log_artifacts(cfg, run_id, script, "slurm")

        def changed(st: slurm.JobStatus) -> None:
            log.info("Slurm job %s: %s%s", job_id, st.state, f" on {st.nodes}" if st.nodes else "")
            _tags(cfg, run_id, {"state": st.state, **({"nodes": st.nodes} if st.nodes else {})})

        try:
            final = slurm.wait(job_id, t.slurm.poll_s, on_change=changed)
        except BaseException:  # a cancelled flow (SIGTERM), Ctrl-C, a failed poll: the job goes with the wait
            _cancel(cfg, run_id, job_id)
            raise
    _tags(cfg, run_id, {"state": final.state, "exit_code": final.exit_code,
                        **({"nodes": final.nodes} if final.nodes else {})})  # fmt: skip
    if final.state != "COMPLETED":
        out = train_dir / f"slurm-{job_id}.out"
        raise slurm.SlurmJobFailed(
            f"Slurm job {job_id} ended {final.state} (exit code {final.exit_code or 'unknown'}) on "
            f"{final.nodes or 'no node'}; its output: {out}\n{slurm.log_tail(out)}"
        )
    return TrainResult(**json.loads((train_dir / "losses.json").read_text())).as_dict()


def _cancel(cfg: PipelineConfig, run_id: str | None, job_id: str) -> None:
    """scancel, never masking why the wait ended (a failing scancel is logged with the command to run)."""
    try:
        slurm.scancel(job_id)
    except BaseException as exc:  # noqa: BLE001 - the wait's own exception is the one to raise
        log.error("could not cancel Slurm job %s (%s): run `scancel %s`", job_id, exc, job_id)
        return
    log.warning("cancelled Slurm job %s", job_id)
    try:
        _tags(cfg, run_id, {"state": "CANCELLED"})
    except Exception as exc:  # noqa: BLE001 - a refused tag must not hide the cancellation
        log.error("could not tag the cancelled Slurm job %s on run %s: %s", job_id, run_id, exc)
