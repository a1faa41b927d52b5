"""DPO for the VLMs (engines/methods/dpo.py): the loss against the published formula, the log-probabilities against
the family's own token loss, a tiny Qwen2-VL run that learns to prefer the chosen answers, and FSDP2 on 2 gloo ranks
equal to one process (LoRA with the adapters-off reference; a full finetune with precomputed reference
log-probabilities, written once and read back, never recomputed, on resume)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from flowspeed.configs import PipelineConfig, load_config
from flowspeed.datasets_prep.cache import CachedLatents, split_records
from flowspeed.datasets_prep.prep import load_samples, run_prep
from flowspeed.engines.methods.dpo import REFERENCE_FILE, answer_logps, dpo_loss, pair_rows
from flowspeed.engines.models import get_family
from flowspeed.engines.torch_engine.trainer import train
from flowspeed.engines.tracking.tracker import ensure_experiment, tracking_uri
from flowspeed.evaluation.common import trained_model
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.engines.torch_engine.runs_job import result, run_together

RECIPE = REPO / "configs" / "pipelines" / "qwen2_vl-dpo.yaml"
FAM = get_family("qwen2_vl")
STEPS = 6
LORA_LR = 3e-3  # the recipe's
FULL = ["train.lora.enabled=false", "train.lr=1e-3", "train.method.label_smoothing=0.1", "train.method.sft_weight=0.5"]


def _published(pi: list[float], ref: list[float], beta: float, eps: float) -> float:
    """Rafailov et al. 2023, eq. 7, with conservative DPO's label noise eps: one pair, in python floats."""
    h = beta * ((pi[0] - ref[0]) - (pi[1] - ref[1]))
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    return -(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h)


def test_the_loss_is_the_published_formula() -> None:
    pi = [[-12.0, -15.5], [-30.25, -28.0], [-7.5, -7.5]]  # (B, 2) summed answer log-probs [chosen, rejected]
    ref = [[-13.0, -14.0], [-29.0, -31.5], [-8.0, -6.0]]
    tokens = [4, 9, 3]  # the chosen answers' token counts
    for beta, eps, sft in ((0.1, 0.0, 0.0), (0.5, 0.2, 0.0), (0.1, 0.1, 0.7)):
        loss, m = dpo_loss(torch.tensor(pi), torch.tensor(ref), beta, eps, sft, torch.tensor(tokens))
        want = sum(_published(p, r, beta, eps) for p, r in zip(pi, ref, strict=True)) / 3
        want += sft * -sum(p[0] for p in pi) / sum(tokens)  # the chosen answers' per-token NLL
        assert loss.item() == pytest.approx(want, rel=1e-6)
        rewards = [(beta * (p[0] - r[0]), beta * (p[1] - r[1])) for p, r in zip(pi, ref, strict=True)]
        assert m["train/chosen_reward"].item() == pytest.approx(sum(c for c, _ in rewards) / 3, rel=1e-6)
        assert m["train/rejected_reward"].item() == pytest.approx(sum(r for _, r in rewards) / 3, rel=1e-6)
        assert m["train/margin"].item() == pytest.approx(sum(c - r for c, r in rewards) / 3, rel=1e-6)
        assert m["train/accuracy"].item() == pytest.approx(2 / 3)  # the third pair's margin is negative
        assert all(v.dim() == 0 for v in m.values())


def _cfg(tmp: Path, manifest: Path, *overrides: str) -> PipelineConfig:
    common = [f"data.manifest={manifest}", "model.max_text_length=256", f"train.max_steps={STEPS}",
              "train.batch_size=1", "train.grad_accum=2", "train.val_fraction=0", "train.warmup_steps=0",
              "train.checkpoint_every=100"]  # fmt: skip
    return load_config(RECIPE, [*common, *overrides], workdir=tmp)


@pytest.fixture(scope="module")
def pref(tmp_path_factory: pytest.TempPathFactory, demo_manifest: Path) -> PipelineConfig:
    """The demo's preference pairs (8: 6 clips, 2 stills), prepped once for the module."""
    cfg = _cfg(tmp_path_factory.mktemp("dpo-prep"), demo_manifest.with_name("preferences.jsonl"))
    run_prep(cfg)
    return cfg


def _on(pref: PipelineConfig, tmp: Path, *overrides: str) -> PipelineConfig:
    return _cfg(tmp, pref.data.manifest, f"data.output_dir={pref.prep_dir}", f"data.cache_dir={pref.cache_dir}",
                *overrides)  # fmt: skip


def test_answer_logps_are_the_token_loss_and_rows_pair_up(pref: PipelineConfig) -> None:
    recs = load_samples(pref.prep_dir)
    items = [CachedLatents(pref.cache_dir, recs)[i] for i in (0, len(recs) - 1)]  # a clip's pair and a still's
    batch = pair_rows(FAM, items)  # rows: chosen 0, chosen 1, rejected 0, rejected 1
    model = FAM.load_model(pref.model).eval()
    with torch.no_grad():
        logps, counts, _ = answer_logps(FAM, model, batch)
        for row, (item, side) in enumerate((it, s) for s in ("chosen", "rejected") for it in items):
            alone = FAM.collate([{k: v for k, v in item.items() if not k.startswith(("chosen_", "rejected_"))}
                                 | {k: item[f"{side}_{k}"] for k in FAM.pad_values}])  # fmt: skip
            assert torch.equal(batch["input_ids"][row, : alone["input_ids"].shape[1]], alone["input_ids"][0])
            n = int((alone["labels"][:, 1:] != -100).sum())
            assert int(counts[row]) == n
            # the family's SFT loss is the per-token mean of the same cross-entropy: -logps / tokens
            assert logps[row].item() == pytest.approx(-FAM.training_loss(model, None, alone, None).item() * n, rel=1e-5)


def test_tokens_per_second_count_both_sides_of_a_pair(pref: PipelineConfig) -> None:
    from flowspeed.engines.methods import get_method

    for rec in load_samples(pref.prep_dir):
        both = sum(rec["shapes"][f"{side}_input_ids"][0] for side in ("chosen", "rejected"))
        assert get_method("dpo").sample_tokens(FAM, None, rec) == both > FAM.sample_tokens(None, rec)
        assert get_method("sft").sample_tokens(FAM, None, rec) == FAM.sample_tokens(None, rec)  # the chosen side


def _metric(client: MlflowClient, run_id: str, name: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]


def _margins(cfg: PipelineConfig, final_dir: str) -> torch.Tensor:
    """beta x ((pi_c - ref_c) - (pi_r - ref_r)) of the exported policy on every training pair, against the starting
    model (the tiny preset's seeded init)."""
    recs = load_samples(cfg.prep_dir)
    batch = pair_rows(FAM, [CachedLatents(cfg.cache_dir, recs)[i] for i in range(len(recs))])
    with torch.no_grad():
        logps = [answer_logps(FAM, m.eval(), batch)[0].view(2, -1) for m in
                 (trained_model(cfg, Path(final_dir)), FAM.load_model(cfg.model))]  # fmt: skip
    (pc, pr), (rc, rr) = logps
    return cfg.train.method.beta * ((pc - rc) - (pr - rr))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, pref: PipelineConfig, mlflow_db: Path) -> dict[str, Any]:
    """The one-process runs the 2-rank ones must equal (each accumulates 2 micro-batches of one pair, what 2 ranks
    of one pair each compute): the recipe (LoRA, reference = adapters off, tracked), and a full finetune with the
    label smoothing and SFT terms on, once with a frozen reference copy and once with precomputed log-probs."""
    out: dict[str, Any] = {}
    lora = _on(pref, tmp_path_factory.mktemp("lora"))
    shutil.copyfile(mlflow_db, lora.workdir / "mlflow.db")
    client = MlflowClient(uri := tracking_uri(lora))
    run_id = client.create_run(ensure_experiment(client, lora)).info.run_id
    out["lora"] = (lora, train(lora, run_id, uri), client, run_id)
    for ref in ("model", "precomputed"):
        cfg = _on(pref, tmp_path_factory.mktemp(f"full-{ref}"), *FULL, f"train.method.reference={ref}")
        out[ref] = (cfg, train(cfg))
    return out


def test_a_tiny_qwen2_vl_dpo_run_learns_to_prefer_the_chosen_answers(one_process: dict[str, Any]) -> None:
    cfg, res, client, run_id = one_process["lora"]
    margin = _metric(client, run_id, "train/margin")
    assert len(margin) == STEPS and margin[0] == 0.0  # step 1: the adapters are zero, the policy IS the reference
    assert res.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # -logsigmoid(0)
    for name in ("train/chosen_reward", "train/rejected_reward", "train/accuracy"):
        assert len(_metric(client, run_id, name)) == STEPS
    # the exported policy prefers the chosen answer of every training pair (margins of 0.3-0.55 on this CPU after
    # 6 steps; 0 before the first): its log-ratio gap grew on each, far above float32 rounding of sums of ~10 terms
    margins = _margins(cfg, res.final_dir)
    assert margins.min() > 0.1, margins
    assert margin[-1] > 0.1 and sum(res.losses[-2:]) < sum(res.losses[:2])


def test_precomputed_reference_equals_the_frozen_copy_and_is_never_recomputed(
    tmp_path: Path, pref: PipelineConfig, one_process: dict[str, Any]
) -> None:
    (_, by_model), (cfg, by_file) = one_process["model"], one_process["precomputed"]
    # the same starting model scores the same answers: the same trajectory, up to float32 summation order
    assert by_file.losses == pytest.approx(by_model.losses, abs=1e-5)
    written = json.loads((cfg.train_dir / REFERENCE_FILE).read_text())["logps"]
    assert sorted(written) == sorted(r["key"] for r in load_samples(cfg.prep_dir))

    # A resumed run reads the file (the policy has moved on): not rewritten, and a record missing from it is an error
    half = _on(pref, tmp_path, *FULL, "train.method.reference=precomputed", "train.checkpoint_every=3")
    first = train(half.model_copy(update={"train": half.train.model_copy(update={"stop_after_steps": 3})}))
    path = half.train_dir / REFERENCE_FILE
    stamp = path.stat().st_mtime_ns
    resumed = train(half)
    assert resumed.resumed_from == 3 and path.stat().st_mtime_ns == stamp
    assert first.losses + resumed.losses == pytest.approx(by_file.losses, abs=1e-6)

    table = json.loads(path.read_text())
    table["logps"].pop(next(iter(table["logps"])))
    path.write_text(json.dumps(table))
    again = half.model_copy(update={"train": half.train.model_copy(update={"max_steps": STEPS + 1})})
    with pytest.raises(ValueError, match="no reference log-probabilities for 1 training records"):
        train(again)
    path.unlink()  # and never recomputed from the trained policy
    with pytest.raises(ValueError, match="is missing but the run resumed from .*step-00000006"):
        train(again)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, pref: PipelineConfig) -> dict[str, Any]:
    fsdp = ["train.nproc_per_node=2", "train.parallel.dp_shard=2", "train.grad_accum=1"]
    pre = [*fsdp, *FULL, "train.method.reference=precomputed"]
    runs = {
        "lora": _on(pref, tmp_path_factory.mktemp("fsdp-lora"), *fsdp),
        "precomputed": _on(pref, tmp_path_factory.mktemp("fsdp-pre"), *pre),
        # 7 training pairs (one held out): shares of 4 and 3 (+ 1 padding forward); one step is enough
        "odd": _on(pref, tmp_path_factory.mktemp("fsdp-odd"), *pre, "train.val_fraction=0.1", "train.max_steps=1"),
    }
    return {"runs": runs, "job_error": run_together(runs, 2)}


def test_precomputed_shares_gather_to_one_process_table_when_ranks_get_unequal_shares(
    two_ranks: dict[str, Any], one_process: dict[str, Any]
) -> None:
    """The reference log-probs depend only on the starting model and the record: the 2-rank table of 7 training
    records (a padded share) is the one-process table of all 8, restricted to them."""
    cfg = two_ranks["runs"]["odd"]
    assert len(result(two_ranks["runs"], "odd", two_ranks["job_error"]).losses) == 1
    got = json.loads((cfg.train_dir / REFERENCE_FILE).read_text())["logps"]
    train_records, _ = split_records(load_samples(cfg.prep_dir), cfg.train.val_fraction)
    assert sorted(got) == sorted(r["key"] for r in train_records) and len(got) == 7
    want = json.loads((one_process["precomputed"][0].train_dir / REFERENCE_FILE).read_text())["logps"]
    assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in got)


@pytest.mark.parametrize("name", ["lora", "precomputed"])
def test_fsdp2_on_two_ranks_equals_one_process(
    name: str, two_ranks: dict[str, Any], one_process: dict[str, Any]
) -> None:
    single_cfg, single = one_process[name][:2]
    res = result(two_ranks["runs"], name, two_ranks["job_error"])
    assert res.losses == pytest.approx(single.losses, abs=1e-5)
    cfg = two_ranks["runs"][name]
    if name == "precomputed":  # the shares of both ranks gathered: the same table one process writes
        got, want = (json.loads((c.train_dir / REFERENCE_FILE).read_text())["logps"] for c in (cfg, single_cfg))
        assert got.keys() == want.keys() and len(want) == 8
        assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in want)
    a, b = (trained_model(c, Path(r.final_dir)).state_dict() for c, r in ((cfg, res), (single_cfg, single)))
    assert a.keys() == b.keys()
    # Adam moves a weight by about lr per step whatever the gradient's scale; float32 reduction order changes a
    # step by a rounding-level share of that (more only where a gradient is itself at rounding level), so after
    # STEPS steps the two runs' weights differ by far less than 1% of the largest possible move, lr x STEPS, while
    # a step on other pairs would move them apart by its whole size
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 0.01 * single_cfg.train.lr * STEPS, worst
