"""Megatron checkpoint folders on disk: HF folder -> megatron shards, the way back, and resharding.

A megatron folder holds what the way back needs to rebuild a HF folder that `from_pretrained` loads
with the original key names, so a conversion is a reversible step and not an export:

    megatron.json              format version, tp, pp, the DecoderShape, the HF decoder prefix and head key
    tp{t:02d}_pp{p:03d}.safetensors   one megatron state dict per (tensor rank, pipeline rank)
    hf_rest.safetensors        every HF tensor outside the decoder mapping (a VLM's vision tower, projector)
    hf/                        the HF folder's non-weight files (config, generation config, tokenizer, processor)

Every folder is written into a temp dir beside the target and renamed into place, so a reader (or a crash)
never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flowspeed.engines.common.io import replaced_dir
from flowspeed.engines.megatron.convert import Tensors, hf_to_megatron, megatron_to_hf
from flowspeed.engines.megatron.gpt import DecoderShape

FORMAT = "flowspeed-megatron"
VERSION = 1
META = "megatron.json"
REST = "hf_rest.safetensors"
HF_FILES = "hf"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
#: a VLM's text decoder types that are Qwen2 decoders under another name (same weights, same layout)
_QWEN2_ALIASES = ("qwen2_vl_text", "qwen2_vl", "qwen2_5_vl_text", "qwen2_5_vl")


@dataclass(frozen=True)
class MegatronMeta:
    """What megatron.json records: the layout, the decoder's shape and how its HF keys were named."""

    tp: int
    pp: int
    shape: DecoderShape
    hf_prefix: str  # "model." / "model.language_model." / "language_model.model." / ""
    hf_head_key: str | None  # the untied output head's HF key; None for tied embeddings
    architectures: tuple[str, ...]
    model_type: str
    parameters: int
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["format"] = FORMAT
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MegatronMeta:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(
                f"{META} is format {data.get('format')!r} version {data.get('version')!r}; "
                f"this flowspeed reads {FORMAT!r} version {VERSION}"
            )
        shape = dict(data["shape"])
        if shape.get("mrope_section") is not None:
            shape["mrope_section"] = tuple(shape["mrope_section"])
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values.update(shape=DecoderShape(**shape), architectures=tuple(data.get("architectures") or ()))
        return cls(**values)


def shard_name(tp_rank: int, pp_rank: int) -> str:
    """The file of one (tensor rank, pipeline rank) shard."""
    return f"tp{tp_rank:02d}_pp{pp_rank:03d}.safetensors"


class _TextConfigAs:
    """A text config seen under another model_type (reads everything else through)."""

    def __init__(self, config: Any, model_type: str) -> None:
        self._config, self.model_type = config, model_type

    def __getattr__(self, name: str) -> Any:
        if name == "text_config":
            raise AttributeError(name)
        return getattr(self._config, name)


def decoder_shape(config: Any) -> DecoderShape:
    """DecoderShape.from_hf, plus Qwen2-VL / Qwen2.5-VL text decoders, which are Qwen2 decoders with mrope.

    from_hf is tried first so its own support (and its refusal message for other models) wins.
    """
    try:
        return DecoderShape.from_hf(config)
    except ValueError:
        text = getattr(config, "text_config", None) or config
        if getattr(text, "model_type", None) not in _QWEN2_ALIASES:
            raise
        return DecoderShape.from_hf(_TextConfigAs(text, "qwen2"))


class _Recording(dict):
    """A state dict that remembers which keys were read: the rest is what the decoder mapping leaves out."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)


def _save(tensors: Tensors, path: Path) -> None:
    """safetensors refuses tensors that share storage (tied weights, views of one cat): give each its own."""
    from safetensors.torch import save_file

    save_file({k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()},
              str(path), metadata={"format": "pt"})  # fmt: skip


def _load(path: Path) -> Tensors:
    from safetensors.torch import load_file

    return load_file(str(path))


def _parameters(state: Tensors) -> int:
    return sum(v.numel() for v in state.values())


@contextlib.contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temp dir beside out_dir, renamed onto it when the block finishes; removed if the block raises."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir} already exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    with replaced_dir(out_dir) as tmp:
        yield tmp


def _weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / HF_INDEX).is_file():
        index = json.loads((hf_dir / HF_INDEX).read_text())
        return [hf_dir / name for name in sorted(set(index["weight_map"].values()))]
    if (hf_dir / HF_WEIGHTS).is_file():
        return [hf_dir / HF_WEIGHTS]
    raise ValueError(f"{hf_dir} has no {HF_WEIGHTS} or {HF_INDEX} (only safetensors weights are converted)")


def _is_weight_file(name: str) -> bool:
    return (
        name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
        or name == HF_INDEX
        or (name.startswith("pytorch_model") and name.endswith(".index.json"))
    )


def _copy_non_weights(src: Path, dst: Path, skip: set[Path]) -> None:
    """config, generation config, tokenizer and processor files: what from_pretrained needs besides weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.resolve() in skip or item.name.startswith(".") or _is_weight_file(item.name):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


def read_hf(hf_dir: Path) -> tuple[Any, Tensors]:
    """A HF folder's config and its whole state dict (one file or a sharded index), as saved on disk."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ValueError(f"{hf_dir} is not a folder")
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir} has no config.json: not a Hugging Face model folder")
    files = _weight_files(hf_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    state: Tensors = {}
    for path in files:
        state.update(_load(path))
    return config, state


def _write_shards(tmp: Path, state: Tensors, shape: DecoderShape, tp: int, pp: int) -> tuple[set[str], str, str | None]:
    """Every (tp, pp) shard into tmp; returns the HF keys the decoder mapping read, its prefix and head key."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor and pipeline parallel sizes must be at least 1, got tp={tp} pp={pp}")
    recording = _Recording(state)
    for p in range(pp):
        for t in range(tp):
            _save(hf_to_megatron(recording, shape, tp, t, pp, p), tmp / shard_name(t, p))
    prefix = next(k.removesuffix("embed_tokens.weight") for k in recording.read if k.endswith("embed_tokens.weight"))
    head = None if shape.tied_embeddings else next(k for k in recording.read if k.endswith("lm_head.weight"))
    return recording.read, prefix, head


def _fit_tying(shape: DecoderShape, config: Any, state: Tensors) -> DecoderShape:
    """A VLM may tie on its top-level config while its text_config says untied: follow what the file holds."""
    heads = ("lm_head.weight", "language_model.lm_head.weight")
    if not shape.tied_embeddings and not any(k in state for k in heads) and getattr(config, "tie_word_embeddings", 0):
        return dataclasses.replace(shape, tied_embeddings=True)
    return shape


def save_megatron(hf_dir: Path, out_dir: Path, tp: int, pp: int, *, overwrite: bool = False) -> Path:
    """A HF decoder folder -> a megatron folder at (tp, pp) that save_hf turns back into the same HF folder.

    Tensors outside the decoder (vision tower, projector) ride along in hf_rest.safetensors untouched, so a
    VLM keeps them for the way back and the megatron side only ever sees its decoder.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.resolve() == hf_dir.resolve():
        raise ValueError(f"the output folder {out_dir} is the HF folder being converted")
    config, state = read_hf(hf_dir)
    shape = _fit_tying(decoder_shape(config), config, state)
    with _atomic_dir(out_dir, overwrite) as tmp:
        read, prefix, head = _write_shards(tmp, state, shape, tp, pp)
        _save({k: v for k, v in state.items() if k not in read}, tmp / REST)
        _copy_non_weights(hf_dir, tmp / HF_FILES, skip={out_dir.resolve(), tmp.resolve()})
        meta = MegatronMeta(
            tp=tp,
            pp=pp,
            shape=shape,
            hf_prefix=prefix,
            hf_head_key=head,
            architectures=tuple(getattr(config, "architectures", None) or ()),
            model_type=config.model_type,
            parameters=_parameters(state),
        )
        (tmp / META).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return out_dir


def read_meta(megatron_dir: Path) -> MegatronMeta:
    """A megatron folder's megatron.json alone (no tensors read): layout, shape, parameter count."""
    megatron_dir = Path(megatron_dir)
    if not (megatron_dir / META).is_file():
        raise ValueError(f"{megatron_dir} has no {META}: not a megatron folder written by `flowspeed convert`")
    return MegatronMeta.from_json(json.loads((megatron_dir / META).read_text()))


def load_megatron(megatron_dir: Path) -> tuple[MegatronMeta, list[list[Tensors]]]:
    """A megatron folder's metadata and its shards as shards[pp_rank][tp_rank]."""
    megatron_dir = Path(megatron_dir)
    meta = read_meta(megatron_dir)
    missing = [shard_name(t, p) for p in range(meta.pp) for t in range(meta.tp)
               if not (megatron_dir / shard_name(t, p)).is_file()]  # fmt: skip
    if missing:
        raise ValueError(f"{megatron_dir} lacks {len(missing)} of its tp={meta.tp} pp={meta.pp} shards: {missing[:4]}")
    shards = [[_load(megatron_dir / shard_name(t, p)) for t in range(meta.tp)] for p in range(meta.pp)]
    return meta, shards


def _hf_state(meta: MegatronMeta, shards: list[list[Tensors]]) -> Tensors:
    """The decoder's HF tensors under the key names the original folder had."""
    state = megatron_to_hf(shards, meta.shape, prefix=meta.hf_prefix)
    if meta.hf_head_key and meta.hf_head_key != "lm_head.weight":  # megatron_to_hf names the head lm_head.weight
        state[meta.hf_head_key] = state.pop("lm_head.weight")
    return state


def save_hf(megatron_dir: Path, out_dir: Path, *, overwrite: bool = False) -> Path:
    """A megatron folder -> a HF folder (model.safetensors + the original non-weight files) for from_pretrained."""
    megatron_dir, out_dir = Path(megatron_dir), Path(out_dir)
    if out_dir.resolve() == megatron_dir.resolve():
        raise ValueError(f"the output folder {out_dir} is the megatron folder being converted")
    meta, shards = load_megatron(megatron_dir)
    state = _hf_state(meta, shards)
    del shards
    rest = _load(megatron_dir / REST) if (megatron_dir / REST).is_file() else {}
    clash = state.keys() & rest.keys()
    if clash:
        raise ValueError(f"{REST} repeats decoder tensors: {sorted(clash)[:4]}")
    state.update(rest)
    with _atomic_dir(out_dir, overwrite) as tmp:
        if (megatron_dir / HF_FILES).is_dir():
            shutil.copytree(megatron_dir / HF_FILES, tmp, dirs_exist_ok=True)
        _save(state, tmp / HF_WEIGHTS)
    return out_dir


def reshard(megatron_dir: Path, out_dir: Path, tp: int, pp: int, *, overwrite: bool = False) -> Path:
    """A megatron folder at another (tp, pp), through the whole HF state dict in memory."""
    megatron_dir, out_dir = Path(megatron_dir), Path(out_dir)
    if out_dir.resolve() == megatron_dir.resolve():
        raise ValueError(f"the output folder {out_dir} is the megatron folder being resharded")
    meta, shards = load_megatron(megatron_dir)
    state = _hf_state(meta, shards)
    del shards
    with _atomic_dir(out_dir, overwrite) as tmp:
        _write_shards(tmp, state, meta.shape, tp, pp)
        if (megatron_dir / REST).is_file():
            shutil.copy2(megatron_dir / REST, tmp / REST)
        else:
            _save({}, tmp / REST)
        if (megatron_dir / HF_FILES).is_dir():
            shutil.copytree(megatron_dir / HF_FILES, tmp / HF_FILES)
        new = dataclasses.replace(meta, tp=tp, pp=pp)
        (tmp / META).write_text(json.dumps(new.to_json(), indent=2) + "\n")
    return out_dir
