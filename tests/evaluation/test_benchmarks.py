"""VLMEvalKit-layout TSV benchmarks: reader, prompts, answer extraction and the suites' metrics.

Fixtures are tiny TSVs written the way VLMEvalKit writes them (pandas, tab-separated, inline base64
images); every expected score is computed by hand in a comment next to it. The edge-case tables whose
expected values came from running VLMEvalKit's own scorers are in test_benchmark_reference.py.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from flowspeed.evaluation.benchmarks import (
    BENCHMARKS,
    METRIC_DIRECTIONS,
    PromptTemplate,
    anls,
    anls_score,
    build_prompt,
    extract_choice,
    levenshtein,
    load_benchmark,
    relaxed_correct,
    score_benchmark,
)
from PIL import Image


def _png_b64(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


RED = _png_b64((8, 6), (255, 0, 0))
BLUE = _png_b64((5, 7), (0, 0, 255))


def _write_tsv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


@pytest.fixture
def ai2d_tsv(tmp_path: Path) -> Path:
    q = "Which organism eats grass?"
    return _write_tsv(
        tmp_path / "AI2D_TEST.tsv",
        [
            {"index": 0, "image": RED, "question": q, "A": "cow", "B": "lion", "C": "shark", "D": "eagle",
             "answer": "A", "category": "food chain", "hint": None},
            # reuses row 0's image by index, has only three options and a hint
            {"index": 1, "image": "0", "question": "Which is a predator?", "A": "grass", "B": "cow", "C": "lion",
             "D": None, "answer": "C", "category": "food chain", "hint": "Look at the arrows."},
            {"index": 2, "image": BLUE, "question": "What comes after the egg?", "A": "adult", "B": "larva",
             "C": "pupa", "D": "egg", "answer": "B", "category": "life cycle", "hint": None},
        ],
    )  # fmt: skip


@pytest.fixture
def mmmu_tsv(tmp_path: Path) -> Path:
    return _write_tsv(
        tmp_path / "MMMU_DEV_VAL.tsv",
        [
            {"index": 10, "image": json.dumps([RED, BLUE]), "question": "<image 1> <image 2> Which is warmer?",
             "A": "the first", "B": "the second", "C": None, "D": None, "answer": "A", "category": "Art",
             "split": "validation"},
            {"index": 11, "image": RED, "question": "How many hours are in a day?", "A": None, "B": None, "C": None,
             "D": None, "answer": "24", "category": "Math", "split": "dev"},
        ],
    )  # fmt: skip


@pytest.fixture
def docvqa_tsv(tmp_path: Path) -> Path:
    return _write_tsv(
        tmp_path / "DocVQA_VAL.tsv",
        [
            {"index": 0, "image": RED, "question": "What is the greeting?", "answer": str(["hello", "hello world"])},
            {"index": 1, "image": "0", "question": "Who signed?", "answer": "['J. Smith']"},
            {"index": 2, "image": BLUE, "question": "What is the total?", "answer": "$1,200"},
        ],
    )


# ----------------------------------------------------------------------------------------------------------------------
# Reader


def test_reader_options_images_category_and_hint(ai2d_tsv: Path) -> None:
    items = load_benchmark("ai2d", ai2d_tsv)
    assert [it.index for it in items] == ["0", "1", "2"]
    assert items[0].options == {"A": "cow", "B": "lion", "C": "shark", "D": "eagle"}
    assert items[1].options == {"A": "grass", "B": "cow", "C": "lion"}  # the empty D is dropped
    assert items[0].answer == "A" and items[0].answers == ["A"]
    assert [it.category for it in items] == ["food chain", "food chain", "life cycle"]
    assert items[0].hint is None and items[1].hint == "Look at the arrows."
    assert items[0].pil_image().size == (8, 6) and items[2].pil_image().size == (5, 7)
    # row 1 stored "0": it gets row 0's image, not the literal string
    assert items[1].images == [RED] and items[1].pil_image().getpixel((0, 0)) == (255, 0, 0)


def test_reader_mmmu_image_list_and_split(mmmu_tsv: Path) -> None:
    items = load_benchmark("MMMU", mmmu_tsv)
    first, open_q = items
    assert first.num_images == 2 and [im.size for im in first.pil_images()] == [(8, 6), (5, 7)]
    assert first.options == {"A": "the first", "B": "the second"}
    assert open_q.options == {} and open_q.answer == "24"
    assert [it.index for it in load_benchmark("mmmu", mmmu_tsv, split="dev")] == ["11"]
    assert [it.index for it in load_benchmark("mmmu", mmmu_tsv, split="validation")] == ["10"]


def test_reader_docvqa_answer_lists(docvqa_tsv: Path) -> None:
    items = load_benchmark("docvqa", docvqa_tsv)
    assert items[0].answer == ["hello", "hello world"]
    assert items[1].answer == ["J. Smith"] and items[1].pil_image().size == (8, 6)
    assert items[2].answer == "$1,200"  # a plain string stays a string
    assert items[0].category is None


def test_reader_keeps_answers_pandas_would_read_as_missing(tmp_path: Path) -> None:
    path = _write_tsv(tmp_path / "x.tsv", [{"index": 0, "image": RED, "question": "q", "answer": "None"}])
    assert load_benchmark("chartqa", path)[0].answer == "None"


def test_unknown_benchmark_lists_known_names(ai2d_tsv: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'mmbench'.*ai2d.*chartqa.*docvqa.*infovqa.*mmmu"):
        load_benchmark("mmbench", ai2d_tsv)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_benchmark("ai2d", tmp_path / "nope.tsv")


def test_missing_columns_are_named(tmp_path: Path) -> None:
    no_answer = _write_tsv(tmp_path / "a.tsv", [{"index": 0, "image": RED, "question": "q", "A": "x", "B": "y"}])
    with pytest.raises(ValueError, match=r"missing required column\(s\) answer"):
        load_benchmark("ai2d", no_answer)
    # multiple choice needs option columns; an open suite does not
    no_options = _write_tsv(tmp_path / "b.tsv", [{"index": 0, "image": RED, "question": "q", "answer": "A"}])
    with pytest.raises(ValueError, match="A, B"):
        load_benchmark("ai2d", no_options)
    assert len(load_benchmark("docvqa", no_options)) == 1
    no_image = _write_tsv(tmp_path / "c.tsv", [{"index": 0, "question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="image"):
        load_benchmark("docvqa", no_image)


def test_dangling_image_reference(tmp_path: Path) -> None:
    path = _write_tsv(tmp_path / "d.tsv", [{"index": 0, "image": "7", "question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="row 0: image cell '7'"):
        load_benchmark("docvqa", path)


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


def test_multiple_choice_prompt_with_hint_and_three_options(ai2d_tsv: Path) -> None:
    item = load_benchmark("ai2d", ai2d_tsv)[1]
    assert build_prompt(item, BENCHMARKS["ai2d"]) == (
        "Hint: Look at the arrows.\n"
        "Which is a predator?\n"
        "Options:\nA. grass\nB. cow\nC. lion\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_open_prompt_and_mmmu_mixed(docvqa_tsv: Path, mmmu_tsv: Path) -> None:
    item = load_benchmark("docvqa", docvqa_tsv)[0]
    assert build_prompt(item, "docvqa") == "What is the greeting?\nAnswer the question using a single word or phrase."
    mc, open_q = load_benchmark("mmmu", mmmu_tsv)
    assert "Options:\nA. the first\nB. the second" in build_prompt(mc, "mmmu")
    assert build_prompt(mc, "mmmu").startswith("<image 1> <image 2> Which is warmer?")  # placeholders kept
    assert build_prompt(open_q, "mmmu").endswith("single word or phrase.") and "Options" not in build_prompt(
        open_q, "mmmu"
    )


def test_family_templates(ai2d_tsv: Path) -> None:
    item = load_benchmark("ai2d", ai2d_tsv)[0]
    qwen = build_prompt(item, "ai2d", template="qwen2_vl")
    assert qwen.startswith("Question: Which organism eats grass?") and "Please select" in qwen
    assert build_prompt(item, "ai2d", template="llava") == build_prompt(item, "ai2d")
    custom = build_prompt(item, "ai2d", template=PromptTemplate(mc_instruction="Letter only."))
    assert custom.endswith("D. eagle\nLetter only.")
    with pytest.raises(ValueError, match="unknown prompt template 'gpt'.*internvl"):
        build_prompt(item, "ai2d", template="gpt")


# ----------------------------------------------------------------------------------------------------------------------
# Answer extraction

OPTS = {"A": "dog", "B": "cat", "C": "black cat", "D": "horse"}


def test_extract_choice_without_options_or_response() -> None:
    # the phrasing table (checked against VLMEvalKit's can_infer) is in test_benchmark_reference.py
    assert extract_choice("B", {}) is None
    assert extract_choice("B", {"A": "x", "B": None}) is None  # a missing option is no option (VLMEvalKit: NaN)
    assert extract_choice("", OPTS) is None and extract_choice("   ", OPTS) is None


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def test_multiple_choice_accuracy_and_categories(ai2d_tsv: Path) -> None:
    items = load_benchmark("ai2d", ai2d_tsv)
    # row 0 (answer A): "A" right; row 1 (answer C): "(B)" wrong; row 2 (answer B): "larva" -> B right
    res = score_benchmark("ai2d", items, ["A", "The answer is (B).", "larva"])
    assert res.metric == "accuracy" and res.n == 3
    assert res.score == pytest.approx(2 / 3)
    # food chain: rows 0 and 1 -> 1/2; life cycle: row 2 -> 1/1
    assert res.per_category == {"food chain": (0.5, 2), "life cycle": (1.0, 1)}
    assert [r["extracted"] for r in res.rows] == ["A", "B", "B"]
    assert [r["score"] for r in res.rows] == [1.0, 0.0, 1.0]
    assert set(res.rows[0]) == {"index", "question", "category", "split", "prediction", "extracted", "answer", "score"}
    assert res.metrics() == {"ai2d/accuracy": pytest.approx(2 / 3), "ai2d/n": 3.0}  # no split column: no split
    assert set(res.tags) == {"ai2d.scale", "ai2d.answer_matching"}  # what differs from VLMEvalKit's run
    # keyed by index gives the same result; a missing response is an error, not a silent zero
    assert score_benchmark("ai2d", items, {0: "A", "1": "(B)", 2: "B"}).score == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no response for 1 item"):
        score_benchmark("ai2d", items, {"0": "A", "1": "B"})
    with pytest.raises(ValueError, match="2 responses for 3 items"):
        score_benchmark("ai2d", items, ["A", "B"])


def test_mmmu_mixed_scoring(mmmu_tsv: Path) -> None:
    items = load_benchmark("mmmu", mmmu_tsv)
    # mc (answer A) right via option text; open (answer 24) right: "24" occurs in the response (MMMU_preproc)
    res = score_benchmark("mmmu", items, ["the first", "There are 24 hours."])
    assert res.score == 1.0 and res.per_category == {"validation/Art": (1.0, 1), "dev/Math": (1.0, 1)}
    assert res.per_split == {"dev": (1.0, 1), "validation": (1.0, 1)}
    assert res.metrics() == {"mmmu/accuracy": 1.0, "mmmu/n": 2.0, "mmmu/dev/accuracy": 1.0,
                             "mmmu/validation/accuracy": 1.0}  # fmt: skip
    assert score_benchmark("mmmu", items, ["B", "25"]).score == 0.0


def test_relaxed_correct_tolerance_is_a_parameter() -> None:
    # the default table against VLMEvalKit's relaxed_correctness is in test_benchmark_reference.py
    assert relaxed_correct("108", "100") is False
    assert relaxed_correct("108", "100", tolerance=0.1) is True  # |108-100|/100 = 0.08


def test_chartqa_score(tmp_path: Path) -> None:
    path = _write_tsv(
        tmp_path / "ChartQA_TEST.tsv",
        [
            {"index": i, "image": RED, "question": f"q{i}", "answer": a, "category": c}
            for i, (a, c) in enumerate([("100", "human"), ("100", "human"), ("Asia", "augmented"), ("12.3", "human")])
        ],
    )
    items = load_benchmark("chartqa", path)
    # 104 right, 106 wrong, " asia " right (prediction stripped, case-insensitive), "12.3%" is 0.123: wrong
    res = score_benchmark("chartqa", items, ["104", "106", " asia ", "12.3%"])
    assert res.metric == "relaxed_accuracy" and res.score == pytest.approx(0.5)
    assert res.per_category == {"augmented": (1.0, 1), "human": (pytest.approx(1 / 3), 3)}
    # ChartQA's scorer compares the raw answer: "Asia." misses; cleaning the final period is opt-in
    assert score_benchmark("chartqa", items[2:3], ["Asia."]).score == 0.0
    assert score_benchmark("chartqa", items[2:3], ['**"Asia."**'], clean_open=True).score == 1.0


def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("hello", "helo") == 1


def test_anls_partial_credit_threshold_and_max() -> None:
    assert anls_score("helo", "hello") == pytest.approx(0.8)  # 1 - 1/5
    assert anls_score("  HELLO ", ["hello"]) == 1.0  # lowercased and stripped
    assert anls_score("xyz", "hello") == 0.0  # NL = 5/5 >= 0.5
    assert anls_score("abxy", "abcd") == 0.5  # NL = 2/4: a score of exactly 0.5 still counts (VLMEvalKit)
    assert anls_score("abcxyz", "abcdef") == 0.5 and anls_score("abwxyz", "abcdef") == 0.0  # 3/6; 4/6
    assert anls_score("abcxy", "abcde") == pytest.approx(0.6)  # NL = 2/5 = 0.4 < 0.5
    # max over acceptable answers: "world" -> 0 (4/5 edits), "help" -> 1 - 1/4 = 0.75, "hello" -> 0.8
    assert anls_score("helo", ["world", "help", "hello"]) == pytest.approx(0.8)
    assert anls(["helo", "xyz"], ["hello", ["hello"]]) == pytest.approx(0.4)  # (0.8 + 0) / 2


def test_docvqa_score(docvqa_tsv: Path) -> None:
    items = load_benchmark("docvqa", docvqa_tsv)
    # row 0: "Hello  World" normalises to "hello world", an acceptable answer: 1.0
    # row 1: "J Smith" vs "j. smith": 1 deletion over 8 chars -> 1 - 1/8 = 0.875
    # row 2: "1200" vs "$1,200": 2 deletions over 6 chars -> NL 1/3 -> 0.6667
    res = score_benchmark("docvqa", items, ["Hello  World", "J Smith", "1200"])
    assert [r["score"] for r in res.rows] == pytest.approx([1.0, 0.875, 2 / 3])
    assert res.score == pytest.approx((1.0 + 0.875 + 2 / 3) / 3)
    assert res.metric == "anls" and res.per_category == {"uncategorized": (pytest.approx(res.score), 3)}
    assert res.rows[0]["answer"] == "['hello', 'hello world']"  # the answer cell as the TSV wrote it
    # a final period costs one edit: "hello world." vs "hello world" -> 1 - 1/12; cleaned it is exact
    assert score_benchmark("docvqa", items[:1], ["Hello world."]).score == pytest.approx(11 / 12)
    assert score_benchmark("docvqa", items[:1], ["Hello world."], clean_open=True).score == 1.0


def test_metric_directions() -> None:
    assert {METRIC_DIRECTIONS[s.metric] for s in BENCHMARKS.values()} == {"higher"}
    assert METRIC_DIRECTIONS["docvqa/anls"] == "higher" and METRIC_DIRECTIONS["chartqa/relaxed_accuracy"] == "higher"
    assert {s.metric for s in BENCHMARKS.values()} == {"accuracy", "relaxed_accuracy", "anls"}
