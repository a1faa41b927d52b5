import subprocess
import sys
from pathlib import Path

from datasets_prep.cache import LatentCache
from datasets_prep.io import read_jsonl
from datasets_prep.prep import run_prep
from tests.conftest import REPO, make_config


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "cache", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_verify_catches_a_flipped_byte_and_fix_lets_prep_re_encode(tmp_path: Path, demo_manifest: Path) -> None:
    cfg = make_config(tmp_path, demo_manifest, "data.shard_size=3")
    run_prep(cfg)
    cache = LatentCache(cfg.prep_dir / "cache")
    assert cache.verify() == []
    shard = cache.shards()[1]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # bit rot in the last tensor's data
    shard.write_bytes(bytes(raw))
    problems = cache.verify()
    assert [p["problem"] for p in problems] == ["checksum mismatch"] and problems[0]["shard"] == shard.name

    args = ["configs/quickstart.yaml", "--workdir", str(tmp_path), "--set", f"data.manifest={demo_manifest}"]
    bad = _cli("verify", *args)
    assert bad.returncode == 1 and "checksum mismatch" in bad.stderr
    assert _cli("verify", *args, "--fix").returncode == 0
    again = run_prep(cfg)
    assert again.num_encoded == 3 and again.num_cached == 5 and LatentCache(cfg.prep_dir / "cache").verify() == []


def test_prune_keeps_only_what_the_config_selects(tmp_path: Path, demo_manifest: Path) -> None:
    old = make_config(tmp_path, demo_manifest, "data.num_frames=5")
    run_prep(old)
    cfg = make_config(tmp_path, demo_manifest)
    run_prep(cfg)
    cache = LatentCache(cfg.prep_dir / "cache")
    assert cache.summary()["samples"] == 16 and len(cache.summary()["groups"]) == 2

    args = ["configs/quickstart.yaml", "--workdir", str(tmp_path), "--set", f"data.manifest={demo_manifest}"]
    listed = _cli("list", *args)
    assert listed.returncode == 0 and "16 samples" in listed.stdout
    dry = _cli("prune", *args, "--dry-run")
    assert "would remove 8 samples" in dry.stdout and cache.summary()["samples"] == 16
    assert _cli("prune", *args).returncode == 0
    assert cache.summary()["samples"] == 8
    assert {r["key"] for r in read_jsonl(cfg.prep_dir / "cache" / "index.jsonl")} == {
        r["key"] for r in read_jsonl(cfg.prep_dir / "samples.jsonl")
    }
    assert run_prep(cfg).encoder_calls == 0  # what the config uses survived the prune
