"""Hostile inputs that once sank a whole prep, or the training set a previous prep left behind."""

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from flowspeed.datasets_prep.cache import CachedLatents, LatentCache
from flowspeed.datasets_prep.decode import decode
from flowspeed.datasets_prep.manifest import Entry, Rejection, read_manifest
from flowspeed.datasets_prep.prep import load_samples, run_prep
from flowspeed.datasets_prep.probe import probe
from flowspeed.engines.common.io import read_jsonl
from PIL import Image

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
    import flowspeed.datasets_prep.prep as prep

    first = read_jsonl(demo_manifest)[0]["file"]
    real = prep.decode

    def flaky(info, indices, decoder, size=None):
        if Path(os.path.realpath(info.path)).name == Path(first).name:  # decoders get the checked /proc/self/fd
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
    # one prep folder for both runs (a changed config gets a folder of its own by default): the case of a
    # rerun whose data went bad, which must not replace the training set the last good run published
    folder = f"data.output_dir={tmp_path / 'w' / 'prep'}"
    cfg = make_config(tmp_path / "w", demo_manifest, folder)
    ok = run_prep(cfg)
    before = {name: (cfg.prep_dir / name).read_bytes() for name in ("samples.jsonl", "rejects.jsonl", "summary.json")}
    before["config.yaml"] = (cfg.prep_dir / "config.yaml").read_bytes()
    index = Path(ok.index).read_bytes()

    bad = tmp_path / "bad" / "data.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"file": "missing.mp4", "captions": "nothing here"}) + "\n")
    failing = make_config(tmp_path / "w", bad, "data.num_frames=5", folder)
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


# ---- the understanding and speech families' prep (datasets_prep/sequence_prep.py) -------------------


def _recipe(name: str, workdir: Path, manifest: Path) -> "PipelineConfig":  # noqa: F821
    from flowspeed.configs import load_config

    from tests.conftest import REPO

    return load_config(REPO / "configs" / "pipelines" / f"{name}.yaml", [f"data.manifest={manifest}"], workdir=workdir)


def test_hostile_conversations_are_rejected_one_by_one(tmp_path: Path, demo_manifest: Path) -> None:
    """A turn that is not an object (AttributeError deep in the chat template's input), a lone-surrogate
    answer and a truncated image each cost their own record; the demo's conversations are all cached."""
    data = tmp_path / "data"
    shutil.copytree(demo_manifest.parent, data)
    good = read_jsonl(data / "conversations.jsonl")
    png = data / "images" / "broken.png"
    png.write_bytes(next((data / "images").glob("*.png")).read_bytes()[:60])  # the header survives, not the pixels
    hostile = [
        {"conversations": ["What shape is shown?", {"from": "gpt", "value": "A circle."}]},
        {"images": [good[-1]["images"][0]], "conversations": [
            {"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A lone \ud800 surrogate."}]},
        {"images": ["images/broken.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A square."}]},
    ]  # fmt: skip
    manifest = data / "conversations.jsonl"
    manifest.write_text(manifest.read_text() + "".join(json.dumps(r) + "\n" for r in hostile))

    res = run_prep(_recipe("qwen2_vl-sft", tmp_path / "w", manifest))

    assert res.num_samples == len(good)
    rejects = read_jsonl(Path(res.rejects))
    assert len(rejects) == 3, rejects
    n = len(good)
    not_a_turn, surrogate, broken = rejects
    assert not_a_turn["reason"].startswith(f"record {n + 1}: AttributeError: ") and not_a_turn["code"] == "exception"
    assert surrogate["reason"].startswith(f"record {n + 2}: ") and surrogate["code"] == "exception", surrogate
    assert surrogate["stage"] == "encode"  # the tokenizer refuses the lone surrogate (a TypeError)
    assert broken["path"].endswith("broken.png") and broken["stage"] == "decode" and "Truncated" in broken["reason"]
    Path(res.rejects).read_text(encoding="ascii")


def test_hostile_speech_records_are_rejected_one_by_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A corrupt audio file, a lone-surrogate transcript, and any exception the feature extractor raises
    for one clip (here a RuntimeError) each become that record's rejection with the exception's type."""
    from flowspeed.datasets_prep.demo import make_demo_audio
    from flowspeed.engines.models import get_family

    manifest = make_demo_audio(tmp_path / "data", num_clips=4)
    good = read_jsonl(manifest)
    (tmp_path / "data" / "audio" / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40)
    hostile = [
        {"audio": "audio/corrupt.wav", "text": "a low tone"},
        {"audio": good[1]["audio"], "text": "a \udc80 tone"},
    ]
    manifest.write_text(manifest.read_text() + "".join(json.dumps(r) + "\n" for r in hostile))
    family = type(get_family("whisper"))
    real = family.encode_sample

    def flaky(self, processor, sample, max_len):  # noqa: ANN001, ANN202
        if sample.text == good[0]["text"] and not hasattr(flaky, "fired"):
            flaky.fired = True  # the first clip only
            raise RuntimeError("simulated feature extractor failure")
        return real(self, processor, sample, max_len)

    monkeypatch.setattr(family, "encode_sample", flaky)
    res = run_prep(_recipe("whisper-asr", tmp_path / "w", manifest))

    assert res.num_samples == len(good) - 1
    rejects = read_jsonl(Path(res.rejects))
    assert len(rejects) == 3, rejects
    by_line = {int(r["reason"].split(":")[0].split()[-1]): r for r in rejects}
    assert by_line[1]["reason"] == "record 1: RuntimeError: simulated feature extractor failure"
    assert by_line[1]["stage"] == "encode" and by_line[1]["code"] == "exception"
    assert (
        by_line[len(good) + 1]["path"].endswith("corrupt.wav")
        and "could not decode audio" in by_line[len(good) + 1]["reason"]
    )
    assert "UnicodeEncodeError" in by_line[len(good) + 2]["reason"]


# ---- whole-file .json manifests: one record nested too deep -------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than the JSON parser's stack: RecursionError


def _json_array(path: Path, records: list[str]) -> Path:
    path.write_text("[\n" + ",\n".join(records) + "\n]\n")
    return path


def test_a_deep_record_in_a_json_conversation_file_is_rejected_alone(tmp_path: Path, demo_manifest: Path) -> None:
    """LLaVA-style `.json` files are parsed whole; a RecursionError used to sink the prep for every record."""
    data = tmp_path / "data"
    shutil.copytree(demo_manifest.parent, data)
    good = [json.dumps(r) for r in read_jsonl(data / "conversations.jsonl")]
    deep = '{"images": [], "conversations": [{"from": "human", "value": "hi, [not a bracket]"}], "x": ' + DEEP + "}"
    manifest = _json_array(data / "conversations.json", [good[0], deep, *good[1:]])

    items = list(read_manifest(manifest))  # auto-detected as sharegpt from its first record
    rejects = [i for i in items if isinstance(i, Rejection)]
    assert [type(i).__name__ for i in items].count("Entry") == len(good)
    (rej,) = rejects
    assert rej.code == "bad_json" and "record 2 " in rej.reason and "RecursionError" in rej.reason
    assert [i.line for i in items if isinstance(i, Entry)] == [1, *range(3, len(good) + 2)]

    res = run_prep(_recipe("qwen2_vl-sft", tmp_path / "w", manifest))
    assert res.num_samples == len(good) and res.rejected_by_reason == {"bad_json": 1}


def test_a_deep_record_in_a_json_table_or_annotation_file_is_rejected_alone(tmp_path: Path) -> None:
    (tmp_path / "a.mp4").write_bytes(b"x")
    rows = ['{"file": "a.mp4", "caption": "first, with \\"escaped\\" quotes and ] brackets"}',
            '{"file": "a.mp4", "caption": ' + DEEP + "}", '{"file": "a.mp4", "caption": "third"}']  # fmt: skip
    items = list(read_manifest(_json_array(tmp_path / "table.json", rows)))
    assert [(type(i).__name__, getattr(i, "caption", None)) for i in items] == [
        ("Entry", 'first, with "escaped" quotes and ] brackets'), ("Rejection", None), ("Entry", "third")]  # fmt: skip
    assert "record 2 " in items[1].reason and "RecursionError" in items[1].reason

    ann_rows = [r.replace('"file"', '"path"').replace('"caption"', '"cap"') for r in rows]
    _json_array(tmp_path / "anno.json", ann_rows)
    (tmp_path / "data.txt").write_text(f"{tmp_path},anno.json\n")
    items = list(read_manifest(tmp_path / "data.txt"))
    assert [type(i).__name__ for i in items] == ["Entry", "Rejection", "Entry"]
    assert items[1].path.endswith("anno.json:2") and "RecursionError" in items[1].reason


@pytest.mark.parametrize("body", ['{"records": ' + DEEP + "}", "[" + DEEP, "not json"])
def test_a_json_manifest_that_cannot_be_split_into_records_is_one_clear_error(tmp_path: Path, body: str) -> None:
    path = tmp_path / "table.json"
    path.write_text(body)
    with pytest.raises(ValueError, match=rf"manifest {path} .*(JSONL|fix the file)"):
        list(read_manifest(path, "json"))
