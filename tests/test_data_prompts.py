"""The Alpaca template, pinned byte for byte against LLM-Adapters (commit 816657208af4db747803f87ba40a4c71383fed7a).

The expected texts below are transcribed from upstream ``finetune.py`` / ``commonsense_evaluate.py``
``generate_prompt``: every line after the first is indented by 16 spaces there, including the "blank" lines
of finetune.py, and the header lines end in trailing spaces.
"""

from __future__ import annotations

from comlora_ds.data.prompts import build_llm_adapters_eval_prompt, build_prompt

I = " " * 16  # noqa: E741 - upstream's indentation

FINETUNE_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.  \n\n"
                     f"{I}### Instruction:\n{I}INSTR\n{I}\n{I}### Response:\n{I}")
FINETUNE_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request. \n\n"
                       f"{I}### Instruction:\n{I}INSTR\n{I}\n{I}### Input:\n{I}INPUT\n{I}\n{I}### Response:\n{I}")
EVAL_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request. \n\n"
                 f"{I}### Instruction:\n{I}INSTR\n\n{I}### Response:\n{I}")
EVAL_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   f"{I}### Instruction:\n{I}INSTR\n\n{I}### Input:\n{I}INPUT\n\n{I}### Response:\n{I}")


def test_finetune_prompt_without_input() -> None:
    assert build_prompt("INSTR") == FINETUNE_NO_INPUT
    assert build_prompt("INSTR", "") == FINETUNE_NO_INPUT


def test_finetune_prompt_with_input() -> None:
    assert build_prompt("INSTR", "INPUT") == FINETUNE_WITH_INPUT


def test_response_follows_the_prompt_directly() -> None:
    # upstream: full text = generate_prompt(data_point), masked part = generate_prompt({..., "output": ""})
    text = build_prompt("Q?") + "the correct answer is true"
    assert text.endswith(f"### Response:\n{I}the correct answer is true")


def test_upstream_eval_prompt_differs_in_whitespace_only() -> None:
    assert build_llm_adapters_eval_prompt("INSTR") == EVAL_NO_INPUT
    assert build_llm_adapters_eval_prompt("INSTR", "INPUT") == EVAL_WITH_INPUT
    assert build_prompt("INSTR").split() == EVAL_NO_INPUT.split()


def test_multiline_instruction_is_not_reindented() -> None:
    instruction = "Question: x?\n\nAnswer format: true/false"
    assert f"{I}{instruction}\n{I}\n" in build_prompt(instruction)
