"""The Alpaca prompt template exactly as LLM-Adapters fine-tunes with it.

Source: ``AGI-Edgerunners/LLM-Adapters`` at commit ``816657208af4db747803f87ba40a4c71383fed7a``,
``finetune.py``, ``generate_prompt(data_point)`` (lines 323-343; last changed in ``281b7a78``). Upstream builds
the training text as ``generate_prompt(data_point)`` and the masked part as
``generate_prompt({**data_point, "output": ""})``, so the prompt is the template with an empty output and the
response follows it directly, with no separator. The template's quirks are kept byte for byte, because the
model is trained on them: a trailing space after "request." (two spaces in the variant without input), a
16-space indentation of every line after the first, and 16-space "blank" lines between the sections.

Upstream's evaluation script (``commonsense_evaluate.py``, ``generate_prompt(instruction, input)``) uses a
slightly different text (really empty blank lines, one trailing space without input, none with input).
:func:`build_prompt` is what we train on and what our evaluation should generate from;
:func:`build_llm_adapters_eval_prompt` reproduces the upstream evaluation prompt for comparisons only.
"""

from __future__ import annotations

_INDENT = " " * 16

_HEADER_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.")
_HEADER_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def _render(header: str, sections: list[tuple[str, str]], blank: str) -> str:
    """``header`` + "\\n\\n" + indented "### Name:\\n<text>" sections joined by ``blank`` lines + the
    "### Response:" marker; the returned prompt ends with the indentation the response is written after."""
    body = f"\n{blank}\n".join(f"{_INDENT}### {name}:\n{_INDENT}{text}" for name, text in sections)
    return f"{header}\n\n{body}\n{blank}\n{_INDENT}### Response:\n{_INDENT}"


def build_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - upstream's field name
    """The LLM-Adapters fine-tuning prompt; the training text is ``build_prompt(...) + output``."""
    if input:
        return _render(_HEADER_WITH_INPUT + " ", [("Instruction", instruction), ("Input", input)], _INDENT)
    return _render(_HEADER_NO_INPUT + "  ", [("Instruction", instruction)], _INDENT)


def build_llm_adapters_eval_prompt(instruction: str, input: str = "") -> str:  # noqa: A002
    """The prompt of upstream ``commonsense_evaluate.py`` (a0f9ba2b); differs from :func:`build_prompt` in
    whitespace only. Use it to reproduce LLM-Adapters' published evaluation setting exactly."""
    if input:
        return _render(_HEADER_WITH_INPUT, [("Instruction", instruction), ("Input", input)], "")
    return _render(_HEADER_NO_INPUT + " ", [("Instruction", instruction)], "")
