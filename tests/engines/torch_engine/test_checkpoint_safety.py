"""Tampered and damaged checkpoints: nothing in them runs, a damaged newest one is skipped, errors are one line.

Every file a resume, an export or an eval of a checkpoint reads gets a planted payload that would create a
marker file if it were ever unpickled with code allowed; the marker must stay absent.
"""

from __future__ import annotations

import io
import logging
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from flowspeed.configs import PipelineConfig
from flowspeed.engines.launch import launch
from flowspeed.engines.torch_engine import checkpoint as ckpt
from flowspeed.engines.torch_engine.trainer import export_checkpoint
from flowspeed.evaluation.exports import model_to_evaluate
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from tests.conftest import on_prepped


class Payload:
    """Unpickling this creates `marker`: proof that a file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prepped: PipelineConfig) -> PipelineConfig:
    """A finished 4-step run with checkpoints at steps 2 and 4 (read-only: tests work on copies)."""
    cfg = _cfg(tmp_path_factory.mktemp("trained"), prepped, "train.max_steps=4")
    launch(cfg, None, None)
    assert [p.name for p in ckpt.list_checkpoints(cfg.train_dir)] == ["step-00000002", "step-00000004"]
    return cfg


def _cfg(workdir: Path, prepped: PipelineConfig, *overrides: str) -> PipelineConfig:
    return on_prepped(
        workdir,
        prepped,
        "train.checkpoint_every=2",
        "train.keep_checkpoints=2",
        *overrides,
    )


def _copy(trained: PipelineConfig, workdir: Path, prepped: PipelineConfig, *overrides: str) -> PipelineConfig:
    cfg = _cfg(workdir, prepped, *overrides)
    shutil.copytree(trained.train_dir / "checkpoints", cfg.train_dir / "checkpoints")
    return cfg


def _newest(cfg: PipelineConfig) -> Path:
    return ckpt.list_checkpoints(cfg.train_dir)[-1]


def _plant_metadata(step: Path, marker: Path) -> None:
    (step / "state" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def _plant_shard_value(step: Path, marker: Path, folder: str = "state") -> None:
    """Point a non-tensor entry (an optimizer hyperparameter) at a torch.save'd payload appended to its shard."""
    meta = dcp.FileSystemReader(str(step / folder)).read_metadata()  # still the genuine file here
    key = next(k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in meta.storage_data if i.fqn == key)
    info = meta.storage_data[index]
    shard = step / folder / info.relative_path
    payload = _torch_saved(Payload(marker))
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    meta.storage_data[index] = _StorageInfo(info.relative_path, offset, len(payload), info.transform_descriptors)
    (step / folder / ".metadata").write_bytes(pickle.dumps(meta))


def _torch_saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _plant_trainer_state(step: Path, marker: Path) -> None:
    torch.save({"step": Payload(marker)}, step / "trainer_state.pt")


def _plant_rng(step: Path, marker: Path) -> None:
    torch.save({"torch": Payload(marker)}, step / "rng" / "rank-00000.pt")


def _plant_config(step: Path, marker: Path) -> None:
    (step / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")


PLANTS: dict[str, Callable[[Path, Path], None]] = {
    "metadata": _plant_metadata,
    "shard-value": _plant_shard_value,
    "trainer-state": _plant_trainer_state,
    "rng": _plant_rng,
    "config": _plant_config,
}


def _resume(cfg: PipelineConfig, step: Path) -> None:
    launch(cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": str(step)})}), None, None)


def _export(cfg: PipelineConfig, step: Path) -> None:
    export_checkpoint(step, cfg.workdir / "export")


def _eval(cfg: PipelineConfig, step: Path) -> None:
    model_to_evaluate(cfg, str(step))


READERS: dict[str, Callable[[PipelineConfig, Path], None]] = {"resume": _resume, "export": _export, "eval": _eval}
# who reads what: only a resume reads RNG states and the optimizer's non-tensor values, only an export the config
READ_BY = {"shard-value": {"resume"}, "rng": {"resume"}, "config": {"export", "eval"}}
CASES = [(plant, reader) for plant in PLANTS for reader in READERS if reader in READ_BY.get(plant, READERS)]


@pytest.mark.parametrize(("plant", "reader"), CASES)
def test_a_planted_payload_never_runs(
    tmp_path: Path, trained: PipelineConfig, prepped: PipelineConfig, plant: str, reader: str
) -> None:
    cfg = _copy(trained, tmp_path / "run", prepped, "train.max_steps=6")
    marker = tmp_path / "marker"
    step = _newest(cfg)
    PLANTS[plant](step, marker)
    with pytest.raises(BaseException) as err:  # noqa: PT011  (each reader words its refusal its own way)
        READERS[reader](cfg, step)
    assert not marker.exists(), f"the planted {plant} ran code during {reader}"
    assert isinstance(err.value, Exception), f"{type(err.value).__name__} slips past `except Exception`"
    if plant in ("metadata", "shard-value"):
        assert isinstance(err.value, ckpt.CheckpointError) and str(step) in str(err.value)


def test_genuine_metadata_reads_and_a_foreign_global_is_named(tmp_path: Path, trained: PipelineConfig) -> None:
    step = _newest(trained)
    meta = ckpt.read_metadata(step / "state")
    assert any(k.startswith("optim.") for k in meta.state_dict_metadata)
    bad = tmp_path / "state"
    bad.mkdir()
    (bad / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path / "marker")))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata names builtins\.exec"):
        ckpt.read_metadata(bad)
    assert not (tmp_path / "marker").exists()


def test_a_genuine_checkpoint_still_resumes_and_exports(
    tmp_path: Path, trained: PipelineConfig, prepped: PipelineConfig
) -> None:
    cfg = _copy(trained, tmp_path / "run", prepped, "train.max_steps=6")
    assert launch(cfg, None, None).resumed_from == 4
    out = export_checkpoint(_newest(cfg), tmp_path / "export")
    assert (out / "transformer" / "config.json").is_file()


def _truncate_shard(step: Path) -> None:
    shard = next((step / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:64])  # a disk that filled up early in the write


def _truncate_metadata(step: Path) -> None:
    meta = step / "state" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:100])


@pytest.mark.parametrize("damage", [_truncate_shard, _truncate_metadata], ids=["shard", "metadata"])
def test_a_truncated_newest_checkpoint_is_skipped_for_the_previous_one(
    tmp_path: Path,
    trained: PipelineConfig,
    prepped: PipelineConfig,
    damage: Callable[[Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = _copy(trained, tmp_path / "run", prepped, "train.max_steps=6")
    damage(_newest(cfg))
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        res = launch(cfg, None, None)
    assert res.resumed_from == 2 and len(res.losses) == 4
    assert any("step-00000004" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(
    tmp_path: Path, trained: PipelineConfig, prepped: PipelineConfig
) -> None:
    cfg = _copy(trained, tmp_path / "run", prepped, "train.max_steps=6")
    for step in ckpt.list_checkpoints(cfg.train_dir):
        _truncate_shard(step)
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint"):
        launch(cfg, None, None)


def test_a_damaged_checkpoint_on_explicit_resume_is_one_line_naming_it(
    tmp_path: Path, trained: PipelineConfig, prepped: PipelineConfig
) -> None:
    cfg = _copy(trained, tmp_path / "run", prepped, "train.max_steps=6")
    step = _newest(cfg)
    _truncate_shard(step)
    with pytest.raises(ckpt.CheckpointError) as err:  # an Exception: Prefect reports a failure, not a crash
        _resume(cfg, step)
    assert str(step) in str(err.value) and "\n" not in str(err.value)


def _cli(*args: str | Path) -> object:
    from flowspeed.flows.cli import app
    from typer.testing import CliRunner

    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [*map(str, args)])


def test_cli_export_of_a_damaged_checkpoint_prints_one_paragraph(tmp_path: Path, trained: PipelineConfig) -> None:
    step = tmp_path / "step-00000004"
    shutil.copytree(_newest(trained), step)
    _truncate_shard(step)
    result = _cli("export", step, "--out", tmp_path / "out")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) < 12, result.output
    assert "could not load checkpoint" in result.output and "step-00000004" in result.output


def test_cli_turns_a_raw_checkpoint_exception_into_one_paragraph(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's CheckpointException is a BaseException; from any path (megatron's, a save) the CLI must catch it."""
    import flowspeed.engines.torch_engine.trainer as trainer

    def fail(*_: object, **__: object) -> None:
        dcp.load({"x": torch.zeros(1)}, checkpoint_id="/nonexistent/flowspeed-ckpt", no_dist=True)

    monkeypatch.setattr(trainer, "export_checkpoint", fail)
    with pytest.raises(CheckpointException):
        fail()
    result = _cli("export", "/nonexistent/flowspeed-ckpt", "--out", "/nonexistent/out")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) < 12, result.output
    assert "rank 0: AssertionError" in result.output and "No such file or directory" in result.output


def _megatron_checkpoint(rank: int, world: int, directory: str) -> None:
    from tests.engines.megatron.test_megatron_train import Layout, _train

    _train(Layout(), steps=1, save=directory)


@pytest.mark.slow
def test_megatron_checkpoints_are_read_safely_and_tampered_ones_refused(tmp_path: Path) -> None:
    """megatron-core unpickles its dist checkpoint's `.metadata` and non-tensor values with code allowed: the trainer
    checks both first."""
    from flowspeed.engines.megatron.trainer import load_checkpoint

    from tests.distributed import run_ranks

    step = tmp_path / "step-00000001"
    (step / "megatron").mkdir(parents=True)
    run_ranks(_megatron_checkpoint, 1, str(step / "megatron"))
    assert ckpt.read_metadata(step / "megatron").state_dict_metadata  # its save plans are allowed too
    torch.save({"step": 1, "engine": "megatron", "data": {"samples_seen": 0}}, step / "trainer_state.pt")
    ckpt.verify(step)
    marker = tmp_path / "marker"
    _plant_shard_value(step, marker, "megatron")  # a layer's extra state, which megatron unpickles freely
    with pytest.raises(ckpt.CheckpointError, match="_extra_state.* was refused"):
        load_checkpoint(step, None, None)
    (step / "megatron" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ckpt.CheckpointError, match=r"megatron/\.metadata names builtins\.exec"):
        load_checkpoint(step, None, None)
    assert not marker.exists()


def test_a_failed_checkpoint_write_is_one_line_naming_it(tmp_path: Path) -> None:
    """An async save's CheckpointException (a BaseException) comes out of `wait()` as a CheckpointError."""
    from concurrent.futures import Future

    failed: Future = Future()
    try:
        dcp.load({"x": torch.zeros(1)}, checkpoint_id=str(tmp_path / "missing"), no_dist=True)
    except CheckpointException as exc:  # a real one, as DCP raises it from a failed write or read
        failed.set_exception(exc)
    tmp, final = tmp_path / ".step-00000002.x", tmp_path / "checkpoints" / "step-00000002"
    tmp.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="could not write checkpoint .*step-00000002 \\(rank 0: ") as err:
        ckpt.PendingCheckpoint(tmp, final, 2, torch.device("cpu"), failed).wait()
    assert "\n" not in str(err.value) and not tmp.exists() and not final.exists()
