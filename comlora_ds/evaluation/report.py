"""Writing results: ``results.json`` + ``results.md`` (+ ``predictions.jsonl``), never silently replacing others.

A results folder belongs to one evaluation *setting* (what was evaluated, on which data, how). Before the
work starts, :func:`check_out_dir` refuses a folder whose ``results.json`` records a different setting. After
the work, :func:`write_results` replaces an existing ``results.json`` only when its metrics are the same (a
re-run), else it refuses and keeps the new results beside it as ``results.conflict-<time>.json``. Both
refusals are lifted by ``overwrite=True``. Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fileio import atomic_write_text


class ResultsConflict(InputError, RuntimeError):
    """The output folder already holds different results."""


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def check_out_dir(out_dir: str | Path, setting: dict[str, Any], overwrite: bool = False) -> None:
    """Raise :class:`ResultsConflict` when ``out_dir`` holds results of another setting (unless ``overwrite``)."""
    existing = Path(out_dir) / "results.json"
    if overwrite or not existing.is_file():
        return
    try:
        old = json.loads(existing.read_text(encoding="utf-8")).get("setting", {})
    except (json.JSONDecodeError, AttributeError):
        raise ResultsConflict(f"{existing} exists and is not a results file of ours; choose another --out or "
                              "pass --overwrite") from None
    diff = _differences(old, json.loads(_dump(setting)))
    if diff:
        raise ResultsConflict(f"{existing} holds results of a different evaluation (differs in: {', '.join(diff)}); "
                              "choose another --out or pass --overwrite")


def write_results(out_dir: str | Path, results: dict[str, Any], markdown: str,
                  predictions: Iterable[dict[str, Any]] | None = None, overwrite: bool = False) -> Path:
    """Write ``results.json``, ``results.md`` and optionally ``predictions.jsonl``; return the json path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text(encoding="utf-8"))
        new = json.loads(_dump(results))
        same = old.get("setting") == new.get("setting") and old.get("metrics") == new.get("metrics")
        if not same:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            conflict = out / f"results.conflict-{stamp}.json"
            atomic_write_text(conflict, _dump(results))
            raise ResultsConflict(f"{path} already holds different results; the new ones are in {conflict}. "
                                  "Compare them, then re-run with --overwrite or another --out")
    if predictions is not None:
        atomic_write_text(out / "predictions.jsonl",
                      "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in predictions))
    atomic_write_text(out / "results.md", markdown)
    atomic_write_text(path, _dump(results))
    return path


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
