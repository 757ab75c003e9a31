"""Answer extraction from generated text: LLM-Adapters' commonsense keyword rule, and MMLU letters.

Reference: ``AGI-Edgerunners/LLM-Adapters`` ``commomsense_evaluate.py`` (sic), ``extract_answer(args, sentence)``::

    pred_answers = re.findall(r'true|false', sentence.strip())   # one alternation per task
    return pred_answers[0] if pred_answers else ""

:func:`extract_answer` reproduces that behaviour exactly (``rule="llm-adapters"``, the default, because the
paper's numbers follow Hu et al. 2023 and so this rule). What follows from the regex, case by case (each one is
pinned by ``tests/test_eval_keywords.py``):

* **First occurrence wins**: ``re.findall`` scans left to right; the prediction is the leftmost keyword in
  the text, whatever comes after ("answer2 ... answer1" -> answer2).
* **Substrings count**: there are no word boundaries, so "untrue" -> ``true``, "falsehood" -> ``false``,
  "solution12" -> ``solution1`` and "answer10" -> ``answer1`` (the alternation is tried in keyword order at
  each position and ``answer1`` matches the first 7 characters). Kept, for parity with the published numbers.
* **Case-sensitive**: "True", "TRUE", "Answer1" are *not* keywords; a response with only those is wrong. A model
  fine-tuned on LLM-Adapters data answers "the correct answer is true" in lower case, so this only bites models
  that were not trained on the format; :data:`RULES` offers ``"word"`` for a robustness check (below).
* **No keyword** -> ``""`` (no prediction), scored wrong.
* **Keyword sets follow upstream, not the task's option count**: social_i_qa, ARC-Challenge, ARC-Easy and
  openbookqa all use ``answer1..answer5``. So for a 3-option SIQA question "answer4 or answer2" predicts
  ``answer4`` (wrong), exactly as upstream; ARC-Easy really has a few 5-option rows. boolq ``true/false``,
  piqa ``solution1/2``, hellaswag ``ending1-4``, winogrande ``option1/2``, sst2 ``positive/negative``.

``rule="word"`` is the stricter alternative (not the paper's): case-insensitive, the keyword must stand alone
(``\\b`` on both sides, so "untrue" and "answer10" do not count), result lower-cased. Reports always say which
rule produced them.

MMLU (:func:`extract_letter`): the first stand-alone capital A-D (``\\b[A-D]\\b``) in the response. The prompt
ends in "Answer:", so a model answering the format starts with the letter; a response that starts with the
article "A" ("A cat ...") predicts A, the price of a simple, documented rule.
"""

from __future__ import annotations

import re

from ..errors import EvaluationError

ANSWER_KEYWORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": tuple(f"answer{i}" for i in range(1, 6)),
    "ARC-Challenge": tuple(f"answer{i}" for i in range(1, 6)),
    "ARC-Easy": tuple(f"answer{i}" for i in range(1, 6)),
    "openbookqa": tuple(f"answer{i}" for i in range(1, 6)),
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
    "sst2": ("positive", "negative"),
}
# The paper's eight tasks: what commonsense evaluation scores when no task is named. sst2 (the demo's task, not
# a commonsense one) is scored the same way, but only when asked for.
COMMONSENSE_TASKS: tuple[str, ...] = tuple(t for t in ANSWER_KEYWORDS if t != "sst2")
RULES = ("llm-adapters", "word")
MMLU_LETTERS = ("A", "B", "C", "D")

_PATTERNS: dict[tuple[str, str], re.Pattern[str]] = {}
for _task, _words in ANSWER_KEYWORDS.items():
    _alternation = "|".join(_words)
    _PATTERNS[(_task, "llm-adapters")] = re.compile(_alternation)
    _PATTERNS[(_task, "word")] = re.compile(rf"\b(?:{_alternation})\b", re.IGNORECASE)
_LETTER = re.compile(r"\b([A-D])\b")


def check_task(task: str) -> None:
    if task not in ANSWER_KEYWORDS:
        raise EvaluationError(f"unknown task {task!r}; choose from {', '.join(ANSWER_KEYWORDS)}")


def extract_answer(task: str, text: str, rule: str = "llm-adapters") -> str:
    """The predicted answer keyword of ``task`` in ``text``, or ``""`` when there is none (see module doc)."""
    check_task(task)
    if rule not in RULES:
        raise EvaluationError(f"unknown extraction rule {rule!r}; choose from {', '.join(RULES)}")
    match = _PATTERNS[(task, rule)].search(text.strip())
    return match.group(0).lower() if match else ""


def extract_letter(text: str) -> str:
    """The first stand-alone capital letter A-D in ``text``, or ``""``."""
    match = _LETTER.search(text)
    return match.group(1) if match else ""
