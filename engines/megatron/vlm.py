"""Qwen2-VL on the megatron engine: the HF vision tower kept in torch, the language model a megatron-core
`GPTModel` with multimodal RoPE.

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
from typing import Any

import torch

from engines.megatron.gpt import DecoderShape, build_gpt

VISUAL_PREFIX = "model.visual."


def mrope_position_ids(hf_config: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(3, B, L) position ids exactly as transformers' Qwen2-VL computes them for a prefilled batch."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    # get_rope_index reads only `config` and its sibling `get_vision_position_ids`: call both on a
    # stand-in instead of building a whole model.
    shim = types.SimpleNamespace(config=hf_config)
    shim.get_vision_position_ids = types.MethodType(Qwen2VLModel.get_vision_position_ids, shim)
    ids = batch["input_ids"]
    token_types = batch.get("mm_token_type_ids")
    if token_types is None:
        token_types = torch.zeros_like(ids)
    positions, _ = Qwen2VLModel.get_rope_index(
        shim,
        ids,
        mm_token_type_ids=token_types,
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        attention_mask=batch.get("attention_mask"),
    )
    return positions


class Qwen2VLMegatron(torch.nn.Module):
    """One pipeline chunk of Qwen2-VL: the vision tower (first stage only) and this chunk's decoder part.

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
        self.visual = None
        if pre_process:
            from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

            self.visual = Qwen2VisionTransformerPretrainedModel._from_config(hf_config.vision_config)
            for param in self.visual.parameters():
                param.sequence_parallel = config.sequence_parallel

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
        if self.visual is not None:
            local = {k: v for k, v in self.visual.state_dict(keep_vars=True).items()}
            state.update(make_sharded_tensors_for_checkpoint(local, f"{prefix}visual.", {}, sharded_offsets))
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
        for pixels, grid, token in (
            ("pixel_values", "image_grid_thw", self.hf_config.image_token_id),
            ("pixel_values_videos", "video_grid_thw", self.hf_config.video_token_id),
        ):
            if media.get(pixels) is None:
                continue
            feats = self.visual(media[pixels].to(emb.dtype), grid_thw=media[grid]).pooler_output
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
        **media: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ([B, S, V/tp]), or per-token losses ([B, S]) when `labels` (already shifted) are given."""
        decoder_input = self._embed(input_ids, media) if self.pre_process else None
        return self.language_model(
            input_ids=None, position_ids=position_ids, attention_mask=None, decoder_input=decoder_input,
            labels=labels,
        )  # fmt: skip


def split_hf_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(decoder tensors as HF names them, the vision tower's tensors renamed to the chunk's `visual.` keys)."""
    visual = {k.removeprefix(VISUAL_PREFIX): v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}
    decoder = {k: v for k, v in state.items() if not k.startswith(VISUAL_PREFIX)}
    return decoder, visual
