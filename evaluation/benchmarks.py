"""Understanding benchmarks (MMMU, AI2D, ChartQA, DocVQA, InfoVQA) read from VLMEvalKit-layout TSV files.

VLMEvalKit's TSVs are the de-facto exchange format for these suites: one row per question, the image
inline as base64, options in columns `A`, `B`, ... So a downloaded TSV scores here with no conversion
step. The scorers follow VLMEvalKit's own (open-compass/VLMEvalKit@e8e78f05; checked against it on
fixed tables, docs/fidelity.md (benchmarks)): multiple choice as its `exact_matching` policy, MMMU open
questions as its `MMMU_preproc`, ChartQA as `relaxed_correctness`, DocVQA/InfoVQA as `anls_compute`
with the 0.5 threshold; so our numbers are the ones VLMEvalKit prints, where they differ the score's
`tags` say how (no LLM judge, fractions rather than percentages, pooled splits, opt-in cleaning).

This module is a pure library (no Prefect, MLflow or torch): a flow asks a model for
`build_prompt(item, spec)` answers, then hands the raw responses to `score_benchmark`, which returns
the overall score, per-split and per-category breakdowns, tags and one row per sample for an MLflow table.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from flowspeed.evaluation.directions import DIRECTIONS
from PIL import Image

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
    raw_answer: str = ""  # the answer cell as written (VLMEvalKit's MMMU matching uses it verbatim)

    def __post_init__(self) -> None:
        if not self.raw_answer:
            self.raw_answer = self.answer if isinstance(self.answer, str) else str(self.answer)

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
        parsed = _parse_list(answer_text)  # "[]" is an empty list of answers, not the answer "[]"
        answer: str | list[str] = answer_text if parsed is None else parsed
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
                raw_answer=answer_text,
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
# Multiple-choice answer extraction: VLMEvalKit's `exact_matching` policy (vlmeval/utils/matching_util.py, can_infer)

NO_ANSWER = "Z"  # VLMEvalKit's letter for "no option chosen": it never equals a real answer
# Refusals VLMEvalKit reads as the explicit non-answer, and the API-failure text that skips the letter rules.
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_API_FAILURE = "Failed to obtain answer via API"
_TOKEN_BREAKS = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
# A lone option letter counts only among the last few tokens: earlier it is usually the article "A" in prose.
_LETTER_TAIL = 4


def _letter_in_response(response: str, letters: Sequence[str]) -> str | None:
    if _API_FAILURE in response:
        return None
    if any(r in response for r in _REFUSALS):
        return NO_ANSWER
    tokens = response.translate(_TOKEN_BREAKS).split()
    named = [k for k in letters if k in tokens]
    if len(named) == 1:
        if tokens.index(named[0]) >= len(tokens) - _LETTER_TAIL:
            return named[0]
    elif not named and NO_ANSWER in tokens:
        return NO_ANSWER
    m = _ANSWER_IS.search(response)  # "The correct answer is **B**. Here's why: ..." (only A-D)
    return m.group(1).upper() if m and m.group(1).upper() in letters else None


def _option_text_in_response(response: str, options: Mapping[str, str]) -> str | None:
    lowered = response.lower()
    if len(lowered) > 2 * sum(len(v) for v in options.values()):  # an essay mentions every option somewhere
        return None
    hits = [k for k, v in options.items() if v.lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def extract_choice(response: str, options: Mapping[str, str]) -> str | None:
    """The option letter VLMEvalKit's exact-matching policy reads from a response; None when it reads none.

    Same rules as VLMEvalKit's `can_infer`, so our accuracy is the number VLMEvalKit prints with
    `--judge exact_matching`: after blanking `.()[],:;!*#{}`, a response naming exactly one option
    letter as a capital token among its last four tokens picks it ("B", "(B)", "Answer: C", but not "b",
    nor "B or C"); else "answer is X" (X in A-D, any case: "the answer is a" picks A); else the one option
    whose text occurs, case-insensitively, in a response at most twice as long as all option texts
    together. Refusals, or a lone "Z", give `NO_ANSWER`. VLMEvalKit's default then asks an LLM judge
    (gpt-4o-mini) about what this leaves unmatched; we have none, so those answers score 0 (see
    `BenchmarkScore.tags`).
    """
    options = {k: str(v) for k, v in options.items() if not _is_missing(v)}
    if not options:
        return None
    return _letter_in_response(response, list(options)) or _option_text_in_response(response, options)


def _mc_options_and_truth(item: BenchmarkItem, spec: BenchmarkSpec) -> tuple[dict[str, str], str]:
    """What VLMEvalKit's MCQ evaluation compares: the options shown to the matcher and the true letter.

    MMMU (its `MMMU_preproc`): an open question (no option A) becomes the choice between A = the raw
    answer cell and B = "Other Answers", and every answer that is not one capital letter reads as A.
    So an open answer counts when the response contains the answer text (or names A), and a list-valued
    answer cell ("['1.5', '1.50']") never matches: VLMEvalKit's behaviour, kept for comparable numbers.
    """
    truth = item.raw_answer
    if spec.name != "mmmu":
        return item.options, truth
    options = dict(item.options)
    if "A" not in options:
        options |= {"A": truth, "B": "Other Answers"}
    return options, truth if len(truth) == 1 and truth in string.ascii_uppercase else "A"


# ----------------------------------------------------------------------------------------------------------------------
# Open-answer metrics: VLMEvalKit's vlmeval/dataset/utils/vqa_eval.py


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


def anls_distance(prediction: str, answer: str) -> float:
    """The normalised Levenshtein distance of DocVQA's scorer (VLMEvalKit's `anls_compute`).

    The edit distance is taken on lowercased, stripped, whitespace-collapsed strings, but divided by the
    longer RAW string's length (as VLMEvalKit's scorer does), so padding a prediction with spaces lowers
    its distance. Two empty strings are a match.
    """
    length = max(len(answer.upper()), len(prediction.upper()))
    return levenshtein(_anls_norm(answer), _anls_norm(prediction)) / length if length else 0.0


def anls_score(prediction: str, answers: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """One question's ANLS: 1 - the smallest distance over the acceptable answers, 0 below `threshold`.

    The threshold keeps a wrong answer that shares a few characters with the truth from earning credit;
    a score of exactly 0.5 (distance 0.5) still counts, as in VLMEvalKit's `hit_calculate`. No acceptable answer
    is an error: the reference scorer fails on it too, and a silent 0 would read as a worse model.
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("ANLS needs at least one acceptable answer")
    score = 1.0 - min(anls_distance(prediction, a) for a in answers)
    return 0.0 if score < threshold else score


def anls(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Mean per-question ANLS (the DocVQA/InfoVQA leaderboard number, as a fraction)."""
    scores = [anls_score(p, a) for p, a in zip(predictions, answers, strict=True)]
    return sum(scores) / len(scores) if scores else float("nan")


def _relaxed_number(text: str) -> float | None:
    # Python's float() grammar: surrounding spaces, "1e3" and "1_000" parse, "1,000" and "$12" do not.
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed accuracy for one answer (VLMEvalKit's `relaxed_correctness`, taken from pix2struct).

    Both sides numbers and the target nonzero: within 5% relative error, inclusive. A trailing "%" divides
    by 100, so "12%" matches "0.12" and not "12"; thousands separators are not numbers, so "1,000" only
    matches the string "1,000". Anything else (a target of 0 included) needs a case-insensitive exact
    match; neither side is stripped here (the caller strips the prediction, as VLMEvalKit does).
    """
    pred, tgt = _relaxed_number(prediction), _relaxed_number(target)
    if pred is not None and tgt:
        return abs(pred - tgt) / abs(tgt) <= tolerance
    return prediction.lower() == target.lower()


def clean_open_answer(response: str) -> str:
    """Strip what chat models wrap short answers in (whitespace, quotes, markdown, a final period).

    Opt-in (`score_benchmark(..., clean_open=True)`, tagged on the score): VLMEvalKit compares the raw
    response, so a cleaned score is friendlier to chatty models but no longer the published metric.
    """
    s = response.replace("**", "").strip().strip("`\"'").strip()
    if s.endswith(".") and _relaxed_number(s) is None:
        s = s[:-1].rstrip()
    return s


# ----------------------------------------------------------------------------------------------------------------------
# Scoring a suite


@dataclass
class BenchmarkScore:
    """The result of one suite: what the flow logs as metrics and tags, and the rows it logs as a table.

    `per_split` is VLMEvalKit's per-split report (MMMU's published number is its validation split);
    with splits, `per_category` is keyed "<split>/<category>", as VLMEvalKit reports categories per split.
    """

    benchmark: str
    metric: str
    score: float
    n: int
    per_category: dict[str, tuple[float, int]]
    rows: list[dict[str, object]]
    per_split: dict[str, tuple[float, int]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metric names; categories stay out (the flow logs them, sanitised, under category/)."""
        out = {f"{self.benchmark}/{self.metric}": self.score, f"{self.benchmark}/n": float(self.n)}
        for split, (value, _) in self.per_split.items():
            safe = re.sub(r"[^\w\-.]", "_", split)  # MLflow metric names: no spaces or slashes inside a split
            out[f"{self.benchmark}/{safe}/{self.metric}"] = value
        return out


def _score_one(spec: BenchmarkSpec, item: BenchmarkItem, response: str, clean_open: bool) -> tuple[str, float]:
    if spec.task != "open":
        options, truth = _mc_options_and_truth(item, spec)
        extracted = extract_choice(response, options)
        return extracted or "", float((extracted or NO_ANSWER) == truth)
    if not item.answers:
        raise ValueError(f"{spec.name} item {item.index} has no acceptable answer")
    pred = clean_open_answer(response) if clean_open else response
    if spec.metric == "anls":  # VLMEvalKit does not strip the prediction before ANLS
        return pred, anls_score(pred, item.answers)
    pred = pred.strip()
    return pred, float(any(relaxed_correct(pred, a) for a in item.answers))


def _tags(spec: BenchmarkSpec, splits: int, clean_open: bool) -> dict[str, str]:
    """Where our number deliberately differs from the one VLMEvalKit prints, for the run's tags."""
    tags = {f"{spec.name}.scale": "fraction in [0, 1]; VLMEvalKit prints ChartQA/DocVQA/InfoVQA and MMMU x100"}
    if spec.task != "open":
        tags[f"{spec.name}.answer_matching"] = (
            "VLMEvalKit exact_matching (can_infer) without its default LLM judge (gpt-4o-mini): "
            "a response the rules cannot match scores 0"
        )
    if splits > 1:
        tags[f"{spec.name}.overall"] = (
            f"{spec.name}/{spec.metric} pools every split of the file; VLMEvalKit reports each split alone "
            f"({spec.name}/<split>/{spec.metric}; MMMU publishes validation)"
        )
    if clean_open:
        tags[f"{spec.name}.answer_cleaning"] = "quotes, markdown and a final period stripped (not VLMEvalKit's)"
    return tags


def _breakdown(keys: Sequence[str], scores: Sequence[float]) -> dict[str, tuple[float, int]]:
    groups: dict[str, list[float]] = {}
    for key, score in zip(keys, scores, strict=True):
        groups.setdefault(key, []).append(score)
    return {g: (sum(v) / len(v), len(v)) for g, v in sorted(groups.items())}


def score_benchmark(
    spec_name: str,
    items: Sequence[BenchmarkItem],
    responses: Sequence[str] | Mapping[str, str],
    clean_open: bool = False,
) -> BenchmarkScore:
    """Score raw model responses; `responses` is aligned with `items` or keyed by item index.

    A missing response is an error, not a zero: a silently shorter run would read as a worse model.
    Responses are scored as VLMEvalKit scores them (module docstring) unless `clean_open` also drops
    quotes, markdown and a final period from open answers (see `clean_open_answer`). Multiple-choice
    rows carry the extracted letter ("" when none) in `extracted`.
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
    scores: list[float] = []
    for item, response in zip(items, ordered, strict=True):
        response = "" if response is None else str(response)
        extracted, score = _score_one(spec, item, response, clean_open)
        scores.append(score)
        rows.append(
            {
                "index": item.index,
                "question": item.question,
                "category": item.category or UNCATEGORIZED,
                "split": item.split or "",
                "prediction": response,
                "extracted": extracted,
                "answer": item.raw_answer,
                "score": score,
            }
        )
    overall = sum(scores) / len(scores) if scores else float("nan")
    with_split = [i for i, it in enumerate(items) if it.split]
    per_split = _breakdown([items[i].split or "" for i in with_split], [scores[i] for i in with_split])
    categories = [(f"{it.split}/" if it.split else "") + (it.category or UNCATEGORIZED) for it in items]
    per_category = _breakdown(categories, scores)
    tags = _tags(spec, len(per_split), clean_open)
    return BenchmarkScore(spec.name, spec.metric, overall, len(rows), per_category, rows, per_split, tags)
