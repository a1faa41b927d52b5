"""Start-up cost does not grow with the zoo: the stage machinery imports no family's model library until the run
asks for that family, and then only that family's module (issue 19). Each check runs in a fresh interpreter,
since this test process has long imported everything. Timings are benchmarks/bench_startup.py's, never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from configs.catalog import FAMILIES

REPO = Path(__file__).resolve().parents[2]
FAMILY_MODULES = {facts.module for facts in FAMILIES.values()}


def imported_after(code: str) -> list[str]:
    """Module names loaded by `code` in a fresh interpreter (printed as JSON by the snippet)."""
    snippet = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_libraries(modules: list[str]) -> list[str]:
    """Family modules and the model code of diffusers/transformers (their import machinery is not model code)."""
    return [
        m
        for m in modules
        if m in FAMILY_MODULES or m.startswith(("diffusers", "transformers.models.", "engines.models.dits"))
    ]


def test_importing_the_stage_machinery_imports_no_family() -> None:
    """`import flows.stages` / `flows.pipeline` / `flows.cli` (what `flowspeed run` imports before any stage)
    loads no family module and no diffusers or transformers model code."""
    modules = imported_after("import flows.cli, flows.pipeline, flows.stages, tasks.stages")
    assert model_libraries(modules) == []
    assert "torch" not in modules  # a cached stage never needs it; training, prep and eval import it


def test_a_family_imports_only_its_own_module(tmp_path: Path) -> None:
    """`get_family('sd3')` imports sd3's module and the shared ones it builds on, no other family; and a new
    family needs only its module: a name the catalog does not list is found by importing the modules under
    engines/models one by one until it is registered (its catalog line is then a speed-up). One interpreter
    for both (a fresh one costs seconds of imports)."""
    (tmp_path / "aaa_sd3_copy.py").write_text(
        "from engines.models.registry import register_family\n"
        "from engines.models.sd3 import SD3\n\n\n"
        "class SD3Copy(SD3):\n"
        '    name = "sd3-copy"\n\n\n'
        "register_family(SD3Copy())\n"
    )
    assert "sd3-copy" not in FAMILIES
    code = (
        "from engines import models\n"
        f"models.__path__.insert(0, {str(tmp_path)!r})  # searched first, so the scan stops there\n"
        "from engines.models import get_family\n"
        "assert type(get_family('sd3-copy')).__name__ == 'SD3Copy'\n"
        "assert get_family('sd3').name == 'sd3'"
    )
    modules = imported_after(code)
    assert "engines.models.aaa_sd3_copy" in modules
    assert sorted(m for m in modules if m in FAMILY_MODULES) == ["engines.models.sd3"]
    assert "diffusers" in modules  # sd3's own library did load
