"""Reference CLIP scores and Fréchet distances for tests/evaluation/test_generation_metrics.py.

Run once (never in CI), with the project venv and the reference scorers installed outside it:

    .venv/bin/pip install --no-deps --target /tmp/h17speech/pkgs torchmetrics==1.9.0 lightning-utilities==0.15.3 \
        pytorch-fid==0.3.0
    PYTHONPATH=/tmp/h17speech/pkgs:. .venv/bin/python docs/fidelity/ref_generation_metrics.py

- CLIP score: torchmetrics 1.9.0 `CLIPScore` (torchmetrics/multimodal/clip_score.py: `update` sums 100 * cos per
  (image, text) pair, `compute` returns max(sum / n, 0)). Its CLIP network (a hub download) is replaced through its
  documented `model_name_or_path=callable` hook by a stand-in whose image features are the frame's pixels - 128
  and whose text features are fixed seeded vectors, so the same features reach both sides; the test feeds our
  `frame_cosines` a fake open_clip triple with the same two encoders.
- Fréchet distance: pytorch-fid 0.3.0 `fid_score.calculate_frechet_distance` (scipy sqrtm, eps retry) and
  torchmetrics 1.9.0 `FrechetInceptionDistance` with an identity feature extractor (its own float64 mean and
  (N-1) covariance accumulation, then `_compute_fid`, the eigenvalue form), on seeded feature sets: N > D, and
  N < D (singular covariances).
Prints Python literals that the tests hold.
"""

import types

import numpy as np
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore

from tests.fidelity import seeded_tensor

CLIP_D = 2 * 4 * 3  # a (2, 4, 3) frame is its own 24-d feature
# unequal video lengths, a single-frame clip, and how strongly each video leans towards its prompt (a negative
# lean gives a negative mean cosine, where the clamp order decides the score)
FRAMES = {"a": 1, "b": 4, "c": 6}
PROMPTS = {"a": "p0", "b": "p1", "c": "p2"}
LEAN = {"a": 0.5, "b": -0.15, "c": 0.25}


def text_feature(prompt: str) -> torch.Tensor:
    return seeded_tensor(f"text-{prompt}", (CLIP_D,), 0, scale=1.0)


def clip_video(name: str) -> np.ndarray:
    """(T, 2, 4, 3) uint8 frames, same recipe as the test."""
    lean = LEAN[name] * 40.0 * text_feature(PROMPTS[name]).view(2, 4, 3)
    x = seeded_tensor(f"clip-{name}", (FRAMES[name], 2, 4, 3), 0, scale=40.0) + lean + 128.0
    return x.clamp(0, 255).round().to(torch.uint8).numpy()


class _Processor:
    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):  # noqa: ANN001, ANN204
        if images is not None:
            return {"pixel_values": torch.stack([i.flatten() for i in images])}
        ids = torch.tensor([[int(t[1:])] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _Model(torch.nn.Module):
    config = types.SimpleNamespace()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.float() - 128.0

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([text_feature(f"p{int(i)}") for i in input_ids[:, 0]])


def clip_scores() -> None:
    def metric() -> CLIPScore:
        return CLIPScore(model_name_or_path=lambda: (_Model(), _Processor()))

    everything = metric()
    for name, frames in FRAMES.items():
        video = clip_video(name)
        images = [torch.from_numpy(f.reshape(-1)).view(CLIP_D, 1, 1) for f in video]  # 3-D, as torchmetrics needs
        one = metric()
        one.update(images, [PROMPTS[name]] * frames)
        everything.update(images, [PROMPTS[name]] * frames)
        feats = torch.nn.functional.normalize(torch.from_numpy(video.reshape(frames, -1)).float() - 128.0, dim=-1)
        cos = feats @ torch.nn.functional.normalize(text_feature(PROMPTS[name]), dim=-1)
        print(f"video {name}: torchmetrics CLIPScore {one.compute().item()!r}, cosines {cos.tolist()}")
        print(f"    per-frame clamp before the mean (our old rule): {(100 * cos.clamp(min=0)).mean().item()!r}")
    print("set of all three videos (one CLIPScore updated with every frame):", repr(everything.compute().item()))


def fid_sets(n: int, d: int, tag: str) -> tuple[np.ndarray, np.ndarray]:
    a = seeded_tensor(f"fid-a-{tag}", (n, d), 0, scale=1.0).double().numpy()
    mix = seeded_tensor(f"fid-mix-{tag}", (d, d), 0, scale=0.5).double().numpy()
    b = seeded_tensor(f"fid-b-{tag}", (n, d), 0, scale=1.0).double().numpy() @ (np.eye(d) + mix) + 0.3
    return a, b


def frechet() -> None:
    for n, d, tag in ((64, 12, "full"), (10, 16, "singular")):
        a, b = fid_sets(n, d, tag)
        mu_a, s_a = np.mean(a, axis=0), np.cov(a, rowvar=False)  # pytorch-fid's calculate_activation_statistics
        mu_b, s_b = np.mean(b, axis=0), np.cov(b, rowvar=False)
        ref = calculate_frechet_distance(mu_a, s_a, mu_b, s_b)
        tm = FrechetInceptionDistance(feature=torch.nn.Identity(), input_img_size=(d,), normalize=True)
        tm.inception.num_features = d
        tm.update(torch.from_numpy(a), real=True)
        tm.update(torch.from_numpy(b), real=False)
        print(f"N={n} D={d}: pytorch-fid {float(ref)!r}, torchmetrics FID {tm.compute().item()!r}")


if __name__ == "__main__":
    clip_scores()
    frechet()
