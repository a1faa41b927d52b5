"""Reference values for the VLM benchmark scorers (evaluation/benchmarks.py), from VLMEvalKit's own code.

Source: github.com/open-compass/VLMEvalKit at commit e8e78f05f3080fe28154f2130321f17951c3be94 (2026-08-18; the
newest release tag, v0.3rc1, predates the verbose-answer rule of matching_util.py, so the commit is pinned):
- vlmeval/utils/matching_util.py: can_infer (can_infer_option, then can_infer_text), the MCQ answer extraction of
  the `exact_matching` judge policy;
- vlmeval/dataset/utils/multiple_choice.py: MMMU_preproc, mcq_vanilla_eval (model=None is `exact_matching`),
  report_acc;
- vlmeval/dataset/utils/vqa_eval.py: relaxed_correctness, anls_compute, process_line, hit_calculate.

Run (once, by hand; CI never runs it), from a checkout of that commit at $VLMEVAL:
    /work/main/.venv/bin/pip install --no-deps --target /tmp/pkgs validators sty tabulate
    PYTHONPATH=/tmp/pkgs VLMEVAL=/path/to/VLMEvalKit .venv/bin/python docs/fidelity/ref_vlm_benchmarks.py
with the project venv (pandas 3.1.1, numpy). Stubbed: the package `__init__`s of `vlmeval`, `vlmeval.dataset`
and `vlmeval.dataset.utils` (they import every dataset and model class and their heavy dependencies); the
modules above are imported from their own files, `vlmeval.smp` and `vlmeval.utils` with their real `__init__`.

Prints one JSON object; its tables are copied verbatim into tests/evaluation/test_benchmark_reference.py:
- can_infer: [response, option set name, can_infer's result (false when it finds nothing)];
- mmmu: per row [index, hit] from mcq_vanilla_eval on an MMMU_DEV_VAL-style frame (open questions included),
  then report_acc's rows (split, Overall, per category);
- relaxed: [prediction, target, relaxed_correctness(target, prediction)];
- anls: [prediction, ground truth, anls_compute(gt, prediction)] (the normalised Levenshtein distance);
- vqa_rows: per dataset, [prediction, answer cell, hit] from process_line + hit_calculate, and the dataset's
  Overall (mean hit x 100), or the exception an empty answer list raises.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types

import numpy as np
import pandas as pd

ROOT = os.path.join(os.environ.get("VLMEVAL", "/tmp/bench17/vlmeval"), "vlmeval")
for name, sub in [("vlmeval", ""), ("vlmeval.dataset", "dataset"), ("vlmeval.dataset.utils", "dataset/utils")]:
    stub = types.ModuleType(name)
    stub.__path__ = [os.path.join(ROOT, sub)]
    sys.modules[name] = stub

from vlmeval.dataset.utils.multiple_choice import mcq_vanilla_eval, report_acc  # noqa: E402
from vlmeval.dataset.utils.vqa_eval import anls_compute, hit_calculate, process_line, relaxed_correctness  # noqa: E402
from vlmeval.utils.matching_util import can_infer  # noqa: E402

OPTION_SETS = {
    "animals": {"A": "dog", "B": "cat", "C": "black cat", "D": "horse"},
    "vitamins": {"A": "Vitamin C", "B": "Vitamin D", "C": "Iron", "D": "Zinc"},
    "colours": {"A": "red", "B": "green", "C": "blue"},
    "five": {"A": "one", "B": "two", "C": "three", "D": "four", "E": "five"},
}

CAN_INFER = [
    ("B", "animals"), ("b", "animals"), ("(B)", "animals"), ("B.", "animals"), ("[D]", "animals"),
    ("**C**", "animals"), ("C)", "animals"), (" C ", "animals"), ("B. cat", "animals"), ("(D) horse", "animals"),
    ("Answer: B", "animals"), ("Answer: C", "animals"), ("The answer is B", "animals"), ("The answer is: B", "animals"),
    ("The correct answer is (C).", "animals"), ("answer is d.", "animals"), ("the answer is a", "animals"),
    ("The correct answer is **C**. Here's why: it is black and it is a cat, as the picture shows.", "animals"),
    ("I think the answer is D because it has hooves.", "animals"), ("The best option is A", "animals"),
    ("I think it's (B).", "animals"), ("A is correct", "animals"), ("A cat is sitting on the mat.", "animals"),
    ("The answer is A cat", "animals"), ("It is a black cat.", "animals"), ("Horse", "animals"), ("a dog", "animals"),
    ("cat", "animals"), ("B or C", "animals"), ("A. dog B. cat", "animals"), ("B B", "animals"),
    ("The image shows a dog and a horse", "animals"), ("I am not sure", "animals"), ("", "animals"),
    ("E", "animals"), ("Z", "animals"), ("Cannot determine the answer", "animals"),
    ("Sorry, I can't help with images of people yet.", "animals"), ("Failed to obtain answer via API", "animals"),
    ("Failed to obtain answer via API: horse", "animals"), ("Option B is wrong, it must be C", "animals"),
    ("B\n\nExplanation: the animal in the picture has whiskers and it meows.", "animals"),
    ("It is a horse, a very large horse with a long mane and a tail, standing in a field of grass.", "animals"),
    ("The answer is B because B is a cat, and the picture shows a cat, I am sure", "animals"),
    ("It is Vitamin D deficiency", "vitamins"), ("Answer: Vitamin C", "vitamins"), ("The answer is C", "vitamins"),
    ("D", "vitamins"), ("The answer is D", "colours"), ("I would say blue", "colours"), ("D", "colours"),
    ("The answer is E", "five"), ("E", "five"), ("Answer: E.", "five"),
]  # fmt: skip

# MMMU_DEV_VAL-style rows: index, split, category, A, B, C, answer, prediction. A row without A is an open
# question; MMMU_preproc turns it into "A: <answer cell>, B: Other Answers" with ground truth A.
MMMU_ROWS = [
    (1, "validation", "Art", "the first", "the second", None, "A", "the first"),
    (2, "validation", "Art", "the first", "the second", None, "B", "A"),
    (3, "validation", "Art", "red", "green", "blue", "C", "The answer is (C)."),
    (4, "validation", "Math", None, None, None, "24", "24"),
    (5, "validation", "Math", None, None, None, "24", "There are 24 hours."),
    (6, "validation", "Math", None, None, None, "24", "25"),
    (7, "validation", "Math", None, None, None, "24", "24.0"),
    (8, "validation", "Math", None, None, None, "24", "A"),
    (9, "validation", "Math", None, None, None, "24", "B"),
    (10, "validation", "Math", None, None, None, "24", "Other Answers"),
    (11, "validation", "Math", None, None, None, "24", ""),
    (12, "validation", "Math", None, None, None, "24", "The answer is 24"),
    (13, "validation", "Math", None, None, None, "1.5", "x = 1.50"),
    (14, "validation", "Math", None, None, None, "['1.5', '1.50']", "1.5"),
    (15, "validation", "Math", None, None, None, "B", "B"),
    (16, "validation", "Math", None, None, None, "B", "A"),
    (17, "dev", "Art", "cat", "dog", None, "A", "cat"),
    (18, "dev", "Math", None, None, None, "3.14", "It equals 3.14 approximately, as computed from the given radius"),
    (19, "dev", "Math", None, None, None, "Paris", "paris"),
]

RELAXED = [
    ("104", "100"), ("105", "100"), ("106", "100"), ("95", "100"), ("94.9", "100"), ("12%", "12"), ("12", "12%"),
    ("12%", "12%"), ("12%", "0.12"), ("0.12", "12%"), ("12 %", "0.12"), ("12.3%", "12.3"), ("1,000", "1000"),
    ("1000", "1,000"), ("1,000", "1,000"), ("1_000", "1000"), ("1e3", "1000"), ("$12", "12"), ("-5", "5"),
    ("-5", "-5.2"), ("0", "0"), ("0.0", "0"), ("0.01", "0"), ("0", "0.0"), ("Yes", "yes"), ("Yes", " yes"),
    ("yes ", "Yes"), ("Yes, it is", "yes"), ("ten", "10"), ("", ""), ("", "0"), ("0", ""), ("nan", "nan"),
    ("inf", "inf"), ("12.0", "12"), ("2019", "2,019"), (" 12", "12"),
]  # fmt: skip

ANLS = [
    ("helo", "hello"), ("  HELLO ", "hello"), ("xyz", "hello"), ("abxy", "abcd"), ("abcxy", "abcde"),
    ("J Smith", "J. Smith"), ("1200", "$1,200"), ("Hello  World", "hello world"), ("helo   ", "hello"),
    ("hello world.", "hello world"), ("", ""), ("", "abc"), ("abc", ""), ("STRASSE", "straße"),
    ("strase", "straße"), ("ab", "abcd"), ("abc", "abcdef"), ("a b", "a  b"),
]  # fmt: skip

VQA_ROWS = {
    "ChartQA_TEST": [
        ("104", "100"), (" asia ", "Asia"), ("Asia.", "Asia"), ("12%", "12"), ("1,000", "1000"),
        ("7", "['7', '8']"), ("8.3", "['7', '8']"), ("", "0"),
    ],
    "DocVQA_VAL": [
        ("Hello  World", "['hello', 'hello world']"), ("J Smith", "['J. Smith']"), ("1200", "$1,200"),
        ("abxy", "abcd"), ("xyz", "['abc', 'xyzw']"), ("", "['', 'x']"), ("helo   ", "hello"),
    ],
    "InfoVQA_VAL": [("52%", "['52 %', '52']"), ("", "abc"), ("2.5 million", "['2.5 million', '2,500,000']")],
}  # fmt: skip


def _can_infer_table() -> list[list]:
    return [[r, name, can_infer(r, dict(OPTION_SETS[name]))] for r, name in CAN_INFER]


def _mmmu() -> dict:
    cols = ["index", "split", "category", "A", "B", "C", "answer", "prediction"]
    data = pd.DataFrame(MMMU_ROWS, columns=cols)
    data["question"] = [f"q{i}" for i in data["index"]]
    meta = data[["index", "answer", "question"]].copy()
    with tempfile.TemporaryDirectory() as tmp:
        scored = mcq_vanilla_eval(None, data.copy(), meta, 1, os.path.join(tmp, "result.pkl"), "MMMU_DEV_VAL")
    acc = report_acc(scored.copy()).sort_values("split")
    return {
        "hits": [[int(i), int(h)] for i, h in zip(scored["index"], scored["hit"], strict=True)],
        "report_acc": json.loads(acc.to_json(orient="records")),
    }


def _vqa(dataset: str, rows: list[tuple[str, str]]) -> dict:
    method = {"ChartQA": "relaxed_accuracy", "DocVQA": "anls", "InfoVQA": "anls"}[dataset.split("_")[0]]
    res = [process_line(pd.Series({"prediction": p, "answer": a}), method=method) for p, a in rows]
    hits = [float(h) for h in hit_calculate(res, dataset)]
    return {"rows": [[p, a, h] for (p, a), h in zip(rows, hits, strict=True)], "overall": float(np.mean(hits) * 100)}


def _empty_answer_list() -> dict:
    out = {}
    for dataset, method in [("ChartQA_TEST", "relaxed_accuracy"), ("DocVQA_VAL", "anls")]:
        try:
            hit_calculate([process_line(pd.Series({"prediction": "x", "answer": "[]"}), method=method)], dataset)
            out[dataset] = "no error"
        except ValueError as e:  # numpy's max/min of an empty array
            out[dataset] = f"ValueError: {e}"
    return out


def main() -> None:
    print(
        json.dumps(
            {
                "can_infer": _can_infer_table(),
                "mmmu": _mmmu(),
                "relaxed": [[p, t, relaxed_correctness(t, p)] for p, t in RELAXED],
                "anls": [[p, g, anls_compute(g, p)] for p, g in ANLS],
                "vqa": {d: _vqa(d, rows) for d, rows in VQA_ROWS.items()},
                "empty_answer_list": _empty_answer_list(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
