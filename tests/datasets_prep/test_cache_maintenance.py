import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from flowspeed.datasets_prep.cache import LatentCache
from flowspeed.datasets_prep.prep import run_prep
from flowspeed.engines.common.io import read_jsonl

from tests.conftest import QUICKSTART, REPO, make_config


def _cli(*args: str) -> SimpleNamespace:
    """`flowspeed cache ...` in this process (its stdout, stderr and exit status as a child's would be),
    without starting an interpreter and importing the CLI again for each call."""
    from flowspeed.flows.cli import app
    from typer.testing import CliRunner

    res = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["cache", *args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return SimpleNamespace(returncode=res.exit_code, stdout=res.stdout, stderr=res.stderr)


def test_verify_catches_a_flipped_byte_and_fix_lets_prep_re_encode(tmp_path: Path, demo_manifest: Path) -> None:
    cfg = make_config(tmp_path, demo_manifest, "data.shard_size=3")
    run_prep(cfg)
    cache = LatentCache(cfg.cache_dir)
    assert cache.verify() == []
    shard = cache.shards()[1]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # bit rot in the last tensor's data
    shard.write_bytes(bytes(raw))
    problems = cache.verify()
    assert [p["problem"] for p in problems] == ["checksum mismatch"] and problems[0]["shard"] == shard.name

    args = [str(QUICKSTART), "--workdir", str(tmp_path), "--set", f"data.manifest={demo_manifest}"]
    bad = _cli("verify", *args)
    assert bad.returncode == 1 and "checksum mismatch" in bad.stderr
    assert _cli("verify", *args, "--fix").returncode == 0
    again = run_prep(cfg)
    assert again.num_encoded == 3 and again.num_cached == 5 and LatentCache(cfg.cache_dir).verify() == []


def test_prune_keeps_only_what_the_workdirs_prep_folders_select(tmp_path: Path, demo_manifest: Path) -> None:
    """Two preps of one workdir (other settings: other folders) share its cache; prune keeps what either
    selects, until a folder is deleted."""
    old = make_config(tmp_path, demo_manifest, "data.num_frames=5")
    run_prep(old)
    cfg = make_config(tmp_path, demo_manifest)
    run_prep(cfg)
    cache = LatentCache(cfg.cache_dir)
    assert old.cache_dir == cfg.cache_dir and old.prep_dir != cfg.prep_dir
    assert cache.summary()["samples"] == 16 and len(cache.summary()["groups"]) == 2

    args = [str(QUICKSTART), "--workdir", str(tmp_path), "--set", f"data.manifest={demo_manifest}"]
    listed = _cli("list", *args)
    assert listed.returncode == 0 and "16 samples" in listed.stdout
    assert f"{old.prep_dir.name}: 8 samples" in listed.stdout and f"{cfg.prep_dir.name}: 8 samples" in listed.stdout
    assert "would remove 0 samples" in _cli("prune", *args, "--dry-run").stdout  # the other prep still uses them
    shutil.rmtree(old.prep_dir)
    dry = _cli("prune", *args, "--dry-run")
    assert "would remove 8 samples" in dry.stdout and cache.summary()["samples"] == 16
    assert _cli("prune", *args).returncode == 0
    assert cache.summary()["samples"] == 8
    assert {r["key"] for r in read_jsonl(cfg.cache_dir / "index.jsonl")} == {
        r["key"] for r in read_jsonl(cfg.prep_dir / "samples.jsonl")
    }
    assert run_prep(cfg).encoder_calls == 0  # what the config uses survived the prune


def test_experiments_share_one_cache_and_live_writers_keep_their_temp_files(
    tmp_path: Path, demo_manifest: Path
) -> None:
    shared = tmp_path / "shared-cache"
    first = run_prep(make_config(tmp_path / "exp-a", demo_manifest, f"data.cache_dir={shared}"))
    assert first.num_encoded == 8
    other = run_prep(make_config(tmp_path / "exp-b", demo_manifest, f"data.cache_dir={shared}", "train.lr=5e-4"))
    assert other.encoder_calls == 0 and other.num_cached == 8  # another experiment, same prep settings

    # A live writer's temp file survives clean_partial; a dead writer's does not.
    code = (
        "import sys, time; from flowspeed.datasets_prep.cache import LatentCache\n"
        "c = LatentCache(sys.argv[1]); c._hold_writer_lock(); print(c.token, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(shared)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    token = proc.stdout.readline().strip()
    tmp = shared / "shards" / f".r000-000099-{token}.safetensors.x1.tmp"
    tmp.write_bytes(b"half a shard")
    assert LatentCache(shared).clean_partial() == 0 and tmp.exists()
    proc.kill()
    proc.wait()
    assert LatentCache(shared).clean_partial() == 1 and not tmp.exists()
