"""Start-up cost does not grow with the zoo: the stage machinery imports no family's model library until the run
asks for that family, and then only that family's module (issue 19). Each check runs in a fresh interpreter,
since this test process has long imported everything. The embedded Prefect API skips only the set-up its database
already had, and flows against it send no heartbeats. Timings are benchmarks/bench_startup.py's, never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flowspeed.configs.catalog import FAMILIES

REPO = Path(__file__).resolve().parents[2]
FAMILY_MODULES = {facts.module for facts in FAMILIES.values()}


def started(code: str) -> subprocess.Popen:
    """A fresh interpreter running `code`, then printing its loaded module names as JSON."""
    snippet = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    return subprocess.Popen([sys.executable, "-c", snippet], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def imported_after(proc: subprocess.Popen) -> list[str]:
    """Module names loaded by a `started` interpreter's code."""
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def model_libraries(modules: list[str]) -> list[str]:
    """Family modules and the model code of diffusers/transformers (their import machinery is not model code)."""
    return [
        m
        for m in modules
        if m in FAMILY_MODULES or m.startswith(("diffusers", "transformers.models.", "flowspeed.engines.models.dits"))
    ]


STAGES = "import flowspeed.flows.cli, flowspeed.flows.pipeline, flowspeed.flows.stages, flowspeed.tasks.stages"
SD3_COPY = (
    "from flowspeed.engines.models.registry import register_family\n"
    "from flowspeed.engines.models.sd3 import SD3\n\n\n"
    "class SD3Copy(SD3):\n"
    '    name = "sd3-copy"\n\n\n'
    "register_family(SD3Copy())\n"
)


def _family_code(folder: Path) -> str:
    return (
        "from flowspeed.engines import models\n"
        f"models.__path__.insert(0, {str(folder)!r})  # searched first, so the scan stops there\n"
        "from flowspeed.engines.models import get_family\n"
        "assert type(get_family('sd3-copy')).__name__ == 'SD3Copy'\n"
        "assert get_family('sd3').name == 'sd3'"
    )


def _cached_rerun_code(folder: Path) -> str:
    return (
        "from pathlib import Path\n"
        "from flowspeed.configs import load_config\n"
        "from flowspeed.engines.tracking import runs\n"
        "from flowspeed.engines.tracking.tracker import tracking_uri\n"
        "from flowspeed.flows.stages import _ensure_mlmodel, _mlmodel_key\n"
        "from flowspeed.tasks.stages import _denoiser_weights, _train_outputs\n"
        "for family, first in (('cogvideox', 'model_index.json'), ('qwen2_vl', 'config.json')):\n"
        f"    sets = ['workdir={folder}/' + family, 'model.family=' + family]\n"
        "    cfg = load_config('configs/quickstart.yaml', sets)\n"
        "    outputs = _train_outputs({'cfg': cfg})\n"
        "    final = cfg.train_dir / 'final'\n"
        "    assert outputs[0] == final / first and outputs[-1] == cfg.train_dir / 'losses.json', outputs\n"
        "    assert final in _denoiser_weights(cfg).parents, _denoiser_weights(cfg)\n"
        "    for path in outputs[:-1]:\n"
        "        path.parent.mkdir(parents=True, exist_ok=True)\n"
        "        path.write_text('{}')\n"
        "    (final / 'MLmodel').write_text('written before')\n"
        "    (final.parent / '.final.mlmodel-key').write_text(_mlmodel_key(cfg, final))\n"
        "    _ensure_mlmodel(final, cfg)  # current: left as it is\n"
        "    assert (final / 'MLmodel').read_text() == 'written before'\n"
        "    runs.record_train_run(cfg.train_dir, tracking_uri(cfg), 'finished-run')\n"
        "    assert runs.continue_train_run(cfg, cfg.train_dir, None, {}) is None  # finished: nothing to continue\n"
    )


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen]]:
    """The three import checks' fresh interpreters, started together when the first of them runs: each costs
    seconds of imports, which a 2-core machine does two at a time. Each test reads its own one's modules."""
    family = tmp_path_factory.mktemp("family")
    (family / "aaa_sd3_copy.py").write_text(SD3_COPY)
    procs = {"stages": started(STAGES), "family": started(_family_code(family)),
             "cached": started(_cached_rerun_code(tmp_path_factory.mktemp("cached")))}  # fmt: skip
    yield procs
    for proc in procs.values():
        if proc.poll() is None:  # a test that failed before reading it
            proc.kill()
            proc.communicate()


def test_importing_the_stage_machinery_imports_no_family(fresh: dict[str, subprocess.Popen]) -> None:
    """`import flowspeed.flows.stages` / `flowspeed.flows.pipeline` / `flowspeed.flows.cli` (what `flowspeed run`
    imports before any stage)
    loads no family module and no diffusers or transformers model code."""
    modules = imported_after(fresh["stages"])
    assert model_libraries(modules) == []
    assert "torch" not in modules  # a cached stage never needs it; training, prep and eval import it


def test_a_family_imports_only_its_own_module(fresh: dict[str, subprocess.Popen]) -> None:
    """`get_family('sd3')` imports sd3's module and the shared ones it builds on, no other family; and a new
    family needs only its module: a name the catalog does not list (`SD3_COPY`, in a folder searched first) is
    found by importing the modules under engines/models one by one until it is registered (its catalog line is
    then a speed-up). One interpreter for both (a fresh one costs seconds of imports)."""
    assert "sd3-copy" not in FAMILIES
    modules = imported_after(fresh["family"])
    assert "flowspeed.engines.models.aaa_sd3_copy" in modules
    assert sorted(m for m in modules if m in FAMILY_MODULES) == ["flowspeed.engines.models.sd3"]
    assert "diffusers" in modules  # sd3's own library did load


def test_a_cached_rerun_imports_no_family(fresh: dict[str, subprocess.Popen]) -> None:
    """What a no-op rerun evaluates beyond the imports above (the train and eval cache checks, the train stage's
    MLmodel already written from the same key, its look for a killed run to continue) needs no family module,
    diffusers, transformers or torch: the export's files come from the catalog, for a diffusers family and a
    transformers one."""
    modules = imported_after(fresh["cached"])
    assert model_libraries(modules) == []
    assert "torch" not in modules


@pytest.mark.slow
def test_the_embedded_api_skips_its_set_up_only_on_a_database_it_set_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first start migrates the database and leaves a stamp; the next start on the same database and packages
    runs with Prefect's migrations and block registration off, and the API still serves reads and writes. A
    database migrated elsewhere (another alembic revision) or a stamp from other packages gets a full start."""
    import sqlite3
    import urllib.request

    from flowspeed.tasks import embedded_prefect as ep

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    first = ep.EmbeddedPrefectServer().start()
    assert first.database == tmp_path / "prefect.db"  # no database yet: a full start
    try:
        first.wait(300)
    finally:
        first.stop()
    assert (tmp_path / ep.STAMP).is_file() and ep._already_set_up(tmp_path / "prefect.db")

    again = ep.EmbeddedPrefectServer().start()
    assert again.database is None  # set up before: Prefect's set-up switched off
    try:
        again.wait(300)
        request = urllib.request.Request(f"{again.api_url}/flows/", data=b'{"name": "startup-check"}', method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as made:
            assert made.status in (200, 201)
        with urllib.request.urlopen(f"{again.api_url}/flows/name/startup-check", timeout=60) as read:
            assert json.loads(read.read())["name"] == "startup-check"
    finally:
        again.stop()

    stamp = json.loads((tmp_path / ep.STAMP).read_text())
    (tmp_path / ep.STAMP).write_text(json.dumps({**stamp, "site": {}}))  # packages installed since
    assert not ep._already_set_up(tmp_path / "prefect.db")
    (tmp_path / ep.STAMP).write_text(json.dumps(stamp))
    with sqlite3.connect(tmp_path / "prefect.db") as db:  # another Prefect migrated it further
        db.execute("UPDATE alembic_version SET version_num = 'elsewhere'")
    assert not ep._already_set_up(tmp_path / "prefect.db")
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/prefect")
    assert ep._database() is None  # a configured database: its migrations are Prefect's alone


def test_flows_send_no_heartbeats_only_to_the_embedded_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the embedded API (which dies with the process) flows run without heartbeats; against a configured
    server (or Prefect's own ephemeral one) the setting stays as Prefect has it."""
    from flowspeed.tasks.embedded_prefect import MARKER, flow_settings
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    # Prefect's own value here, not the suite's: tests/conftest.py turns heartbeats off for in-process flows.
    with temporary_settings(restore_defaults={PREFECT_FLOWS_HEARTBEAT_FREQUENCY}):
        default = get_current_settings().flows.heartbeat_frequency
        assert default is not None
        monkeypatch.delenv(MARKER, raising=False)
        with flow_settings():
            assert get_current_settings().flows.heartbeat_frequency == default
        monkeypatch.setenv(MARKER, "http://127.0.0.1:4321/api")
        monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")  # a server, not ours
        with flow_settings():
            assert get_current_settings().flows.heartbeat_frequency == default
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4321/api")
        with flow_settings():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == default
