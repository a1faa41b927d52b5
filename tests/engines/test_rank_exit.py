"""How a finished torchrun rank (and the CLI) ends: `run_rank` / `exit_without_teardown`.

A 2-rank CPU eval in CI finished its work and then rank 1 died by SIGABRT ("terminate called without an active
exception"), failing the job, in two of the recent fresh-clone runs of the suite. The abort came from the interpreter's
finalization: torch keeps process groups alive after `destroy_process_group()` (DTensor's sharding caches hold
device meshes, which hold their groups), so gloo's worker threads still run while Python finalizes. A core dump of a
2-rank gloo job that aborted the same way shows the worker freeing a finished all_gather's output tensor, asking for
the GIL, being ended with `pthread_exit` by the finalizing interpreter, and the unwind through C++ calling
std::terminate. The ranks now end as Python's shutdown begins (threads joined, atexit hooks, streams flushed) and
skip the finalization itself. These tests pin that contract; the race itself is too rare to reproduce on demand (1
abort in about 50 runs of such a job on a loaded 2-core machine).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = """
import atexit, sys, threading, time
from flowspeed.engines.common.lifetime import run_rank

class Teardown:
    def __del__(self):
        print("finalized", flush=True)

kept = Teardown()  # a module global: only the interpreter's finalization deletes it

def main():
    atexit.register(lambda: print("atexit hook ran", flush=True))
    threading.Thread(target=lambda: (time.sleep(0.2), print("worker thread joined", flush=True))).start()
    sys.stdout.write("buffered line")  # no newline on a pipe: still in the buffer at exit
    {body}

{ending}
"""


def _run(tmp_path: Path, body: str, ending: str = "run_rank(main)") -> subprocess.CompletedProcess:
    path = tmp_path / "rank.py"
    path.write_text(SCRIPT.format(body=body, ending=ending))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_a_finished_rank_ends_like_python_without_finalizing(tmp_path: Path) -> None:
    done = _run(tmp_path, "return None")
    assert done.returncode == 0, done.stderr
    assert "worker thread joined" in done.stdout and "atexit hook ran" in done.stdout
    assert "buffered line" in done.stdout
    assert "finalized" not in done.stdout
    # the control: the same script ending as Python does finalizes its module (so the check above can fail)
    plain = _run(tmp_path, "return None", ending="main()")
    assert plain.returncode == 0 and "finalized" in plain.stdout


@pytest.mark.parametrize(
    ("body", "code", "said"),
    [
        ("raise RuntimeError('the eval broke')", 1, "RuntimeError: the eval broke"),
        ("sys.exit(3)", 3, ""),
        ("sys.exit('bad arguments')", 1, "bad arguments"),
    ],
)
def test_a_failed_rank_keeps_its_status_and_traceback(tmp_path: Path, body: str, code: int, said: str) -> None:
    done = _run(tmp_path, body)
    assert done.returncode == code
    assert said in done.stderr
    if code == 1 and "RuntimeError" in said:
        assert "Traceback (most recent call last)" in done.stderr
    assert "atexit hook ran" in done.stdout and "finalized" not in done.stdout


def _torchrun_ranks() -> list[Path]:
    """The package's modules that torchrun starts as ranks: those whose `main` carries torchrun's `@record`."""
    packages = ("configs", "datasets_prep", "engines", "evaluation", "flows", "tasks")
    return sorted(p for top in packages for p in (REPO / top).rglob("*.py") if "\n@record\n" in p.read_text())


def test_every_torchrun_rank_ends_through_run_rank() -> None:
    ranks = _torchrun_ranks()
    names = {str(p.relative_to(REPO)) for p in ranks}
    assert {"evaluation/run.py", "datasets_prep/prep.py", "engines/torch_engine/trainer.py",
            "engines/megatron/trainer.py", "engines/tracking/parallel_predict.py"} <= names  # fmt: skip
    for path in ranks:
        tree = ast.parse(path.read_text())
        mains = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert len(mains) == 1, path
        calls = {ast.unparse(c.func) for c in ast.walk(mains[0]) if isinstance(c, ast.Call)}
        assert "run_rank" in calls, f"{path.relative_to(REPO)}: end the rank with run_rank(main)"
        assert textwrap.dedent(ast.unparse(mains[0])).count("main()") == 0, path  # not also a plain call
