"""The prep preview: a contact sheet with one tile per sample, MLflow tables of samples (with thumbnails) and
rejects, and `flowspeed prep --preview N` drawing N records without encoding.

The session's `prepped` folder is read-only here: its outputs are copied into tmp_path and drawn there.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from flowspeed.configs import PipelineConfig
from flowspeed.datasets_prep import preview as pv
from flowspeed.engines.common.io import read_jsonl, write_jsonl
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import QUICKSTART

REJECT = {"path": "/data/broken.mp4", "stage": "probe", "reason": "unreadable video: moov atom not found",
          "code": "unreadable"}  # fmt: skip


def _outputs(prepped: PipelineConfig, dest: Path) -> Path:
    """A copy of the prep's samples and rejects (plus one known reject) to draw into."""
    dest.mkdir()
    shutil.copy(prepped.prep_dir / "samples.jsonl", dest / "samples.jsonl")
    write_jsonl(dest / "rejects.jsonl", [*read_jsonl(prepped.prep_dir / "rejects.jsonl"), REJECT])
    return dest


def test_contact_sheet_has_one_tile_per_sample(prepped: PipelineConfig, tmp_path: Path, monkeypatch) -> None:
    prep_dir = _outputs(prepped, tmp_path / "prep")
    records = read_jsonl(prep_dir / "samples.jsonl")
    out = pv.render_prep(prep_dir, roots=pv.media_roots(prepped))

    assert [t.key for t in out.tiles] == [r["key"] for r in records]
    assert [t.frames for t in out.tiles] == [1 if r["kind"] == "image" else 3 for r in records]
    assert out.pages == [prep_dir / "preview" / "contact_sheet.png"]  # 8 samples: one page
    with Image.open(out.pages[0]) as sheet:
        assert sheet.size == (pv.COLUMNS * pv.TILE_W, math.ceil(len(records) / pv.COLUMNS) * pv.TILE_H)
        for t in out.tiles:  # each tile drawn where the layout says: its first frame is not the page's background
            cell = sheet.crop((t.box[0] + pv.PAD, t.box[1] + pv.PAD, t.box[0] + pv.PAD + pv.THUMB, t.box[1] + 40))
            assert len(set(cell.getdata())) > 1, t
    assert len({t.box for t in out.tiles}) == len(records)
    assert [r["key"] for r in out.samples] == [r["key"] for r in records]
    assert all(Path(r["thumbnail"]).is_file() and r["caption"] and r["bucket"] for r in out.samples)
    assert REJECT["reason"] in [r["reason"] for r in out.rejects]

    # Unchanged outputs: the preview there is reused, nothing is decoded again.
    monkeypatch.setattr(pv, "sample_frames", lambda *a, **k: pytest.fail("decoded again"))
    assert pv.render_prep(prep_dir, roots=pv.media_roots(prepped)).tiles == out.tiles


def test_pages_and_a_sample_without_frames(prepped: PipelineConfig, tmp_path: Path) -> None:
    records = read_jsonl(prepped.prep_dir / "samples.jsonl")[:4]
    gone = {**records[0], "key": "gone", "source": str(tmp_path / "gone.mp4")}
    out = pv.render([*records, gone], [], tmp_path / "preview", per_sheet=2)

    assert [p.name for p in out.pages] == ["contact_sheet.png", "contact_sheet_2.png", "contact_sheet_3.png"]
    assert [t.page for t in out.tiles] == [0, 0, 1, 1, 2]
    assert out.tiles[-1].frames == 0 and Path(out.samples[-1]["thumbnail"]).is_file()  # a text tile, still a row
    with Image.open(out.pages[-1]) as last:
        assert last.size == (pv.TILE_W, pv.TILE_H)
    assert json.loads((tmp_path / "preview" / "preview.json").read_text())["pages"] == [p.name for p in out.pages]


def test_prep_logs_the_sheet_and_tables_to_mlflow(prepped: PipelineConfig, tmp_path: Path) -> None:
    from flowspeed.engines.tracking.tracker import tracking_uri
    from flowspeed.tasks import tracking as tr

    prep_dir = _outputs(prepped, tmp_path / "prep")
    cfg = prepped.model_copy(update={"workdir": tmp_path / "work"})  # the MLflow store: sqlite under tmp_path
    client = MlflowClient(tracking_uri(cfg))
    exp = client.create_experiment("preview", artifact_location=(tmp_path / "artifacts").as_uri())  # not ./mlruns
    run_id = client.create_run(exp).info.run_id

    tr.log_prep_preview(cfg, run_id, prep_dir)

    assert "prep/contact_sheet.png" in [f.path for f in client.list_artifacts(run_id, "prep")]
    samples = _table(client, run_id, "prep_samples.json", tmp_path)
    assert list(samples["key"]) == [r["key"] for r in read_jsonl(prep_dir / "samples.jsonl")]
    assert {"caption", "bucket", "frames", "size", "thumbnail"} <= set(samples)
    thumbs = {f.path for f in client.list_artifacts(run_id, "table_images/prep_samples")}
    assert all(t["type"] == "image" and t["filepath"] in thumbs for t in samples["thumbnail"])  # shown as pictures
    rejects = _table(client, run_id, "prep_rejects.json", tmp_path)
    assert list(rejects["code"])[-1] == "unreadable" and list(rejects["reason"])[-1] == REJECT["reason"]
    tags = client.get_run(run_id).data.tags
    n = len(samples["key"])
    assert tags["flowspeed.prep_preview"].startswith(f"{n} of {n} samples")
    tables = [a["path"] for a in json.loads(tags["mlflow.loggedArtifacts"]) if a["type"] == "table"]
    assert tables == ["prep_samples.json", "prep_rejects.json"]  # what the UI lists as the run's tables

    # A preview that cannot be drawn is a tag on a prep that still succeeds.
    other = client.create_run(exp).info.run_id
    tr.log_prep_preview(cfg, other, tmp_path / "no-such-prep")
    assert client.get_run(other).data.tags["flowspeed.prep_preview"].startswith("failed: FileNotFoundError")


def _table(client: MlflowClient, run_id: str, name: str, tmp: Path) -> dict[str, list]:
    """A logged table's columns, read as MLflow wrote it (pandas `orient="split"` JSON). Not
    `MlflowClient.load_table`: it searches runs through the global tracking URI, not the client's."""
    data = json.loads(Path(client.download_artifacts(run_id, name, str(tmp))).read_text())
    return {c: [row[i] for row in data["data"]] for i, c in enumerate(data["columns"])}


def test_cli_preview_draws_n_records_without_encoding(demo_manifest: Path, tmp_path: Path) -> None:
    from flowspeed.flows.cli import app
    from typer.testing import CliRunner

    work = tmp_path / "work"
    args = ["prep", str(QUICKSTART), "--workdir", str(work), "--set", f"data.manifest={demo_manifest}"]
    res = CliRunner().invoke(app, [*args, "--preview", "3"])

    assert res.exit_code == 0, res.output
    sheet = Path(res.stdout.strip().splitlines()[-1])
    assert sheet.name == "contact_sheet.png" and sheet.is_file()
    drawn = pv.load(sheet.parent)
    assert len(drawn.tiles) == 3 and all(t.frames == 3 for t in drawn.tiles)  # the demo's first records: clips
    assert not (work / "prep" / "cache").exists()  # no latent written
    assert not (work / "mlflow.db").exists() and not (work / "prefect").exists()  # no runs opened
