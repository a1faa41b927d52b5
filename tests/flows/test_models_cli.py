"""`flowspeed models list|inspect`: meta-device builds, one JSON object, one-paragraph errors."""

import json
import subprocess
import sys

from tests.conftest import REPO


def flowspeed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flowspeed.flows.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_models_list_shows_families_variants_and_tasks() -> None:
    """In-process, as the refusals below (a CLI subprocess pays ~6 s of imports)."""
    from flowspeed.flows.cli import app
    from typer.testing import CliRunner

    out = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["models", "list"])
    assert out.exit_code == 0, out.output
    for name in ("cogvideox", "sd3", "flux", "sdxl", "tiny", "cogvideox-5b", "t2v", "t2i", "lora"):
        assert name in out.stdout


def test_models_inspect_json_is_one_object_with_the_counts() -> None:
    out = flowspeed("models", "inspect", "cogvideox", "--variant", "cogvideox-2b", "--json")
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)  # the whole of stdout: exactly one object
    assert counts["family"] == "cogvideox" and counts["variant"] == "cogvideox-2b"
    # published 1,693,783,872 (released THUDM/CogVideoX-2b transformer weights; the card says "2B")
    assert abs(counts["parameters"] - 1_693_783_872) <= 0.01 * 1_693_783_872
    assert counts["components"]["transformer"] == counts["parameters"]
    assert set(counts["components"]) == {"transformer", "text_encoder", "vae"}


def test_models_inspect_unknown_names_fail_with_one_paragraph() -> None:
    """In-process (each CLI subprocess pays ~6 s of imports): exit 1, the known names, no traceback."""
    from flowspeed.flows.cli import app
    from typer.testing import CliRunner

    runner = CliRunner(env={"COLUMNS": "400"})
    out = runner.invoke(app, ["models", "inspect", "cogvideox", "--variant", "cogvideox-50b", "--json"])
    assert out.exit_code == 1 and out.stdout == ""
    assert "known variants: tiny, cogvideox-2b, cogvideox-5b" in out.stderr
    assert "Traceback" not in out.stderr
    out = runner.invoke(app, ["models", "inspect", "sora"])
    assert out.exit_code == 1 and "known families: cogvideox" in out.stderr and "Traceback" not in out.stderr
