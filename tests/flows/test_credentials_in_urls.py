"""Team-mode credentials come from the environment: a password written into a server URL would be
printed in summaries and errors, stored in run tags and files, and visible in `ps` on the ranks'
command lines, so such a URL is refused before anything runs, without echoing the password."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flowspeed.configs import PipelineConfig
from flowspeed.engines.tracking.tracker import tracking_uri

from tests.conftest import QUICKSTART, REPO

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("uri", [f"http://flowspeed:{SECRET}@mlflow.internal:5000", f"https://u:{SECRET}@h/"])
def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them(uri: str, tmp_path: Path) -> None:
    cfg = PipelineConfig(workdir=tmp_path, tracking={"tracking_uri": uri})
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_USERNAME") as err:
        tracking_uri(cfg)
    assert SECRET not in str(err.value) and "carries credentials" in str(err.value)
    plain = PipelineConfig(workdir=tmp_path, tracking={"tracking_uri": "http://mlflow.internal:5000"})
    assert tracking_uri(plain) == "http://mlflow.internal:5000"


@pytest.mark.parametrize("var", ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"])
def test_the_cli_refuses_a_server_url_with_credentials_before_writing_anything(var: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env[var] = f"http://flowspeed:{SECRET}@127.0.0.1:9/" + ("api" if var == "PREFECT_API_URL" else "")
    demo = tmp_path / "data.jsonl"
    demo.write_text("")
    work = tmp_path / "work"
    out = subprocess.run([sys.executable, "-m", "flowspeed.flows.cli", "train", str(QUICKSTART), "--workdir", str(work),
                          "--set", f"data.manifest={demo}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", out.stdout + out.stderr).split())  # the error box wraps lines
    assert out.returncode == 1, text
    assert "carries credentials" in text and SECRET not in text.replace(" ", "")  # not even wrapped
    assert not work.exists()
