"""What a served export needs installed: `flowspeed` at the version that wrote it, its dependencies as installed.

The pyfunc model's loader (`flowspeed.engines.tracking.serving`) is part of the flowspeed distribution, so
the model's code travels as a pinned requirement, not as copied files: MLflow's `code_paths` would put a
second `flowspeed/` portion on sys.path, which Python merges into the installed namespace package, so two
versions' modules would mix. Everything else is flowspeed's own base dependencies, each pinned to the
version installed when the model was written (the environment its eval ran in), as MLflow pins what it
infers; the local version label (`+cu128`) is dropped, as MLflow does, so pip can resolve it from PyPI.

    pip_requirements()  # ["flowspeed==0.1.0", "av==18.1.0", ..., "torch==2.14.1", ...]
    pip_requirements(["video-decode"])  # ["flowspeed[video-decode]==0.1.0", ..., "decord==0.6.0", ...]

Imports nothing heavy: the pipeline's cheap "is the MLmodel current" check calls it on every rerun.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement
from packaging.version import Version

DISTRIBUTION = "flowspeed"
#: what the loader imports that flowspeed does not declare itself: mlflow's pyfunc and its default
#: requirement (mlflow.pyfunc.get_default_pip_requirements), and pandas (predict's input and output)
SERVING_IMPORTS = ("mlflow", "cloudpickle", "pandas")


def pinned(name: str) -> str | None:
    """`name==<installed public version>`, or None when `name` is not installed here."""
    try:
        return f"{name}=={Version(version(name)).public}"
    except PackageNotFoundError:
        return None


def pip_requirements(extras: Sequence[str] = ()) -> list[str]:
    """flowspeed (with `extras`, those of its extras a prediction needs) pinned to the installed version, then its
    base dependencies, the extras' dependencies and what the loader imports besides, each pinned as installed."""
    try:
        own = Version(version(DISTRIBUTION)).public
    except PackageNotFoundError as exc:
        raise RuntimeError(
            "flowspeed is not installed as a distribution, so a served model cannot name the version that loads it: "
            "install it (`pip install -e .` in a checkout, or `pip install flowspeed`)"
        ) from exc
    head = f"{DISTRIBUTION}[{','.join(extras)}]=={own}" if extras else f"{DISTRIBUTION}=={own}"
    names: list[str] = []
    for line in requires(DISTRIBUTION) or []:
        req = Requirement(line)
        wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ["", *extras])
        if wanted and req.name != DISTRIBUTION:
            names.append(req.name)
    names += [n for n in SERVING_IMPORTS if n not in names]
    pins = [p for p in (pinned(n) for n in names) if p is not None]
    return [head, *sorted(set(pins), key=str.lower)]
