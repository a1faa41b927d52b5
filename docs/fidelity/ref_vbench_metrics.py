"""Reference VBench scores for tests/evaluation/test_generation_metrics.py, from VBench's own per-video and set code.

Run once (never in CI), with the project venv and VBench's v0.1.5 tree (github:Vchitect/VBench@v0.1.5):

    git --git-dir=<mirror> archive v0.1.5 vbench/temporal_flickering.py vbench/motion_smoothness.py \
        vbench/background_consistency.py vbench/subject_consistency.py vbench/utils.py vbench/distributed.py \
        vbench/third_party/amt/utils vbench/__init__.py | tar -x -C /tmp/h17speech/VBench
    PYTHONPATH=/tmp/h17speech/VBench:. .venv/bin/python docs/fidelity/ref_vbench_metrics.py

What is stubbed, and why the numbers still test the formulas:
- Video files: VBench reads each video from disk (cv2 / decord); here `get_frames` / `load_video` hand it the
  seeded uint8 clips directly, so both sides score the same pixels (no codec in between).
- Encoders: `clip` (OpenAI CLIP ViT-B/32) and the DINO ViT-B/16 hub model are replaced by encoders that return
  fixed seeded features per frame (8-d, so some cosines are negative and VBench's max(0, cos) clamp matters);
  VBench's preprocessing transform still runs on the frames, its output is ignored by the stub.
- Motion smoothness: the AMT-S interpolation network is replaced by the linear interpolator (in_0 + in_1) / 2 on
  VBench's own [0, 1] float32 tensors; everything else (even-frame extraction, replicate padding to a multiple of 16,
  `tensor2img` truncation to uint8, the odd-frame MAE and (255 - mae) / 255) is VBench's code. This is exactly the
  metric we compute (motion smoothness with a linear interpolator), so the numbers must agree to float32 rounding.
- `omegaconf`, `imageio` and `clip` are imported by those modules but not used on these paths: empty shims.
Prints Python literals that the tests hold.
"""

import sys
import types

for name in ("clip", "omegaconf", "imageio"):
    shim = types.ModuleType(name)
    shim.OmegaConf = None
    shim.imread = shim.imwrite = None
    sys.modules[name] = shim

import numpy as np  # noqa: E402
import torch  # noqa: E402
import vbench.background_consistency as vb_bg  # noqa: E402
import vbench.motion_smoothness as vb_ms  # noqa: E402
import vbench.subject_consistency as vb_sc  # noqa: E402
import vbench.temporal_flickering as vb_tf  # noqa: E402

from tests.fidelity import seeded_tensor  # noqa: E402

H, W, D = 20, 28, 8  # 20 x 28 is not a multiple of 16: AMT's replicate padding runs


def seeded_video_sized(name: str, frames: int, h: int, w: int) -> np.ndarray:
    """(T, h, w, 3) uint8: a random walk over frames around mid-grey (same recipe as the test)."""
    walk = seeded_tensor(name, (frames, h, w, 3), 0, scale=12.0).cumsum(0) + 128.0
    return walk.clamp(0, 255).round().to(torch.uint8).numpy()


def seeded_video(name: str, frames: int) -> np.ndarray:
    return seeded_video_sized(name, frames, H, W)


def seeded_features(name: str, frames: int) -> torch.Tensor:
    """(T, 8) float32: a shared direction plus per-frame noise, so cosines are mostly positive, some negative."""
    return seeded_tensor("shared", (D,), 0, scale=0.6) + seeded_tensor(name, (frames, D), 0, scale=1.0)


def flickering() -> None:
    videos = {f"v{t}": seeded_video(f"v{t}", t) for t in (2, 5, 8)}
    vb_tf.get_frames = lambda path: list(videos[path])
    avg, per_video = vb_tf.temporal_flickering(list(videos))
    print("temporal_flickering per video:", {r["video_path"]: float(r["video_results"]) for r in per_video})
    print("temporal_flickering set:", float(avg))
    with np.errstate(all="ignore"):
        one = {"v1": seeded_video("v1", 1)}
        vb_tf.get_frames = lambda path: list(one[path])
        print("temporal_flickering, one frame:", vb_tf.cal_score("v1"))


class _Linear(torch.nn.Module):
    def forward(self, in_0, in_1, embt, scale_factor=1.0, eval=True):  # noqa: A002 - AMT's call signature
        return {"imgt_pred": (in_0 + in_1) / 2}


def smoothness() -> None:
    videos = {f"m{t}": seeded_video(f"m{t}", t) for t in (3, 4, 7, 8)}
    motion = vb_ms.MotionSmoothness.__new__(vb_ms.MotionSmoothness)
    motion.device, motion.niters = "cpu", 1
    motion.initialization()
    motion.model = _Linear()
    motion.fp.get_frames = lambda path: list(videos[path.removesuffix(".mp4")])
    avg, per_video = vb_ms.motion_smoothness(motion, [f"{k}.mp4" for k in videos])
    print(
        "motion_smoothness (linear interpolator) per video:",
        {r["video_path"]: float(r["video_results"]) for r in per_video},
    )
    print("motion_smoothness set:", float(avg))


def consistency() -> None:
    lengths = {"c2": 2, "c5": 5, "c9": 9}
    feats = {k: seeded_features(k, t) for k, t in lengths.items()}
    videos = {k: torch.from_numpy(seeded_video(k, t)).permute(0, 3, 1, 2) for k, t in lengths.items()}
    current = {}

    def load_video(path, *args, **kwargs):
        current["name"] = path
        return videos[path]

    class Clip:  # encode_image on the whole (preprocessed) clip, as background_consistency calls it
        def encode_image(self, images):
            assert images.shape[0] == lengths[current["name"]]
            return feats[current["name"]].clone()

    vb_bg.load_video = load_video
    avg, per_video = vb_bg.background_consistency(Clip(), None, list(videos), "cpu", read_frame=False)
    print("background_consistency per video:", {r["video_path"]: r["video_results"] for r in per_video})
    print("background_consistency set (sim / cnt):", avg)

    class Dino:  # called once per frame, in order
        def __call__(self, image):
            i = current["frame"]
            current["frame"] += 1
            return feats[current["name"]][i : i + 1].clone()

    def load_video_sc(path, *args, **kwargs):
        current["frame"] = 0
        return load_video(path)

    vb_sc.load_video = load_video_sc
    avg, per_video = vb_sc.subject_consistency(Dino(), list(videos), "cpu", read_frame=False)
    print("subject_consistency per video:", {r["video_path"]: r["video_results"] for r in per_video})
    print("subject_consistency set (sim / cnt):", avg)


def dino_input() -> None:
    """VBench's DINO preprocessing (vbench/utils.py dino_transform(224)) on a (2, 40, 64, 3) clip."""
    from vbench.utils import dino_transform

    video = torch.from_numpy(seeded_video_sized("dino", 2, 40, 64)).permute(0, 3, 1, 2)
    x = dino_transform(224)(video)
    print(
        "dino_transform(224):",
        tuple(x.shape),
        "sum",
        x.double().sum().item(),
        "x[1, 2, 100, :4]",
        x[1, 2, 100, :4].tolist(),
    )


if __name__ == "__main__":
    dino_input()
    flickering()
    smoothness()
    consistency()
