"""Each optional stack (a pip extra) missing is refused where it is first needed, with the install line.

"Missing" is simulated the way Python itself reports an absent module: `sys.modules[name] = None` makes
`import name` raise ModuleNotFoundError and `importlib.util.find_spec(name)` answer None, in a child
process so this one keeps its real imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flowspeed.configs import load_config, stage_problems

from tests.conftest import QUICKSTART

CHILD = """
import json, sys
from pathlib import Path
for name in ("decord", "scenedetect", "cv2", "jiwer", "megatron"):
    sys.modules[name] = None

import numpy as np
from flowspeed.configs import load_config, stage_problems
from flowspeed.configs.schema import SceneSplitConfig
from flowspeed.engines.common.extras import MissingExtraError

out = {}

def refusal(key, fn):
    try:
        fn()
    except MissingExtraError as exc:
        out[key] = str(exc)

from flowspeed.datasets_prep.decode import decode
from flowspeed.datasets_prep.probe import probe
info = probe(Path(sys.argv[1]))
refusal("decode", lambda: decode(info, [0, 1], "decord"))
out["pyav_used"] = decode(info, [0, 1], "pyav")[1]

from flowspeed.datasets_prep import curate
refusal("scenes", lambda: curate.detect_scenes(Path(sys.argv[1]), SceneSplitConfig(enabled=True)))
refusal("motion", lambda: curate.motion_score(np.zeros((2, 8, 8, 3), np.uint8)))
refusal("speech", lambda: __import__("flowspeed.evaluation.speech_metrics"))

# the rank's first megatron-core import (the launcher's validate calls the same guard before torchrun; importing
# that module costs seconds of model-library imports)
from flowspeed.engines.megatron.setup import init_model_parallel
refusal("megatron_launch", init_model_parallel)
megatron = load_config("qwen2_vl-sft-megatron")

quickstart = load_config(sys.argv[2], ["data.decoder=decord", "data.curate.motion.enabled=true"])
out["stage_prep"] = stage_problems(quickstart, "prep")
out["stage_train"] = stage_problems(megatron, "train")
out["stage_eval"] = stage_problems(load_config("whisper-asr"), "eval")
print(json.dumps(out))
"""


def test_a_missing_extra_is_refused_with_its_install_line(demo_manifest: Path) -> None:
    clip = next((demo_manifest.parent / "videos").glob("*.mp4"))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(clip), str(QUICKSTART)], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])

    line = "pip install 'flowspeed[{}]'"
    assert (
        out["decode"] == "data.decoder: decord needs decord, which is not installed here: "
        f"{line.format('video-decode')}, or use data.decoder: pyav"
    )
    assert out["pyav_used"] == "pyav"  # the core decoder still works, and falls back to nothing missing
    assert (
        out["scenes"].startswith("data.curate.scene_split needs scenedetect") and line.format("curate") in out["scenes"]
    )
    assert "opencv-python-headless" in out["motion"] and line.format("curate") in out["motion"]
    assert "jiwer" in out["speech"] and line.format("speech") in out["speech"]
    assert "megatron-core" in out["megatron_launch"] and line.format("megatron") in out["megatron_launch"]

    # the config checks a stage runs before writing anything say the same, for each stage's own stacks
    assert any(line.format("video-decode") in p and "data.decoder: pyav" in p for p in out["stage_prep"])
    assert any(line.format("curate") in p and "data.curate.motion" in p for p in out["stage_prep"])
    assert any(line.format("megatron") in p and "train.engine: megatron" in p for p in out["stage_train"])
    assert any(line.format("speech") in p for p in out["stage_eval"])


def test_installed_extras_are_not_refused() -> None:
    """The same configs here, where every extra is installed (the dev extra): no install line anywhere."""
    configs = {
        "prep": load_config(QUICKSTART, ["data.decoder=decord", "data.curate.motion.enabled=true"]),
        "train": load_config("qwen2_vl-sft-megatron"),
        "eval": load_config("whisper-asr"),
    }
    problems = [p for stage, cfg in configs.items() for p in stage_problems(cfg, stage)]
    assert not [p for p in problems if "pip install 'flowspeed[" in p]
