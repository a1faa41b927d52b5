"""Preference records (DPO) through the VLM prep: LLaMA-Factory's ShareGPT DPO layout and a TRL-style table, each side
encoded by the family with answer-only labels, the media cached once, the bad pairs rejected with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flowspeed.configs import ModelConfig, PipelineConfig, load_config
from flowspeed.datasets_prep.cache import CachedLatents
from flowspeed.datasets_prep.demo import make_demo_dataset
from flowspeed.datasets_prep.prep import load_samples, run_prep
from flowspeed.engines.methods import get_method
from flowspeed.engines.models import get_family
from flowspeed.engines.models.sequence import IGNORE_INDEX

from tests.conftest import REPO

RECIPE = REPO / "configs" / "pipelines" / "qwen2_vl-dpo.yaml"
FAM = get_family("qwen2_vl")
Q = {"from": "human", "value": "<image>\nWhat shape is shown?"}


def _sharegpt(image: str, chosen: object, rejected: object = None, **extra: object) -> dict:
    row = {"conversations": [Q], "images": [image], "chosen": chosen, **extra}
    return row if rejected is None else {**row, "rejected": rejected}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prep(tmp: Path, manifest: Path) -> tuple[PipelineConfig, object]:
    cfg = load_config(RECIPE, [f"data.manifest={manifest}", "model.max_text_length=160"], workdir=tmp)
    return cfg, run_prep(cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pref")
    make_demo_dataset(root, num_videos=0, num_images=2)
    return root


def _labelled(ids: torch.Tensor, labels: torch.Tensor) -> str:
    return FAM.load_processor(ModelConfig(family="qwen2_vl")).tokenizer.decode(ids[labels != IGNORE_INDEX])


def test_both_layouts_cache_each_side_and_the_media_once(tmp_path: Path, data: Path) -> None:
    im0, im1 = "images/still_000.png", "images/still_001.png"
    sharegpt = _write(data / "dpo_sharegpt.jsonl", [
        _sharegpt(im0, {"from": "gpt", "value": "A square."}, {"from": "gpt", "value": "A circle."}),
        _sharegpt(im1, "A triangle.", [{"role": "assistant", "content": "A square."}]),  # a string, a list of turns
        _sharegpt(im0, {"from": "gpt", "value": "A square."}),  # no rejected side
        _sharegpt(im0, "A square.", {"from": "gpt", "value": "A square."}),  # nothing to prefer
        _sharegpt(im1, {"from": "gpt", "value": " "}, "A circle."),  # an empty answer
        _sharegpt(im1, "a very long answer " * 8, "A circle."),  # over model.max_text_length=160
    ])  # fmt: skip
    cfg, res = _prep(tmp_path / "sharegpt", sharegpt)
    assert res.num_samples == 2 and res.rejected_by_reason == {"bad_preference": 3, "unusable": 1}
    rejects = [json.loads(x) for x in Path(res.rejects).read_text().splitlines()]
    reasons = " | ".join(r["reason"] for r in rejects)
    for why in ("no rejected answer", "the same answer", "chosen answer is empty", "model.max_text_length=160"):
        assert why in reasons, reasons
    recs = sorted(load_samples(cfg.prep_dir), key=lambda r: r["manifest_line"])
    assert [(r["preference"], r["chosen"], r["rejected"]) for r in recs] == [
        (True, "A square.", "A circle."), (True, "A triangle.", "A square.")
    ]  # fmt: skip
    assert recs[0]["messages"] == [{"role": "user", "content": "What shape is shown?"},
                                   {"role": "assistant", "content": "A square."}]  # fmt: skip
    items = CachedLatents(cfg.cache_dir, recs)
    first = items[0]
    plain = ["attention_mask", "image_grid_thw", "input_ids", "labels", "mm_token_type_ids", "pixel_values"]
    assert sorted(k for k in first if not k.startswith(("chosen_", "rejected_"))) == plain  # the media once
    for name in FAM.pad_values:  # the plain token rows are the chosen side's
        assert torch.equal(first[name], first[f"chosen_{name}"])
    assert _labelled(first["chosen_input_ids"], first["chosen_labels"]) == "A square.<|im_end|>\n"
    assert _labelled(first["rejected_input_ids"], first["rejected_labels"]) == "A circle.<|im_end|>\n"
    start = int((first["chosen_labels"] != IGNORE_INDEX).nonzero()[0])  # both sides share the prompt before it
    assert torch.equal(first["chosen_input_ids"][:start], first["rejected_input_ids"][:start])

    # SFT on a preference cache: the default collate sees only the plain names, i.e. trains on the chosen side
    sft = get_method("sft")
    chosen_only = [{k: v for k, v in items[i].items() if not k.startswith(("chosen_", "rejected_"))} for i in (0, 1)]
    for pack in (False, True):
        got, want = sft.collate(FAM, [items[0], items[1]], pack), (FAM.pack if pack else FAM.collate)(chosen_only)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    # A TRL-style table row of the same image, prompt and answers caches the same tensors; no prompt is a rejection
    row = {"image": im0, "prompt": "What shape is shown?", "chosen": "A square.", "rejected": "A circle."}
    table = _write(data / "dpo_table.jsonl", [row, {"image": im1, "chosen": "A square.", "rejected": "A circle."}])
    cfg2, res2 = _prep(tmp_path / "table", table)
    assert res2.num_samples == 1 and res2.rejected_by_reason == {"bad_preference": 1}
    assert "no prompt" in Path(res2.rejects).read_text()
    (rec,) = load_samples(cfg2.prep_dir)
    assert rec["preference"] and rec["source"] == str(data / im0)
    again = CachedLatents(cfg2.cache_dir, [rec])[0]
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)

    # The cache key covers both answers: a new rejected answer is a new record, the unchanged ones stay cached
    _write(table, [row, {**row, "image": im1}])
    assert _prep(tmp_path / "table", table)[1].num_encoded == 1
    _write(table, [{**row, "rejected": "A triangle."}, {**row, "image": im1}])
    res3 = _prep(tmp_path / "table", table)[1]
    assert (res3.num_encoded, res3.num_cached) == (1, 1)


def test_dpo_refuses_a_cache_without_preference_records(tmp_path: Path, data: Path) -> None:
    cfg = load_config(RECIPE, [f"data.manifest={data / 'conversations.jsonl'}"], workdir=tmp_path)
    run_prep(cfg)
    with pytest.raises(ValueError, match=r'2 of 2 cached records are not .*"chosen" and "rejected"'):
        get_method("dpo").check(FAM, cfg)
    packed = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"packing": cfg.train.packing.model_copy(update={"max_tokens": 512})})})  # fmt: skip
    with pytest.raises(ValueError, match="train.packing.max_tokens: null"):
        get_method("dpo").check(FAM, packed)
