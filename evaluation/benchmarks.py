"""Understanding benchmarks (MMMU, AI2D, ChartQA, DocVQA, InfoVQA) read from VLMEvalKit-layout TSV files.

VLMEvalKit's TSVs are the de-facto exchange format for these suites: one row per question, the image
inline as base64, options in columns `A`, `B`, ... So a downloaded TSV scores here with no conversion
step, and our numbers stay comparable to published ones. This module is a pure library (no Prefect,
MLflow or torch): a flow asks a model for `build_prompt(item, spec)` answers, then hands the raw
responses to `score_benchmark`, which returns the overall score, a per-category breakdown and one row
per sample for an MLflow table.

All scores are fractions in [0, 1] (VLMEvalKit prints some of them as percentages).
"""

from __future__ import annotations

import ast
import base64
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from PIL import Image

from evaluation.directions import DIRECTIONS

MetricName = Literal["accuracy", "relaxed_accuracy", "anls"]
TaskKind = Literal["multiple_choice", "open", "mixed"]

# A cell this short cannot hold an image; VLMEvalKit stores the `index` of the row whose image it
# reuses there instead (its loader uses the same 64-character cut-off).
_IMAGE_REF_MAX_LEN = 64
ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
UNCATEGORIZED = "uncategorized"


# ----------------------------------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class BenchmarkSpec:
    """What differs between suites: which metric, whether answers are letters, which columns must exist."""

    name: str
    metric: MetricName
    task: TaskKind
    required_columns: tuple[str, ...]
    description: str = ""
    splits: tuple[str, ...] = ()


_BASE_COLUMNS = ("index", "question", "answer")
_MC_COLUMNS = (*_BASE_COLUMNS, "A", "B")

BENCHMARKS: dict[str, BenchmarkSpec] = {
    "mmmu": BenchmarkSpec(
        "mmmu",
        "accuracy",
        "mixed",
        _BASE_COLUMNS,
        "college-level multi-discipline questions; mostly multiple choice, some open (number/short phrase)",
        ("dev", "validation"),
    ),
    "ai2d": BenchmarkSpec("ai2d", "accuracy", "multiple_choice", _MC_COLUMNS, "science diagrams, multiple choice"),
    "chartqa": BenchmarkSpec("chartqa", "relaxed_accuracy", "open", _BASE_COLUMNS, "charts; 5% numeric tolerance"),
    "docvqa": BenchmarkSpec("docvqa", "anls", "open", _BASE_COLUMNS, "document pages; ANLS over acceptable answers"),
    "infovqa": BenchmarkSpec("infovqa", "anls", "open", _BASE_COLUMNS, "infographics; ANLS over acceptable answers"),
}

# Every benchmark metric here is higher-is-better; keys cover the bare metric and "<benchmark>/<metric>",
# the names `BenchmarkScore.metrics()` logs under.
METRIC_DIRECTIONS: dict[str, str] = {  # one table: evaluation/directions.py
    **{m: DIRECTIONS[m] for m in ("accuracy", "relaxed_accuracy", "anls")},
    **{f"{s.name}/{s.metric}": DIRECTIONS[s.metric] for s in BENCHMARKS.values()},
}


def get_spec(name: str) -> BenchmarkSpec:
    """Look a suite up case-insensitively, failing with the list of known names rather than a bare KeyError."""
    spec = BENCHMARKS.get(name.lower().strip())
    if spec is None:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}")
    return spec


# ----------------------------------------------------------------------------------------------------------------------
# Items and the TSV reader


@dataclass
class BenchmarkItem:
    """One question. Images stay base64 until asked for: a full DocVQA TSV decoded up front is gigabytes."""

    index: str
    question: str
    options: dict[str, str]
    answer: str | list[str]
    category: str | None = None
    images: list[str] = field(default_factory=list)
    hint: str | None = None
    l2_category: str | None = None
    split: str | None = None
    image_paths: list[Path] = field(default_factory=list)

    @property
    def answers(self) -> list[str]:
        """The acceptable answers as a list, whichever form the TSV stored them in."""
        return list(self.answer) if isinstance(self.answer, list) else [self.answer]

    @property
    def num_images(self) -> int:
        return len(self.images) or len(self.image_paths)

    def image_bytes(self, i: int = 0) -> bytes:
        if self.images:
            return _b64decode(self.images[i])
        return Path(self.image_paths[i]).read_bytes()

    def pil_image(self, i: int = 0) -> Image.Image:
        """Decoded and converted to RGB: the TSVs mix palette, RGBA and grayscale images, processors want RGB."""
        with Image.open(io.BytesIO(self.image_bytes(i))) as im:
            return im.convert("RGB")

    def pil_images(self) -> list[Image.Image]:
        return [self.pil_image(i) for i in range(self.num_images)]


def _b64decode(data: str) -> bytes:
    if data.startswith("data:") and "," in data:  # tolerate data URLs written by other tools
        data = data.split(",", 1)[1]
    return base64.b64decode(data)


def _is_missing(value: object) -> bool:
    # Read with dtype=str and no NA conversion, so "None"/"NA" answers survive; only empty cells (and the
    # literal "nan" pandas writes for a float NaN in some exports) are missing.
    return value is None or (isinstance(value, float) and value != value) or str(value).strip().lower() in {"", "nan"}


def _cell(row: Mapping[str, object], column: str) -> str | None:
    value = row.get(column)
    return None if _is_missing(value) else str(value).strip()


def _parse_list(text: str) -> list[str] | None:
    """A cell holding a JSON or Python-repr list (MMMU images, DocVQA answers), else None."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
            return [str(v) for v in value]
    return None


def _option_columns(columns: Sequence[str]) -> list[str]:
    return [c for c in columns if len(c) == 1 and "A" <= c <= "Z"]


def read_vlmeval_tsv(path: str | Path, required_columns: Sequence[str] = _BASE_COLUMNS) -> list[BenchmarkItem]:
    """Read any VLMEvalKit-layout TSV; `load_benchmark` adds the suite's column requirements."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark TSV not found: {path}")
    # The C parser has no per-field size limit (the csv module's 128 KiB default breaks on inline images).
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in required_columns if c not in df.columns]
    if "image" not in df.columns and "image_path" not in df.columns:
        missing.append("image (or image_path)")
    if missing:
        raise ValueError(f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(df.columns)}")

    rows = df.to_dict(orient="records")
    image_by_index = {str(r["index"]).strip(): r.get("image", "") for r in rows}
    option_cols = _option_columns(list(df.columns))
    items = []
    for row in rows:
        index = str(row["index"]).strip()
        answer_text = _cell(row, "answer") or ""
        answer: str | list[str] = _parse_list(answer_text) or answer_text
        images = _resolve_images(row.get("image", ""), image_by_index, index) if "image" in df.columns else []
        paths_cell = _cell(row, "image_path")
        image_paths = [path.parent / p for p in (_parse_list(paths_cell) or [paths_cell])] if paths_cell else []
        items.append(
            BenchmarkItem(
                index=index,
                question=_cell(row, "question") or "",
                options={c: str(row[c]).strip() for c in option_cols if not _is_missing(row[c])},
                answer=answer,
                category=_cell(row, "category"),
                images=images,
                hint=_cell(row, "hint"),
                l2_category=_cell(row, "l2-category"),
                split=_cell(row, "split"),
                image_paths=image_paths,
            )
        )
    return items


def _resolve_images(cell: object, image_by_index: Mapping[str, object], index: str) -> list[str]:
    """Base64 strings of a row's images, following index references (chains allowed, cycles are an error)."""
    if _is_missing(cell):
        return []
    text = str(cell).strip()
    out: list[str] = []
    for first in _parse_list(text) or [text]:
        seen: set[str] = set()
        pending = [first.strip()]
        while pending:
            entry = pending.pop(0)
            if len(entry) > _IMAGE_REF_MAX_LEN:
                out.append(entry)
                continue
            target = image_by_index.get(entry)
            if entry in seen or target is None or _is_missing(target):
                raise ValueError(f"row {index}: image cell {entry!r} is neither base64 data nor the index of a row")
            seen.add(entry)
            target = str(target).strip()
            pending = [t.strip() for t in (_parse_list(target) or [target])] + pending
    return out


def load_benchmark(name: str, tsv_path: str | Path, split: str | None = None) -> list[BenchmarkItem]:
    """Items of one suite, optionally restricted to one `split` (MMMU ships dev and validation in one file)."""
    spec = get_spec(name)
    items = read_vlmeval_tsv(tsv_path, spec.required_columns)
    if split is not None:
        items = [it for it in items if (it.split or "").lower() == split.lower()]
    return items


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class PromptTemplate:
    """The instruction wording, the only part families differ on; the option layout stays fixed."""

    mc_instruction: str = "Answer with the option's letter from the given choices directly."
    open_instruction: str = "Answer the question using a single word or phrase."
    hint_prefix: str = "Hint: "
    question_prefix: str = ""


# Starting points, not each model's official evaluation prompt: "default"/"llava" is the LLaVA-1.5
# evaluation wording, which many open VLMs reuse; the others only reword the instruction.
PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "default": PromptTemplate(),
    "llava": PromptTemplate(),
    "qwen2_vl": PromptTemplate(
        mc_instruction="Please select the correct answer from the options above. "
        "Answer with the option's letter from the given choices directly.",
        question_prefix="Question: ",
    ),
    "internvl": PromptTemplate(open_instruction="Answer the question using a single word or phrase. Be concise."),
}


def build_prompt(item: BenchmarkItem, spec: BenchmarkSpec | str, template: str | PromptTemplate = "default") -> str:
    """The text half of the model input; image placeholders (MMMU's `<image 1>`) are left for the caller's
    chat template, which knows how its family interleaves images."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    if isinstance(template, str):
        if template not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(sorted(PROMPT_TEMPLATES))}")
        template = PROMPT_TEMPLATES[template]
    parts = []
    if item.hint:
        parts.append(f"{template.hint_prefix}{item.hint}")
    parts.append(f"{template.question_prefix}{item.question}")
    if _is_multiple_choice(item, spec):
        parts.append("Options:\n" + "\n".join(f"{k}. {v}" for k, v in item.options.items()))
        parts.append(template.mc_instruction)
    else:
        parts.append(template.open_instruction)
    return "\n".join(parts)


def _is_multiple_choice(item: BenchmarkItem, spec: BenchmarkSpec) -> bool:
    # MMMU mixes both kinds in one file: a row with options is multiple choice, one without is open.
    return spec.task == "multiple_choice" or (spec.task == "mixed" and bool(item.options))


# ----------------------------------------------------------------------------------------------------------------------
# Multiple-choice answer extraction

# After "answer is"/"answer:", a capital A or I followed by a lowercase word reads as prose ("The answer
# is A cat"), unless that word cannot follow an article or a pronoun (a verb or a conjunction).
_NOT_PROSE_AFTER = frozenset("is was seems appears because since would should could must fits matches and or".split())
_EXPLICIT = re.compile(
    r"(?i:\b(?P<kw>answer|option|choice)s?\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?)"
    r"\s*[:=\-]?\s*(?i:(?:option|choice)\s+)?(?P<open>[(\[])?(?P<letter>[A-Z])(?![A-Za-z0-9])"
)
_LEADING = re.compile(r"^[(\[]?([A-Z])[)\]\.:](?=\s|$)")
_PAREN = re.compile(r"[(\[]([A-Z])[)\]]")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'’\-])([A-Z])(?![A-Za-z0-9'’\-])")


def _norm_text(s: str) -> str:
    return " ".join(s.casefold().split()).strip(" .")


def _reads_as_prose(text: str, end: int) -> bool:
    m = re.match(r"\s+([a-z]+)", text[end:])
    return m is not None and m.group(1) not in _NOT_PROSE_AFTER


def extract_choice(response: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form response picks, or None when it does not clearly pick one.

    Rules, first hit wins:
    1. the whole response is one letter, bracketed or punctuated or not ("B", "(b)", "B.");
    2. it starts with a letter and a delimiter ("B. a dog", "(B) a dog", "B: ...");
    3. an explicit phrase: "Answer: B", "The answer is (B)", "option C";
    4. it equals an option's text (case-insensitive);
    5. exactly one distinct bracketed letter "(C)", then exactly one distinct standalone capital letter,
       both outside the spans where option texts occur (so "Vitamin D" does not read as option D);
    6. option texts contained in the response: the unique match, or the longest when the others are
       part of it ("black cat" over "cat"); then the unique option that contains the whole response.

    The article rule: a capital "A" (or the pronoun "I") followed by a lowercase word ("A cat is on the
    mat", "I think ...") is prose, not a choice, unless that word is a verb or conjunction that cannot
    follow an article ("A is correct", "A because ..."). Letters must be capitals except in rule 1, so
    "the answer is a cat" never picks A. Only letters present in `options` count.
    """
    letters = {k.strip().upper(): v for k, v in options.items() if not _is_missing(v)}
    if not letters or not response or not response.strip():
        return None
    text = response.replace("**", "").replace("`", "").strip()

    bare = text.strip(" \t\r\n.:;,!?()[]{}'\"*")
    if len(bare) == 1 and bare.upper() in letters:  # rule 1
        return bare.upper()
    m = _LEADING.match(text)  # rule 2
    if m and m.group(1) in letters:
        return m.group(1)
    for m in _EXPLICIT.finditer(text):  # rule 3
        letter = m.group("letter")
        if letter not in letters:
            continue
        after_keyword_only = m.group("kw").lower() == "answer" and not m.group("open")
        if after_keyword_only and letter in "AI" and _reads_as_prose(text, m.end()):
            continue
        return letter

    text = " ".join(text.split())
    norm_response = _norm_text(text)
    norm_options = {k: _norm_text(v) for k, v in letters.items()}
    exact = [k for k, v in norm_options.items() if v and v == norm_response]  # rule 4
    if len(exact) == 1:
        return exact[0]

    masked = _mask_option_texts(text, [v for v in norm_options.values() if v])  # rule 5
    found = {m.group(1) for m in _PAREN.finditer(masked)} & letters.keys()
    if len(found) == 1:
        return found.pop()
    found = {
        m.group(1)
        for m in _STANDALONE.finditer(masked)
        if m.group(1) in letters and not (m.group(1) in "AI" and _reads_as_prose(text, m.end()))
    }
    if len(found) == 1:
        return found.pop()
    return _match_option_text(norm_response, norm_options)  # rule 6


def _word_pattern(text: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(text) + r"(?!\w)", re.IGNORECASE)


def _mask_option_texts(text: str, option_texts: list[str]) -> str:
    for t in sorted(option_texts, key=len, reverse=True):
        text = _word_pattern(t).sub(lambda m: " " * len(m.group(0)), text)
    return text


def _match_option_text(norm_response: str, norm_options: Mapping[str, str]) -> str | None:
    hits = [(k, v) for k, v in norm_options.items() if v and _word_pattern(v).search(norm_response)]
    if len(hits) == 1:
        return hits[0][0]
    if hits:
        best_k, best_v = max(hits, key=lambda kv: len(kv[1]))
        if all(v != best_v and v in best_v for k, v in hits if k != best_k):
            return best_k
        return None
    if norm_response:
        containing = [k for k, v in norm_options.items() if _word_pattern(norm_response).search(v)]
        if len(containing) == 1:
            return containing[0]
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute all cost 1); answers are short, so the O(len*len) DP is fine."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_norm(s: str) -> str:
    return " ".join(s.strip().lower().split())


def anls_score(prediction: str, answers: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """DocVQA's per-question ANLS: max over acceptable answers of 1 - NL, zeroed when NL >= threshold.

    NL is the Levenshtein distance over the longer string's length, on lowercased, whitespace-stripped
    (and internally collapsed) strings. The threshold keeps a wrong answer that shares a few characters
    with the truth from earning partial credit. Two empty strings count as an exact match.
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    pred = _anls_norm(prediction)
    best = 0.0
    for ans in answers:
        gt = _anls_norm(ans)
        longest = max(len(pred), len(gt))
        nl = levenshtein(pred, gt) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def anls(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Mean per-question ANLS (the DocVQA/InfoVQA leaderboard number, as a fraction)."""
    scores = [anls_score(p, a) for p, a in zip(predictions, answers, strict=True)]
    return sum(scores) / len(scores) if scores else float("nan")


def _to_number(s: str) -> float | None:
    t = s.strip().replace(",", "")
    t = t.removesuffix("%").strip()
    try:
        return float(t)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed accuracy for one answer: within 5% relative error when both sides are numbers.

    Numbers parse after dropping thousands commas and a trailing "%" ("12%" is 12, as in ChartQA's own
    scorer, not 0.12). A target of 0 has no relative error, so it needs an exact numeric match. Anything
    non-numeric needs a case-insensitive exact match after stripping.
    """
    pred, tgt = _to_number(prediction), _to_number(target)
    if pred is not None and tgt is not None:
        if tgt == 0:
            return pred == 0
        return abs(pred - tgt) / abs(tgt) <= tolerance
    return prediction.strip().lower() == target.strip().lower()


def clean_open_answer(response: str) -> str:
    """Strip what chat models wrap short answers in (whitespace, quotes, markdown, a final period).

    Opt-in (`score_benchmark(..., clean_open=True)`): the official ChartQA/DocVQA scorers compare the raw
    stripped response, so a cleaned score is friendlier to chatty models but no longer the published metric.
    """
    s = response.replace("**", "").strip().strip("`\"'").strip()
    if s.endswith(".") and _to_number(s) is None:
        s = s[:-1].rstrip()
    return s


def _mmmu_open_correct(prediction: str, answers: Sequence[str]) -> bool:
    """MMMU's open-question rule, simplified: a numeric gold matches any number in the response (2 decimals),
    a text gold matches when it occurs in the lowercased response."""
    pred = prediction.lower().strip()
    pred_numbers = {
        round(n, 2) for n in (_to_number(t) for t in re.findall(r"-?\d[\d,]*\.?\d*%?", pred)) if n is not None
    }
    for ans in answers:
        gold = _to_number(ans)
        if gold is not None:
            if round(gold, 2) in pred_numbers:
                return True
        elif _norm_text(ans) and _norm_text(ans) in _norm_text(pred):
            return True
    return False


@dataclass
class BenchmarkScore:
    """The result of one suite: what the flow logs as metrics, and the rows it logs as a table."""

    benchmark: str
    metric: str
    score: float
    n: int
    per_category: dict[str, tuple[float, int]]
    rows: list[dict[str, object]]

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metric names; categories stay in the table (their names are not metric-safe)."""
        return {f"{self.benchmark}/{self.metric}": self.score, f"{self.benchmark}/n": float(self.n)}


def _score_one(spec: BenchmarkSpec, item: BenchmarkItem, response: str, clean_open: bool) -> tuple[str, float]:
    if _is_multiple_choice(item, spec):
        extracted = extract_choice(response, item.options)
        correct = extracted is not None and extracted in {a.strip().upper() for a in item.answers}
        return extracted or "", float(correct)
    pred = clean_open_answer(response) if clean_open else response.strip()
    if spec.metric == "anls":
        return pred, anls_score(pred, item.answers)
    if spec.metric == "relaxed_accuracy":
        return pred, float(any(relaxed_correct(pred, a) for a in item.answers))
    return pred, float(_mmmu_open_correct(pred, item.answers))


def score_benchmark(
    spec_name: str,
    items: Sequence[BenchmarkItem],
    responses: Sequence[str] | Mapping[str, str],
    clean_open: bool = False,
) -> BenchmarkScore:
    """Score raw model responses; `responses` is aligned with `items` or keyed by item index.

    A missing response is an error, not a zero: a silently shorter run would read as a worse model.
    Open answers are compared as the benchmarks' own scorers do (the stripped response) unless
    `clean_open` also drops quotes, markdown and a final period (see `clean_open_answer`).
    Multiple-choice rows carry the extracted letter ("" when none) in `extracted`.
    """
    spec = get_spec(spec_name)
    if isinstance(responses, Mapping):
        by_index = {str(k): v for k, v in responses.items()}
        missing = [it.index for it in items if it.index not in by_index]
        if missing:
            raise ValueError(f"no response for {len(missing)} item(s), e.g. index {', '.join(missing[:5])}")
        ordered = [by_index[it.index] for it in items]
    else:
        if len(responses) != len(items):
            raise ValueError(f"{len(responses)} responses for {len(items)} items")
        ordered = list(responses)

    rows: list[dict[str, object]] = []
    by_category: dict[str, list[float]] = {}
    for item, response in zip(items, ordered, strict=True):
        response = "" if response is None else str(response)
        extracted, score = _score_one(spec, item, response, clean_open)
        category = item.category or UNCATEGORIZED
        by_category.setdefault(category, []).append(score)
        answer = item.answer if isinstance(item.answer, str) else json.dumps(item.answer, ensure_ascii=False)
        rows.append(
            {
                "index": item.index,
                "question": item.question,
                "category": category,
                "prediction": response,
                "extracted": extracted,
                "answer": answer,
                "score": score,
            }
        )
    scores = [r["score"] for r in rows]
    overall = sum(scores) / len(scores) if scores else float("nan")
    per_category = {c: (sum(v) / len(v), len(v)) for c, v in sorted(by_category.items())}
    return BenchmarkScore(spec.name, spec.metric, overall, len(rows), per_category, rows)
