"""The local task files of an lm-eval run: data rows as JSON Lines and one task YAML per task, nothing fetched.

:func:`write_harness_tasks` turns harness task names (:data:`HARNESS_TASKS`) into a folder that lm-eval's
``TaskManager(include_path=...)`` reads: ``data/<task>.jsonl`` (the rows of comlora_ds's own loaders, so the harness
scores exactly the rows ``--task commonsense`` / ``--task mmlu`` score) and ``tasks/<task>.yaml``, each including a
template shipped in ``comlora_ds/evaluation/harness_tasks/`` (prompt, continuations, metrics) and naming its local
data with ``dataset_path: json`` + ``dataset_kwargs.data_files``. The folder stays beside the results, so the same
run can be repeated with lm-eval's own CLI (``lm_eval --include_path <folder>/tasks ...``).

* ``comlora_<task>`` (``comlora_boolq``, ``comlora_arc_challenge``, ... ``comlora_sst2``): an LLM-Adapters commonsense
  task as rank classification; ``comlora_commonsense`` = the paper's eight (a group: mean of the tasks).
* ``comlora_mmlu``: the Hendrycks MMLU prompt, one lm-eval task per subject (``comlora_mmlu_<subject>``) and a group
  whose ``acc`` is over all questions (Hendrycks' micro average).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import EvaluationError
from ..fileio import atomic_write_text
from .keywords import ANSWER_KEYWORDS, COMMONSENSE_TASKS

TEMPLATES = Path(__file__).with_name("harness_tasks")
PREFIX = "comlora_"
COMMONSENSE_GROUP = "comlora_commonsense"
MMLU_GROUP = "comlora_mmlu"


def harness_name(task: str) -> str:
    """``ARC-Challenge`` -> ``comlora_arc_challenge``."""
    return PREFIX + task.lower().replace("-", "_")


COMMONSENSE_BY_NAME: dict[str, str] = {harness_name(task): task for task in ANSWER_KEYWORDS}
HARNESS_TASKS: tuple[str, ...] = (*COMMONSENSE_BY_NAME, COMMONSENSE_GROUP, MMLU_GROUP)


def check_harness_tasks(names: Sequence[str]) -> None:
    if not names:
        raise EvaluationError(f"--harness needs task names; choose from {', '.join(HARNESS_TASKS)}")
    unknown = [n for n in names if n not in HARNESS_TASKS]
    if unknown:
        raise EvaluationError(f"unknown harness task(s) {', '.join(unknown)}; choose from {', '.join(HARNESS_TASKS)}")


def commonsense_tasks_of(names: Sequence[str]) -> list[str]:
    wanted = set(COMMONSENSE_TASKS) if COMMONSENSE_GROUP in names else set()
    wanted |= {COMMONSENSE_BY_NAME[n] for n in names if n in COMMONSENSE_BY_NAME}
    return [task for task in ANSWER_KEYWORDS if task in wanted]


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)       # atomic: every torchrun rank writes the same files
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _write_task(folder: Path, name: str, config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def commonsense_rows(task: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """LLM-Adapters rows plus ``choices`` (the offered answers, as ``--choice`` ranks them) and ``label``."""
    from .commonsense import allowed_answers

    out = []
    for row in rows:
        choices = allowed_answers(task, row)
        out.append({**row, "choices": choices, "label": choices.index(row["answer"])})
    return out


def _commonsense_tasks(folder: Path, tasks: list[str], data: Optional[Sequence[str]]) -> dict[str, str]:
    from .commonsense import load_commonsense

    loaded = load_commonsense(data or None, tasks)
    sources = {}
    for task, entry in loaded.items():
        name = harness_name(task)
        path = _write_jsonl(folder / "data" / f"{name}.jsonl", commonsense_rows(task, entry["rows"]))
        _write_task(folder / "tasks", name, {"include": str(TEMPLATES / "_commonsense_template.yaml"), "task": name,
                                             "dataset_kwargs": {"data_files": {"test": str(path)}}})
        sources[name] = entry["source"]
    return sources


def _mmlu_tasks(folder: Path, rows: Sequence[dict[str, Any]], dev_rows: Sequence[dict[str, Any]],
                shots: int) -> list[str]:
    subjects = sorted({r["subject"] for r in rows})
    names = []
    for subject in subjects:
        name = f"{MMLU_GROUP}_{subject}"
        files = {"test": str(_write_jsonl(folder / "data" / f"{name}.jsonl",
                                          [r for r in rows if r["subject"] == subject]))}
        config: dict[str, Any] = {"include": str(TEMPLATES / "_mmlu_template.yaml"), "task": name}
        if shots:
            files["dev"] = str(_write_jsonl(folder / "data" / f"{name}_dev.jsonl",
                                            [r for r in dev_rows if r["subject"] == subject][:shots]))
            config.update(fewshot_split="dev", num_fewshot=shots)
        config["dataset_kwargs"] = {"data_files": files}
        _write_task(folder / "tasks", name, config)
        names.append(name)
    _write_task(folder / "tasks", MMLU_GROUP, {
        "group": MMLU_GROUP, "task": names,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0}})
    return subjects


def write_harness_tasks(folder: str | Path, names: Sequence[str], *, data: Optional[Sequence[str]] = None,
                        mmlu_rows: Sequence[dict[str, Any]] = (), mmlu_dev_rows: Sequence[dict[str, Any]] = (),
                        shots: int = 0) -> dict[str, Any]:
    """Write the task folder for ``names`` (see the module doc) and return what it holds: the lm-eval task names to
    request and the data source of each task. ``data``: commonsense source as for ``--task commonsense``;
    ``mmlu_rows`` / ``mmlu_dev_rows``: loaded MMLU rows (the caller applies ``--mmlu-data``, split and subjects)."""
    check_harness_tasks(names)
    folder = Path(folder)
    requested: list[str] = []
    sources: dict[str, Any] = {}
    tasks = commonsense_tasks_of(names)
    if tasks:
        sources.update(_commonsense_tasks(folder, tasks, data))
        requested += [n for n in names if n == COMMONSENSE_GROUP]
        requested += [harness_name(t) for t in tasks if COMMONSENSE_GROUP not in names or t not in COMMONSENSE_TASKS]
        if COMMONSENSE_GROUP in names:
            _write_task(folder / "tasks", COMMONSENSE_GROUP, {
                "group": COMMONSENSE_GROUP, "task": [harness_name(t) for t in COMMONSENSE_TASKS],
                "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": False}
                                          for m in ("acc", "acc_norm")],
                "metadata": {"version": 1.0}})
    if MMLU_GROUP in names:
        if not mmlu_rows:
            raise EvaluationError(f"{MMLU_GROUP}: no MMLU rows to score")
        sources[MMLU_GROUP] = {"subjects": _mmlu_tasks(folder, mmlu_rows, mmlu_dev_rows, shots)}
        requested.append(MMLU_GROUP)
    return {"tasks": requested, "include_path": str(folder / "tasks"), "sources": sources}
