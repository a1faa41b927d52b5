from pathlib import Path

import pytest
import torch
from flowspeed.configs import CaptionConfig
from flowspeed.datasets_prep.caption import load_captioner, tiny_qwen2_vl
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.common.io import read_jsonl, write_jsonl

from tests.conftest import make_config


def test_tiny_qwen2_vl_captions_every_clip_and_records_the_model(
    tmp_path: Path, demo_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = read_jsonl(demo_manifest)
    keep = rows[0]["captions"]
    rows = [{"file": str(demo_manifest.parent / r["file"])} for r in rows]  # no captions ...
    rows[0]["captions"] = keep  # ... except one, which is kept
    manifest = write_jsonl(demo_manifest.parent / "uncaptioned.jsonl", rows)
    cfg = make_config(
        tmp_path, manifest, "data.caption.enabled=true", "data.caption.max_new_tokens=8", "data.caption.batch_size=3"
    )
    res = run_prep(cfg)
    samples = read_jsonl(Path(res.samples))
    assert res.num_samples == 8 and res.num_rejected == 0
    by_model = {s["caption_model"] for s in samples[1:]}
    assert by_model == {"qwen2_vl:preset:tiny"} and samples[0]["caption_model"] == "manifest"
    assert samples[0]["caption"] == keep and all(s["caption"] for s in samples)

    # A re-run reuses the captions: no captioner is even built.
    import flowspeed.datasets_prep.caption as mod

    monkeypatch.setattr(mod, "load_captioner", None)
    again = run_prep(cfg)
    assert again.num_cached == 8 and again.encoder_calls == 0


def test_tiny_captioner_round_trips_through_from_pretrained(tmp_path: Path) -> None:
    model, processor = tiny_qwen2_vl()
    model.save_pretrained(tmp_path / "qwen")
    processor.save_pretrained(tmp_path / "qwen")
    cap = load_captioner(CaptionConfig(pretrained=str(tmp_path / "qwen"), max_new_tokens=6), torch.device("cpu"))
    from PIL import Image

    frames = [Image.new("RGB", (64, 48), (200, 20, 20)), Image.new("RGB", (64, 48), (20, 20, 200))]
    texts = cap([frames, frames[:1]])
    tiny = load_captioner(CaptionConfig(max_new_tokens=6), torch.device("cpu"))
    assert texts == tiny([frames, frames[:1]])  # the same weights give the same words
    assert cap.identity.startswith("qwen2_vl:pretrained:")
    with pytest.raises(ValueError, match="known captioners: internvl, llava, qwen2_vl"):
        load_captioner(CaptionConfig(model="blip"), torch.device("cpu"))
    with pytest.raises(ValueError, match="has no tiny preset"):
        load_captioner(CaptionConfig(model="llava"), torch.device("cpu"))
