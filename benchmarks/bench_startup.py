"""Start-up cost: where the wall time of a no-op rerun of the whole pipeline goes, in one run.

    python benchmarks/bench_startup.py [--config configs/quickstart.yaml] [--repeats 5] [--keep DIR]
                                       [--baseline-pythonpath DIR]

In a temporary folder: `flowspeed demo-data runs/demo`, a first real `flowspeed run` (timed, for scale),
then the same `flowspeed run` again, which finds every stage cached and does no stage work. That no-op
rerun is measured three ways, side by side:

1. plain: `flowspeed run CONFIG`, wall clock from outside (what a user waits for) and CPU, `--repeats` times,
   with their median and the machine's load average before and after (the machine is shared: compare
   lines of one run, not runs at different loads);
2. broken down: the same command through this script's `--phases` driver (under `-X importtime`), which books
   every moment of the main thread to one of: opening the MLflow store (while the Prefect API boots), waiting
   for the embedded Prefect API, importing the config's model family, the all-cached check (Prefect cache
   lookups and the cached task runs), each stage's own work (its MLflow calls, its cache check through
   Prefect), the summary, and the rest (CLI, config, imports, Prefect's flow-run bookkeeping); plus the
   interpreter's start and exit.
   The rows add up to the wall time; the time spent in imports is printed beside them, from `-X importtime`;
3. the pieces alone, each in a fresh process: `import flowspeed.flows.cli`, `import flowspeed.flows.stages`,
   importing the config's model family after that, and the embedded Prefect API server's start to its first
   answered API request on the run's database: a full start (migrations, block types) and a start on a
   database that an earlier start of the same Prefect set up (flowspeed.tasks.embedded_prefect's stamp).

`--baseline-pythonpath DIR` also runs another flowspeed tree (DIR holds a `flowspeed/` folder whose
sub-folders link to that tree's flows, tasks, engines, ... ; PYTHONPATH puts it before the editable install)
in its own folder, its no-op reruns alternating with this tree's, so both see the same load. For a commit:
`git archive C | tar -x -C /tmp/c` and `ln -s /tmp/c/<each folder> /tmp/root/flowspeed/<folder>`.

Timings are printed, never asserted. The machine's load matters (the Prefect API server boots in its own
process, concurrently with the CLI's imports): compare lines of one run, not runs on different machines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STARTED = time.time()  # the driver's first moment (the interpreter's own start is before it)
PHASES_ENV = "FLOWSPEED_BENCH_PHASES"  # the driver writes its breakdown (JSON) here
LAUNCHED = EXITED = 0.0  # when the last `_timed` command was launched and had exited (time.time())
LAST_STDERR = ""  # and what it wrote to stderr (the driver's -X importtime lines)
LAST_CPU = 0.0  # and its CPU seconds (user + system, with the child processes it waited for: the Prefect API)


def _import_seconds(importtime: str) -> float:
    """Seconds spent importing, from `-X importtime` lines: the sum over the modules imported at the top level
    (not from inside another module's import). A module imported through `importlib.import_module` (a family,
    by get_family) has no line of its own; its imports then count at the top level, so the sum holds them."""
    total = 0.0
    for line in importtime.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and not name[1:].startswith(" "):  # depth 0: one space after the bar
            total += int(cumulative) / 1e6
    return total


# ---- the driver: `flowspeed run` with every moment of the main thread booked to one phase ----------------
class Ledger:
    """Exclusive time per phase on the main thread: entering a phase pauses the one it interrupts."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.stack: list[str] = ["rest"]
        self.totals: dict[str, float] = {}
        self.main = threading.main_thread()

    def _switch(self) -> None:
        now = time.perf_counter()
        self.totals[self.stack[-1]] = self.totals.get(self.stack[-1], 0.0) + now - self.mark
        self.mark = now

    def enter(self, phase: str) -> bool:
        if threading.current_thread() is not self.main:
            return False
        self._switch()
        self.stack.append(phase)
        return True

    def leave(self) -> None:
        self._switch()
        self.stack.pop()

    def timed(self, phase: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = phase(*args, **kwargs) if callable(phase) else phase
            entered = self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                if entered:
                    self.leave()

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def result(self) -> dict[str, float]:
        self._switch()
        wall = time.perf_counter() - self.start
        return {**self.totals, "driver_wall": wall, "started": STARTED, "ended": time.time()}


def _patch_after_import(name: str, patch: Any) -> None:
    """Run `patch(module)` once `name` has been imported (now, if it already is), without importing it."""
    if name in sys.modules:
        patch(sys.modules[name])
        return

    class Hook:
        def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            exec_module = spec.loader.exec_module

            def exec_then_patch(module: Any) -> None:
                exec_module(module)
                patch(module)

            spec.loader.exec_module = exec_then_patch
            return spec

    sys.meta_path.insert(0, Hook())


def drive(argv: list[str]) -> None:
    """`flowspeed run ...` in this process, with the phases booked; writes them to $FLOWSPEED_BENCH_PHASES."""
    ledger = Ledger()

    def patch_cli(m: Any) -> None:
        for name, phase in (("_wait_for_prefect", "prefect_api_wait"), ("_summary", "summary"),
                            ("_open_local_tracking", "tracking_open")):  # fmt: skip
            if hasattr(m, name):  # an older tree (--baseline-pythonpath) may lack one
                setattr(m, name, ledger.timed(phase, getattr(m, name)))

    def patch_stages(m: Any) -> None:
        m.in_stage_run = ledger.timed(lambda cfg, stage, *a, **k: f"stage:{stage}", m.in_stage_run)

    def patch_pipeline(m: Any) -> None:
        if hasattr(m, "_all_reused"):
            m._all_reused = ledger.timed("reuse_check", m._all_reused)

    def patch_store(m: Any) -> None:
        m.SqlAlchemyStore.__init__ = ledger.timed("mlflow_store_open", m.SqlAlchemyStore.__init__)

    def patch_registry(m: Any) -> None:
        m._import_family = ledger.timed("family_import", m._import_family)

    _patch_after_import("flowspeed.flows.stages", patch_stages)
    _patch_after_import("flowspeed.flows.pipeline", patch_pipeline)
    _patch_after_import("flowspeed.engines.models.registry", patch_registry)
    _patch_after_import("mlflow.store.tracking.sqlalchemy_store", patch_store)
    import flowspeed.flows.cli

    patch_cli(flowspeed.flows.cli)
    exit_now = flowspeed.flows.cli._exit_without_teardown

    def write_then_exit(code: int) -> None:  # the exit itself (threads, hooks) is timed from outside
        Path(os.environ[PHASES_ENV]).write_text(json.dumps(ledger.result()))
        exit_now(code)

    flowspeed.flows.cli._exit_without_teardown = write_then_exit
    sys.argv = ["flowspeed", *argv]
    flowspeed.flows.cli.main()


# ---- the measurements --------------------------------------------------------------------------------
def _flowspeed() -> list[str]:
    exe = Path(sys.executable).with_name("flowspeed")
    return (
        [str(exe)]
        if exe.is_file()
        else [sys.executable, "-c", "import sys; from flowspeed.flows.cli import main; main()"]
    )


def _timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    global LAUNCHED, EXITED, LAST_STDERR, LAST_CPU
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAUNCHED = t = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    EXITED = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    LAST_STDERR = proc.stderr
    wall = EXITED - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall


def _python(code: str, cwd: Path) -> float:
    """Seconds `code` takes in a fresh interpreter, measured inside it (the interpreter's own start excluded)."""
    timed = f"import time; _t = time.perf_counter()\n{code}\nprint(time.perf_counter() - _t)"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", timed], cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"python -c {code!r} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _prefect_api_start(prefect_home: Path, cwd: Path, set_up: bool) -> float:
    """Seconds from launch to the first answered API request; `set_up`: on a database an earlier start set up
    (the stamp kept), else a full start (the stamp removed first: migrations and block types run)."""
    stamp = "" if set_up else "(Path(os.environ['PREFECT_HOME']) / STAMP).unlink(missing_ok=True)\n"
    code = (
        "import os\nfrom pathlib import Path\n"
        "from flowspeed.tasks.embedded_prefect import STAMP, EmbeddedPrefectServer\n"
        f"{stamp}s = EmbeddedPrefectServer().start(); s.wait(300); s.stop()"
    )
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    timed = f"import time; _t = time.perf_counter()\n{code}\nprint(time.perf_counter() - _t)"
    out = subprocess.run([sys.executable, "-c", timed], cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the Prefect API server did not start:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _family_and_workdir(config: Path) -> tuple[str, str]:
    """The config's `model.family` and `workdir` (its own keys, else its include's), without loading it."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    inc = yaml.safe_load((config.parent / raw["include"]).read_text()) if raw.get("include") else {}
    family = (raw.get("model") or {}).get("family") or (inc.get("model") or {}).get("family") or "cogvideox"
    return family, raw.get("workdir") or inc.get("workdir") or "runs"


def _family_module(family: str) -> str:
    from flowspeed.configs.catalog import FAMILIES

    return FAMILIES[family].module if family in FAMILIES else f"flowspeed.engines.models.{family}"


def _load() -> str:
    """The machine's 1-minute load average (how busy the shared machine was)."""
    return f"{os.getloadavg()[0]:.2f}"


def _rerun(cmd: list[str], work: Path, env: dict[str, str] | None, walls: list[float], cpus: list[float]) -> None:
    walls.append(_timed(cmd, work, env))
    cpus.append(LAST_CPU)


def _plain_line(label: str, walls: list[float], cpus: list[float]) -> str:
    each = " ".join(f"{t:.2f}" for t in walls)
    return (f"{label}: median {statistics.median(walls):6.2f} s wall ({each}), "
            f"median {statistics.median(cpus):6.2f} s CPU")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml", help="relative to the repository")
    ap.add_argument("--repeats", type=int, default=5, help="plain no-op reruns (and breakdowns: half as many)")
    ap.add_argument("--keep", type=Path, default=None, help="work here (kept) instead of a temporary folder")
    ap.add_argument("--baseline-pythonpath", type=Path, default=None, help="another tree's root, run alternately")
    ap.add_argument("--phases", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the driver (internal)
    args = ap.parse_args()
    if args.phases is not None:
        drive(args.phases)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    base_work = work / "baseline"
    base_env = None
    if args.baseline_pythonpath is not None:
        base_env = {**os.environ, "PYTHONPATH": str(args.baseline_pythonpath.resolve())}
    try:
        fs = _flowspeed()
        for folder, env in ((work, None), (base_work, base_env)):
            if folder is base_work and base_env is None:
                continue
            shutil.copytree(REPO / "configs", folder / "configs", dirs_exist_ok=True)
            _timed([*fs, "demo-data", "runs/demo"], folder, env)
            first = _timed([*fs, "run", args.config], folder, env)
            name = "baseline" if env else "this tree"
            print(f"[0] first run (real work, for scale), {name:<9}: {first:6.2f} s", flush=True)
        print(f"    load average (1 min) before the reruns: {_load()}")
        plain: list[float] = []
        cpus: list[float] = []
        base_plain: list[float] = []
        base_cpus: list[float] = []
        for _ in range(args.repeats):  # alternating, so both trees see the same load
            _rerun([*fs, "run", args.config], work, None, plain, cpus)
            if base_env is not None:
                _rerun([*fs, "run", args.config], base_work, base_env, base_plain, base_cpus)
        print(_plain_line("[1] no-op rerun, plain `flowspeed run`, this tree ", plain, cpus))
        if base_env is not None:
            print(_plain_line("[1] no-op rerun, plain `flowspeed run`, baseline  ", base_plain, base_cpus))
        print(f"    (CPU: user+sys, with the Prefect API process); load average (1 min) after: {_load()}", flush=True)

        phases_file = work / "phases.json"
        env = {**os.environ, PHASES_ENV: str(phases_file)}
        driver = [sys.executable, "-X", "importtime", str(Path(__file__).resolve()), "--phases", "run", args.config]
        family_module = _family_module(_family_and_workdir(work / args.config)[0])
        runs = []
        for _ in range(max(1, args.repeats // 2)):
            wall = _timed(driver, work, env)
            phases = json.loads(phases_file.read_text())
            phases["imports"] = _import_seconds(LAST_STDERR)
            edges = {"start": phases["started"] - LAUNCHED, "exit": EXITED - phases["ended"]}
            runs.append({**phases, **edges, "wall": wall})
        best = min(runs, key=lambda r: r["wall"])
        stages = sorted(k for k in best if k.startswith("stage:"))
        walls = " ".join(f"{r['wall']:.2f}" for r in runs)
        print(f"[2] no-op rerun, broken down (fastest of {len(runs)}; walls {walls} s; load {_load()})")
        rows = [
            ("interpreter start (to the driver's first line)", best["start"]),
            ("opening the MLflow store, while the Prefect API boots", best.get("tracking_open", 0.0)),
            ("  of which the sqlite store itself", best.get("mlflow_store_open", 0.0)),
            ("waiting for the embedded Prefect API (after that)", best.get("prefect_api_wait", 0.0)),
            (f"importing the model family ({family_module} and its libraries)", best.get("family_import", 0.0)),
            ("all-cached check (Prefect cache lookups, cached task runs)", best.get("reuse_check", 0.0)),
            *((f"stage {s[6:]} (MLflow calls, cache check via Prefect)", best[s]) for s in stages),
            ("summary (table, links)", best.get("summary", 0.0)),
            ("rest (CLI, config, imports, Prefect flow runs)", best.get("rest", 0.0)),
            ("exit (threads joined, exit hooks: the Prefect API stopped)", best["exit"]),
            ("unaccounted (driver set-up)", best["wall"] - best["start"] - best["exit"] - best["driver_wall"]),
        ]
        for name, secs in rows:
            print(f"    {name:<60}: {secs:6.2f} s")
        print(f"    {'total':<60}: {best['wall']:6.2f} s")
        print(f"    {'imports, all (-X importtime; inside the rows above)':<60}: {best['imports']:6.2f} s", flush=True)

        family, workdir = _family_and_workdir(work / args.config)
        workdir = work / workdir
        cli = _python("import flowspeed.flows.cli", REPO)
        stage = _python("import flowspeed.flows.stages", REPO)
        fam = _python(
            "import flowspeed.flows.stages\n_t = time.perf_counter()\n"
            f"from flowspeed.engines.models import get_family\nget_family({family!r})",
            REPO,
        )
        full = _prefect_api_start(workdir / "prefect", REPO, set_up=False)
        set_up = _prefect_api_start(workdir / "prefect", REPO, set_up=True)
        print(f"[3] pieces alone, each in a fresh process (load {_load()})")
        print(f"    import flowspeed.flows.cli                                       : {cli:6.2f} s")
        print(f"    import flowspeed.flows.stages                                    : {stage:6.2f} s")
        print(f"    get_family({family!r}) after that (its module only)             : {fam:6.2f} s")
        print(f"    embedded Prefect API, launch to first API answer, full start    : {full:6.2f} s")
        print(f"    the same on a database set up by an earlier start (stamp kept)  : {set_up:6.2f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
