"""Packed micro-batches on the megatron engine compute the padded step: the same samples, once padded two by two and
once packed end to end into rows of other sizes, give equal loss and equal gradients (every parameter, vision tower
included) within 1e-5; in 1 process for Qwen2-VL, Qwen2.5-VL and LLaVA, and on 2 gloo ranks for Qwen2-VL and
Qwen2.5-VL under data parallel (each rank its own rows; the loss normalised over both) and TP + sequence parallel
(an odd-length row padded by one unattended segment), and for Qwen2-VL under pipeline parallel. The samples mix
images, videos, both and none. On CPU the local attention backend keeps each sample apart with a block-diagonal
causal mask (engines/megatron/packing.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from flowspeed.engines.models.sequence import IGNORE_INDEX

from tests.engines.megatron.test_megatron_vlm import CASES, IMAGE_TOKEN, VIDEO_TOKEN, VISION_START

PATCH = 3 * 2 * 14 * 14  # Qwen-VL's flattened patch: channels x temporal patch x 14 x 14
TOLERANCE = 1e-5


def _sample(g: torch.Generator, head: int, tail: int, media: str, family: str) -> dict[str, torch.Tensor]:
    """One cached sample as prep writes it: text, then a medium (image: 4 merged tokens of a 4x4-patch grid; video:
    2 temporal patches of it, 8 tokens; LLaVA's image: 16 CLS-less CLIP features), then an answer, labelled."""
    text = lambda n: torch.randint(0, 240, (n,), generator=g)  # noqa: E731
    parts, types, out = [text(head)], [torch.zeros(head, dtype=torch.long)], {}
    if family == "llava":
        if media:
            parts.append(torch.full((16,), IMAGE_TOKEN))
            types.append(torch.zeros(16, dtype=torch.long))
            out["pixel_values"] = torch.randn(1, 3, 56, 56, generator=g)
    else:
        for kind in media:
            token, kind_id, t = (IMAGE_TOKEN, 1, 1) if kind == "i" else (VIDEO_TOKEN, 2, 2)
            parts += [torch.tensor([VISION_START]), torch.full((4 * t,), token)]
            types += [torch.zeros(1, dtype=torch.long), torch.full((4 * t,), kind_id)]
            pixels, grid = ("pixel_values", "image_grid_thw") if kind == "i" else ("pixel_values_videos",
                                                                                 "video_grid_thw")  # fmt: skip
            out[pixels] = torch.randn(16 * t, PATCH, generator=g)
            out[grid] = torch.tensor([[t, 4, 4]])
            if kind == "v" and family == "qwen2_5_vl":
                out["second_per_grid_ts"] = torch.tensor([0.5 + torch.rand((), generator=g).item()])
    parts.append(text(tail))
    types.append(torch.zeros(tail, dtype=torch.long))
    ids = torch.cat(parts)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-tail:] = ids[-tail:]
    out.update(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))
    if family != "llava":
        out["mm_token_type_ids"] = torch.cat(types)
    return out


def samples(family: str) -> list[dict[str, torch.Tensor]]:
    """8 samples of odd and even lengths: image, video, image + video, text only."""
    g = torch.Generator().manual_seed(7)
    media = ["i", "v", "iv", "", "v", "i", "", "vi"] if family != "llava" else ["i", "i", "", "i", "i", "", "i", "i"]
    return [_sample(g, 3 + i % 3, 4 + (i * 5) % 7, m, family) for i, m in enumerate(media)]


def _run(family: str, layout_fields: dict[str, Any], packed: bool, leak: bool = False) -> dict[str, Any]:
    """One forward-backward of the global batch on this rank's share (data-parallel ranks split the samples):
    micro-batches of 2 padded rows, or packed rows of 3, 1 and then 4 samples (other cuts than the padded ones).
    `leak`: packed rows WITHOUT their sample boundaries (attention crosses samples), which must differ."""
    from flowspeed.engines.megatron.batches import megatron_batch, megatron_packed_batch, vlm_forward_step
    from flowspeed.engines.megatron.convert import hf_to_megatron
    from flowspeed.engines.megatron.gpt import DecoderShape, transformer_config
    from flowspeed.engines.megatron.setup import init_model_parallel
    from flowspeed.engines.megatron.training import Layout, build_chunks, forward_backward, unwrap
    from flowspeed.engines.megatron.vlm import MODELS, split_hf_state
    from flowspeed.engines.models import get_family
    from megatron.core import parallel_state as ps

    layout = Layout(**layout_fields)
    hf = CASES[family][0]()
    cls, shape = MODELS[family], DecoderShape.from_hf(hf.config)
    init_model_parallel(tp=layout.tp, pp=layout.pp)
    config = transformer_config(shape, **layout.config_fields())
    config.variable_seq_lengths = layout.pp > 1  # as the engine sets it: rows differ in length
    decoder, vision = split_hf_state(hf.state_dict(), cls.vision_prefixes)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()

    def make(pre: bool, post: bool, vp: int | None) -> torch.nn.Module:
        model = cls(hf.config, config, pre_process=pre, post_process=post, vp_stage=vp)
        state = {f"language_model.{k}": v for k, v in hf_to_megatron(decoder, shape, layout.tp, tp_rank, layout.pp,
                                                                      pp_rank).items()}  # fmt: skip
        if pre:
            state.update(vision)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        return model

    chunks = build_chunks(make, config, layout, torch.device("cpu"))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    everything = samples(family)
    per = len(everything) // dp
    mine = everything[dp_rank * per : (dp_rank + 1) * per]
    cuts = [0, 2, 4, 6, 8] if not packed else [0, 3, 4, 8]
    groups = [mine[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=False) if a < len(mine)]
    make_batch = megatron_packed_batch if packed else megatron_batch
    multiple = layout.tp if layout.sequence_parallel else 1
    mbs = [make_batch(get_family(family), hf.config, group, multiple) for group in groups]
    if leak:
        mbs = [{k: v for k, v in mb.items() if k != "cu_seqlens"} for mb in mbs]
    seq = max(mb["input_ids"].shape[1] for mb in mbs)
    loss, tokens = forward_backward(chunks, mbs, forward_step=vlm_forward_step, seq_length=seq,
                                    micro_batch_size=mbs[0]["input_ids"].shape[0])  # fmt: skip
    grads = {n: p.main_grad.clone() for n, p in unwrap(chunks[0]).named_parameters() if p.requires_grad}
    ps.destroy_model_parallel()
    return {"loss": loss, "tokens": tokens, "grads": grads, "rows": [tuple(mb["input_ids"].shape) for mb in mbs]}


ONE_PROCESS = ("qwen2_vl", "qwen2_5_vl", "llava")
TWO_RANKS = {"dp2": {}, "tp2+sp": {"tp": 2, "sequence_parallel": True}, "pp2": {"pp": 2}}
#: (family, layout) pairs of the 2-rank spawn: every layout for Qwen2-VL, data and tensor + sequence parallel for 2.5
TWO_RANK_RUNS = [*(("qwen2_vl", name) for name in TWO_RANKS), ("qwen2_5_vl", "dp2"), ("qwen2_5_vl", "tp2+sp")]


def packing_jobs(rank: int, world: int) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Every (family, layout, padded|packed|leaky) run of one spawn (megatron's state torn down in between)."""
    if world == 1:
        runs = [(f, "one process", {}) for f in ONE_PROCESS]
    else:
        runs = [(family, name, TWO_RANKS[name]) for family, name in TWO_RANK_RUNS]
    out = {}
    for family, name, fields in runs:
        out[(family, name, "padded")] = _run(family, fields, packed=False)
        out[(family, name, "packed")] = _run(family, fields, packed=True)
    if world == 1:
        out[("qwen2_vl", "one process", "leaky")] = _run("qwen2_vl", {}, packed=True, leak=True)
    return out


@pytest.mark.parametrize("world", [1, 2], ids=["1 process", "2 gloo ranks"])
def test_packed_rows_give_the_padded_loss_and_gradients(world: int, vlm_ranks: dict[int, list[dict]]) -> None:
    """The ranks run in conftest.py's shared spawn (`packing_jobs` there)."""
    results = [r["packing"] for r in vlm_ranks[world]]
    for rank, runs in enumerate(results):
        assert len(runs) == 2 * (len(ONE_PROCESS) if world == 1 else len(TWO_RANK_RUNS)) + (world == 1)
        for (family, layout, kind), got in runs.items():
            if kind != "packed":
                continue
            want = runs[(family, layout, "padded")]
            where = f"{family} {layout} rank {rank}"
            assert got["rows"][0][0] == 1 and want["rows"][0][0] == 2, where  # packed rows vs padded pairs
            assert got["tokens"] == want["tokens"] > 0, where
            assert abs(got["loss"] - want["loss"]) < TOLERANCE, f"{where}: {got['loss']} vs {want['loss']}"
            assert got["grads"].keys() == want["grads"].keys()
            for name, grad in got["grads"].items():
                msg = f"{where}: {name}"
                torch.testing.assert_close(grad, want["grads"][name], atol=TOLERANCE, rtol=TOLERANCE, msg=msg)
            vision = [g for n, g in got["grads"].items() if n.startswith(("visual.", "vision_tower."))]
            assert not vision or any(g.abs().sum() > 0 for g in vision), where  # the towers' gradients compared too
    if world == 1:  # the boundaries are what makes it exact: without them attention leaks across samples
        runs = results[0]
        leaky, padded = runs[("qwen2_vl", "one process", "leaky")], runs[("qwen2_vl", "one process", "padded")]
        assert abs(leaky["loss"] - padded["loss"]) > 1e-3, (leaky["loss"], padded["loss"])


def test_block_causal_mask_keeps_attention_inside_each_sample() -> None:
    from flowspeed.engines.megatron.packing import block_causal_mask

    mask = block_causal_mask(torch.tensor([0, 2, 5, 6], dtype=torch.int32), 6)[0, 0]
    allowed = ~mask
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for a, b in ((0, 2), (2, 5), (5, 6)):
        expected[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected)


def test_transformer_engine_attention_gets_thd_boundaries_and_an_unknown_backend_is_refused() -> None:
    """Which attention inputs a packed row gets follows the chunk's backend: TE's gets megatron-core's PackedSeqParams
    (THD, the samples' cu_seqlens, the longest sample), the local one the mask; any other could attend across
    samples unseen, so it is refused. (No TE here: stand-in modules named as megatron-core names them.)"""
    from flowspeed.engines.megatron.packing import attention_inputs

    class TEDotProductAttention(torch.nn.Module):
        pass

    class DotProductAttention(torch.nn.Module):
        pass

    class SomeOtherAttention(torch.nn.Module):
        pass

    class Layer(torch.nn.Module):
        def __init__(self, core: torch.nn.Module) -> None:
            super().__init__()
            self.core_attention = core

    cu = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    params = attention_inputs(torch.nn.Sequential(Layer(TEDotProductAttention())), cu, 8)["packed_seq_params"]
    assert params.qkv_format == "thd" and params.max_seqlen_q == params.max_seqlen_kv == 4
    assert torch.equal(params.cu_seqlens_q, cu) and torch.equal(params.cu_seqlens_kv, cu)
    mask = attention_inputs(torch.nn.Sequential(Layer(DotProductAttention())), cu, 8)["attention_mask"]
    assert mask.shape == (1, 1, 8, 8) and bool(mask[0, 0, 3, 2]) and not bool(mask[0, 0, 6, 3])
    with pytest.raises(ValueError, match="SomeOtherAttention"):
        attention_inputs(torch.nn.Sequential(Layer(SomeOtherAttention())), cu, 8)


def test_packed_positions_restart_per_sample_as_transformers_computes_them() -> None:
    """Qwen2.5-VL's M-RoPE of a packed row equals each sample's alone (its video's absolute time included), and plain
    RoPE (LLaVA) restarts at 0 at every sample."""
    from flowspeed.engines.megatron.batches import packed_positions
    from flowspeed.engines.megatron.vlm import qwen2_5_vl_position_ids
    from flowspeed.engines.models import get_family

    for family in ("qwen2_5_vl", "llava"):
        hf_config = CASES[family][0]().config
        items = samples(family)[:4]
        got = packed_positions(get_family(family), hf_config, get_family(family).pack(items))
        alone = []
        for it in items:
            one = get_family(family).collate([it])
            n = len(it["input_ids"])
            alone.append(qwen2_5_vl_position_ids(hf_config, one) if family != "llava" else torch.arange(n)[None])
        assert torch.equal(got, torch.cat(alone, dim=-1).expand_as(got)), family


def test_context_parallel_with_packing_is_refused_with_the_reason(tmp_path: Any) -> None:
    """The rule `engines/megatron/trainer.py:validate` applies before any rank starts (torch-free, so the config
    checks can call it at load): context parallel cannot keep a packed row's samples apart on this engine."""
    from flowspeed.configs import load_config
    from flowspeed.configs.validate import ConfigError
    from flowspeed.engines.megatron.packing import packing_problems

    from tests.conftest import REPO

    recipe = REPO / "configs" / "pipelines" / "qwen2_vl-sft-megatron.yaml"
    packed = ["train.packing.max_tokens=256", "train.parallel.pp=1"]
    assert packing_problems(load_config(recipe, packed, workdir=tmp_path)) == []
    cp = [*packed, "train.parallel.cp=2"]
    (problem,) = packing_problems(load_config(recipe, cp, workdir=tmp_path, check=False))
    assert "train.packing with train.parallel.cp=2" in problem and "Transformer Engine's THD" in problem
    with pytest.raises(ConfigError, match=r"train.packing with train.parallel.cp=2"):  # and the config checks say it
        load_config(recipe, cp, workdir=tmp_path)
