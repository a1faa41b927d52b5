"""`train.launcher: slurm`: the batch script line by line, the script run on two stand-in nodes, and the
submit / wait / cancel path against stand-in Slurm commands.

The stand-ins (`sbatch`, `squeue`, `sacct`, `scontrol`, `scancel`, `srun`) are one small Python script put on
PATH under those names: each call is recorded, `squeue` walks through the states the test plans (PENDING ->
RUNNING -> leaves the queue, then `sacct` gives the final state), `srun` runs its command once per node with
that node's SLURM_NODEID, as Slurm does. Cancellation is the real thing: a Prefect flow waiting on the job
gets SIGTERM (how Prefect cancels a flow run) from the stand-in `squeue`, and must scancel the job.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from flowspeed.configs import ConfigError, PipelineConfig
from flowspeed.engines.common import slurm
from flowspeed.engines.common.torchrun import root_cause
from flowspeed.tasks.slurm import JOB_RECORD, SCRIPT, train_on_slurm
from mlflow import MlflowClient

from tests.conftest import make_config

STAND_IN = r"""
import json, os, signal, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM"])
name, args = Path(sys.argv[0]).name, sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps([name, *args]) + "\n")
plan = json.loads((state / "plan.json").read_text())
cancelled = (state / "cancelled").exists()
if name == "sbatch":
    (state / "submitted.sh").write_text(Path(args[-1]).read_text())
    print(plan["job_id"])
elif name == "squeue":
    polls = state / "polls"
    n = int(polls.read_text()) if polls.exists() else 0
    polls.write_text(str(n + 1))
    if n + 1 == plan.get("sigterm_parent_at_poll"):
        os.kill(os.getppid(), signal.SIGTERM)  # Prefect cancelling the flow run that waits on the job
    states = plan["states"]
    if not cancelled and n < len(states):
        print(f"{states[n]}|{plan['nodes'] if states[n] != 'PENDING' else ''}")
elif name == "sacct":
    final = "CANCELLED by 1000|0:15" if cancelled else plan["final"]
    print(f"{final}|{plan['nodes']}")
elif name == "scancel":
    (state / "cancelled").write_text(args[0])
elif name == "scontrol" and args[:2] == ["show", "hostnames"]:
    print("\n".join(plan["hostnames"]))
elif name == "srun":
    import subprocess
    cmd = args[next(i for i, a in enumerate(args) if not a.startswith("--")):]  # srun's own options first
    for node in range(int(os.environ["SLURM_NNODES"])):
        env = {**os.environ, "SLURM_NODEID": str(node)}
        rc = subprocess.run(cmd, env=env).returncode
        if rc:
            sys.exit(rc)
elif name == "python-on-node":
    with open(state / "ranks.jsonl", "a") as f:
        f.write(json.dumps({"node": os.environ["SLURM_NODEID"], "argv": args}) + "\n")
"""
NAMES = ("sbatch", "squeue", "sacct", "scancel", "scontrol", "srun", "python-on-node")


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of stand-in Slurm commands first on PATH; returns their state folder (plan.json, calls.jsonl)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm-state"
    bin_dir.mkdir()
    state.mkdir()
    for name in NAMES:
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable} -S\n{STAND_IN}")
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    plan(state)
    return state


def plan(state: Path, **kw: object) -> None:
    base = {"job_id": "4242", "states": ["PENDING", "RUNNING", "RUNNING"], "final": "COMPLETED|0:0",
            "nodes": "node[01-02]", "hostnames": ["node01", "node02"]}  # fmt: skip
    (state / "plan.json").write_text(json.dumps({**base, **kw}))


def calls(state: Path) -> list[list[str]]:
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def slurm_config(workdir: Path, manifest: Path, *extra: str) -> PipelineConfig:
    return make_config(workdir, manifest, "train.launcher=slurm", "train.nnodes=2", *extra)


LAYOUT = ("train.nproc_per_node=8", "train.slurm.partition=gpu", "train.slurm.account=proj42",
          "train.slurm.time=1-12:00:00", "train.slurm.cpus_per_task=64", "train.slurm.port=29400",
          "train.slurm.sbatch_args=[--exclusive]", "train.slurm.setup=[module load cuda/12.4]")  # fmt: skip


def test_batch_script_for_2_nodes_of_8_gpus_line_by_line(tmp_path: Path) -> None:
    cfg = slurm_config(tmp_path, tmp_path / "data.jsonl", *LAYOUT)
    args = ["--config", "/shared/cfg.yaml", "--run-id", "abc", "--tracking-uri", "http://mlflow:5000"]
    script = slurm.batch_script(cfg, "flowspeed.engines.torch_engine.trainer", args, python="/venv/bin/python",
                                workdir=Path("/shared/work"))  # fmt: skip
    log = Path("/shared/work") / cfg.train_dir / "slurm-%j.out"
    assert script.splitlines() == [
        "#!/bin/bash",
        "#SBATCH --job-name=flowspeed-train-cogvideox",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --time=1-12:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --chdir=/shared/work",
        f"#SBATCH --output={log}",
        "#SBATCH --exclusive",
        "# flowspeed train stage (cogvideox): 2 node(s) x 8 rank(s), one torchrun per node, c10d rendezvous on "
        "the first node",
        "set -eo pipefail",
        "export SRUN_CPUS_PER_TASK=64",
        "module load cuda/12.4",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'export FLOWSPEED_RDZV_ENDPOINT="$head_node:29400"',
        'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
        '  bash -c \'exec "$0" -m torch.distributed.run --nnodes=$SLURM_NNODES --node_rank=$SLURM_NODEID '
        "--rdzv_backend=c10d --rdzv_endpoint=$FLOWSPEED_RDZV_ENDPOINT --rdzv_id=$SLURM_JOB_ID --nproc_per_node=8 "
        '-m flowspeed.engines.torch_engine.trainer "$@"\' \\',
        "  /venv/bin/python --config /shared/cfg.yaml --run-id abc --tracking-uri http://mlflow:5000",
    ]
    bash = shutil.which("bash")
    assert bash and subprocess.run([bash, "-n"], input=script, text=True).returncode == 0  # valid shell


def test_the_script_gives_each_node_its_rank_and_one_rendezvous(tmp_path: Path, fake_slurm: Path) -> None:
    """Run on two stand-in nodes: the per-node variables are expanded on each node, not by the batch shell."""
    python = str(Path(shutil.which("python-on-node") or ""))
    cfg = slurm_config(tmp_path, tmp_path / "data.jsonl", *LAYOUT[:2], f"train.slurm.python={python}")
    uri = "sqlite:////tmp/a b/mlflow.db"  # a space: the arguments must reach the trainer unsplit
    script = tmp_path / "job.sh"
    script.write_text(slurm.batch_script(cfg, "flowspeed.engines.torch_engine.trainer", ["--tracking-uri", uri]))
    env = {"PATH": f"{Path(python).parent}:/usr/bin:/bin", "FAKE_SLURM": str(fake_slurm), "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]"}  # fmt: skip
    subprocess.run(["bash", str(script)], env=env, check=True, cwd=tmp_path)
    ranks = [json.loads(line) for line in (fake_slurm / "ranks.jsonl").read_text().splitlines()]
    assert [r["node"] for r in ranks] == ["0", "1"]
    for r in ranks:
        assert r["argv"] == ["-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r['node']}",
                             "--rdzv_backend=c10d", "--rdzv_endpoint=node01:29500", "--rdzv_id=4242",
                             "--nproc_per_node=8", "-m", "flowspeed.engines.torch_engine.trainer",
                             "--tracking-uri", uri]  # fmt: skip


def _store(tmp_path: Path, mlflow_db: Path) -> tuple[str, str]:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_db, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("slurm", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client.create_run(experiment).info.run_id


def _losses(cfg: PipelineConfig) -> dict:
    """What the job's rank 0 leaves (no training inside the stand-in)."""
    out = {"final_dir": str(cfg.train_dir / "final"), "checkpoint": "", "steps": 6, "resumed_from": 0,
           "losses": [0.5, 0.4], "samples_per_s": 3.0, "median_step_s": 0.1}  # fmt: skip
    cfg.train_dir.mkdir(parents=True, exist_ok=True)
    (cfg.train_dir / "losses.json").write_text(json.dumps(out))
    return out


def test_submit_wait_and_record_the_job_on_the_run(
    tmp_path: Path, fake_slurm: Path, demo_manifest: Path, mlflow_db: Path
) -> None:
    uri, run_id = _store(tmp_path, mlflow_db)
    cfg = slurm_config(tmp_path, demo_manifest, "train.slurm.poll_s=0.01", f"tracking.tracking_uri={uri}")
    expected = _losses(cfg)
    assert train_on_slurm(cfg, run_id, uri) == expected
    names = [c[0] for c in calls(fake_slurm)]
    assert names == ["sbatch", "squeue", "squeue", "squeue", "squeue", "sacct"]  # 3 states, gone, final state
    assert calls(fake_slurm)[0][1] == "--parsable"
    assert (fake_slurm / "submitted.sh").read_text() == (cfg.train_dir / SCRIPT).read_text()
    assert f"--run-id {run_id} --tracking-uri {uri}" in (cfg.train_dir / SCRIPT).read_text()
    run = MlflowClient(uri).get_run(run_id)
    tags = {k.removeprefix("flowspeed.slurm."): v for k, v in run.data.tags.items() if "slurm" in k}
    assert {k: tags[k] for k in ("job_id", "nodes", "state", "exit_code")} == {
        "job_id": "4242", "nodes": "node[01-02]", "state": "COMPLETED", "exit_code": "0:0"}  # fmt: skip
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id, "slurm")] == [f"slurm/{SCRIPT}"]

    # The job fails: the error says how, where, and why (the rank's Root Cause from the job's output)
    plan(fake_slurm, job_id="4243", final="FAILED|1:0")
    (cfg.train_dir / "slurm-4243.out").write_text("step 3\nRoot Cause (first observed failure):\n  CUDA OOM\n")
    with pytest.raises(slurm.SlurmJobFailed) as err:
        train_on_slurm(cfg, run_id, uri)
    assert "Slurm job 4243 ended FAILED (exit code 1:0) on node[01-02]" in str(err.value)
    assert root_cause("Root Cause (first observed failure):\n  CUDA OOM") in str(err.value)
    assert MlflowClient(uri).get_run(run_id).data.tags["flowspeed.slurm.state"] == "FAILED"


def test_a_live_job_of_an_earlier_stage_is_waited_on_not_submitted_twice(
    tmp_path: Path, fake_slurm: Path, demo_manifest: Path
) -> None:
    cfg = slurm_config(tmp_path, demo_manifest, "train.slurm.poll_s=0.01")
    expected = _losses(cfg)
    (cfg.train_dir / JOB_RECORD).write_text(json.dumps({"job_id": "4100"}))  # its flow process was SIGKILLed
    plan(fake_slurm, states=["RUNNING", "RUNNING"])
    assert train_on_slurm(cfg, None, None) == expected
    # the record's job is asked about (running: adopted), waited on until it leaves the queue, then its end state
    assert [c[0] for c in calls(fake_slurm)] == ["squeue", "squeue", "squeue", "sacct"]
    assert all(c[3] == "4100" for c in calls(fake_slurm) if c[0] == "squeue")


def test_cancelling_the_flow_cancels_the_job(
    tmp_path: Path, fake_slurm: Path, demo_manifest: Path, mlflow_db: Path
) -> None:
    """Prefect cancels a flow run with SIGTERM (its TerminationSignal inside the flow): the waiting task
    scancels the job, and the run says so."""
    from prefect import flow, task

    uri, run_id = _store(tmp_path, mlflow_db)
    cfg = slurm_config(tmp_path, demo_manifest, "train.slurm.poll_s=0.01", f"tracking.tracking_uri={uri}")
    plan(fake_slurm, states=["PENDING", "RUNNING", "RUNNING", "RUNNING"], sigterm_parent_at_poll=3)

    @task
    def train_task() -> dict:
        return train_on_slurm(cfg, run_id, uri)

    @flow
    def train_flow() -> dict:
        return train_task()

    # Prefect re-sends the signal to the handler it found once its flow is down: ours records it, not pytest's exit
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with pytest.raises(BaseException) as err:
            train_flow()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert type(err.value).__name__ == "TerminationSignal"
    assert [c for c in calls(fake_slurm) if c[0] == "scancel"] == [["scancel", "4242"]]
    assert MlflowClient(uri).get_run(run_id).data.tags["flowspeed.slurm.state"] == "CANCELLED"
    assert received == [signal.SIGTERM]


def test_no_slurm_here_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(slurm.SlurmError, match="sbatch is not on PATH.*train.launcher: local"):
        slurm.sbatch(tmp_path / "job.sh")


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.slurm.time=12h", "is not a Slurm time limit"),
        ("train.slurm.time=12:00:00", "write the time limit quoted"),  # YAML's 43200
        ("train.slurm.gpus_per_node=4", "gpus_per_node=4 is below train.nproc_per_node=8"),
        ("train.rdzv_endpoint=node01:29500", "come from the Slurm allocation"),
        ("train.slurm.partition='gpu a100'", "must be one word"),
    ],
)
def test_load_refuses_what_sbatch_would(tmp_path: Path, override: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        slurm_config(tmp_path, tmp_path / "data.jsonl", "train.nproc_per_node=8", override)


def test_quoting_survives_a_config_path_with_spaces(tmp_path: Path) -> None:
    cfg = slurm_config(tmp_path, tmp_path / "data.jsonl")
    script = slurm.batch_script(cfg, "m", ["--config", "/a b/c.yaml"], python="/venv/bin/python")
    assert shlex.split(script.splitlines()[-1]) == ["/venv/bin/python", "--config", "/a b/c.yaml"]
