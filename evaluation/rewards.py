"""Rewards: what GRPO and flow GRPO maximise while training, and what `eval/reward` measures on held-out data.

    reward = build_reward([RewardConfig(name="exact_answer"), RewardConfig(name="format", pattern=r"\\d+")])
    reward.text(answers, references, prompts)   # (N,) float tensor: answering families
    reward.media(frames, prompts)               # (N,) float tensor: generating families, frames (N, T, H, W, 3)

A reward is a weighted sum of terms. Built-ins score answers ("text": `exact_answer`, `format`) or samples ("media":
`brightness`, `clip_score` with an open_clip model from a local weight file); any other term is a callable named
`package.module:function` with the built-ins' arguments of its kind:

    def my_text_reward(answers: list[str], references: list[str], prompts: list[str]) -> list[float]: ...
    def my_media_reward(frames: np.ndarray, prompts: list[str]) -> list[float]: ...   # frames uint8 (N, T, H, W, 3)

The training methods and the eval use the same object, so a reward gained in training is the one the registry gate
reads (`eval/reward`).
"""

from __future__ import annotations

import importlib
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flowspeed.configs.catalog import REWARDS
from flowspeed.configs.schema import ClipConfig, RewardConfig

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """The comparable form of an answer: the `<answer>...</answer>` part when there is one (R1-style prompts),
    lower-cased, surrounding whitespace and punctuation stripped, inner whitespace collapsed."""
    found = _ANSWER_TAG.search(text)
    if found:
        text = found.group(1)
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def exact_answer(answers: list[str], references: list[str], prompts: list[str]) -> list[float]:
    """1 where the normalised answer equals the normalised reference, else 0."""
    return [float(normalize_answer(a) == normalize_answer(r)) for a, r in zip(answers, references, strict=True)]


def format_reward(pattern: str) -> Callable[[list[str], list[str], list[str]], list[float]]:
    """1 where the whole (stripped) answer matches `pattern`, else 0: the R1-style format reward."""
    compiled = re.compile(pattern, re.DOTALL)

    def score(answers: list[str], references: list[str], prompts: list[str]) -> list[float]:
        return [float(compiled.fullmatch(a.strip()) is not None) for a in answers]

    return score


def brightness(frames: np.ndarray, prompts: list[str]) -> list[float]:
    """Mean pixel value of each sample in [0, 1]: a synthetic reward whose optimum is obvious (tests, demos)."""
    x = np.asarray(frames, dtype=np.float32)
    if np.issubdtype(np.asarray(frames).dtype, np.integer):
        x = x / 255.0
    return x.reshape(x.shape[0], -1).mean(1).tolist()


def clip_reward(cfg: ClipConfig, device: torch.device) -> Callable[[np.ndarray, list[str]], list[float]]:
    """Each sample's CLIP cosine with its prompt (mean over its frames), x 100 as CLIP score reads, unclamped so a
    weak model's negative scores still rank samples."""
    from flowspeed.evaluation.clip_score import frame_cosines, load_clip

    clip = load_clip(cfg, device)

    def score(frames: np.ndarray, prompts: list[str]) -> list[float]:
        return [100 * frame_cosines(clip, v, p, device).mean().item() for v, p in zip(frames, prompts, strict=True)]

    return score


def reward_prompt(messages: list[dict[str, str]]) -> str:
    """The question a conversation's last answer answers (its last user turn before that answer): what a text
    reward's `prompts` receive, in GRPO's rollouts and in the eval alike."""
    turns = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    users = [m["content"] for m in turns if m["role"] == "user"]
    return users[-1] if users else ""


def load_callable(spec: str) -> Callable[..., Any]:
    """`package.module:function` -> the function, with an error naming what is missing."""
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {spec!r}: cannot load {attr!r} from module {module!r} ({exc})") from exc
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


@dataclass
class Term:
    name: str
    weight: float
    kind: str  # "text" or "media"; "any" for a callable (the caller's kind)
    fn: Callable[..., Any]


class Reward:
    """A weighted sum of reward terms; `terms` is public so a method can log each term."""

    def __init__(self, terms: list[Term]) -> None:
        if not terms:
            raise ValueError("no reward terms: set train.method.rewards (or eval.rewards)")
        self.terms = terms

    def _sum(self, kind: str, n: int, *args: Any) -> torch.Tensor:
        total = torch.zeros(n, dtype=torch.float64)
        for t in self.terms:
            if t.kind not in (kind, "any"):
                raise ValueError(f"reward {t.name} scores {t.kind}, not {kind}")
            values = torch.as_tensor(list(t.fn(*args)), dtype=torch.float64)
            if values.shape != (n,):
                raise ValueError(f"reward {t.name} gave {tuple(values.shape)} values for {n} samples")
            if not torch.isfinite(values).all():
                raise ValueError(f"reward {t.name} gave a non-finite value: {values.tolist()}")
            total += t.weight * values
        return total.float()

    def text(self, answers: list[str], references: list[str], prompts: list[str]) -> torch.Tensor:
        return self._sum("text", len(answers), answers, references, prompts)

    def media(self, frames: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """`frames`: uint8 (N, T, H, W, 3) (an image is T = 1)."""
        return self._sum("media", len(frames), frames, prompts)


def build_reward(
    configs: list[RewardConfig], clip: ClipConfig | None = None, device: torch.device | None = None
) -> Reward:
    """The `Reward` of a config's terms; `clip` is the CLIP a `clip_score` term without its own uses."""
    device = device or torch.device("cpu")
    terms = []
    for c in configs:
        if ":" in c.name:
            terms.append(Term(c.name, c.weight, "any", load_callable(c.name)))
        elif c.name == "exact_answer":
            terms.append(Term(c.name, c.weight, REWARDS[c.name], exact_answer))
        elif c.name == "format":
            if not c.pattern:
                raise ValueError("the format reward needs `pattern`")
            terms.append(Term(c.name, c.weight, REWARDS[c.name], format_reward(c.pattern)))
        elif c.name == "brightness":
            terms.append(Term(c.name, c.weight, REWARDS[c.name], brightness))
        elif c.name == "clip_score":
            terms.append(Term(c.name, c.weight, REWARDS[c.name], clip_reward(c.clip or clip or ClipConfig(), device)))
        else:
            raise ValueError(f"unknown reward {c.name!r}; built-ins: {', '.join(REWARDS)}, or `module:function`")
    return Reward(terms)
