"""Every path a manifest names must resolve under the allowed roots, symlinks included.

A hostile manifest can point anywhere: `..`, absolute paths, symlinks to files or folders outside
the dataset, sidecar captions that are links, Open-Sora-Plan roots and annotation files elsewhere.
Each must become a recorded rejection that names the path and the roots, never a read, and the
rest of the manifest must still be ingested.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from flowspeed.datasets_prep.manifest import Entry, Rejection, read_manifest

SECRET = "the contents of a file outside the dataset"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """(dataset root with two clips, a sibling folder outside it holding a secret file and clip)."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    (root / "videos").mkdir(parents=True)
    outside.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (root / "videos" / name).write_bytes(b"x")
    (outside / "secret.txt").write_text(SECRET)
    (outside / "secret.mp4").write_bytes(b"x")
    return root, outside


def _split(items: list) -> tuple[list[Entry], list[Rejection]]:
    return [i for i in items if isinstance(i, Entry)], [i for i in items if isinstance(i, Rejection)]


def _jsonl(root: Path, rows: list[dict], name: str = "data.jsonl") -> Path:
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assert_refused(rej: Rejection, root: Path, what: str) -> None:
    assert rej.code == "escapes_root" and rej.stage == "manifest", rej
    assert what in rej.reason and str(root.resolve()) in rej.reason, rej.reason


def test_sidecar_caption_symlinked_outside_is_refused_unread(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "videos" / "a.txt").write_text("a red circle")
    os.symlink(outside / "secret.txt", root / "videos" / "b.txt")
    entries, rejects = _split(list(read_manifest(root)))
    assert [(e.path.name, e.caption) for e in entries] == [("a.mp4", "a red circle")]
    (rej,) = rejects
    _assert_refused(rej, root, "b.txt")
    assert SECRET not in rej.reason and str(outside / "secret.txt") in rej.reason


@pytest.mark.parametrize(
    "raw",
    [
        "videos/../../outside/secret.mp4",  # `..` components
        "linked.mp4",  # a media file symlinked outside
        "linkdir/secret.mp4",  # a symlinked directory inside the root pointing outside
        "ABSOLUTE",  # an absolute path elsewhere
    ],
)
def test_media_outside_the_root_is_refused_and_the_rest_is_read(tree: tuple[Path, Path], raw: str) -> None:
    root, outside = tree
    os.symlink(outside / "secret.mp4", root / "linked.mp4")
    os.symlink(outside, root / "linkdir", target_is_directory=True)
    raw = str(outside / "secret.mp4") if raw == "ABSOLUTE" else raw
    rows = [{"file": "videos/a.mp4", "captions": "a"}, {"file": raw, "captions": "out"}]
    rows.append({"file": "videos/../videos/b.mp4", "captions": "b"})  # `..` that stays inside is fine
    rows.append({"file": str(root / "videos" / "a.mp4"), "captions": "abs"})  # absolute inside is fine
    entries, rejects = _split(list(read_manifest(_jsonl(root, rows))))
    assert [e.caption for e in entries] == ["a", "b", "abs"]
    (rej,) = rejects
    _assert_refused(rej, root, raw)
    assert "record 2" in rej.reason and str((outside / "secret.mp4").resolve()) in rej.reason


def test_a_declared_root_admits_paths_outside_the_manifest_folder(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    rows = [{"file": str(outside / "secret.mp4"), "captions": "declared"}]
    (e,) = list(read_manifest(_jsonl(root, rows), roots=[outside]))
    assert isinstance(e, Entry) and e.path == (outside / "secret.mp4").resolve()


def test_folder_refuses_a_symlinked_directory_pointing_outside(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    os.symlink(outside, root / "videos" / "more", target_is_directory=True)
    entries, rejects = _split(list(read_manifest(root)))
    assert sorted(e.path.name for e in entries) == ["a.mp4", "b.mp4"]
    (rej,) = rejects
    _assert_refused(rej, root, "more")


def _annotation(folder: Path, media: str, name: str = "anno.json") -> Path:
    ann = folder / name
    ann.write_text(json.dumps([{"path": media, "cap": ["a clip"], "fps": 24, "num_frames": 8}]))
    return ann


@pytest.mark.parametrize("where", ["absolute", "relative", "symlinked"])
def test_opensora_plan_root_outside_the_allowed_roots_is_refused(tree: tuple[Path, Path], where: str) -> None:
    root, outside = tree
    _annotation(root, "videos/a.mp4", "inside.json")
    _annotation(root, "secret.mp4", "hostile.json")  # a clip that exists under the hostile root
    os.symlink(outside, root / "elsewhere", target_is_directory=True)
    named = {"absolute": str(outside), "relative": "../outside", "symlinked": "elsewhere"}[where]
    txt = root / "data.txt"
    txt.write_text(f"{root},inside.json\n{named},hostile.json\n")
    entries, rejects = _split(list(read_manifest(txt)))
    assert [e.path for e in entries] == [(root / "videos" / "a.mp4").resolve()]
    (rej,) = rejects
    _assert_refused(rej, root, named)
    assert "line 2" in rej.reason and "root" in rej.reason
    # A root declared in data.roots is allowed.
    entries, rejects = _split(list(read_manifest(txt, roots=[outside])))
    assert len(entries) == 2 and rejects == []


@pytest.mark.parametrize("how", ["absolute", "symlinked"])
def test_opensora_plan_annotation_outside_is_refused_unread(tree: tuple[Path, Path], how: str) -> None:
    root, outside = tree
    ann = _annotation(outside, "videos/b.mp4")  # names a clip inside the root: only the file's place is wrong
    if how == "symlinked":
        os.symlink(ann, root / "anno.json")
    named = str(ann) if how == "absolute" else "anno.json"
    txt = root / "data.txt"
    txt.write_text(f"{root},{named}\n")
    entries, rejects = _split(list(read_manifest(txt, "opensora_plan")))
    assert entries == []
    (rej,) = rejects
    _assert_refused(rej, root, named)
    assert "annotation" in rej.reason and str(ann) in rej.reason


@pytest.mark.parametrize("image", ["d.png", "loop.png"])
def test_sharegpt_image_symlinked_outside_or_looping_is_refused(tree: tuple[Path, Path], image: str) -> None:
    root, outside = tree
    (root / "c.png").write_bytes(b"x")
    os.symlink(outside / "secret.mp4", root / "d.png")
    os.symlink("loop.png", root / "loop.png")
    rows = [{"messages": [{"role": "user", "content": f"<image>{n}"}], "images": [n]} for n in ("c.png", image)]
    entries, rejects = _split(list(read_manifest(_jsonl(root, rows, "chat.jsonl"))))
    assert [e.path.name for e in entries] == ["c.png"]
    (rej,) = rejects
    _assert_refused(rej, root, image)


def test_audio_table_path_outside_is_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "clip.wav").write_bytes(b"RIFF")
    (outside / "out.wav").write_bytes(b"RIFF")
    rows = [{"audio": "clip.wav", "text": "in"}, {"audio": "../outside/out.wav", "text": "out"}]
    entries, rejects = _split(list(read_manifest(_jsonl(root, rows, "speech.jsonl"))))
    assert [e.caption for e in entries] == ["in"]
    (rej,) = rejects
    _assert_refused(rej, root, "out.wav")


@pytest.mark.parametrize("raw", ["loop.mp4", "bad\u0000name.mp4"])
def test_unresolvable_paths_are_rejections_not_crashes(tree: tuple[Path, Path], raw: str) -> None:
    root, _ = tree
    os.symlink("loop.mp4", root / "loop.mp4")  # a link to itself: resolve() cannot finish
    rows = [{"file": raw, "captions": "bad"}, {"file": "videos/a.mp4", "captions": "a"}]
    entries, rejects = _split(list(read_manifest(_jsonl(root, rows))))
    assert [e.caption for e in entries] == ["a"]
    (rej,) = rejects
    assert rej.code == "escapes_root" and "record 1" in rej.reason and "cannot be resolved" in rej.reason


@pytest.mark.slow
def test_prep_records_escapes_in_rejects_jsonl_and_carries_on(tmp_path: Path, demo_manifest: Path) -> None:
    from flowspeed.datasets_prep.prep import run_prep
    from flowspeed.engines.common.io import read_jsonl

    from tests.conftest import make_config

    root, outside = tmp_path / "clips", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    shutil.copytree(demo_manifest.parent / "videos", root)
    clips = sorted(root.glob("*.mp4"))
    for n, clip in enumerate(clips[1:]):
        clip.with_suffix(".txt").write_text(f"clip number {n}")
    os.symlink(outside / "secret.txt", clips[0].with_suffix(".txt"))
    shutil.copy(clips[1], outside / "hidden.mp4")
    os.symlink(outside, root / "more", target_is_directory=True)

    res = run_prep(make_config(tmp_path / "w", root))
    rejects = {Path(r["path"]).name: r for r in read_jsonl(Path(res.rejects))}
    assert rejects.keys() == {clips[0].with_suffix(".txt").name, "more"}
    assert all(r["code"] == "escapes_root" and str(root.resolve()) in r["reason"] for r in rejects.values())
    captions = [r["caption"] for r in read_jsonl(Path(res.samples))]
    assert res.num_samples == len(clips) - 1 and SECRET not in captions


# ---- check-then-read races: a symlink swapped in after the check --------------------------------------


def _swap_after_check(monkeypatch: pytest.MonkeyPatch, target: Path, swap) -> None:  # noqa: ANN001
    """Run `swap()` right after `resolve_under` has accepted `target`: the window between a path's check
    and its read, made deterministic."""
    import flowspeed.datasets_prep.manifest as manifest

    real = manifest.resolve_under

    def checked_then_swapped(raw, root, extra_roots=()):  # noqa: ANN001, ANN202
        out = real(raw, root, extra_roots)
        if out == target.resolve():
            swap()
        return out

    monkeypatch.setattr(manifest, "resolve_under", checked_then_swapped)


def _link_file(path: Path, to: Path) -> None:
    path.unlink()
    os.symlink(to, path)


def _link_folder(folder: Path, to: Path) -> None:
    shutil.rmtree(folder)
    os.symlink(to, folder, target_is_directory=True)


@pytest.mark.parametrize("swapped", ["file", "folder"])
def test_a_sidecar_caption_swapped_for_a_symlink_after_its_check_is_refused(
    tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, swapped: str
) -> None:
    """The caption is checked, then read: a link swapped in between (for the file, or for a folder on its
    way, which O_NOFOLLOW alone would miss) must not hand out the file outside."""
    root, outside = tree
    (root / "videos" / "b.txt").write_text("a blue square")
    (outside / "b.txt").write_text(SECRET)
    (outside / "b.mp4").write_bytes(b"x")
    sidecar = root / "videos" / "b.txt"
    if swapped == "file":
        _swap_after_check(monkeypatch, sidecar, lambda: _link_file(sidecar, outside / "secret.txt"))
    else:
        _swap_after_check(monkeypatch, sidecar, lambda: _link_folder(root / "videos", outside))
    entries, rejects = _split(list(read_manifest(root)))
    assert SECRET not in [e.caption for e in entries]
    (rej,) = [r for r in rejects if r.path.endswith("b.txt")]
    assert rej.code == "escapes_root" and "sidecar caption" in rej.reason, rej
    assert SECRET not in rej.reason


def test_an_annotation_file_swapped_for_a_symlink_after_its_check_is_refused(
    tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tree
    ann = _annotation(root, "videos/a.mp4")
    _annotation(outside, "videos/b.mp4", "hostile.json")
    txt = root / "data.txt"
    txt.write_text(f"{root},anno.json\n")
    _swap_after_check(monkeypatch, ann, lambda: _link_file(ann, outside / "hostile.json"))
    entries, rejects = _split(list(read_manifest(txt, "opensora_plan")))
    assert entries == []
    (rej,) = rejects
    assert rej.code == "escapes_root" and "annotation file" in rej.reason and "line 1" in rej.reason, rej


@pytest.mark.parametrize(("swapped", "moment"), [("file", "after_check"), ("folder", "after_probe")])
def test_media_swapped_for_a_symlink_after_its_check_is_not_hashed_or_decoded(
    tmp_path: Path, demo_manifest: Path, monkeypatch: pytest.MonkeyPatch, moment: str, swapped: str
) -> None:
    """Decoders open files by path: they are handed the checked descriptor's own file (/proc/self/fd) instead,
    so a clip swapped (or a folder on its way) for a link out of the dataset, after the manifest was read or
    after the probe, is a rejection, not a sample made of the file outside."""
    import flowspeed.datasets_prep.prep as prep
    from flowspeed.engines.common.io import read_jsonl

    from tests.conftest import make_config

    root, outside = tmp_path / "data", tmp_path / "outside"
    shutil.copytree(demo_manifest.parent, root)
    rows = read_jsonl(root / "data.jsonl")
    rows = rows[:2] + [r for r in rows if r["file"].startswith("images/")][:1]  # a clip beside, a still elsewhere
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    clip = (root / rows[0]["file"]).resolve()  # the path the manifest accepted (before any swap)
    (outside / clip.parent.name).mkdir(parents=True)
    for f in clip.parent.iterdir():  # the same names outside: only the link's target differs
        shutil.copy(f, outside / clip.parent.name / f.name)

    def swap() -> None:
        if swapped == "file":
            _link_file(clip, outside / clip.parent.name / clip.name)
        else:
            _link_folder(clip.parent, outside / clip.parent.name)

    if moment == "after_check":
        _swap_after_check(monkeypatch, clip, swap)
    else:
        real = prep.probe

        def probe_then_swap(path):  # noqa: ANN001, ANN202
            info = real(path)
            if Path(path) == clip:
                swap()
            return info

        monkeypatch.setattr(prep, "probe", probe_then_swap)
    res = prep.run_prep(make_config(tmp_path / "w", root / "data.jsonl"))
    rejects = read_jsonl(Path(res.rejects))
    escaped = [r for r in rejects if r["code"] == "escapes_root"]
    assert str(clip) in [r["path"] for r in escaped], rejects
    assert str(clip) not in [r["source"] for r in read_jsonl(Path(res.samples))]
    if swapped == "file":  # the folder's other files now lie outside too: all of them refused
        assert res.num_samples == len(rows) - 1


def test_audio_swapped_for_a_symlink_after_its_check_is_not_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowspeed.configs import load_config
    from flowspeed.datasets_prep.demo import make_demo_audio
    from flowspeed.datasets_prep.prep import run_prep
    from flowspeed.engines.common.io import read_jsonl

    from tests.conftest import REPO

    manifest = make_demo_audio(tmp_path / "data", num_clips=3)
    make_demo_audio(tmp_path / "outside", num_clips=3)
    clip = (tmp_path / "data" / read_jsonl(manifest)[0]["audio"]).resolve()
    _swap_after_check(monkeypatch, clip, lambda: _link_file(clip, tmp_path / "outside" / "audio" / "tone_002.wav"))
    cfg = load_config(
        REPO / "configs/pipelines/whisper-asr.yaml", [f"data.manifest={manifest}"], workdir=tmp_path / "w"
    )
    res = run_prep(cfg)
    (rej,) = read_jsonl(Path(res.rejects))
    assert rej["path"] == str(clip) and rej["code"] == "escapes_root" and "EscapedRoot" in rej["reason"]
    assert res.num_samples == 2
