"""Vision-language models on the megatron engine: the HF vision tower (and projector) kept in torch, the
language model a megatron-core `GPTModel`. Qwen2-VL (multimodal RoPE), Qwen2.5-VL (the same decoder, a
window-attention vision tower, absolute time in its video positions) and LLaVA (a CLIP tower, an MLP
projector, a Llama decoder).

Why this split: the vision tower is small (~0.6B of 72B) and data-dependent (variable patch grids), so it
stays transformers' own module, replicated on the TP ranks of the first pipeline stage; the decoder,
where the parameters and FLOPs are, gets megatron's TP/SP/PP. Image and video features replace their
placeholder tokens' embeddings before the first layer, as transformers' model does; the 3-D (time,
height, width) position ids come from transformers' own `get_rope_index`, so both models rotate the
same way.

Under sequence parallelism each TP rank embeds only its slice of the sequence, so the vision tower's
gradient on one rank covers only the placeholders in that slice; its parameters carry megatron's
`sequence_parallel` tag, which makes `finalize_model_grads` sum them across the TP group.
"""

from __future__ import annotations

import types
from abc import ABCMeta, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from flowspeed.engines.megatron.gpt import DecoderShape, build_gpt


def _rope_index(model_cls: Any, hf_config: Any, batch: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
    """(3, B, L) position ids from `model_cls.get_rope_index`, transformers' own code for a prefilled batch.

    get_rope_index reads only `config` and its sibling `get_vision_position_ids`: both are called on a
    stand-in instead of building a whole model."""
    shim = types.SimpleNamespace(config=hf_config)
    shim.get_vision_position_ids = types.MethodType(model_cls.get_vision_position_ids, shim)
    ids = batch["input_ids"]
    token_types = batch.get("mm_token_type_ids")
    if token_types is None:
        token_types = torch.zeros_like(ids)
    positions, _ = model_cls.get_rope_index(
        shim,
        ids,
        mm_token_type_ids=token_types,
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        attention_mask=batch.get("attention_mask"),
        **extra,
    )
    return positions


def mrope_position_ids(hf_config: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(3, B, L) position ids exactly as transformers' Qwen2-VL computes them for a prefilled batch."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    return _rope_index(Qwen2VLModel, hf_config, batch)


def qwen2_5_vl_position_ids(hf_config: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(3, B, L) position ids as transformers' Qwen2.5-VL computes them: Qwen2-VL's, with each video's
    temporal ids spaced by `tokens_per_second * second_per_grid_ts` (its absolute time encoding)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    return _rope_index(Qwen2_5_VLModel, hf_config, batch, second_per_grid_ts=batch.get("second_per_grid_ts"))


class VisionLanguageMegatron(torch.nn.Module, metaclass=ABCMeta):
    """One pipeline chunk of a VLM: the vision parts (first stage only) and this chunk's decoder part.

    Exposes the attributes megatron's DDP and `finalize_model_grads` look up on a model chunk
    (`pre_process`, `post_process`, `share_embeddings_and_output_weights`, `set_input_tensor`, ...)
    by delegating to the GPTModel inside.
    """

    def __init__(
        self,
        hf_config: Any,
        config: Any,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        parallel_output: bool = True,
    ) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.config = config
        self.shape = DecoderShape.from_hf(hf_config)
        self.language_model = build_gpt(
            self.shape, config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
            parallel_output=parallel_output,
        )  # fmt: skip
        if pre_process:
            self.build_vision(hf_config)
            for name, param in self.named_parameters():
                if not name.startswith("language_model."):
                    param.sequence_parallel = config.sequence_parallel

    # ---- what a model implements ------------------------------------------------------------------
    #: HF state-dict prefixes of the vision parts -> this chunk's attribute prefixes
    vision_prefixes: dict[str, str] = {}

    @abstractmethod
    def build_vision(self, hf_config: Any) -> None:
        """Build the vision parts (first pipeline stage only) as attributes named by `vision_prefixes`."""

    @abstractmethod
    def media_features(self, media: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, int]]:
        """(media key, features [tokens, hidden], placeholder token id) for each medium in the batch."""

    @staticmethod
    def positions(hf_config: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids as the HF model computes them: plain RoPE ignores them beyond their shape."""
        ids = batch["input_ids"]
        return torch.arange(ids.shape[1]).expand_as(ids)

    # ---- what megatron's wrappers and schedules ask a chunk ----------------------------------------
    @property
    def model_type(self) -> Any:
        return self.language_model.model_type

    @property
    def pre_process(self) -> bool:
        return self.language_model.pre_process

    @property
    def post_process(self) -> bool:
        return self.language_model.post_process

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor: Any) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """megatron's dist-checkpoint view: the decoder's own sharded dict, and the vision tower as replicated
        tensors (one copy written, from TP rank 0 and DP rank 0)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.language_model.sharded_state_dict(f"{prefix}language_model.", sharded_offsets, metadata)
        for name, module in self.named_children():
            if name != "language_model":
                local = dict(module.state_dict(keep_vars=True))
                state.update(make_sharded_tensors_for_checkpoint(local, f"{prefix}{name}.", {}, sharded_offsets))
        return state

    # ---- forward ----------------------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings ([S, B, H], or this rank's [S/tp, B, H] slice under SP) with the image and video
        features in their placeholders' rows."""
        from megatron.core import parallel_state

        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        s_full = input_ids.shape[1]
        full = None
        mask = torch.zeros(s_full, input_ids.shape[0], 1, dtype=torch.bool, device=emb.device)
        for pixels, feats, token in self.media_features(media):
            where = (input_ids == token).unsqueeze(-1)  # [B, S, 1]: features fill rows in batch-major order
            if int(where.sum()) != feats.shape[0]:
                raise ValueError(
                    f"{int(where.sum())} {pixels} placeholder tokens but {feats.shape[0]} vision features: the "
                    "cached sample and the vision config disagree (spatial_merge_size, patch size)"
                )
            base = torch.zeros(*input_ids.shape, emb.shape[-1], dtype=emb.dtype, device=emb.device)
            placed = base.masked_scatter(where, feats.to(emb.dtype)).transpose(0, 1)  # [S, B, H]
            full = placed if full is None else full + placed
            mask = mask | where.transpose(0, 1)
        if full is None:
            return emb
        if self.config.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            rows = slice(rank * s_full // tp, (rank + 1) * s_full // tp)
            full, mask = full[rows], mask[rows]
        return torch.where(mask, full, emb)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        packed_seq_params: Any = None,
        **media: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ([B, S, V/tp]), or per-token losses ([B, S]) when `labels` (already shifted) are given.

        A packed row (engines/megatron/packing.py) comes with `attention_mask` (the local backend's block-diagonal
        causal mask) or `packed_seq_params` (Transformer Engine's THD boundaries), and position ids that restart
        at each sample: M-RoPE reads them; plain RoPE, which megatron counts from 0 over the whole row, is given
        them by `_restarting_rope`, so every sample rotates as it does alone."""
        decoder_input = self._embed(input_ids, media) if self.pre_process else None
        packed = attention_mask is not None or packed_seq_params is not None
        with _restarting_rope(self.language_model, position_ids if packed else None):
            return self.language_model(
                input_ids=None, position_ids=position_ids, attention_mask=attention_mask, decoder_input=decoder_input,
                labels=labels, packed_seq_params=packed_seq_params,
            )  # fmt: skip


class _RestartingRope(torch.nn.Module):
    """megatron's plain RotaryEmbedding, read at given positions: GPTModel asks it for rows 0..S-1 of one sequence;
    this answers the rows of `positions` (L,) instead, so the samples of a packed row each start at 0."""

    def __init__(self, rope: torch.nn.Module, positions: torch.Tensor) -> None:
        super().__init__()
        self.rope, self.positions = rope, positions

    def get_rotary_seq_len(self, *args: Any, **kwargs: Any) -> int:
        return self.rope.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        table = self.rope(int(self.positions.max()) + 1)  # [positions, 1, 1, dim]
        return table[self.positions.to(table.device)]


@contextmanager
def _restarting_rope(language_model: torch.nn.Module, positions: torch.Tensor | None) -> Iterator[None]:
    """Plain-RoPE decoders (LLaVA's Llama) read `positions` (B=1, L) for one forward; M-RoPE ones already do."""
    rope = getattr(language_model, "rotary_pos_emb", None)
    if positions is None or getattr(language_model, "position_embedding_type", None) != "rope" or rope is None:
        yield
        return
    language_model.rotary_pos_emb = _RestartingRope(rope, positions.reshape(-1))
    try:
        yield
    finally:
        language_model.rotary_pos_emb = rope


class Qwen2VLMegatron(VisionLanguageMegatron):
    """Qwen2-VL: transformers' vision tower (patch merger included) and multimodal RoPE positions."""

    vision_prefixes = {"model.visual.": "visual."}

    def build_vision(self, hf_config: Any) -> None:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        self.visual = Qwen2VisionTransformerPretrainedModel._from_config(hf_config.vision_config)

    def media_features(self, media: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, int]]:
        out = []
        dtype = next(self.visual.parameters()).dtype
        for pixels, grid, token in (
            ("pixel_values", "image_grid_thw", self.hf_config.image_token_id),
            ("pixel_values_videos", "video_grid_thw", self.hf_config.video_token_id),
        ):
            if media.get(pixels) is not None:
                out.append((pixels, self.visual(media[pixels].to(dtype), grid_thw=media[grid]).pooler_output, token))
        return out

    positions = staticmethod(mrope_position_ids)


class LlavaMegatron(VisionLanguageMegatron):
    """LLaVA: transformers' vision tower (CLIP) and multimodal projector; features from
    `vision_feature_layer`, the CLS token dropped under the "default" strategy, as LlavaModel does."""

    vision_prefixes = {"model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector."}

    def build_vision(self, hf_config: Any) -> None:
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.vision_tower = AutoModel.from_config(hf_config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(hf_config)

    def media_features(self, media: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, int]]:
        if media.get("pixel_values") is None:
            return []
        cfg = self.hf_config
        dtype = next(self.vision_tower.parameters()).dtype
        hidden = self.vision_tower(media["pixel_values"].to(dtype), output_hidden_states=True).hidden_states
        layers = [cfg.vision_feature_layer] if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer
        picked = [hidden[i][:, 1:] if cfg.vision_feature_select_strategy == "default" else hidden[i] for i in layers]
        feats = self.multi_modal_projector(torch.cat(picked, dim=-1))
        return [("pixel_values", feats.flatten(0, 1), cfg.image_token_index)]


class Qwen2_5VLMegatron(Qwen2VLMegatron):
    """Qwen2.5-VL: Qwen2-VL's decoder (M-RoPE, Qwen2 layers) behind another vision tower (window attention,
    RMSNorm, SwiGLU), kept as transformers' module; positions from Qwen2.5-VL's own get_rope_index."""

    def build_vision(self, hf_config: Any) -> None:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_config.vision_config)

    positions = staticmethod(qwen2_5_vl_position_ids)


#: families the megatron engine trains, and the chunk class that builds each
MODELS: dict[str, type[VisionLanguageMegatron]] = {
    "qwen2_vl": Qwen2VLMegatron,
    "llava": LlavaMegatron,
    "qwen2_5_vl": Qwen2_5VLMegatron,
}


def split_hf_state(
    state: dict[str, torch.Tensor], prefixes: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(decoder tensors as HF names them, the vision parts' tensors under the chunk's names)."""
    vision, decoder = {}, {}
    for key, value in state.items():
        hf = next((p for p in prefixes if key.startswith(p)), None)
        if hf is None:
            decoder[key] = value
        else:
            vision[prefixes[hf] + key[len(hf) :]] = value
    return decoder, vision


def frozen_vision(hf_prefixes: tuple[str, ...], model_class: type[VisionLanguageMegatron]) -> tuple[str, ...]:
    """The family's frozen vision-tower prefixes (transformers' names) as the chunk names them.

    Every frozen prefix must sit under one of the chunk's vision parts; one that does not (a layout
    this engine does not know) is refused rather than silently trained."""
    out = []
    for prefix in hf_prefixes:
        hf = next((h for h in model_class.vision_prefixes if prefix.startswith(h)), None)
        if hf is None:
            raise ValueError(f"frozen prefix {prefix!r} is not in {model_class.__name__}'s vision parts")
        out.append(model_class.vision_prefixes[hf] + prefix[len(hf) :])
    return tuple(out)


def join_hf_state(vision: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """The way back: chunk names of the vision parts -> HF names."""
    out = {}
    for key, value in vision.items():
        hf, ours = next((h, o) for h, o in prefixes.items() if key.startswith(o))
        out[hf + key[len(ours) :]] = value
    return out
