"""Scoring the stored validation split offline: the real model (base + K adapters + selector) rebuilt from the
run config and the recovered tensors, then ``comlora_ds.comlora.validation.score_validation`` (docs/method.md, "Winner":
accumulated selector similarity per component, per-component LM loss, per-sample argmax counts), and the soup's
validation loss (:func:`score_soup`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..checkpointing.run_layout import VALIDATION_ROWS
from ..comlora.inject import merge_component, unmerge_all
from ..comlora.layer import SOUP
from ..comlora.model import ComLoRAModel, build_model
from ..comlora.validation import ValidationScores, score_validation
from ..config import RunConfig
from ..data import ResponseCollator, prepare_tokenizer
from ..models.base_model import Placement, load_base_model
from .errors import ConsolidationError


def load_validation_rows(step_dir: Path) -> list[dict] | None:
    path = step_dir / VALIDATION_ROWS
    if not path.is_file():
        return None
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise ConsolidationError(f"{path} line {i + 1} is not valid JSON (truncated or changed after the save); "
                                     f"consolidate another checkpoint, or pass --winner k") from None
        if not isinstance(row, dict) or "input_ids" not in row or "labels" not in row:
            raise ConsolidationError(f"{path} line {i + 1} has no input_ids/labels: not a tokenised validation split")
        rows.append(row)
    return rows


def build_live_model(cfg: RunConfig, base_path: str, tensors: dict[str, torch.Tensor],
                     placement: Placement = Placement("cpu", torch.float32, "sdpa")) -> ComLoRAModel:
    """The trained ComLoRAModel on ``placement`` (device, base dtype, attention): adapters (fp32) and selector
    injected as in training, the recovered tensors loaded. In eval mode (no dropout)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.gradient_checkpointing = False
    model = build_model(cfg, load_base_model(base_path, cfg.model, placement.dtype, placement.attn_implementation))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    not_loaded = sorted(trainable & set(missing))
    if not_loaded or unexpected:
        raise ConsolidationError(f"the recovered tensors do not fit the model: missing {not_loaded[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]}")
    return model.to(placement.device).eval()


def score_checkpoint(model: ComLoRAModel, rows: list[dict], tokenizer_dir: Path, num_components: int,
                     batch_size: int, device: str = "cpu") -> ValidationScores:
    from transformers import AutoTokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    collate = ResponseCollator(tokenizer.pad_token_id)
    return score_validation(model, rows, collate, num_components, batch_size, device)


def score_soup(model: ComLoRAModel, rows: list[dict], tokenizer_dir: Path, num_components: int, batch_size: int,
               device: str = "cpu") -> float:
    """The validation loss of the soup (the uniform average of the K updates merged into the base, exactly what
    ``--winner-rule soup`` exports): with every layer merged, each of the K components computes the merged model,
    so component 0's mean loss is the soup's. The model is unmerged afterwards."""
    merge_component(model.llm, SOUP)
    try:
        return float(score_checkpoint(model, rows, tokenizer_dir, num_components, batch_size, device).mean_loss[0])
    finally:
        unmerge_all(model.llm)
