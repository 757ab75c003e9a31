"""Functions the shipped lm-eval task templates name with ``!function prompts.<name>``: the prompt and the
continuations of an LLM-Adapters commonsense row, built by the same code as comlora_ds's own scorer."""

from __future__ import annotations

from typing import Any

from comlora_ds.data.prompts import build_prompt

RESPONSE_PREFIX = "the correct answer is "


def alpaca_prompt(doc: dict[str, Any]) -> str:
    return build_prompt(doc["instruction"], doc.get("input") or "")


def answer_responses(doc: dict[str, Any]) -> list[str]:
    return [RESPONSE_PREFIX + answer for answer in doc["choices"]]
