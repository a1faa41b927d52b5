"""Preference pairs in the latent prep: both sides cached at one shape, a bad rejected side refuses the pair."""

import json
from pathlib import Path

import pytest
import torch
from flowspeed.configs import load_config
from flowspeed.datasets_prep.cache import LatentCache
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.common.io import read_jsonl
from PIL import Image, ImageDraw

from tests.conftest import REPO


def _image(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    img = Image.new("RGB", size, (20, 20, 20))
    ImageDraw.Draw(img).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=colour)
    img.save(path)
    return path.name


def test_pairs_cache_both_sides_at_one_shape_and_a_bad_rejected_side_refuses_the_pair(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    chosen = _image(root / "chosen.png", (96, 80), (230, 40, 40))
    rejected = _image(root / "rejected.png", (112, 72), (40, 80, 230))  # another size and aspect: cropped to the bucket
    _image(root / "tiny.png", (16, 16), (0, 0, 0))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = [
        {"caption": "a red circle", "chosen": chosen, "rejected": rejected},
        {"caption": "a missing one", "chosen": chosen, "rejected": "missing.png"},
        {"caption": "a tiny one", "chosen": chosen, "rejected": "tiny.png"},
        {"caption": "a broken one", "chosen": chosen, "rejected": "broken.png"},
        {"caption": "an escape", "chosen": chosen, "rejected": "../outside.png"},
        # the same files as plain samples: what each side of the pair must be
        {"file": chosen, "caption": "the chosen image alone"},
        {"file": rejected, "caption": "the rejected image alone"},
    ]
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(REPO / "configs" / "sd3-quickstart.yaml", [f"data.manifest={manifest}"], workdir=tmp_path / "w")

    res = run_prep(cfg)
    samples = {r["caption"]: r for r in read_jsonl(Path(res.samples))}
    assert sorted(samples) == ["a red circle", "the chosen image alone", "the rejected image alone"]
    pair = samples["a red circle"]
    assert pair["preference"] is True
    assert pair["source"].endswith("chosen.png") and pair["rejected_source"].endswith("rejected.png")
    assert pair["tensors"] == ["latent_params", "pooled_embeds", "rejected_latent_params", "text_embeds"]
    assert pair["rejected_src_size"] == [112, 72]
    cache = LatentCache(cfg.cache_dir)
    t = cache.load(pair)
    assert t["latent_params"].shape == t["rejected_latent_params"].shape == torch.Size([8, 8, 8])
    # each side is its own image at the chosen one's bucket: the latents a plain prep of that file gives. Not bit for
    # bit: the VAE encodes them in batches of other sizes, and oneDNN picks its convolution algorithm (Winograd among
    # them, ~1e-3 relative) per batch shape and thread count; the two images' latents differ by over 1e-2
    alone = {k: cache.load(samples[f"the {k} image alone"])["latent_params"] for k in ("chosen", "rejected")}
    torch.testing.assert_close(t["latent_params"], alone["chosen"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(t["rejected_latent_params"], alone["rejected"], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(t["latent_params"], t["rejected_latent_params"], atol=1e-2)

    rejects = {r["reason"].split(":")[0]: r for r in read_jsonl(Path(res.rejects))}
    by_code = sorted(r["code"] for r in read_jsonl(Path(res.rejects)))
    assert by_code == ["escapes_root", "not_found", "too_small", "unreadable"], by_code
    for name in ("missing.png", "tiny.png", "broken.png"):
        (why,) = [r for r in rejects.values() if name in r["reason"]]
        assert why["reason"].startswith("rejected side ") and why["path"].endswith("chosen.png"), why

    # idempotent, and the key covers the rejected file: replacing it makes a new sample, the plain ones stay cached
    again = run_prep(cfg)
    assert (again.num_cached, again.num_encoded) == (3, 0)
    _image(root / "rejected.png", (112, 72), (240, 220, 40))
    changed = run_prep(cfg)
    assert changed.num_encoded == 2 and changed.num_cached == 1  # the pair and the plain row of that file


@pytest.mark.parametrize("row", [{"caption": "x", "chosen": "a.png"}, {"caption": "x", "chosen": "", "rejected": "b"}])
def test_half_a_pair_is_no_media(tmp_path: Path, row: dict) -> None:
    from flowspeed.datasets_prep.manifest import Rejection, read_sources

    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps(row) + "\n")
    (item,) = read_sources(manifest)
    assert isinstance(item, Rejection) and item.code == "no_media"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_pair_rows_read_from_every_table_layout(tmp_path: Path, fmt: str) -> None:
    from flowspeed.datasets_prep.manifest import Entry, read_sources

    rows = [{"caption": "a red circle", "chosen": "a.png", "rejected": "sub/b.png", "annotator": "x"}]
    manifest = tmp_path / f"pairs.{fmt}"
    if fmt == "csv":
        manifest.write_text("caption,chosen,rejected,annotator\na red circle,a.png,sub/b.png,x\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), manifest)
    (item,) = read_sources(manifest)
    assert isinstance(item, Entry) and item.caption == "a red circle"
    assert item.path == tmp_path / "a.png" and item.media == (tmp_path / "a.png", tmp_path / "sub" / "b.png")
    assert item.meta == {"chosen": "a.png", "rejected": "sub/b.png", "annotator": "x"}
