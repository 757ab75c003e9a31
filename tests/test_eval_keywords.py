"""Answer extraction: LLM-Adapters' rule reproduced exactly, and every tricky case pinned."""

from __future__ import annotations

import re

import pytest

from comlora_ds.evaluation.keywords import (ANSWER_KEYWORDS, COMMONSENSE_TASKS, extract_answer,
                                            extract_letter)


def upstream_extract_answer(dataset: str, sentence: str) -> str:
    """AGI-Edgerunners/LLM-Adapters commomsense_evaluate.py extract_answer, verbatim apart from `args`."""
    if dataset == 'boolq':
        pred_answers = re.findall(r'true|false', sentence.strip())
    elif dataset == 'piqa':
        pred_answers = re.findall(r'solution1|solution2', sentence.strip())
    elif dataset in ['social_i_qa', 'ARC-Challenge', 'ARC-Easy', 'openbookqa']:
        pred_answers = re.findall(r'answer1|answer2|answer3|answer4|answer5', sentence.strip())
    elif dataset == 'hellaswag':
        pred_answers = re.findall(r'ending1|ending2|ending3|ending4', sentence.strip())
    elif dataset == 'winogrande':
        pred_answers = re.findall(r'option1|option2', sentence.strip())
    return pred_answers[0] if pred_answers else ""


TRICKY = [
    "the correct answer is true", "the correct answer is false", "True", "TRUE false", "untrue", "falsehood true",
    "true or false? false", "", "   ", "no idea", "answer10", "answer2 answer1", "Answer1 answer3",
    "the correct answer is answer4", "answer5", "solution12", "solution2solution1", "Solution1 solution2",
    "ending4 ending1", "ending5", "option2 option1", "Option1", "optional option1", "the answer is answer3.",
    "answer1answer2", "false\ntrue", "trueanswer2ending3option1solution2",
]


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
def test_matches_llm_adapters_on_tricky_strings(task):
    for text in TRICKY:
        assert extract_answer(task, text) == upstream_extract_answer(task, text), (task, text)


@pytest.mark.parametrize("task,text,expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "untrue", "true"),                       # substring inside another word counts (upstream)
    ("boolq", "falsehood", "false"),
    ("boolq", "True", ""),                             # case-sensitive: upper case is no keyword
    ("boolq", "TRUE, I mean false", "false"),
    ("boolq", "false, no wait, true", "false"),        # several keywords: the first one wins
    ("boolq", "I do not know", ""),                    # none: no prediction (scored wrong)
    ("ARC-Challenge", "answer10", "answer1"),          # answer10 -> answer1 (prefix match)
    ("ARC-Easy", "answer5", "answer5"),                # ARC-E has 5-option rows
    ("social_i_qa", "answer4 then answer2", "answer4"),  # SIQA uses upstream's answer1-5 set
    ("openbookqa", "Answer2 answer3", "answer3"),
    ("piqa", "solution12", "solution1"),
    ("hellaswag", "ending5 ending2", "ending2"),        # ending5 is not a hellaswag keyword
    ("winogrande", "Option1 option2", "option2"),
])
def test_tricky_cases_llm_adapters_rule(task, text, expected):
    assert extract_answer(task, text) == expected


@pytest.mark.parametrize("task,text,expected", [
    ("boolq", "untrue", ""),
    ("boolq", "True.", "true"),
    ("boolq", "TRUE false", "true"),
    ("ARC-Challenge", "answer10 answer2", "answer2"),
    ("piqa", "Solution2!", "solution2"),
    ("boolq", "", ""),
])
def test_word_rule(task, text, expected):
    assert extract_answer(task, text, rule="word") == expected


def test_keyword_sets():
    assert ANSWER_KEYWORDS["boolq"] == ("true", "false")
    assert ANSWER_KEYWORDS["ARC-Easy"][-1] == "answer5"
    assert ANSWER_KEYWORDS["hellaswag"] == ("ending1", "ending2", "ending3", "ending4")
    assert len(COMMONSENSE_TASKS) == 8


def test_errors():
    with pytest.raises(ValueError, match="unknown task"):
        extract_answer("boolqq", "true")
    with pytest.raises(ValueError, match="unknown extraction rule"):
        extract_answer("boolq", "true", rule="fuzzy")


@pytest.mark.parametrize("text,expected", [
    (" B", "B"), ("B. 42", "B"), ("(C)", "C"), ("the correct answer is D", "D"), ("Answer: A", "A"),
    ("a b c d", ""), ("E", ""), ("ABCD", ""), ("", ""), ("Because C", "C"), ("A cat", "A"),
])
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected
