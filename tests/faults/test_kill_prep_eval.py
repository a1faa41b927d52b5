"""SIGKILL of `flowspeed prep` and `flowspeed eval` at chosen points, then a rerun.

Each kill runs the real command line (`flowspeed.flows.cli`, with its Prefect flow, MLflow run and embedded
Prefect API) in a child process of its own session; the child wraps one product function so that it
SIGKILLs itself at the chosen call (no test hooks in the product). After the kill: nothing of the
child's session lives on; the rerun finishes, reuses what was finished (samples cached, encoder
calls, generated samples), and its outputs equal those of an uninterrupted run.

Costs are shared: the uninterrupted prep is the session's `prepped` fixture, the CLI children share
one Prefect home (with the other fault tests) and one SQLite MLflow store (their schemas are made once),
and the eval works on a model trained in-process for 2 steps on that prep.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from flowspeed.configs import PipelineConfig
from flowspeed.datasets_prep.cache import TMP_RE, LatentCache
from flowspeed.engines.common.io import read_jsonl
from flowspeed.evaluation.common import measured

from tests.conftest import QUICKSTART, REPO, make_config
from tests.faults.conftest import CLI_PREFECT_HOME, assert_no_survivors, log_tail, session_survivors, wait_killed

pytestmark = pytest.mark.slow

SHARD = "data.shard_size=2"  # the demo's 8 samples in 4 shards: a kill can fall between them
TRAIN = ("train.max_steps=2", "train.checkpoint_every=2")
EVAL = ("eval.batch_size=1",)  # one sample per model call: a kill can fall between the 2 samples

# Run first in every child: SIGKILL this very process, no cleanup (what `kill -9` or the OOM killer does).
PRELUDE = """
import os, signal, sys
def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""
CLI = "\nfrom flowspeed.flows.cli import main\nsys.argv[0] = 'flowspeed'\nmain()\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, mlflow_db: Path) -> dict[str, str]:
    """The children's environment: one Prefect home (the fault tests' CLI children's, migrated once) and one
    MLflow store for all (made once), and none of the test session's own Prefect settings."""
    root = tmp_path_factory.mktemp("kill-env")
    shutil.copyfile(mlflow_db, root / "mlflow.db")  # the schema, made once a session
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    out |= {"PREFECT_HOME": str(CLI_PREFECT_HOME), "MLFLOW_TRACKING_URI": uri}
    out |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    return out


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@contextlib.contextmanager
def _child(code: str, args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A `python -c` child in its own session; whatever of that session outlives the test is killed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        yield proc
    finally:
        for p in [*session_survivors(proc.pid)]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _samples(prep_dir: Path) -> list[dict]:
    """The training set without the shard names (those carry a per-writer token, by design)."""
    return [{k: v for k, v in r.items() if k != "shard"} for r in read_jsonl(prep_dir / "samples.jsonl")]


def _cache_state(cfg: PipelineConfig) -> dict[str, str]:
    """key -> tensor digest of every cached sample: the same keys and the same bytes."""
    return {r["key"]: r["digest"] for r in LatentCache(cfg.cache_dir).records()}


def _tmp_files(cfg: PipelineConfig) -> list[str]:
    shards = cfg.cache_dir / "shards"
    return sorted(p.name for p in shards.iterdir() if TMP_RE.match(p.name)) if shards.is_dir() else []


# ---- prep ------------------------------------------------------------------------------------------

# Kill while encoding, after 2 of the 4 shards are published: at the 3rd shard's rename, its temp file
# written whole (the dead writer's leftover the rerun must clear), samples 5 and 6 encoded and lost.
KILL_AT_THIRD_SHARD = """
import flowspeed.datasets_prep.cache as cache
from pathlib import Path
replace, renames = os.replace, []
def replace_or_die(src, dst):
    if cache.SHARD_RE.match(Path(dst).name):
        renames.append(dst)
        if len(renames) == 3:
            die()
    replace(src, dst)
cache.os.replace = replace_or_die
"""

# Kill during the publication of the outputs: samples.jsonl replaced, rejects/summary/config not yet.
KILL_AFTER_SAMPLES = """
import flowspeed.datasets_prep.prep as prep
from pathlib import Path
write_jsonl = prep.write_jsonl
def write_then_die(target, rows):
    out = write_jsonl(target, rows)
    if Path(target).name == "samples.jsonl":
        die()
    return out
prep.write_jsonl = write_then_die
"""


def test_a_prep_killed_while_encoding_then_while_publishing_resumes_to_the_uninterrupted_result(
    tmp_path: Path, demo_manifest: Path, prepped: PipelineConfig, env: dict[str, str]
) -> None:
    """Two kills in a row on one workdir, each followed by the same command again, as a user would."""
    cfg = make_config(tmp_path, demo_manifest, SHARD)
    args = ["prep", str(QUICKSTART), "--workdir", str(tmp_path), *_sets(f"data.manifest={demo_manifest}", SHARD)]
    want_samples, want_cache = _samples(prepped.prep_dir), _cache_state(prepped)
    n = len(want_samples)
    assert n == 8, "the demo's 8 samples make 4 shards of 2"

    log = tmp_path / "killed-encoding.log"
    with _child(KILL_AT_THIRD_SHARD + CLI, args, env, log) as proc:
        wait_killed(proc, log)
        assert_no_survivors(proc)
    assert len(LatentCache(cfg.cache_dir).shards()) == 2 and len(_tmp_files(cfg)) == 1
    assert not (cfg.prep_dir / "samples.jsonl").exists()  # nothing is published before the end

    # The rerun reuses the 2 published shards' 4 samples, encodes the 4 others (the 3rd shard's 2 among them:
    # never published) in 2 new shards, clears the dead writer's temp file, and is killed while publishing.
    log = tmp_path / "killed-publishing.log"
    with _child(KILL_AFTER_SAMPLES + CLI, args, env, log) as proc:
        wait_killed(proc, log)
        assert_no_survivors(proc)
    assert len(LatentCache(cfg.cache_dir).shards()) == 4 and _tmp_files(cfg) == []
    assert not (cfg.prep_dir / "summary.json").exists()

    from flowspeed.datasets_prep.prep import run_prep

    res = run_prep(cfg)  # this process, as the next rerun's prep task would: nothing left to encode
    assert (res.num_cached, res.num_encoded, res.encoder_calls) == (n, 0, 0)
    assert _samples(cfg.prep_dir) == want_samples
    assert _cache_state(cfg) == want_cache
    summary = json.loads((cfg.prep_dir / "summary.json").read_text())
    assert summary["num_samples"] == n and read_jsonl(cfg.prep_dir / "rejects.jsonl") == []
    assert {r["key"] for r in read_jsonl(cfg.cache_dir / "index.jsonl")} == set(want_cache)
    assert len(LatentCache(cfg.cache_dir).shards()) == 4


# ---- eval ------------------------------------------------------------------------------------------

# Kill after the first sample is finished (video, features and row on disk), while the second one's video
# is being published: written whole to its temp file, not yet renamed.
KILL_PUBLISHING_SECOND_SAMPLE = """
from pathlib import Path
replace = os.replace
def replace_or_die(src, dst):
    if Path(dst).name == "sample_01.mp4":
        die()
    replace(src, dst)
os.replace = replace_or_die
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prepped: PipelineConfig) -> SimpleNamespace:
    """A 2-step model on the session's prep, and its uninterrupted eval (in a folder of its own)."""
    from flowspeed.engines.launch import launch
    from flowspeed.evaluation.run import run_eval

    work = tmp_path_factory.mktemp("kill-eval")
    sets = [
        f"data.manifest={prepped.data.manifest}",
        f"data.output_dir={prepped.prep_dir}",
        f"data.cache_dir={prepped.cache_dir}",
        *TRAIN,
        *EVAL,
    ]
    cfg = make_config(work, prepped.data.manifest, *sets[1:])
    launch(cfg, None, None)
    ref = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"output_dir": work / "eval-uninterrupted"})})
    result = run_eval(ref)
    return SimpleNamespace(
        cfg=cfg, sets=sets, result=result, rows=read_jsonl(ref.eval_dir / "samples/generation.jsonl")
    )


def test_a_killed_eval_resumes_without_regenerating_what_it_kept(
    trained: SimpleNamespace, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowspeed.engines.models import get_family
    from flowspeed.evaluation.run import run_eval

    cfg = trained.cfg
    n = len(cfg.eval.prompts) * cfg.eval.samples_per_prompt
    assert n == 2 and len(trained.rows) == n
    args = ["eval", str(QUICKSTART), "--workdir", str(cfg.workdir), *_sets(*trained.sets)]
    log = tmp_path / "killed.log"
    with _child(KILL_PUBLISHING_SECOND_SAMPLE + CLI, args, env, log) as proc:
        wait_killed(proc, log)
        assert_no_survivors(proc)
    partial = [p for p in (cfg.eval_dir / ".partial").iterdir() if p.name.startswith("generate-")]
    assert len(partial) == 1 and len(read_jsonl(next(partial[0].glob("rank*.jsonl")))) == 1, log_tail(log)
    assert not (cfg.eval_dir / "metrics.json").exists()
    assert [p.name for p in (cfg.eval_dir / "videos").glob(".sample_01.mp4.*.tmp")], "not killed mid-publication"

    family = type(get_family(cfg.model.family))
    generate, made = family.generate, []

    def counted(self, final_dir, prompts, **kw):  # noqa: ANN001, ANN003, ANN202
        made.extend(prompts)
        return generate(self, final_dir, prompts, **kw)

    monkeypatch.setattr(family, "generate", counted)
    result = run_eval(cfg)  # this process, as the rerun's eval task would

    assert made == cfg.eval.prompts[1:], "the sample the killed eval had finished was generated again"
    rows = read_jsonl(cfg.eval_dir / "samples/generation.jsonl")
    assert [(r["index"], r["prompt"], r["seed"], r["sample"]) for r in rows] == [
        (r["index"], r["prompt"], r["seed"], r["sample"]) for r in trained.rows
    ]
    # The same seeds through the same float32 CPU kernels in two processes: the sample videos and their
    # scores agree to float32 rounding of the score reductions (rel 1e-5 bounds a few hundred float32 adds).
    for got, want in zip(rows, trained.rows, strict=True):
        for key, value in want.items():
            if isinstance(value, float) and not measured(key):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, got, want)
    want = {k: v for k, v in trained.result.metrics.items() if not measured(k)}
    got = {k: v for k, v in result.metrics.items() if not measured(k)}
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert not (cfg.eval_dir / ".partial").exists()
    # Nothing of the killed run is left to be taken for a result (the videos folder is logged to MLflow whole).
    assert sorted(p.name for p in (cfg.eval_dir / "videos").iterdir()) == ["sample_00.mp4", "sample_01.mp4"]
