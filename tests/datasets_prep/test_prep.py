import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flowspeed.datasets_prep.cache import LatentCache
from flowspeed.datasets_prep.mp4 import write_mp4
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.common.io import read_jsonl
from flowspeed.engines.models import get_family

from tests.conftest import REPO, make_config
from tests.datasets_prep.media import write_audio_only, write_rotated, write_vfr


def _copy_dataset(src_manifest: Path, dst: Path) -> Path:
    shutil.copytree(src_manifest.parent, dst)
    return dst / "data.jsonl"


def test_bad_inputs_are_recorded_and_the_rest_is_cached(tmp_path: Path, demo_manifest: Path) -> None:
    manifest = _copy_dataset(demo_manifest, tmp_path / "data")
    root = manifest.parent
    good = read_jsonl(manifest)
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
    full = (root / good[0]["file"]).read_bytes()
    (root / "truncated.mp4").write_bytes(full[: len(full) // 3])
    (root / "empty.mp4").write_bytes(b"")
    write_mp4(root / "short.mp4", np.zeros((4, 64, 64, 3), np.uint8), 8)
    write_mp4(root / "tiny.mp4", np.zeros((12, 16, 16, 3), np.uint8), 8)
    write_audio_only(root / "audio.mp4")
    (tmp_path / "outside.mp4").write_bytes(full)
    # Usable but awkward: kept, with what the probe saw recorded.
    write_rotated(root / "rotated.mp4")
    write_vfr(root / "vfr.mp4")
    lines = [json.dumps(r) for r in good]
    lines += [json.dumps({"file": f, "captions": f"clip {f}"}) for f in ("rotated.mp4", "vfr.mp4")]
    bad = (
        "corrupt.mp4",
        "truncated.mp4",
        "empty.mp4",
        "missing.mp4",
        "short.mp4",
        "tiny.mp4",
        "audio.mp4",
        "../outside.mp4",
    )
    lines += [json.dumps({"file": f, "captions": f"bad {f}"}) for f in bad]
    lines += ["{not json", json.dumps({"captions": "no file"}), json.dumps({"file": good[1]["file"]})]
    manifest.write_text("\n".join(lines) + "\n")

    res = run_prep(make_config(tmp_path / "w", manifest))

    rejects = {Path(r["path"]).name: r for r in read_jsonl(Path(res.rejects))}
    assert all(set(r) == {"path", "stage", "reason", "code"} for r in rejects.values())
    expect = {
        "corrupt.mp4": "unreadable",
        "empty.mp4": "empty",
        "missing.mp4": "not_found",
        "short.mp4": "too_short",
        "tiny.mp4": "too_small",
        "audio.mp4": "no_video",
        "outside.mp4": "escapes_root",
    }
    for name, code in expect.items():
        assert rejects[name]["code"] == code, (name, rejects[name])
    assert rejects["truncated.mp4"]["code"] in {"unreadable", "no_frames"}
    assert "audio streams only" in rejects["audio.mp4"]["reason"]
    assert "too short" in rejects["short.mp4"]["reason"] and "min_side" in rejects["tiny.mp4"]["reason"]
    manifest_rejects = [r for r in rejects.values() if r["stage"] == "manifest"]
    bad_json_line = len(good) + 2 + len(bad) + 1
    assert any(r["code"] == "bad_json" and f"line {bad_json_line}" in r["reason"] for r in manifest_rejects)
    assert any(r["code"] == "no_media" and f"record {bad_json_line + 1}" in r["reason"] for r in manifest_rejects)
    assert any(r["code"] == "no_caption" for r in manifest_rejects)
    assert res.num_rejected == len(bad) + 3
    assert res.rejected_by_reason["escapes_root"] == 1 and sum(res.rejected_by_reason.values()) == res.num_rejected
    assert res.num_samples == res.num_encoded == len(good) + 2

    samples = {Path(r["source"]).name: r for r in read_jsonl(Path(res.samples))}
    assert samples["rotated.mp4"]["rotation"] == 90 and samples["rotated.mp4"]["src_size"] == [64, 96]
    assert samples["vfr.mp4"]["vfr"] is True and samples[Path(good[0]["file"]).name]["vfr"] is False
    cache = LatentCache(Path(res.cache_dir))
    t = cache.load(samples["rotated.mp4"])
    assert t["latent_params"].shape == (8, 3, 8, 8) and t["text_embeds"].shape == (128, 32)
    assert {"source", "content_hash", "encoder", "prep_hash"} <= samples["rotated.mp4"].keys()


def test_rotation_is_applied_the_same_by_both_decoders(tmp_path: Path) -> None:
    from flowspeed.datasets_prep.decode import decode
    from flowspeed.datasets_prep.probe import probe

    info = probe(write_rotated(tmp_path / "r.mp4"))
    assert (info.width, info.height, info.rotation) == (64, 96, 90)
    frames = {name: decode(info, [0, 3], name)[0] for name in ("decord", "pyav")}
    for arr in frames.values():
        assert arr.shape == (2, 96, 64, 3)
        assert arr[:, -8:].mean() > 200 and arr[:, :8].mean() < 30  # the bright stored left edge is now at the bottom
    assert np.abs(frames["decord"].astype(int) - frames["pyav"]).mean() < 1


def test_second_run_encodes_nothing_and_changes_add_entries(
    tmp_path: Path, demo_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _copy_dataset(demo_manifest, tmp_path / "data")
    cfg = make_config(tmp_path / "w", manifest)
    first = run_prep(cfg)
    assert first.num_encoded == first.num_samples == 8 and first.encoder_calls > 0

    family = get_family("cogvideox")
    calls = {"n": 0}
    real = type(family).encode_video

    def counting(self, vae, frames):
        calls["n"] += 1
        return real(self, vae, frames)

    monkeypatch.setattr(type(family), "encode_video", counting)
    second = run_prep(cfg)
    assert second.encoder_calls == 0 and calls["n"] == 0
    assert second.num_cached == 8 and second.num_encoded == 0

    # One changed file: one new entry; the old entry stays in the cache index.
    clip = manifest.parent / read_jsonl(manifest)[0]["file"]
    write_mp4(clip, np.full((48, 64, 96, 3), 200, np.uint8), 24)
    third = run_prep(cfg)
    assert third.num_encoded == 1 and third.num_cached == 7 and calls["n"] == 1
    assert len(read_jsonl(Path(third.index))) == 9

    # A changed prep config: every sample is new, and the earlier ones are still reusable.
    fourth = run_prep(make_config(tmp_path / "w", manifest, "data.num_frames=5"))
    assert fourth.num_encoded == 8 and len(read_jsonl(Path(fourth.index))) == 17


def test_num_frames_the_vae_cannot_take_is_refused(tmp_path: Path, demo_manifest: Path) -> None:
    with pytest.raises(ValueError, match="4k\\+1"):
        run_prep(make_config(tmp_path, demo_manifest, "data.num_frames=8"))


KILL_SCRIPT = """
import sys
from flowspeed.configs import load_config
from flowspeed.datasets_prep.prep import run_prep
run_prep(load_config(sys.argv[1], sys.argv[2:]))
"""


def test_sigkill_mid_prep_resumes_to_a_complete_duplicate_free_index(tmp_path: Path) -> None:
    from flowspeed.datasets_prep.demo import make_demo_dataset

    manifest = make_demo_dataset(tmp_path / "data", num_videos=16, num_images=4)
    args = [
        str(REPO / "configs" / "quickstart.yaml"),
        f"data.manifest={manifest}",
        f"workdir={tmp_path / 'w'}",
        "data.shard_size=1",
        "data.batch_size=1",
        "data.height=128",
        "data.width=128",
    ]
    from flowspeed.configs import load_config

    cache_dir = load_config(args[0], args[1:]).cache_dir
    shards = cache_dir / "shards"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len(list(shards.glob("*.safetensors"))) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    assert proc.wait() == -signal.SIGKILL, "prep finished before it could be killed"
    written = len(list(shards.glob("*.safetensors")))
    assert 2 <= written < 20

    res = run_prep(load_config(args[0], args[1:]))
    assert res.num_cached == written and res.num_encoded == 20 - written  # finished shards are not redone
    index = read_jsonl(Path(res.index))
    keys = [r["key"] for r in index]
    assert len(keys) == len(set(keys)) == res.num_samples == 20
    assert not list(shards.glob(".*.tmp"))
    cache = LatentCache(cache_dir)
    for rec in index:  # every indexed sample is readable: no half-written shard is visible
        assert cache.load(rec)["latent_params"].shape[0] == 8


@pytest.mark.slow
def test_two_rank_extraction_gives_the_same_index_as_one_rank(tmp_path: Path, demo_manifest: Path) -> None:
    from flowspeed.datasets_prep.prep import launch_prep

    one = launch_prep(make_config(tmp_path / "one", demo_manifest))
    two = launch_prep(make_config(tmp_path / "two", demo_manifest, "data.nproc_per_node=2"))
    assert two.world_size == 2 and one.world_size == 1
    assert (two.num_samples, two.num_encoded, two.num_rejected) == (one.num_samples, one.num_encoded, one.num_rejected)

    def content(res) -> dict:
        # the digest covers float bits, which change with how clips were batched through the VAE
        return {
            r["key"]: {k: v for k, v in r.items() if k not in ("shard", "digest")} for r in read_jsonl(Path(res.index))
        }

    assert content(one) == content(two)
    shards = sorted(p.name for p in (Path(two.cache_dir) / "shards").glob("*.safetensors"))
    assert any(s.startswith("r000-") for s in shards) and any(s.startswith("r001-") for s in shards)
    c1, c2 = LatentCache(Path(one.cache_dir)), LatentCache(Path(two.cache_dir))
    by_key = {r["key"]: r for r in read_jsonl(Path(two.index))}
    for rec in read_jsonl(Path(one.index)):
        a, b = c1.load(rec), c2.load(by_key[rec["key"]])
        assert torch.allclose(a["latent_params"], b["latent_params"], atol=1e-5)
        assert torch.equal(a["text_embeds"], b["text_embeds"])
    assert [r["key"] for r in read_jsonl(Path(one.samples))] == [r["key"] for r in read_jsonl(Path(two.samples))]


def test_a_family_with_several_text_outputs_caches_and_batches_them_all(
    tmp_path: Path, demo_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The extension point image families (pooled + per-token text states) rely on."""
    from flowspeed.datasets_prep.cache import CachedLatents, collate

    family = get_family("cogvideox")
    real = type(family).encode_text

    def two_outputs(self, tokenizer, encoder, captions, max_length):
        states = real(self, tokenizer, encoder, captions, max_length)
        return {"text_embeds": states, "pooled_embeds": states.mean(dim=1)}

    monkeypatch.setattr(type(family), "encode_text", two_outputs)
    res = run_prep(make_config(tmp_path, demo_manifest))
    samples = read_jsonl(Path(res.samples))
    assert samples[0]["tensors"] == ["latent_params", "pooled_embeds", "text_embeds"]
    assert samples[0]["text_shape"] == [128, 32]
    batch = collate([CachedLatents(Path(res.cache_dir), samples)[i] for i in range(2)])
    assert batch["pooled_embeds"].shape == (2, 32)
    assert torch.allclose(batch["pooled_embeds"], batch["text_embeds"].mean(dim=1), atol=1e-6)
    assert LatentCache(Path(res.cache_dir)).verify() == []
