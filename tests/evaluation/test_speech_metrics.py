"""WER/CER after Whisper normalisation: hand-counted edits in the comments, and fixed tables computed once with
openai/whisper's own normalisers and jiwer (docs/fidelity/ref_speech_metrics.py; CI never runs that code)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flowspeed.evaluation.speech_metrics import (
    METRIC_DIRECTIONS,
    WHISPER_SPELLING,
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


def test_spelling_mapping_default_override_and_file(tmp_path: Path) -> None:
    # the example: Whisper's spelling table is on by default, so British and American spellings agree
    assert wer("The colour of the centre was grey.", "the color of the center was gray") == 0.0
    # turned off explicitly, "colour"/"color", "centre"/"center", "grey"/"gray" are 3 substitutions in 7 words
    assert wer("The colour of the centre was grey.", "the color of the center was gray", spelling_mapping={}) == (
        pytest.approx(3 / 7)
    )
    assert wer("the colour red", "the color red", spelling_mapping={"colour": "color"}) == 0.0
    (tmp_path / "normalizer.json").write_text(json.dumps({"colour": "color"}))
    assert load_spelling_mapping(tmp_path) == {"colour": "color"}
    assert wer("the grey colour", "the gray color", spelling_mapping=tmp_path / "normalizer.json") == pytest.approx(
        1 / 3
    )  # the file replaces Whisper's table: only "colour" maps, "grey" stays a substitution
    with pytest.raises(FileNotFoundError):
        load_spelling_mapping(tmp_path / "missing")


def test_bundled_spelling_table_is_whispers() -> None:
    # openai-whisper 20250625 whisper/normalizers/english.json: 1739 entries (printed by the reference script)
    table = load_spelling_mapping(WHISPER_SPELLING)
    assert len(table) == 1739
    assert (table["colour"], table["centre"], table["grey"], table["programme"]) == (
        "color",
        "center",
        "gray",
        "program",
    )


# (reference, hypothesis, language, Whisper-normalised reference, normalised hypothesis, jiwer wer, jiwer cer),
# each scored alone: printed by docs/fidelity/ref_speech_metrics.py (openai-whisper 20250625 + jiwer 4.0.0).
CASES = [
    (
        "The colour of the centre was grey.",
        "the color of the center was gray",
        "en",
        "the color of the center was gray",
        "the color of the center was gray",
        0.0,
        0.0,
    ),
    (
        "I've organised the programme.",
        "i have organized the program",
        "en",
        "i have organized the program",
        "i have organized the program",
        0.0,
        0.0,
    ),
    (
        "Mr. Smith paid $20.",
        "mister smith paid twenty dollars",
        "en",
        "mister smith paid $20",
        "mister smith paid $20",
        0.0,
        0.0,
    ),
    ("It costs $1,000,000.", "it costs one million dollars", "en", "it costs $1000000", "it costs $1000000", 0.0, 0.0),
    (
        "She was born in 1985.",
        "she was born in nineteen eighty five",
        "en",
        "she was born in 1985",
        "she was born in 1985",
        0.0,
        0.0,
    ),
    ("The 21st century", "the twenty first century", "en", "the 21st century", "the 21st century", 0.0, 0.0),
    ("About 50% of them", "about fifty percent of them", "en", "about 50% of them", "about 50% of them", 0.0, 0.0),
    (
        "He won't go, can't stay.",
        "he will not go can not stay",
        "en",
        "he will not go can not stay",
        "he will not go can not stay",
        0.0,
        0.0,
    ),
    ("Let's say it's done.", "let us say it is done", "en", "let us say it is done", "let us say it is done", 0.0, 0.0),
    (
        "Hello, world! How are you?",
        "hello world how are you",
        "en",
        "hello world how are you",
        "hello world how are you",
        0.0,
        0.0,
    ),
    ("uh hello [noise] world (laughs)", "hello world", "en", "hello world", "hello world", 0.0, 0.0),
    (
        "Dr. Jones lives on St. James St.",
        "doctor jones lives on saint james street",
        "en",
        "doctor jones lives on saint james saint",
        "doctor jones lives on saint james street",
        0.14285714285714285,
        0.10256410256410256,
    ),
    ("one oh one", "101", "en", "101", "101", 0.0, 0.0),
    ("Café naïve résumé", "cafe naive resume", "en", "cafe naive resume", "cafe naive resume", 0.0, 0.0),
    ("well-known e-mail", "well known email", "en", "well known e mail", "well known email", 0.5, 0.058823529411764705),
    ("", "", "en", "", "", 0.0, 0.0),
    ("", "something extra here", "en", "", "something extra here", 3.0, 20.0),
    ("(laughs)", "ha ha", "en", "", "ha ha", 2.0, 5.0),
    ("the cat sat", "", "en", "the cat sat", "", 1.0, 1.0),
    ("hmm", "", "en", "", "", 0.0, 0.0),
    ("Le chat est là!", "le chat est la", "fr", "le chat est là", "le chat est la", 0.25, 0.07142857142857142),
    (
        "Ça coûte 20 €.",
        "ca coute vingt euros",
        "fr",
        "ça coûte 20",
        "ca coute vingt euros",
        1.3333333333333333,
        1.1818181818181819,
    ),
    (
        "Straße und Öl",
        "strasse und öl",
        "de",
        "straße und öl",
        "strasse und öl",
        0.3333333333333333,
        0.15384615384615385,
    ),
]


@pytest.mark.parametrize(("ref", "hyp", "lang", "norm_ref", "norm_hyp", "ref_wer", "ref_cer"), CASES)
def test_matches_whisper_normaliser_and_jiwer(
    ref: str, hyp: str, lang: str, norm_ref: str, norm_hyp: str, ref_wer: float, ref_cer: float
) -> None:
    assert (normalize_text(ref, lang), normalize_text(hyp, lang)) == (norm_ref, norm_hyp)
    assert wer(ref, hyp, language=lang) == pytest.approx(ref_wer, abs=1e-12)
    assert cer(ref, hyp, language=lang) == pytest.approx(ref_cer, abs=1e-12)
    row = score_transcripts([ref], [hyp], language=lang)["rows"][0]
    assert (row["wer"], row["cer"]) == pytest.approx((ref_wer, ref_cer), abs=1e-12)


def test_corpus_rates_match_jiwer_over_the_list() -> None:
    english = [(r, h) for r, h, lang, *_ in CASES if lang == "en"]
    refs, hyps = [r for r, _ in english], [h for _, h in english]
    # jiwer.wer / jiwer.cer over the 20 normalised English cases: 0.15942028985507245 and 0.128125
    assert wer(refs, hyps) == pytest.approx(0.15942028985507245, abs=1e-12)
    assert cer(refs, hyps) == pytest.approx(0.128125, abs=1e-12)
    res = score_transcripts(refs, hyps)
    assert (res["wer"], res["cer"]) == pytest.approx((0.15942028985507245, 0.128125), abs=1e-12)


# A 20-utterance English set with British spellings in the references (the same list in the reference script).
CORPUS = [
    ("The colour of the centre was grey.", "the color of the center was gray"),
    ("We analysed the behaviour of the neighbours.", "we analyzed the behavior of the neighbors"),
    ("He travelled to the theatre on Monday.", "he traveled to the theater on monday"),
    ("Her favourite flavour is lemon.", "her favorite flavor is lemon"),
    ("The organisation apologised for the delay.", "the organization apologized for the delay"),
    ("I'll meet you at 5 o'clock.", "i will meet you at five oclock"),
    ("There were 3 dogs and 12 cats.", "there were three dogs and twelve cats"),
    ("The defence of the realm.", "the defense of the realm"),
    ("She paid £30 for the licence.", "she paid thirty pounds for the license"),
    ("It's a quarter past two.", "its a quarter past two"),
    ("They recognised the honour.", "they recognized the honor"),
    ("The programme starts at noon.", "the program starts at new"),
    ("Please catalogue these jewellery items.", "please catalog these jewelry items"),
    ("The tyres were worn.", "the tires were worn out"),
    ("He's gone to the grey building.", "he has gone to the gray building"),
    ("A litre of milk costs $2.50.", "a liter of milk cost two dollars fifty"),
    ("The harbour was full of boats.", "the harbor was full of boat"),
    ("We practised in the afternoon.", "we practiced in the afternoon"),
    ("Her moustache was fake.", "her mustache was fake"),
    ("Um, the plough is in the barn.", "the plow is in the barn"),
]


def test_corpus_with_and_without_whisper_spelling_table() -> None:
    refs, hyps = [r for r, _ in CORPUS], [h for _, h in CORPUS]
    # reference: openai-whisper's EnglishTextNormalizer + jiwer -> wer 0.08695652173913043, cer 0.024475524475524476
    assert wer(refs, hyps) == pytest.approx(0.08695652173913043, abs=1e-12)
    assert cer(refs, hyps) == pytest.approx(0.024475524475524476, abs=1e-12)
    # the same normaliser with an empty spelling table (the old default) -> 0.3130434782608696, 0.08149405772495756
    assert wer(refs, hyps, spelling_mapping={}) == pytest.approx(0.3130434782608696, abs=1e-12)
    assert cer(refs, hyps, spelling_mapping={}) == pytest.approx(0.08149405772495756, abs=1e-12)


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
    # no reference words: jiwer reports the insertion count as the rate (jiwer.wer([""], ["hello there"]) == 2)
    assert wer([""], ["hello there"]) == 2.0
    assert cer("", "x") == 1.0
    assert wer(["", ""], ["a b", "c"]) == 3.0 and cer(["", ""], ["a b", "c"]) == 4.0  # jiwer: 3 and 4
    # corpus: the empty reference's one insertion over the other utterance's four words
    assert wer(["", "a b c d"], ["x", "a b c d"]) == pytest.approx(1 / 4)
    # "(laughs)" normalises to nothing: the same rule applies
    assert wer("(laughs)", "") == 0.0 and wer("(laughs)", "ha") == 1.0 and wer("(laughs)", "ha ha") == 2.0
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
