"""Hostile inputs that once sank a whole prep, or the training set a previous prep left behind."""

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets_prep.cache import LatentCache
from datasets_prep.decode import decode
from datasets_prep.io import read_jsonl
from datasets_prep.prep import load_samples, run_prep
from datasets_prep.probe import probe
from engines.torch_engine.data import CachedLatents
from tests.conftest import make_config


def _dataset(src_manifest: Path, dst: Path, extra: list[str]) -> Path:
    shutil.copytree(src_manifest.parent, dst)
    manifest = dst / "data.jsonl"
    manifest.write_text(manifest.read_text() + "".join(line + "\n" for line in extra))
    return manifest


def _huge_png(path: Path, width: int = 16000, height: int = 10000) -> Path:
    """A flat palette image: a few hundred KB on disk, 160 Mpixels (480 MB as RGB) once decoded."""
    Image.new("P", (width, height), 3).save(path, optimize=True)
    return path


def test_hostile_manifest_lines_become_rejections_and_the_rest_is_cached(tmp_path: Path, demo_manifest: Path) -> None:
    good = read_jsonl(demo_manifest)
    deep = '{"file": "' + good[0]["file"] + '", "captions": ' + "[" * 100_000 + "]" * 100_000 + "}"
    surrogate = json.dumps({"file": good[1]["file"], "captions": "a lone \ud800 surrogate"})
    manifest = _dataset(demo_manifest, tmp_path / "data", [deep, surrogate])

    res = run_prep(make_config(tmp_path / "w", manifest))

    assert res.num_samples == len(good)
    rejects = read_jsonl(Path(res.rejects))
    deep_line = len(good) + 1
    assert any(f"line {deep_line}" in r["reason"] and "RecursionError" in r["reason"] for r in rejects), rejects
    assert any("UnicodeEncodeError" in r["reason"] and "surrogate" in r["reason"] for r in rejects), rejects
    Path(res.rejects).read_text(encoding="ascii")  # escaped: any text round-trips through the file


def test_an_exception_decoding_one_record_rejects_only_that_record(
    tmp_path: Path, demo_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets_prep.prep as prep

    first = read_jsonl(demo_manifest)[0]["file"]
    real = prep.decode

    def flaky(info, indices, decoder, size=None):
        if Path(info.path).name == Path(first).name:
            raise MemoryError("simulated allocation failure")
        return real(info, indices, decoder, size)

    monkeypatch.setattr(prep, "decode", flaky)
    res = run_prep(make_config(tmp_path, demo_manifest))
    assert res.num_samples == len(read_jsonl(demo_manifest)) - 1
    [rej] = [r for r in read_jsonl(Path(res.rejects)) if r["stage"] == "decode"]
    assert rej["reason"] == "MemoryError: simulated allocation failure" and rej["path"].endswith(first)


def test_a_tiny_png_of_huge_dimensions_is_rejected_before_decoding(tmp_path: Path, demo_manifest: Path) -> None:
    manifest = _dataset(demo_manifest, tmp_path / "data", [json.dumps({"file": "huge.png", "captions": "huge"})])
    assert _huge_png(manifest.parent / "huge.png").stat().st_size < 2**20
    tracemalloc.start()
    try:
        res = run_prep(make_config(tmp_path / "w", manifest))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    [rej] = [r for r in read_jsonl(Path(res.rejects)) if r["path"].endswith("huge.png")]
    assert rej["code"] == "over_budget" and "data.max_decode_pixels" in rej["reason"] and "16000x10000" in rej["reason"]
    assert res.num_samples == len(read_jsonl(demo_manifest))
    assert peak < 200 * 2**20, f"prep peaked at {peak / 2**20:.0f} MiB of Python/numpy allocations"


def test_images_are_resized_once_before_being_repeated_per_frame(tmp_path: Path) -> None:
    """A within-budget large image costs one full-size frame, not one per output frame."""
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), np.uint8)).save(path)
    info = probe(path)
    tracemalloc.start()
    try:
        frames, _ = decode(info, [0] * 9, "decord", (48, 64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frames.shape == (9, 48, 64, 3) and frames.dtype == np.uint8
    assert peak < 4 * 1500 * 2000 * 3, f"{peak / 2**20:.0f} MiB: the full-size frame was repeated or kept as float"


def test_a_failed_prep_leaves_the_previous_training_set_intact(tmp_path: Path, demo_manifest: Path) -> None:
    cfg = make_config(tmp_path / "w", demo_manifest)
    ok = run_prep(cfg)
    before = {name: (cfg.prep_dir / name).read_bytes() for name in ("samples.jsonl", "rejects.jsonl", "summary.json")}
    before["config.yaml"] = (cfg.prep_dir / "config.yaml").read_bytes()
    index = Path(ok.index).read_bytes()

    bad = tmp_path / "bad" / "data.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"file": "missing.mp4", "captions": "nothing here"}) + "\n")
    failing = make_config(tmp_path / "w", bad, "data.num_frames=5")
    with pytest.raises(ValueError, match="no usable samples") as err:
        run_prep(failing)
    assert "rejects.failed.jsonl" in str(err.value) and "left as they were" in str(err.value)
    assert "not_found" in (cfg.prep_dir / "rejects.failed.jsonl").read_text()

    assert {name: (cfg.prep_dir / name).read_bytes() for name in before} == before
    assert Path(ok.index).read_bytes() == index
    records = load_samples(cfg.prep_dir)
    data = CachedLatents(cfg.cache_dir, records)
    assert len(records) == ok.num_samples and all(data[i]["latent_params"].numel() for i in range(len(data)))


def test_training_on_an_empty_training_set_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "samples.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no samples.*flowspeed prep"):
        load_samples(tmp_path)


def test_an_unreadable_shard_is_named_and_its_samples_re_encoded(
    tmp_path: Path, demo_manifest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(tmp_path, demo_manifest, "data.shard_size=3")
    run_prep(cfg)
    cache = LatentCache(cfg.cache_dir)
    shard = cache.shards()[0]
    shard.write_bytes(b"\xff" * 64)  # header length beyond the file: safetensors cannot open it

    with caplog.at_level("WARNING"):
        again = run_prep(cfg)
    assert shard.name in caplog.text and "cache verify" in caplog.text
    assert again.num_encoded == 3 and again.num_samples == len(read_jsonl(demo_manifest))
    assert {r["shard"] for r in load_samples(cfg.prep_dir)}.isdisjoint({shard.name})
