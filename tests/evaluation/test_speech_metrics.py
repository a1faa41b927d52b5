"""WER/CER after Whisper normalisation: hand-counted edits in the comments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evaluation.speech_metrics import (
    METRIC_DIRECTIONS,
    cer,
    load_spelling_mapping,
    normalize_text,
    score_transcripts,
    wer,
)


def test_wer_known_strings() -> None:
    # one deletion ("the") over six reference words
    assert wer("the cat sat on the mat", "the cat sat on mat") == pytest.approx(1 / 6)
    # b->x substitution and an inserted d over three reference words
    assert wer(["a b c"], ["a x c d"]) == pytest.approx(2 / 3)
    assert wer("same words here", "same words here") == 0.0


def test_corpus_wer_weights_by_reference_length() -> None:
    # 0 errors in 4 words + 1 substitution in 1 word = 1/5, not the mean of per-utterance rates (0.5)
    assert wer(["a b c d", "e"], ["a b c d", "x"]) == pytest.approx(1 / 5)


def test_normalisation_case_punctuation_titles_and_fillers() -> None:
    ref, hyp = "The Cat sat, on the MAT.", "the cat sat on the mat"
    assert wer(ref, hyp) == 0.0
    # raw: The, Cat, sat, and MAT. all differ from their lowercase, unpunctuated counterparts: 4/6
    assert wer(ref, hyp, normalize=False) == pytest.approx(4 / 6)
    # "Mr." -> "mister" is a built-in rule of Whisper's English normaliser (no spelling table needed)
    assert normalize_text("Mr. Smith") == "mister smith"
    assert wer("Mr. Smith paid $20.", "mister smith paid twenty dollars") == 0.0
    assert wer("hello world", "uh hello world [noise]") == 0.0  # fillers and bracketed asides dropped


def test_spelling_mapping_from_dict_and_file(tmp_path: Path) -> None:
    # without Whisper's spelling table British and American spellings stay different words: 1 substitution
    assert wer("the colour red", "the color red") == pytest.approx(1 / 3)
    assert wer("the colour red", "the color red", spelling_mapping={"colour": "color"}) == 0.0
    (tmp_path / "normalizer.json").write_text(json.dumps({"colour": "color"}))
    assert load_spelling_mapping(tmp_path) == {"colour": "color"}
    assert wer("the colour red", "the color red", spelling_mapping=tmp_path / "normalizer.json") == 0.0
    with pytest.raises(FileNotFoundError):
        load_spelling_mapping(tmp_path / "missing")


def test_non_english_uses_basic_normaliser() -> None:
    # the basic normaliser keeps diacritics, so "là" vs "la" is one substitution in four words
    assert wer("Le chat est là!", "le chat est la", language="fr") == pytest.approx(1 / 4)
    # the English one strips them
    assert wer("Le chat est là!", "le chat est la") == 0.0


def test_cer() -> None:
    # "the cat sat on the mat" is 22 characters; dropping "the " deletes 4
    assert cer("the cat sat on the mat", "the cat sat on mat") == pytest.approx(4 / 22)
    # one substitution in five characters (the space counts)
    assert cer("abc d", "abd d", normalize=False) == pytest.approx(1 / 5)
    assert cer("Hello, World!", "hello world") == 0.0


def test_empty_references() -> None:
    assert wer([""], [""]) == 0.0 and cer([""], [""]) == 0.0
    assert wer([""], ["hello there"]) == 1.0  # no denominator: any hypothesis word makes it 1.0
    assert cer("", "x") == 1.0
    # corpus: the empty reference's one insertion over the other utterance's four words
    assert wer(["", "a b c d"], ["x", "a b c d"]) == pytest.approx(1 / 4)
    # "(laughs)" normalises to nothing: the same rule applies
    assert wer("(laughs)", "") == 0.0 and wer("(laughs)", "ha") == 1.0
    assert wer(["a"], [None]) == 1.0  # a missing hypothesis is an empty one: one deletion
    assert math.isnan(wer([], []))
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])


def test_score_transcripts_rows() -> None:
    res = score_transcripts(["The cat sat on the mat.", "", "hello world"], ["the cat sat on mat", "um hi", "hello"])
    # words: 1 deletion / 6, 1 insertion / 0, 1 deletion / 2 -> 3 edits over 8 reference words
    assert res["wer"] == pytest.approx(3 / 8)
    # chars: 4 / 22, 2 inserted ("hi") / 0, 6 deleted (" world") / 11 -> 12 / 33
    assert res["cer"] == pytest.approx(12 / 33)
    assert (res["num_utterances"], res["ref_words"], res["empty_references"]) == (3, 8, 1)
    assert (res["substitutions"], res["deletions"], res["insertions"]) == (0, 2, 1)
    rows = res["rows"]
    assert [r["wer"] for r in rows] == pytest.approx([1 / 6, 1.0, 0.5])
    assert (
        rows[0]["reference"] == "The cat sat on the mat."
        and rows[0]["reference_normalized"] == "the cat sat on the mat"
    )
    assert rows[1]["hypothesis_normalized"] == "hi" and rows[1]["insertions"] == 1 and rows[1]["ref_words"] == 0
    assert set(rows[0]) == {
        "index", "reference", "hypothesis", "reference_normalized", "hypothesis_normalized",
        "wer", "cer", "substitutions", "deletions", "insertions", "ref_words",
    }  # fmt: skip


def test_metric_directions() -> None:
    assert METRIC_DIRECTIONS == {"wer": "lower", "cer": "lower"}
