"""Word and character error rates for speech transcripts, after Whisper's text normalisation.

Raw WER mostly measures formatting: a perfect transcript "mister smith paid twenty dollars" of the
reference "Mr. Smith paid $20." has raw WER 1.0 (four edits, four reference words) and 0.0 normalised.
Published ASR numbers (Whisper's own evaluation, the HF/Open ASR Leaderboard) normalise both sides with
Whisper's normaliser and then let jiwer count edits over the whole list, so we do exactly that (the
normaliser is transformers' copy of openai/whisper's; checked against the original in
docs/fidelity/ref_speech_metrics.py). Pure library: no Prefect, MLflow or torch.

Normaliser: English uses `EnglishTextNormalizer` (lowercase, drop bracketed/parenthesised asides and
fillers like "uh", expand contractions and titles such as "Mr." -> "mister", write spelled-out numbers as
digits, map British to American spelling, strip punctuation). Its spelling table is Whisper's
`english.json` (1739 entries, the same table every Whisper checkpoint ships as `normalizer.json`), bundled
here as `whisper_english_spelling.json` and used by default, so "colour" and "color" are the same word as
in Whisper's scoring. `spelling_mapping` replaces it (a dict, a json file, or a Whisper checkpoint
directory); `spelling_mapping={}` turns spelling normalisation off. Any other language uses
`BasicTextNormalizer` (lowercase, drop asides and punctuation, keep diacritics), as Whisper does.

Rates follow jiwer: the corpus rate is total edits over total reference words (characters for CER,
spaces included). An utterance whose normalised reference is empty (e.g. "(laughs)") adds its insertions
to the numerator and nothing to the denominator; when no reference has any words at all, jiwer reports
the insertion count itself (0.0 for an empty hypothesis, 3.0 for a three-word one), and so do we, also
for a single utterance's row. An empty list of utterances gives NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from flowspeed.engines.common.extras import require
from flowspeed.evaluation.directions import DIRECTIONS
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

jiwer = require("jiwer", "WER/CER scoring (speech eval)")  # the `speech` extra

METRIC_DIRECTIONS: dict[str, str] = {m: DIRECTIONS[m] for m in ("wer", "cer")}  # one table: evaluation/directions.py
_ENGLISH = {"en", "eng", "english"}
# openai/whisper's whisper/normalizers/english.json (openai-whisper 20250625, MIT), byte for byte
WHISPER_SPELLING = Path(__file__).with_name("whisper_english_spelling.json")

SpellingMapping = Mapping[str, str] | str | Path | None


def load_spelling_mapping(source: str | Path) -> dict[str, str]:
    """Whisper's spelling table from a `normalizer.json`, or from a checkpoint directory that holds one."""
    path = Path(source)
    if path.is_dir():
        path = path / "normalizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Whisper normalizer.json at {path}")
    return dict(json.loads(path.read_text(encoding="utf-8")))


@lru_cache(maxsize=8)
def _cached_normalizer(language: str | None, mapping_file: str | None) -> Callable[[str], str]:
    # Building the English normaliser compiles a few hundred number-word patterns: do it once per setting.
    if language is not None and language.lower() in _ENGLISH:
        return EnglishTextNormalizer(load_spelling_mapping(mapping_file or WHISPER_SPELLING))
    return BasicTextNormalizer()


def get_normalizer(language: str | None = "en", spelling_mapping: SpellingMapping = None) -> Callable[[str], str]:
    """Whisper's normaliser for `language` (English, else the language-agnostic basic one).

    `spelling_mapping=None` is Whisper's own table; a mapping, file or checkpoint folder replaces it.
    """
    if isinstance(spelling_mapping, Mapping):
        if language is not None and language.lower() in _ENGLISH:
            return EnglishTextNormalizer(dict(spelling_mapping))
        return BasicTextNormalizer()
    return _cached_normalizer(language, str(spelling_mapping) if spelling_mapping is not None else None)


def normalize_text(text: str, language: str | None = "en", spelling_mapping: SpellingMapping = None) -> str:
    return get_normalizer(language, spelling_mapping)(text or "").strip()


def _as_list(texts: str | Sequence[str | None]) -> list[str]:
    return [texts] if isinstance(texts, str) else ["" if t is None else str(t) for t in texts]


def _prepare(
    references: str | Sequence[str | None],
    hypotheses: str | Sequence[str | None],
    normalize: bool,
    language: str | None,
    spelling_mapping: SpellingMapping,
) -> tuple[list[str], list[str], list[str], list[str]]:
    refs, hyps = _as_list(references), _as_list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if normalize:
        norm = get_normalizer(language, spelling_mapping)
        return refs, hyps, [norm(r).strip() for r in refs], [norm(h).strip() for h in hyps]
    # Unnormalised still collapses whitespace: a double space is not an error in anyone's definition.
    return refs, hyps, [" ".join(r.split()) for r in refs], [" ".join(h.split()) for h in hyps]


def _edits(ref: str, hyp: str, unit: str) -> dict[str, int]:
    """Edit counts for one utterance; `ref_len` is the denominator (words, or characters incl. spaces)."""
    out = jiwer.process_words(ref, hyp) if unit == "word" else jiwer.process_characters(ref, hyp)
    ref_len = out.hits + out.substitutions + out.deletions
    return {"S": out.substitutions, "D": out.deletions, "I": out.insertions, "N": ref_len}


def _rate(errors: int, ref_len: int) -> float:
    if ref_len == 0:  # no reference words: jiwer reports the edit count (all insertions) as the rate
        return float(errors)
    return errors / ref_len


def _corpus_rate(counts: list[dict[str, int]]) -> float:
    if not counts:
        return math.nan
    return _rate(sum(c["S"] + c["D"] + c["I"] for c in counts), sum(c["N"] for c in counts))


def wer(
    references: str | Sequence[str | None],
    hypotheses: str | Sequence[str | None],
    normalize: bool = True,
    language: str | None = "en",
    spelling_mapping: SpellingMapping = None,
) -> float:
    """Corpus word error rate: all edits over all reference words (not a mean of per-utterance rates,
    which would let a two-word utterance weigh as much as a fifty-word one)."""
    _, _, refs, hyps = _prepare(references, hypotheses, normalize, language, spelling_mapping)
    return _corpus_rate([_edits(r, h, "word") for r, h in zip(refs, hyps, strict=True)])


def cer(
    references: str | Sequence[str | None],
    hypotheses: str | Sequence[str | None],
    normalize: bool = True,
    language: str | None = "en",
    spelling_mapping: SpellingMapping = None,
) -> float:
    """Corpus character error rate; spaces between words count as characters, as in jiwer."""
    _, _, refs, hyps = _prepare(references, hypotheses, normalize, language, spelling_mapping)
    return _corpus_rate([_edits(r, h, "char") for r, h in zip(refs, hyps, strict=True)])


def score_transcripts(
    refs: str | Sequence[str | None],
    hyps: str | Sequence[str | None],
    normalize: bool = True,
    language: str | None = "en",
    spelling_mapping: SpellingMapping = None,
) -> dict[str, object]:
    """WER and CER plus one row per utterance, so a flow logs the metrics and an MLflow table in one go.

    Keys: `wer`, `cer`, `num_utterances`, `ref_words`, `substitutions`, `deletions`, `insertions`,
    `empty_references` (utterances whose normalised reference has no words) and `rows` (each with the
    raw and normalised texts, the utterance's wer/cer and its word edit counts).
    """
    raw_refs, raw_hyps, norm_refs, norm_hyps = _prepare(refs, hyps, normalize, language, spelling_mapping)
    rows: list[dict[str, object]] = []
    words: list[dict[str, int]] = []
    chars: list[dict[str, int]] = []
    for i, (rr, rh, nr, nh) in enumerate(zip(raw_refs, raw_hyps, norm_refs, norm_hyps, strict=True)):
        w, c = _edits(nr, nh, "word"), _edits(nr, nh, "char")
        words.append(w)
        chars.append(c)
        rows.append(
            {
                "index": i,
                "reference": rr,
                "hypothesis": rh,
                "reference_normalized": nr,
                "hypothesis_normalized": nh,
                "wer": _rate(w["S"] + w["D"] + w["I"], w["N"]),
                "cer": _rate(c["S"] + c["D"] + c["I"], c["N"]),
                "substitutions": w["S"],
                "deletions": w["D"],
                "insertions": w["I"],
                "ref_words": w["N"],
            }
        )
    return {
        "wer": _corpus_rate(words),
        "cer": _corpus_rate(chars),
        "num_utterances": len(rows),
        "ref_words": sum(w["N"] for w in words),
        "substitutions": sum(w["S"] for w in words),
        "deletions": sum(w["D"] for w in words),
        "insertions": sum(w["I"] for w in words),
        "empty_references": sum(1 for w in words if w["N"] == 0),
        "rows": rows,
    }
