"""Evaluation: commonsense accuracy (LLM-Adapters keyword rule), MMLU (letter logits / generated letter),
ConvAI2 (BLEU, METEOR, ROUGE-L, BERTScore), batched greedy generation and model/adapter loading.

Names are imported lazily (``from comlora_ds.evaluation import extract_answer`` does not import torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ANSWER_KEYWORDS": "keywords",
    "COMMONSENSE_TASKS": "keywords",
    "extract_answer": "keywords",
    "extract_letter": "keywords",
    "load_commonsense": "commonsense",
    "score_outputs": "commonsense",
    "rescore_file": "commonsense",
    "evaluate_commonsense": "commonsense",
    "MMLU_SUBJECTS": "mmlu",
    "load_mmlu": "mmlu",
    "hendrycks_prompt": "mmlu",
    "letter_scores": "mmlu",
    "accuracy_report": "mmlu",
    "evaluate_mmlu": "mmlu",
    "parse_convai2": "convai2",
    "convai2_examples": "convai2",
    "evaluate_convai2": "convai2",
    "text_metrics": "metrics",
    "MetricUnavailable": "wordnet",
    "load_wordnet": "wordnet",
    "generate": "generate",
    "load_for_eval": "load",
    "describe_target": "load",
    "TrainingCheckpointError": "load",
    "EvalSettings": "runner",
    "run_evaluation": "runner",
    "ResultsConflict": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
