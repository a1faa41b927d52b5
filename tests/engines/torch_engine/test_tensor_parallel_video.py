"""Tensor parallelism for the video DiTs Wan (T2V, I2V-shaped, per-token timesteps; each also with sequence parallel),
HunyuanVideo and 1.5 on 2 real gloo CPU ranks: the TP model's output and every parameter's gradient equal one process
within 1e-5 (float32).

One spawn checks every case: each rank builds a one-process reference and a TP=2 copy from the same seed, runs one
forward/backward of both on the same inputs, and records the error cases; the parent compares what ranks return.
Tiny models are built straight from the diffusers classes (no family module involved).
"""

from __future__ import annotations

import pytest
import torch
from flowspeed.engines.torch_engine.tensor_parallel import apply_tp, supported_tp_models
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from tests.distributed import run_ranks

TOL = 1e-5
B = 2


def _wan(heads: int = 2, image: bool = False) -> nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    i2v = dict(image_dim=12, added_kv_proj_dim=8 * heads) if image else {}
    return WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=8, in_channels=4, out_channels=4,
                                 text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
                                 **i2v)  # fmt: skip


def _hunyuan(heads: int = 2) -> nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                          attention_head_dim=8, num_layers=1, num_single_layers=1,
                                          num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
                                          rope_axes_dim=(2, 2, 4))  # fmt: skip


def _hunyuan15(heads: int = 2) -> nn.Module:
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                            attention_head_dim=8, num_layers=1, num_refiner_layers=1,
                                            text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
                                            rope_axes_dim=(2, 2, 4))  # fmt: skip


def _inputs(case: str, side: int = 8) -> dict[str, torch.Tensor]:
    """(B, C, T, H, W) latents: 3 x 4 x 4 = 48 tokens after 1x2x2 patches."""
    case = case.removesuffix("_sp")
    g = torch.Generator().manual_seed(1)
    x = {"hidden_states": torch.randn(B, 4, 3, side, side, generator=g)}
    if case.startswith("wan"):
        # Wan's I2V attention takes the last 512 text tokens as text and the rest as image tokens (diffusers
        # hard-codes UMT5's 512); per-token timesteps are Wan2.2 TI2V's (B, tokens) form.
        text = 512 if case == "wan_i2v" else 8
        x |= {"encoder_hidden_states": torch.randn(B, text, 16, generator=g),
              "timestep": torch.randint(0, 1000, (B, 48) if case == "wan_ti2v" else (B,), generator=g)}  # fmt: skip
        if case == "wan_i2v":
            x["encoder_hidden_states_image"] = torch.randn(B, 5, 12, generator=g)
        return x
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padded text tokens are masked in the refiner and in every joint attention
    if case == "hunyuanvideo15":  # Qwen2.5-VL and ByT5 text, SigLIP image tokens
        return x | {"encoder_hidden_states": torch.randn(B, 6, 16, generator=g), "encoder_attention_mask": mask,
                    "encoder_hidden_states_2": torch.randn(B, 4, 8, generator=g),
                    "encoder_attention_mask_2": torch.ones(B, 4, dtype=torch.long),
                    "image_embeds": torch.randn(B, 3, 8, generator=g),
                    "timestep": torch.tensor([3.0, 700.0])}  # fmt: skip
    return x | {"encoder_hidden_states": torch.randn(B, 6, 16, generator=g), "encoder_attention_mask": mask,
                "pooled_projections": torch.randn(B, 8, generator=g), "timestep": torch.tensor([3, 700]),
                "guidance": torch.full((B,), 6000.0)}  # fmt: skip


CASES = {  # name: builder; "_sp": with sequence parallel
    "wan_t2v": _wan,
    "wan_i2v": lambda: _wan(image=True),
    "wan_ti2v": _wan,
    "wan_t2v_sp": _wan,
    "wan_i2v_sp": lambda: _wan(image=True),
    "wan_ti2v_sp": _wan,
    "hunyuanvideo": _hunyuan,
    "hunyuanvideo15": _hunyuan15,
    "wan_engine_order": _wan,
}
SHARDED = {  # a parameter per case and the placement it must have: the plan really splits the weights
    "wan_t2v": {"blocks.0.attn1.to_q.weight": Shard(0), "blocks.0.attn1.norm_q.weight": Shard(0),
                "blocks.1.ffn.net.2.weight": Shard(1), "condition_embedder.time_proj.weight": Shard(0),
                "blocks.0.scale_shift_table": Replicate(), "scale_shift_table": Replicate()},
    "wan_i2v": {"blocks.0.attn2.add_k_proj.weight": Shard(0), "blocks.0.attn2.norm_added_k.weight": Shard(0)},
    "hunyuanvideo": {"transformer_blocks.0.attn.add_q_proj.weight": Shard(0),
                     "transformer_blocks.0.attn.to_add_out.weight": Shard(1),
                     "transformer_blocks.0.norm1_context.linear.weight": Shard(0),
                     "single_transformer_blocks.0.proj_mlp.weight": Shard(0),
                     "single_transformer_blocks.0.norm.linear.weight": Shard(0),
                     "single_transformer_blocks.0.proj_out.weight": Replicate()},
    "hunyuanvideo15": {"transformer_blocks.0.attn.norm_added_k.weight": Replicate(),
                       "transformer_blocks.0.ff_context.net.0.proj.weight": Shard(0)},
    "wan_engine_order": {"blocks.0.attn2.to_k.weight": Shard(0), "blocks.1.scale_shift_table": Replicate()},
}  # fmt: skip


SEEN = ("blocks.1.ffn", "transformer_blocks.0.ff")  # where each model's video tokens are counted


def _plain(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")  # the name without activation checkpointing's wrapper


def _forward_backward(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(**inputs, return_dict=False)[0]
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    nn.functional.mse_loss(out, target).backward()
    grads = {_plain(n): p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for n, p in model.named_parameters() if p.grad is not None}  # fmt: skip
    return out.detach(), grads


def _error(fn) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _engine_order(build, world: int, rank: int) -> nn.Module:
    """The engine's path: built on meta, TP -> selective AC -> FSDP2 on a (dp_shard=1, tp=2) mesh, then rank 0's
    weights broadcast into the shards (a block's adaLN table is read locally inside FSDP2's unshard)."""
    from flowspeed.engines.torch_engine.parallel_dims import ParallelDims
    from flowspeed.engines.torch_engine.parallelize import apply_ac, apply_fsdp, materialize

    mesh = ParallelDims(1, 1, 1, 2, 1, world).build_mesh("cpu")
    with torch.device("meta"):
        model = build()
    apply_tp(model, mesh["tp"])
    apply_ac(model, "selective")
    apply_fsdp(model, mesh["dp_shard"], "float32", "float32", reshard=True)
    materialize(model, build() if rank == 0 else None, torch.device("cpu"))
    return model


def _sequence_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    apply_tp(model, mesh, sequence_parallel=True)
    return model


def _worker(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    results = {}
    for name, build in CASES.items():
        ref = build()
        if name == "wan_engine_order":
            tp = _engine_order(build, world, rank)
        else:
            tp = build()
            apply_tp(tp, mesh, sequence_parallel=name.endswith("_sp"))
        seen = []  # tokens reaching an FFN, one process then TP: a rank's shard between first and last block under SP
        where = SEEN[0] if name.startswith("wan") else SEEN[1]
        for model in (ref, tp):
            model.get_submodule(where).register_forward_pre_hook(
                lambda _, args, seen=seen: seen.append(args[0].shape[1])
            )
        out_ref, grads_ref = _forward_backward(ref, _inputs(name))
        out_tp, grads_tp = _forward_backward(tp, _inputs(name))
        params = {_plain(n): p for n, p in tp.named_parameters()}
        results[name] = dict(
            out=(out_tp - out_ref).abs().max().item(),
            grads={n: (grads_tp[n] - g).abs().max().item() for n, g in grads_ref.items()},
            missing=sorted(set(grads_ref) ^ set(grads_tp)),
            all_dtensor=all(isinstance(p, DTensor) for p in params.values()),
            placements={n: params[n].placements[-1] for n in SHARDED.get(name, {})},  # the TP mesh dim is last
            keys=[_plain(k) for k in tp.state_dict()] == list(ref.state_dict()),
            tokens=seen,
        )
    results["errors"] = dict(
        wan_heads=_error(lambda: apply_tp(_wan(heads=3), mesh)),
        hunyuan_heads=_error(lambda: apply_tp(_hunyuan(heads=3), mesh)),
        hunyuan15_heads=_error(lambda: apply_tp(_hunyuan15(heads=3), mesh)),
        wan_uneven_sp=_error(lambda: _forward_backward(_sequence_parallel(_wan(), mesh), _inputs("wan_t2v", side=6))),
        hunyuan_sp=_error(lambda: apply_tp(_hunyuan(), mesh, sequence_parallel=True)),
    )
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_worker, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_tp_forward_and_every_gradient_match_one_process(ranks: list[dict], case: str) -> None:
    for r in ranks:
        res = r[case]
        assert res["all_dtensor"], "every parameter is a DTensor, so clip_grad_norm_/AdamW/FSDP2 see one kind"
        assert res["keys"], "state-dict keys are the model's own: checkpoints and exports do not change"
        assert res["out"] < TOL
        assert not res["missing"], "the same parameters get gradients"
        worst = max(res["grads"], key=res["grads"].get)
        assert res["grads"][worst] < TOL, (worst, res["grads"][worst])
        assert res["placements"] == SHARDED.get(case, {})
        full, mine = res["tokens"][:2]  # activation checkpointing runs the hook again in backward
        assert mine == (full // 2 if case.endswith("_sp") else full)


def test_tp_refuses_what_it_cannot_split(ranks: list[dict]) -> None:
    errors = ranks[0]["errors"]
    assert "WanTransformer3DModel has 3 attention heads" in errors["wan_heads"] and "tp=2" in errors["wan_heads"]
    assert "HunyuanVideoTransformer3DModel has 3 attention heads" in errors["hunyuan_heads"]
    assert "HunyuanVideo15Transformer3DModel has 3 attention heads" in errors["hunyuan15_heads"]
    assert "sequence parallel is not implemented" in errors["hunyuan_sp"]
    assert "sequence_parallel: false" in errors["hunyuan_sp"]
    assert "hidden_states of 27 tokens over tp=2" in errors["wan_uneven_sp"]  # 3 x 3 x 3 patches


def test_supported_models() -> None:
    names = {"WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "HunyuanVideo15Transformer3DModel"}
    assert names <= set(supported_tp_models())
