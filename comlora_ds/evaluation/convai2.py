"""ConvAI2 (PersonaChat) in the self-persona setting: parsing, prompts, training rows, generation metrics.

File format (ParlAI ``valid_self_original_no_cands.txt``): one line per entry, ``<n> <text>``; ``n == 1`` starts
a new dialogue and numbers then count up by one. The dialogue's first lines are ``your persona: <sentence>``;
then every line is ``<partner utterance>\\t<self response>``. Files with candidates (``..._cands.txt``) carry
more tab fields (reward, candidates), which are ignored. ``partner's persona:`` lines (the "both" files) are
skipped: the self-persona setting of the paper reveals only the speaker's own persona.

One example per self turn: the persona and the dialogue so far are the prompt, the self response is the
reference. As LLM-Adapters rows (:func:`training_rows`): ``instruction`` = task text + persona sentences,
``input`` = the history ("Partner: ..."/"You: ..." lines ending with the partner's last utterance),
``output`` = the self response; the prompt is :func:`comlora_ds.data.prompts.build_prompt`, so training and
evaluation see the same text. ParlAI's ``__SILENCE__`` placeholder (the self speaker opens) becomes no line.

Generated responses are cut at the first newline (a reply is one line; the authors' SPT code likewise cuts at
"\\n"/"Q:"/"R:") and stripped. Metrics: :mod:`comlora_ds.evaluation.metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..data.formats import DataError
from ..data.templates import PromptRenderer

SELF_PERSONA = "your persona:"
PARTNER_PERSONA = "partner's persona:"
SILENCE = "__SILENCE__"
INSTRUCTION = ("Continue the conversation as the person described by the persona below. Reply to your partner "
               "with one message that fits the persona and the conversation.\n\nYour persona:\n")
_LINE = re.compile(r"^(\d+) (.*)$")


@dataclass
class Dialogue:
    """One dialogue: the self persona sentences and the (partner, self) turns; ``line`` is its first line."""

    persona: list[str] = field(default_factory=list)
    turns: list[tuple[str, str]] = field(default_factory=list)
    line: int = 0


def parse_convai2(path: str | Path) -> list[Dialogue]:
    """Dialogues of a ParlAI ConvAI2 text file; DataError naming file and line for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    dialogues: list[Dialogue] = []
    expected = None
    with path.open(encoding="utf-8") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            match = _LINE.match(line)
            if not match:
                raise DataError(f"{where}: expected '<number> <text>', got {line[:60]!r}")
            number, text = int(match.group(1)), match.group(2)
            if number == 1:
                dialogues.append(Dialogue(line=lineno))
            elif number != expected:
                raise DataError(f"{where}: entry number {number}, expected {expected} (or 1 to start a dialogue)")
            expected = number + 1
            dialogue = dialogues[-1]
            if text.startswith(SELF_PERSONA):
                if dialogue.turns:
                    raise DataError(f"{where}: persona line after the dialogue turns started")
                sentence = text[len(SELF_PERSONA):].strip()
                if not sentence:
                    raise DataError(f"{where}: empty persona sentence")
                dialogue.persona.append(sentence)
                continue
            if text.startswith(PARTNER_PERSONA):
                continue
            fields = text.split("\t")
            if len(fields) < 2:
                raise DataError(f"{where}: dialogue line has no tab between the partner utterance and the self "
                                f"response: {text[:60]!r}")
            partner, response = fields[0].strip(), fields[1].strip()
            if not response:
                raise DataError(f"{where}: empty self response")
            dialogue.turns.append((partner, response))
    if not dialogues:
        raise DataError(f"{path}: contains no dialogues")
    for dialogue in dialogues:
        if not dialogue.turns:
            raise DataError(f"{path} line {dialogue.line}: dialogue has no turns")
    return dialogues


def _history(turns: Sequence[tuple[str, str]], upto: int, max_history: Optional[int]) -> str:
    lines: list[str] = []
    for partner, response in turns[:upto]:
        if partner and partner != SILENCE:
            lines.append(f"Partner: {partner}")
        lines.append(f"You: {response}")
    partner = turns[upto][0]
    if partner and partner != SILENCE:
        lines.append(f"Partner: {partner}")
    if max_history is not None:
        lines = lines[-max_history:] if max_history > 0 else []
    return "\n".join(lines)


def convai2_examples(dialogues: Sequence[Dialogue], max_history: Optional[int] = None) -> list[dict[str, Any]]:
    """One row per self turn: ``instruction``, ``input``, ``output`` (the reference), ``dialogue``, ``turn``.

    ``max_history``: keep only the last N history lines (None = the whole dialogue so far).
    """
    rows = []
    for d_index, dialogue in enumerate(dialogues):
        instruction = INSTRUCTION + "\n".join(dialogue.persona)
        for t_index, (_, response) in enumerate(dialogue.turns):
            rows.append({"instruction": instruction, "input": _history(dialogue.turns, t_index, max_history),
                         "output": response, "dialogue": d_index, "turn": t_index})
    return rows


def training_rows(path_or_dialogues: str | Path | Sequence[Dialogue],
                  max_history: Optional[int] = None) -> list[dict[str, str]]:
    """ConvAI2 as LLM-Adapters training rows ``{instruction, input, output, answer}`` (answer = "")."""
    dialogues = (parse_convai2(path_or_dialogues) if isinstance(path_or_dialogues, (str, Path))
                 else path_or_dialogues)
    return [{"instruction": r["instruction"], "input": r["input"], "output": r["output"], "answer": ""}
            for r in convai2_examples(dialogues, max_history)]


def clean_response(text: str) -> str:
    """The first line of a generated reply, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def evaluate_convai2(model: Any, tokenizer: Any, path: str | Path, *, limit: Optional[int] = None,
                     batch_size: int = 8, max_new_tokens: int = 64, max_history: Optional[int] = None,
                     bertscore_model: Optional[str] = None, bertscore_layers: Optional[int] = None,
                     max_prompt_tokens: Optional[int] = None, progress: bool = True,
                     renderer: Optional[PromptRenderer] = None) -> dict[str, Any]:
    """Generate a reply for every example (the first ``limit``) and score the replies against the references;
    also the reference responses' NLL under the model (``nll``: per response token, EOS included, pooled over all
    examples; ``perplexity`` = exp(nll)), with each example's summed NLL and token count."""
    import math

    from .generate import generate, model_device
    from .likelihood import response_logprobs
    from .metrics import text_metrics

    rows = convai2_examples(parse_convai2(path), max_history)
    if limit is not None:
        rows = rows[:limit]
    renderer = renderer or PromptRenderer()
    prompts = [renderer.prompt(r["instruction"], r["input"]) for r in rows]
    raw = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   progress=progress, desc="convai2", max_prompt_tokens=max_prompt_tokens,
                   prefix=renderer.prefix_ids(tokenizer))
    hypotheses = [clean_response(text) for text in raw]
    references = [r["output"] for r in rows]
    device = str(model_device(model))
    metrics = text_metrics(hypotheses, references, bertscore_model=bertscore_model,
                           bertscore_layers=bertscore_layers, device=device, per_example=True)
    per_example = metrics.pop("per_example")
    logprobs, counts = response_logprobs(model, tokenizer, list(zip(prompts, references)), batch_size=batch_size,
                                         max_length=(max_prompt_tokens or 2048) + max_new_tokens, renderer=renderer)
    metrics["nll"] = -sum(logprobs) / sum(counts)
    metrics["perplexity"] = math.exp(metrics["nll"])
    examples = [{"dialogue": r["dialogue"], "turn": r["turn"], "reference": r["output"], "generated": g,
                 "response": h, "nll_sum": -lp, "response_tokens": n, **scores}
                for r, g, h, lp, n, scores in zip(rows, raw, hypotheses, logprobs, counts, per_example)]
    return {"task": "convai2", "data": str(path), "examples_scored": len(rows), "metrics": metrics,
            "examples": examples}
