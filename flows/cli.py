"""`flowspeed`: the command line.

    flowspeed demo-data runs/demo                   # a small dataset, no downloads
    flowspeed run configs/quickstart.yaml           # prep -> train -> eval, tracked
    flowspeed train configs/quickstart.yaml --set train.max_steps=50

Prefect and MLflow default to embedded stores under the workdir (Prefect's ephemeral API with its
database in <workdir>/prefect, MLflow in <workdir>/mlflow.db); PREFECT_API_URL and
MLFLOW_TRACKING_URI point them at servers instead.

Stopping: Ctrl-C and SIGTERM end a run with exit status 130 and 143 (128 + the signal, what a shell
reports for a process that signal killed), keeping finished shards and checkpoints. Every process a
run starts (the embedded Prefect API, torchrun and its ranks) ends with it, even after `kill -9`.
A full disk is one paragraph naming the path, its filesystem and the space left.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from flowspeed.engines.common.lifetime import exit_without_teardown
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Raw videos to a trained, evaluated model.")


def _version(value: bool) -> None:
    """`flowspeed --version`: the installed distribution's version, for bug reports and run records."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"flowspeed {version('flowspeed')}")
        except PackageNotFoundError:
            typer.echo("flowspeed (not installed as a package: run `pip install -e .`)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Raw videos to a trained, evaluated model."""


console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="pipeline YAML or recipe, e.g. configs/quickstart.yaml, quickstart")]
WorkdirOpt = Annotated[Path | None, typer.Option("--workdir", help="where everything this run writes goes")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. --set train.max_steps=20")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="print the full traceback on failure")]


class RichReporter:
    """Rich progress bars for the libraries' decode/encode/train loops."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def start(self, name: str, total: int) -> None:
        self.tasks[name] = self.progress.add_task(name, total=total)

    def advance(self, name: str, n: int = 1) -> None:
        if name in self.tasks:
            self.progress.advance(self.tasks[name], n)

    def finish(self, name: str) -> None:
        if name in self.tasks:
            self.progress.update(self.tasks[name], completed=self.progress.tasks[self.tasks[name]].total)


_embedded_server: Any = None  # the Prefect API flowspeed started (flowspeed.tasks.embedded_prefect), if any


def prepare_environment(workdir: Path, debug: bool = False) -> None:
    """Settings that must exist before Prefect, MLflow or HF libraries are imported."""
    global _embedded_server
    workdir.mkdir(parents=True, exist_ok=True)
    if "PREFECT_API_URL" not in os.environ:
        os.environ.setdefault("PREFECT_HOME", str((workdir / "prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A first run creates the ephemeral API's database; on a busy 2-core machine that can pass 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if _embedded_server is None:
        # Our own ephemeral API, which dies with this process even on SIGKILL; it boots during the imports below.
        from flowspeed.tasks.embedded_prefect import start_embedded_server

        _embedded_server = start_embedded_server()
    # Flow and task logs go to the Prefect API (the UI shows them); the terminal shows the progress
    # bars and, on failure, one paragraph. --debug puts Prefect's console logs back.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    if not debug:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    # Model hubs are often unreachable on clusters: fail in seconds on a missing local file.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    _quiet_when_imported()
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _quiet(lib: Any) -> None:
    lib.set_verbosity_error()
    lib.disable_progress_bar()


class _AfterImport:
    """A meta-path finder that runs `hook(module)` right after `name` is first imported, and otherwise
    finds nothing (the usual finders do the import). Importing diffusers or transformers just to set
    their log level costs seconds, and a run whose stages are cached never needs them."""

    def __init__(self, name: str, hook: Callable[[Any], None]) -> None:
        self.name, self.hook = name, hook

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.name:
            return None
        with contextlib.suppress(ValueError):  # once; the finders after it find the module
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, hook = spec.loader.exec_module, self.hook

        def exec_then_hook(module: Any) -> None:
            exec_module(module)
            hook(module)

        spec.loader.exec_module = exec_then_hook  # type: ignore[method-assign]
        return spec


def _quiet_when_imported() -> None:
    """diffusers and transformers log errors only and show no download/loading bars (the terminal has
    flowspeed's own), set when each is first imported, or now if it already is."""
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        if name in sys.modules:
            _quiet(sys.modules[name])
        elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(name, _quiet))


_STOPS = (KeyboardInterrupt, SystemExit, GeneratorExit)  # the ways a process is meant to stop, not failures


def _errors() -> tuple[type[BaseException], ...]:
    """What a command reports as one paragraph: every exception but Ctrl-C, an exit and a closing generator.
    torch's CheckpointException (and Prefect's signals) derive from BaseException, so `except Exception`
    alone lets them through as a page of tracebacks; BaseException's direct subclasses are listed when the
    error is handled, so whatever a library loaded by then defines is covered."""
    others = (c for c in BaseException.__subclasses__() if c is not Exception and not issubclass(c, _STOPS))
    return (Exception, *others)


def _termination(exc: BaseException) -> bool:
    """Prefect's own SIGTERM signal, when it reaches the CLI instead of the signal itself."""
    mod = sys.modules.get("prefect.exceptions")
    return mod is not None and isinstance(exc, mod.TerminationSignal)


def _checkpoint_exception() -> tuple[type[BaseException], ...]:
    """torch's CheckpointException derives from BaseException, so `except Exception` alone lets it
    through as a page of per-rank tracebacks (looked up only if torch is loaded: the CLI starts without it)."""
    api = sys.modules.get("torch.distributed.checkpoint.api")
    return (api.CheckpointException,) if api else ()


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and everything it wraps: causes, contexts, exception groups and the per-rank failures of
    torch's CheckpointException."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
        failures = getattr(e, "failures", None)  # rank -> exception, or (exception, traceback) in newer torch
        if isinstance(failures, dict):
            for f in failures.values():
                todo += [x for x in (f if isinstance(f, tuple) else (f,)) if isinstance(x, BaseException)]
    return seen


_NO_SPACE = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "(os error 28)")
# torch.save to a path (C++ stream) reports a failed write without errno: "unexpected pos N vs M" after
# "basic_ios::clear: iostream error"; the usual cause is a full disk.
_TORN_WRITE = ("iostream error", "unexpected pos")


def _bytes(n: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def filesystem_of(path: Path) -> str:
    """'tmpfs mounted at /x, 0 B free' for the filesystem holding `path` (or its nearest existing parent)."""
    import psutil

    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    real = os.path.realpath(path)
    try:
        parts = [p for p in psutil.disk_partitions(all=True) if real == p.mountpoint or
                 real.startswith(p.mountpoint.rstrip("/") + "/")]  # fmt: skip
        part = max(parts, key=lambda p: len(p.mountpoint)) if parts else None
        st = os.statvfs(real)
        free = _bytes(st.f_bavail * st.f_frsize)
    except OSError:
        return "its filesystem could not be inspected"
    if part is None:
        return f"{free} free"
    return f"{part.fstype} mounted at {part.mountpoint}, {free} free"


def disk_full_message(exc: BaseException, where: Path | None) -> str | None:
    """One paragraph for a write that found its disk full (None for any other error): which path,
    which filesystem, how much is free, and that nothing finished is lost (every write is atomic)."""
    hit = None
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            hit = e
            break
        if any(marker in str(e) for marker in _NO_SPACE):  # a rank's error, as torchrun reports it
            hit = hit or e
    torn = hit is None and any(marker in str(e) for e in _causes(exc) for marker in _TORN_WRITE)
    if hit is None and not torn:
        return None
    path = Path(hit.filename) if isinstance(hit, OSError) and isinstance(hit.filename, str) else where
    if path is not None and path.name.startswith("."):  # an atomic write's temp name: name its folder
        path = path.parent
    held = f" holding {path} ({filesystem_of(path)})" if path is not None else ""
    advice = (
        "free space or point the workdir elsewhere (--workdir); finished shards and checkpoints are kept "
        "(every write is atomic) and the next run resumes from them"
    )
    if torn:  # torch's file writer loses errno: say what we know
        return f"a write stopped part-way on the device{held}, most likely because it is full: {advice}"
    quota = isinstance(hit, OSError) and hit.errno == errno.EDQUOT or "quota" in str(hit).lower()
    what = "disk quota exceeded on" if quota else "no space left on"
    return f"{what} the device{held}: {advice}"


def _fail(command: str, exc: BaseException, debug: bool, where: Path | None = None) -> None:
    if debug:
        console.print("".join(traceback.format_exception(exc)))
    msg = str(exc).strip() or repr(exc)
    full = disk_full_message(exc, where)
    if full is not None:
        console.print(Panel(full, title=f"flowspeed {command} failed: disk full", border_style="red", expand=False))
        if not debug:
            console.print("Run again with --debug for the full traceback.")
        raise typer.Exit(1)
    if isinstance(exc, _checkpoint_exception()):
        from flowspeed.engines.common.safe_load import describe

        msg = f"a checkpoint could not be read or written ({describe(exc)})"
    console.print(
        Panel(
            f"[bold]{type(exc).__name__}[/]: {rich_escape(msg)}",  # a message's [..] (pip extras, lists) is text
            title=f"flowspeed {command} failed",
            border_style="red",
            expand=False,
        )
    )
    if not debug:
        console.print("Run again with --debug for the full traceback.")
    raise typer.Exit(1)


_signalled: list[int] = []


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (what `kill`, schedulers and timeouts send) ends the run as Ctrl-C does. Prefect's flow
    engine puts its own SIGTERM handler in front of this one while a flow runs; it marks the flow run
    crashed, puts this handler back and sends the signal again, so it arrives here all the same."""
    _signalled.append(signum)
    raise KeyboardInterrupt


def _exit_interrupted(signum: int) -> None:
    """Exit with 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), as a process the signal killed
    reports to its shell. Cleanup (closing runs, stopping the Prefect API) gets a bounded time: a
    thread stuck on an unreachable server must not keep the process alive, and a second signal exits now."""
    code = 128 + signum
    console.print("[yellow]interrupted: finished shards and checkpoints are kept; run again to resume[/]")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    signal.signal(signal.SIGINT, lambda *_: os._exit(code))
    _hard_exit_after(30.0, code)
    raise typer.Exit(code)


def _hard_exit_after(seconds: float, code: int) -> None:
    def later() -> None:
        threading.Event().wait(seconds)
        sys.stderr.flush()
        os._exit(code)

    threading.Thread(target=later, name="exit-deadline", daemon=True).start()


def _no_credentials_in_urls(cfg: Any) -> None:
    """Team-mode credentials come from the environment (MLFLOW_TRACKING_USERNAME/PASSWORD,
    PREFECT_API_AUTH_STRING); one written into a server URL would be printed and stored in run tags.
    Only a configured URL can carry them: the embedded defaults (a sqlite file, flowspeed's own Prefect API)
    are checked without importing MLflow, which would delay the embedded API's start by its import."""
    if not (cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get("PREFECT_API_URL")):
        return
    from flowspeed.engines.tracking.tracker import refuse_credentials_in_url, tracking_uri

    tracking_uri(cfg)  # refuses a tracking URI with user:password@
    if os.environ.get("PREFECT_API_URL"):
        refuse_credentials_in_url(os.environ["PREFECT_API_URL"], "PREFECT_API_URL", "set PREFECT_API_AUTH_STRING")


def _stage_dir(command: str, cfg: Any) -> Path:
    """Where the command writes (named in a disk-full error when the OSError names no file)."""
    return {"prep": cfg.cache_dir, "train": cfg.train_dir, "eval": cfg.eval_dir}.get(command, cfg.workdir)


def _run_stage(command: str, config: Path, workdir: Path | None, overrides: list[str] | None, debug: bool) -> None:
    from flowspeed.configs import ConfigError, check_stage, load_config

    try:
        cfg = load_config(config, overrides or [], workdir)
        check_stage(cfg, "run" if command == "post-train" else command, str(config))  # paths it reads, before writing
        _no_credentials_in_urls(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(command, exc, debug)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        prepare_environment(cfg.workdir, debug)
        from flowspeed.engines.common.progress import use_reporter
        from flowspeed.tasks.embedded_prefect import flow_settings  # no heartbeats to the embedded API

        columns = (TextColumn("[bold]{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress, use_reporter(RichReporter(progress)):
            _open_local_tracking(cfg)
            if command in ("run", "post-train"):  # post-train: the pipeline, refused unless it post-trains
                from flowspeed.flows.pipeline import pipeline
                from flowspeed.flows.post_train import post_train

                _wait_for_prefect()
                with flow_settings():
                    out = (post_train if command == "post-train" else pipeline)(cfg)
            else:
                from flowspeed.flows import stages

                flow = {"prep": stages.prep, "train": stages.train, "eval": stages.evaluate}[command]
                _wait_for_prefect()
                with flow_settings():
                    out = {command: flow(cfg)}
    except KeyboardInterrupt:
        _exit_interrupted(_signalled[-1] if _signalled else signal.SIGINT)
    except _errors() as exc:  # one readable paragraph, not a bare traceback
        if _termination(exc):
            _exit_interrupted(signal.SIGTERM)
        _fail(command, exc, debug, _stage_dir(command, cfg))
    try:
        _summary(cfg, out)
    except KeyboardInterrupt:
        _exit_interrupted(_signalled[-1] if _signalled else signal.SIGINT)


def _open_local_tracking(cfg: Any) -> None:
    """While the embedded Prefect API boots: open a local MLflow store (sqlite, files), as the flow's first
    stage would (MLflow's store imports, the schema check, the sweep of runs left open by dead processes),
    so that ~1 s overlaps the boot. A tracking server is left to the flow: waiting for one is its business."""
    from flowspeed.engines.tracking import runs
    from flowspeed.engines.tracking.tracker import tracking_uri

    if _embedded_server is not None and not tracking_uri(cfg).startswith(("http://", "https://")):
        runs.ready(cfg)


def _wait_for_prefect() -> None:
    """The embedded Prefect API was started before the imports; it must answer before the flow starts."""
    if _embedded_server is not None:
        _embedded_server.wait(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))


def _summary(cfg: Any, out: dict[str, Any]) -> None:
    """What this run did: a reused stage says which run did its work, and its counts, speeds and scores are never
    shown as this run's."""
    from flowspeed.engines.tracking.tracker import tracking_uri
    from flowspeed.flows.summary import summary_rows
    from flowspeed.tasks.tracking import prefect_run_url, ui_link

    table = Table(title="flowspeed run", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # paths are for copying: fold, never truncate with an ellipsis
    for item, value in summary_rows(out):
        table.add_row(item, value)
    Console().print(table)
    uri = tracking_uri(cfg)
    prefect_home = os.environ.get("PREFECT_HOME")
    run_id = out.get("mlflow_run_id") or next(iter(out.values())).get("mlflow_run_id", "")
    flow_run_id = out.get("prefect_flow_run_id")
    console.print("\n[bold]See this run:[/]")
    if uri.startswith("sqlite"):
        console.print(f"  mlflow ui --backend-store-uri {uri}", soft_wrap=True)
    if run_id:
        from mlflow import MlflowClient

        try:
            exp_id = MlflowClient(uri).get_run(run_id).info.experiment_id
            console.print(f"  MLflow run:  {ui_link(uri, exp_id, run_id)}", soft_wrap=True)
        except Exception:  # noqa: BLE001 - the server went away at the end: the warning above says what waits
            console.print(f"  MLflow run:  {run_id} (the tracking server is unreachable now)", soft_wrap=True)
    if (_embedded_server is not None or "PREFECT_API_URL" not in os.environ) and prefect_home:
        console.print(f"  PREFECT_HOME={prefect_home} prefect server start", soft_wrap=True)
    if flow_run_id:
        console.print(f"  Prefect run: {prefect_run_url(flow_run_id)}", soft_wrap=True)


@app.command("demo-data")
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="folder to write clips, stills and data.jsonl into")],
    num_videos: int = 16,
    num_images: int = 4,
    seed: int = 0,
) -> None:
    """Write a small dataset of moving coloured shapes with true captions (no downloads)."""
    from flowspeed.datasets_prep.demo import make_demo_audio, make_demo_dataset

    manifest = make_demo_dataset(out_dir, num_videos, num_images, seed)
    audio = make_demo_audio(out_dir)
    console.print(f"wrote {num_videos} clips and {num_images} stills; manifest: [bold]{manifest}[/]")
    console.print(f"  the same clips as conversations: [bold]{manifest.parent / 'conversations.jsonl'}[/]")
    console.print(f"  preference pairs about them (DPO): [bold]{manifest.parent / 'preferences.jsonl'}[/]")
    console.print(f"  image preference pairs (Diffusion-DPO): [bold]{manifest.parent / 'pairs.jsonl'}[/]")
    console.print(f"  spoken-tone clips with transcripts: [bold]{audio}[/]")


@app.command()
def run(config: ConfigArg, workdir: WorkdirOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Run the whole pipeline: prep -> train -> eval."""
    _run_stage("run", config, workdir, set_, debug)


@app.command("post-train")
def post_train(config: ConfigArg, workdir: WorkdirOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Post-train the registry's champion (DPO, GRPO, ...): prep -> train from the champion -> eval -> register; the
    new version becomes champion only if the gates pass. Refuses a config that is not a post-training one."""
    _run_stage("post-train", config, workdir, set_, debug)


@app.command()
def prep(
    config: ConfigArg,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    debug: DebugOpt = False,
    preview: Annotated[
        int | None,
        typer.Option(
            "--preview",
            min=1,
            help="only draw the contact sheet of the first N manifest records (probe and decode: nothing is "
            "encoded, no runs are made)",
        ),
    ] = None,
) -> None:
    """Probe, decode and encode the manifest into the latent cache."""
    if preview is not None:
        _preview(config, workdir, set_, debug, preview)
        return
    _run_stage("prep", config, workdir, set_, debug)


def _preview(config: Path, workdir: Path | None, overrides: list[str] | None, debug: bool, n: int) -> None:
    """`prep --preview N`: what prep would take from the first N records, as pictures, in seconds (no model
    is loaded, no Prefect or MLflow run is opened)."""
    from flowspeed.configs import check_stage, load_config

    try:
        cfg = load_config(config, overrides or [], workdir)
        check_stage(cfg, "prep", str(config))
        from flowspeed.datasets_prep.preview import preview_manifest

        pv = preview_manifest(cfg, n)
    except _errors() as exc:
        _fail("prep --preview", exc, debug)
    console.print(f"{len(pv.tiles)} samples, {len(pv.rejects)} rejected, of the first {n} records")
    for r in pv.rejects:
        console.print(f"  rejected {r['source']}: {r['code']}: {rich_escape(r['reason'])}", soft_wrap=True)
    for page in pv.pages:
        typer.echo(page)  # stdout: the sheet's path, for scripts


@app.command()
def train(config: ConfigArg, workdir: WorkdirOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Train on the cached latents (resumes from the latest checkpoint)."""
    _run_stage("train", config, workdir, set_, debug)


@app.command("eval")
def eval_(config: ConfigArg, workdir: WorkdirOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Evaluate the exported model (or eval.model: a registry version, checkpoint or export folder)."""
    _run_stage("eval", config, workdir, set_, debug)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint directory: <train folder>/checkpoints/step-N")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write the release model into")],
    ema: Annotated[bool, typer.Option(help="export the EMA weights (train.ema) instead of the raw ones")] = False,
    debug: DebugOpt = False,
) -> None:
    """Turn a sharded training checkpoint (any parallel layout) into the family's native release folder."""
    try:
        from flowspeed.engines.torch_engine.trainer import export_checkpoint

        final = export_checkpoint(checkpoint, out, use_ema=ema)
    except _errors() as exc:  # one paragraph; --debug: traceback
        _fail("export", exc, debug)
    console.print(f"exported [bold]{checkpoint}[/] -> [bold]{final}[/]")


@app.command()
def compare(
    experiment: Annotated[str, typer.Argument(help="MLflow experiment (default: flowspeed-<workdir name>)")],
    workdir: Annotated[Path | None, typer.Option(help="the runs' workdir: its sqlite MLflow store")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="an MLflow server or store URI instead")] = None,
    last: Annotated[int, typer.Option(min=1, help="how many of the newest pipeline runs")] = 10,
    wide: Annotated[bool, typer.Option("--wide", help="every column in full (the default fits 80 columns)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON")] = False,
    debug: DebugOpt = False,
) -> None:
    """The last N pipeline runs of an experiment side by side: family, variant, median samples/s, final and
    held-out loss, eval metrics, registry. Reads an existing store only (never creates one)."""
    import json as _json

    from flowspeed.engines.tracking.compare import compare_runs, compare_table

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        uri = f"sqlite:///{(workdir or Path.cwd()).resolve() / 'mlflow.db'}"
    try:
        from flowspeed.engines.tracking.tracker import MLFLOW_CREDENTIALS, refuse_credentials_in_url

        refuse_credentials_in_url(uri, "the MLflow tracking URI", MLFLOW_CREDENTIALS)
        rows = compare_runs(uri, experiment, last)
    except _errors() as exc:  # one paragraph; --debug for the traceback
        _fail("compare", exc, debug)
    if as_json:
        print(_json.dumps(rows, indent=2))
        return
    out = Console()  # stdout at the terminal's width: the default table fits 80 columns
    table, notes = compare_table(rows, f"{experiment}: last {len(rows)} runs", wide)
    if wide:  # every column whole, wider than the terminal if need be (it wraps lines, rich would fold cells)
        from rich.measure import Measurement

        whole = Measurement.get(out, out.options.update_width(10_000), table).maximum
        out = Console(width=max(out.width, whole))
    out.print(table)
    for note in notes:
        out.print(note, highlight=False, markup=False)
    out.print(
        f"store: {uri}. In the MLflow UI: open the experiment, tick these runs, press Compare.",
        highlight=False,
        markup=False,
    )


@app.command("sync-metrics")
def sync_metrics(
    folder: Annotated[Path, typer.Argument(help="a workdir, a training dir, or an mlflow-undelivered/ folder")],
    debug: DebugOpt = False,
) -> None:
    """Deliver what MLflow missed while its server was away: training metrics, and the stages' tags,
    artifacts, tables and final status."""
    from flowspeed.engines.tracking.runs import sync_undelivered

    if not folder.is_dir():
        typer.echo(f"nothing to send: {folder} does not exist")
        return
    delivered, waiting = sync_undelivered(folder)
    typer.echo(f"delivered {delivered} metrics/tags; {waiting} still waiting (server unreachable)")
    if waiting:
        raise typer.Exit(1)


from flowspeed.flows.config_cli import config_app  # noqa: E402 - beside the other sub-commands

app.add_typer(config_app, name="config")

from flowspeed.flows.recipes_cli import recipes_app  # noqa: E402

app.add_typer(recipes_app, name="recipes")

from flowspeed.flows.k8s_cli import k8s_app  # noqa: E402

app.add_typer(k8s_app, name="k8s")

cache_app = typer.Typer(help="Inspect, verify and prune the latent cache of a config's prep stage.")
app.add_typer(cache_app, name="cache")


def _cache_for(config: Path, workdir: Path | None, overrides: list[str] | None):
    from flowspeed.configs import ConfigError, load_config
    from flowspeed.datasets_prep.cache import LatentCache

    try:
        cfg = load_config(config, overrides or [], workdir)
    except (ConfigError, FileNotFoundError) as exc:
        _fail("cache", exc, False)
    cache = LatentCache(cfg.cache_dir)
    if not cache.shards():
        _fail("cache", FileNotFoundError(f"no latent cache under {cache.root}: run `flowspeed prep` first"), False)
    return cfg, cache


@cache_app.command("list")
def cache_list(config: ConfigArg, workdir: WorkdirOpt = None, set_: SetOpt = None) -> None:
    """Samples, shards and size, grouped by prep settings and encoder, and the prep folders using it."""
    cfg, cache = _cache_for(config, workdir, set_)
    info = cache.summary()
    table = Table(title=f"latent cache {info['root']}")
    for col in ("prep hash", "encoder", "samples"):
        table.add_column(col, overflow="fold")
    for g in info["groups"]:
        table.add_row(g["prep_hash"], g["encoder"], str(g["samples"]))
    Console().print(table)
    Console().print(f"{info['samples']} samples in {info['shards']} shards, {info['bytes'] / 2**20:.1f} MiB")
    from flowspeed.engines.common.io import read_jsonl

    for folder in _prep_folders(cfg):  # which recipes' preps select from it (what `cache prune` keeps)
        typer.echo(f"prep folder {folder}: {len(read_jsonl(folder / 'samples.jsonl'))} samples")  # paths unwrapped


@cache_app.command("verify")
def cache_verify(
    config: ConfigArg,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    fix: Annotated[bool, typer.Option(help="delete damaged shards; the next prep re-encodes them")] = False,
) -> None:
    """Re-read every cached tensor and check it against its recorded checksum."""
    _, cache = _cache_for(config, workdir, set_)
    problems = cache.verify()
    for p in problems:
        console.print(f"[red]{p['shard']}[/] {p['key']}: {p['problem']}", soft_wrap=True)
    if not problems:
        Console().print(f"all {cache.summary()['samples']} cached samples verified")
        return
    if fix:
        cache.remove_shards({p["shard"] for p in problems})
        console.print(
            f"removed {len({p['shard'] for p in problems})} damaged shards; run `flowspeed prep` to re-encode"
        )
        return
    raise typer.Exit(1)


@cache_app.command("prune")
def cache_prune(
    config: ConfigArg,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option(help="report what would go, change nothing")] = False,
) -> None:
    """Keep only the samples that the workdir's prep folders on this cache selected (this config's and
    other recipes'); drop the rest (other settings, old files). Delete a prep folder to let its samples go."""
    from flowspeed.engines.common.io import read_jsonl

    cfg, cache = _cache_for(config, workdir, set_)
    folders = _prep_folders(cfg)
    keep = {r["key"] for folder in folders for r in read_jsonl(folder / "samples.jsonl")}
    out = cache.prune(keep, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    Console().print(
        f"{verb} {out['removed_samples']} samples ({out['rewritten_shards']} shards rewritten, "
        f"{out['deleted_shards']} deleted); kept {len(keep)}, selected by {', '.join(f.name for f in folders)}"
    )


def _prep_folders(cfg: Any) -> list[Path]:
    """The prep folders whose samples live in `cfg`'s cache: its own, and every folder under
    `<workdir>/prep/` whose saved config names the same cache (one it cannot read counts: keep, not lose)."""
    from flowspeed.configs import load_config

    def same_cache(folder: Path) -> bool:
        try:
            saved = load_config(folder / "config.yaml", check=False)
        except Exception:  # noqa: BLE001 - an unreadable config: its samples are kept
            return True
        return saved.cache_dir.resolve() == cfg.cache_dir.resolve()

    found = {p.parent for p in (cfg.workdir / "prep").glob("*/samples.jsonl") if same_cache(p.parent)}
    own = {cfg.prep_dir} if (cfg.prep_dir / "samples.jsonl").is_file() else set()
    return sorted(own | found)


models_app = typer.Typer(help="Model families, their named real variants and parameter counts (no weights needed).")
app.add_typer(models_app, name="models")


def _quiet_model_libraries() -> None:
    """Building on the meta device needs no workdir or hub; keep library chatter off stdout."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()


def _billions(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n:,}"


@models_app.command("list")
def models_list(debug: DebugOpt = False) -> None:
    """Families, the variants `models inspect` builds (tiny = the training preset) and what each trains for."""
    _quiet_model_libraries()
    try:
        from flowspeed.engines.models import known_families
        from flowspeed.engines.models.variants import family_summary

        rows = [family_summary(f) for f in known_families()]
    except _errors() as exc:  # one paragraph; --debug for the traceback
        _fail("models list", exc, debug)
    table = Table(title="model families")
    for col in ("family", "denoiser", "variants", "tasks"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["family"], r["denoiser"], ", ".join(r["variants"]), ", ".join(r["tasks"]))
    Console().print(table)


@models_app.command("inspect")
def models_inspect(
    family: Annotated[str, typer.Argument(help="model family, e.g. cogvideox (see `flowspeed models list`)")],
    variant: Annotated[str, typer.Option("--variant", "-v", help="named variant, e.g. cogvideox-5b")] = "tiny",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
    debug: DebugOpt = False,
) -> None:
    """Build a variant on the meta device (no memory, no weights) and print its parameter counts."""
    _quiet_model_libraries()
    try:
        from flowspeed.engines.models.variants import parameter_counts

        counts = parameter_counts(family, variant)
    except _errors() as exc:  # unknown family/variant: one paragraph listing the known ones
        _fail("models inspect", exc, debug)
    if as_json:
        import json

        typer.echo(json.dumps(counts))
        return
    table = Table(title=f"{family} / {variant}")
    table.add_column("component", style="bold")
    table.add_column("parameters", justify="right")
    for part, n in counts["components"].items():
        table.add_row(part, f"{_billions(n)}  ({n:,})")
    table.add_row(f"trainable {counts['denoiser']}", f"{_billions(counts['parameters'])}  ({counts['parameters']:,})")
    if counts["published"]:
        off = 100 * (counts["parameters"] - counts["published"]) / counts["published"]
        stated = f"{_billions(counts['published'])} ({off:+.2f}%), stated as {counts['published_as']}"
        table.add_row("published", stated)
        from rich.markup import escape

        table.add_row("source", escape(counts["source"]))  # "FLUX.1 [dev]" is not markup
    Console().print(table)


convert_app = typer.Typer(help="Hugging Face decoder folders <-> megatron-core TP/PP shards, and resharding.")
app.add_typer(convert_app, name="convert")
TpOpt = Annotated[int, typer.Option("--tp", min=1, help="tensor parallel size")]
PpOpt = Annotated[int, typer.Option("--pp", min=1, help="pipeline parallel size")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output folder")]


def _convert(command: str, debug: bool, do: Any) -> Any:
    """Quiet libraries, run one conversion, turn its failure into one paragraph and exit 1."""
    _quiet_model_libraries()
    try:
        return do()
    except _errors() as exc:  # one paragraph; --debug for the traceback
        _fail(f"convert {command}", exc, debug)


def _megatron_written(out: Path) -> None:
    from flowspeed.engines.megatron.checkpoint_io import read_meta

    meta = read_meta(out)
    Console().print(
        f"wrote {meta.tp * meta.pp} shards (tp={meta.tp}, pp={meta.pp}) of a {meta.shape.model_type} decoder, "
        f"{_billions(meta.parameters)} parameters ({meta.parameters:,}) -> [bold]{out}[/]",
        soft_wrap=True,
    )


@convert_app.command("hf-to-megatron")
def convert_hf_to_megatron(
    hf_dir: Annotated[Path, typer.Argument(help="a HF model folder: config.json + safetensors weights")],
    out_dir: Annotated[Path, typer.Argument(help="the megatron folder to write")],
    tp: TpOpt = 1,
    pp: PpOpt = 1,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Split a Llama/Qwen2/Mistral (or Qwen2-VL) HF folder into megatron-core shards at (tp, pp)."""
    from flowspeed.engines.megatron.checkpoint_io import save_megatron

    out = _convert("hf-to-megatron", debug, lambda: save_megatron(hf_dir, out_dir, tp, pp, overwrite=overwrite))
    _megatron_written(out)


@convert_app.command("megatron-to-hf")
def convert_megatron_to_hf(
    megatron_dir: Annotated[Path, typer.Argument(help="a folder written by `flowspeed convert hf-to-megatron`")],
    out_dir: Annotated[Path, typer.Argument(help="the HF folder to write (model.safetensors + configs)")],
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Join megatron shards back into a HF folder that from_pretrained loads, with the original key names."""
    from flowspeed.engines.megatron.checkpoint_io import HF_WEIGHTS, read_meta, save_hf

    out = _convert("megatron-to-hf", debug, lambda: save_hf(megatron_dir, out_dir, overwrite=overwrite))
    meta = read_meta(megatron_dir)
    Console().print(
        f"joined {meta.tp * meta.pp} shards (tp={meta.tp}, pp={meta.pp}) into {HF_WEIGHTS}, "
        f"{_billions(meta.parameters)} parameters ({meta.parameters:,}) -> [bold]{out}[/]",
        soft_wrap=True,
    )


@convert_app.command("reshard")
def convert_reshard(
    megatron_dir: Annotated[Path, typer.Argument(help="a folder written by `flowspeed convert`")],
    out_dir: Annotated[Path, typer.Argument(help="the megatron folder to write at the new layout")],
    tp: TpOpt = 1,
    pp: PpOpt = 1,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rewrite megatron shards at another (tp, pp) layout."""
    from flowspeed.engines.megatron.checkpoint_io import reshard

    out = _convert("reshard", debug, lambda: reshard(megatron_dir, out_dir, tp, pp, overwrite=overwrite))
    _megatron_written(out)


def main() -> None:
    """The `flowspeed` entry point. Once the command is done, the process ends through `exit_without_teardown`:
    Python's own shutdown without tearing the interpreter down module by module (1.5-3 s of a 10 s cached rerun on
    the dev machine)."""
    try:
        app(prog_name="flowspeed")
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    except _errors() as exc:  # whatever a command let through: still one paragraph, never a bare traceback
        try:
            command = next((a for a in sys.argv[1:2] if not a.startswith("-")), "command")
            _fail(command, exc, "--debug" in sys.argv)
        except typer.Exit as done:
            code = done.exit_code
    if code is not None and not isinstance(code, int):  # a message to print: Python's own exit does it
        raise SystemExit(code)
    exit_without_teardown(code or 0)


if __name__ == "__main__":
    sys.exit(main())
