"""Activation checkpointing and regional compile per block for the video DiTs (Wan, LTX-Video, HunyuanVideo and 1.5),
in one process: the engine finds each model's repeated blocks, recomputation leaves the loss and every gradient
unchanged, and compile wraps exactly those blocks (checked on the wrapper: inductor itself runs in
test_engine_features' CogVideoX test, at ~20 s of C++ compile per model).
"""

from __future__ import annotations

import pytest
import torch
from flowspeed.engines.torch_engine.parallelize import apply_ac, apply_compile, block_lists
from torch import nn

from tests.engines.torch_engine.test_tensor_parallel_video import _hunyuan, _hunyuan15, _inputs, _wan


def _ltx() -> nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                      cross_attention_dim=16, num_layers=2, caption_channels=12)  # fmt: skip


def _ltx_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 2 * 4 * 4, 8, generator=g),  # (B, T*H*W, C): LTX takes patchified tokens
            "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
            "timestep": torch.tensor([10, 900]), "num_frames": 2, "height": 4, "width": 4}  # fmt: skip


MODELS = {  # name: (builder, inputs, the block lists the engine must find)
    "wan": (_wan, lambda: _inputs("wan_t2v"), ["blocks"]),
    "ltx": (_ltx, _ltx_inputs, ["transformer_blocks"]),
    "hunyuanvideo": (_hunyuan, lambda: _inputs("hunyuanvideo"), ["transformer_blocks", "single_transformer_blocks"]),
    "hunyuanvideo15": (_hunyuan15, lambda: _inputs("hunyuanvideo15"), ["transformer_blocks"]),
}


def _loss_and_grads(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(**inputs, return_dict=False)[0]
    loss = nn.functional.mse_loss(out, torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
    loss.backward()
    names = {n: n.replace("_checkpoint_wrapped_module.", "") for n, _ in model.named_parameters()}
    return loss.detach(), {names[n]: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_engine_finds_each_video_models_repeated_blocks(name: str) -> None:
    build, _, paths = MODELS[name]
    model = build()
    assert block_lists(model) == [model.get_submodule(p) for p in paths]
    # diffusers names the same block classes for its own regional compile (`_repeated_blocks`)
    assert {type(b).__name__ for p in paths for b in model.get_submodule(p)} <= set(model._repeated_blocks)


@pytest.mark.parametrize("name", list(MODELS))
def test_recomputation_leaves_loss_and_every_gradient_unchanged(name: str) -> None:
    build, inputs, paths = MODELS[name]
    loss, grads = _loss_and_grads(build(), inputs())
    for mode in ("full", "selective"):
        model = build()
        apply_ac(model, mode)
        wrapped = [b for p in paths for b in model.get_submodule(p)]
        assert wrapped and all(type(b).__name__ == "CheckpointWrapper" for b in wrapped), mode
        ac_loss, ac_grads = _loss_and_grads(model, inputs())
        torch.testing.assert_close(ac_loss, loss, rtol=0, atol=1e-6)
        assert ac_grads.keys() == grads.keys()
        for k, g in grads.items():
            torch.testing.assert_close(ac_grads[k], g, rtol=0, atol=1e-6, msg=f"{mode} {k}")


@pytest.mark.parametrize("name", list(MODELS))
def test_regional_compile_wraps_exactly_the_blocks(name: str) -> None:
    build, _, paths = MODELS[name]
    model = build()
    apply_compile(model)  # compile is lazy: wrapping costs nothing until a block runs
    blocks = {id(b) for p in paths for b in model.get_submodule(p)}
    compiled = {id(m) for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == blocks


def test_identical_blocks_share_one_compiled_graph_when_the_first_gets_views() -> None:
    """CogVideoX hands its first block slices of one [text, video] tensor and later blocks fresh outputs; dynamo
    guards on strides, so without contiguous block inputs the first block would compile a second graph."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, num_layers=3, time_embed_dim=16,
                                        text_embed_dim=16, in_channels=4, sample_frames=5, sample_height=8,
                                        sample_width=8, max_text_seq_length=6)  # fmt: skip
    graphs = []

    def count(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward  # run the traced graph as is: no inductor

    torch._dynamo.reset()
    apply_compile(model, backend=count)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 2, 4, 8, 8, generator=g), torch.randn(2, 6, 16, generator=g)  # (B, F, C, H, W), (B, L, D)
    with torch.no_grad():
        model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([1, 500]))
    assert len(graphs) == 1
