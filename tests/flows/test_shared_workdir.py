"""Recipes share one workdir and one MLflow store: each gets stage folders keyed by what decides their
content, a checkpoint of another model is refused by name, and what fails is one paragraph, retried only
when it may pass on its own."""

from __future__ import annotations

import errno
import signal
import sys
import traceback
from pathlib import Path

import pytest
from flowspeed.configs import ConfigError, PipelineConfig, check_stage, load_config, save_config
from mlflow import MlflowClient

from tests.conftest import QUICKSTART, REPO

SD3 = REPO / "configs" / "sd3-quickstart.yaml"
QWEN = REPO / "configs" / "pipelines" / "qwen2_vl-sft.yaml"
TINY = ["train.max_steps=2", "train.checkpoint_every=2", "train.warmup_steps=0", "eval.val_batches=1"]
GENERATION = ["model.max_text_length=32", 'eval.prompts=["a red circle"]', "eval.num_inference_steps=1"]


@pytest.mark.slow
def test_a_video_an_image_and_a_vlm_recipe_share_one_workdir(tmp_path: Path, demo_manifest: Path) -> None:
    """CogVideoX, then SD3, then Qwen2-VL into one workdir: each trains from scratch in folders of its own
    (none resumes another's checkpoint), all three land in the workdir's one experiment as comparable pipeline
    runs told apart by tags, and the first recipe run again reuses its own prep, training and eval."""
    from flowspeed.engines.tracking.compare import compare_runs
    from flowspeed.flows.pipeline import pipeline

    work = tmp_path / "shared"
    cogvideox = load_config(QUICKSTART, [f"data.manifest={demo_manifest}", *TINY, *GENERATION], work)
    sd3 = load_config(SD3, [f"data.manifest={demo_manifest}", *TINY, *GENERATION], work)
    qwen = load_config(QWEN, [f"data.manifest={demo_manifest.with_name('conversations.jsonl')}", *TINY,
                              "eval.max_answers=2", "eval.max_new_tokens=4"], work)  # fmt: skip
    cfgs = {"cogvideox": cogvideox, "sd3": sd3, "qwen2_vl": qwen}
    outs = {family: pipeline(cfg) for family, cfg in cfgs.items()}

    for family, cfg in cfgs.items():
        for folder in (cfg.prep_dir, cfg.train_dir, cfg.eval_dir):
            assert folder.parent.parent == work and folder.name.startswith(f"{family}-"), folder
        assert Path(outs[family]["train"]["final_dir"]) == cfg.train_dir / "final"
        assert len(outs[family]["train"]["losses"]) == 2  # two steps of its own: nothing resumed
        saved = load_config(Path(outs[family]["train"]["checkpoint"]) / "config.yaml", check=False)
        assert saved.model.family == family
    assert len({c.train_dir for c in cfgs.values()}) == len({c.prep_dir for c in cfgs.values()}) == 3
    assert cogvideox.cache_dir == sd3.cache_dir == work / "prep" / "cache"  # content-addressed, shared

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    made = {e.name for e in client.search_experiments()} - {"Default"}  # MLflow's own
    assert made == {f"flowspeed-{work.name}"}  # one experiment for the workdir, not one per family
    exp = client.get_experiment_by_name(f"flowspeed-{work.name}").experiment_id
    parents = [r for r in client.search_runs([exp]) if r.data.tags.get("flowspeed.stage") == "pipeline"]
    tags = {r.data.tags["flowspeed.family"]: r.data.tags for r in parents}
    assert {f: (t["flowspeed.recipe"], t["flowspeed.variant"]) for f, t in tags.items()} == {
        "cogvideox": ("quickstart", "tiny"), "sd3": ("sd3-quickstart", "tiny"), "qwen2_vl": ("qwen2_vl-sft", "tiny")
    }  # fmt: skip
    trains = [r for r in client.search_runs([exp]) if r.data.tags.get("flowspeed.stage") == "train"]
    assert sorted(r.data.tags["flowspeed.resumed_from_step"] for r in trains) == ["0", "0", "0"]
    rows = compare_runs(uri, f"flowspeed-{work.name}")  # `flowspeed compare`: side by side
    assert {r["recipe"] for r in rows} == {"quickstart", "sd3-quickstart", "qwen2_vl-sft"}
    assert all(r.get("train/final_loss", 0) > 0 for r in rows), rows

    again = pipeline(cogvideox)  # after two other recipes wrote into the workdir
    assert all(again[stage]["cache_hit"] for stage in ("prep", "train", "eval"))


def _checkpoint(folder: Path, cfg: PipelineConfig) -> Path:
    """A published checkpoint as far as a resume looks before loading tensors: its config and trainer state."""
    import torch

    folder.mkdir(parents=True)
    save_config(cfg, folder)
    torch.save({"step": 2, "data": {"samples_seen": 4}}, folder / "trainer_state.pt")
    return folder


def test_a_checkpoint_of_another_model_is_refused_naming_both(tmp_path: Path) -> None:
    from flowspeed.engines.common.checkpoints import CheckpointMismatch
    from flowspeed.engines.loop import resume_path

    cog = load_config(QUICKSTART, workdir=tmp_path)
    ckpt = _checkpoint(tmp_path / "elsewhere" / "checkpoints" / "step-00000002", cog)
    sd3 = load_config(SD3, [f"train.resume={ckpt}"], tmp_path)
    said = "model.family is 'cogvideox' in the checkpoint but 'sd3' in this config"
    with pytest.raises(CheckpointMismatch, match=said):  # what the training ranks check
        resume_path(sd3)
    with pytest.raises(ConfigError, match=said):  # and the stage, before it writes anything
        check_stage(sd3, "train")
    shared = load_config(SD3, [f"train.output_dir={tmp_path / 'elsewhere'}"], tmp_path)  # resume: auto
    with pytest.raises(ConfigError, match=said):
        check_stage(shared, "run")
    lora = load_config(QUICKSTART, [f"train.resume={ckpt}", "train.lora.enabled=true"], tmp_path)
    with pytest.raises(CheckpointMismatch, match="train.lora.enabled is False in the checkpoint but True"):
        resume_path(lora)

    # What a resume may change (the layout reshards; length, learning rate, precision) is no conflict.
    layout = ["train.nproc_per_node=2", "train.parallel.dp_shard=2", "train.max_steps=60", "train.lr=1e-4",
              "train.mixed_precision=bf16"]  # fmt: skip
    assert resume_path(load_config(QUICKSTART, [f"train.resume={ckpt}", *layout], tmp_path)) == ckpt


def _checkpoint_exception() -> BaseException:
    """What torch.distributed.checkpoint raises when a rank fails: a BaseException holding every rank's error."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        raise RuntimeError("Missing key in checkpoint state_dict: model.transformer_blocks.0.attn1.to_q.weight.")
    except RuntimeError as exc:
        failure = (exc, traceback.extract_tb(exc.__traceback__))
    return CheckpointException("CheckpointException ranks:dict_keys([0])", {0: failure})


def test_a_checkpoint_exception_in_a_stage_is_one_paragraph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's CheckpointException derives from BaseException: it once slipped past the CLI as a page of
    per-rank tracebacks. The stage's handler reports the first rank's cause in one paragraph."""
    from flowspeed.flows import cli, stages
    from typer.testing import CliRunner

    def failing(cfg: PipelineConfig) -> None:
        raise _checkpoint_exception()

    monkeypatch.setattr(cli, "prepare_environment", lambda workdir, debug=False: None)  # no Prefect API needed
    monkeypatch.setattr(cli, "_wait_for_prefect", lambda: None)
    monkeypatch.setattr(stages, "train", failing)
    sigterm = signal.getsignal(signal.SIGTERM)  # the stage installs its SIGTERM handler: pytest's comes back
    try:
        out = CliRunner(env={"COLUMNS": "300"}).invoke(cli.app, ["train", str(QUICKSTART), "--workdir", str(tmp_path)])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output
    assert "flowspeed train failed" in out.output and "rank 0: RuntimeError: Missing key" in out.output
    assert "Traceback" not in out.output and "--debug" in out.output


def test_what_a_command_lets_through_is_still_one_paragraph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The entry point's last guard: a BaseException from any command (here `sync-metrics`) is one
    paragraph and exit status 1, with the traceback only under --debug."""
    from flowspeed.engines.tracking import runs
    from flowspeed.flows import cli

    def fail(path: Path) -> None:
        raise _checkpoint_exception()

    exits: list[int] = []
    monkeypatch.setattr(runs, "sync_undelivered", fail)
    monkeypatch.setattr(cli, "exit_without_teardown", exits.append)  # the process must outlive the check
    said = {}
    for extra in ([], ["--debug"]):
        monkeypatch.setattr(sys, "argv", ["flowspeed", "sync-metrics", str(tmp_path), *extra])
        cli.main()
        out = capsys.readouterr()
        said[bool(extra)] = " ".join((out.out + out.err).replace("│", " ").split())  # unwrapped
    assert exits == [1, 1]
    assert "flowspeed sync-metrics failed" in said[False] and "rank 0: RuntimeError: Missing key" in said[False]
    assert "Traceback" not in said[False] and "Traceback" in said[True]


def test_only_transient_errors_are_retried() -> None:
    """A config, checkpoint or data error fails at once (a retry would only repeat it); the network, a busy
    server or a rank whose peer went away gets its retry."""
    import requests
    from flowspeed.engines.common.checkpoints import CheckpointMismatch
    from flowspeed.engines.common.safe_load import CheckpointError
    from flowspeed.engines.common.torchrun import DistributedJobFailed
    from flowspeed.tasks.caching import is_transient, retry_if_transient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, TEMPORARILY_UNAVAILABLE
    from prefect.states import Failed

    permanent = [
        ConfigError("train.lr: must be > 0"),
        CheckpointMismatch("model.family is 'cogvideox' in the checkpoint but 'sd3' in this config"),
        CheckpointError("could not load checkpoint step-00000010 (rank 0: RuntimeError: Missing key)"),
        FileNotFoundError("samples.jsonl does not exist: run `flowspeed prep` first"),
        OSError(errno.ENOSPC, "No space left on device"),
        DistributedJobFailed("Root Cause: rank 1 ValueError: data.num_frames must be 4k+1"),
        RuntimeError("a bug"),
        MlflowException("experiment exists", error_code=RESOURCE_ALREADY_EXISTS),  # a 400: asking again is refused
    ]
    transient = [
        ConnectionError("tracking server busy"),
        requests.exceptions.ConnectionError("HTTPConnectionPool: Max retries exceeded"),
        MlflowException("API request failed", error_code=TEMPORARILY_UNAVAILABLE),  # a 503
        OSError(errno.ESTALE, "Stale file handle"),
        DistributedJobFailed("Root Cause: rank 1 DistNetworkError: Connection reset by peer"),
        RuntimeError("while logging"),  # raised from a timeout below
    ]
    try:
        raise transient[-1] from TimeoutError("read timed out")
    except RuntimeError:
        pass
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    assert [is_transient(e) for e in transient] == [True] * len(transient)

    # Prefect asks `retry_condition_fn` with the failed task run's state (tests/tasks/test_caching.py runs a
    # retried task through Prefect itself).
    assert [retry_if_transient(None, None, Failed(data=e)) for e in (permanent[1], transient[-2])] == [False, True]
