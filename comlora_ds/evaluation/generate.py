"""Batched greedy generation for any Hugging Face causal LM (plain or PEFT-wrapped) and its tokenizer.

* Prompts are tokenised the way training tokenises them (:mod:`comlora_ds.data.tokenize`): the tokenizer's own
  special prefix (BOS for LLaMA tokenizers) + the prompt encoded without special tokens, so the model sees at
  test time exactly the prefix it was trained to continue.
* Left padding with an attention mask; a pad token is set when the tokenizer has none (UNK if it differs from
  EOS, else EOS; the same choice as training). Generation stops per row at EOS or after ``max_new_tokens``.
* Greedy (``do_sample=False``, one beam; sampling knobs of the model's own generation config are cleared), so
  the output is a function of the inputs. Rows are processed longest first (less padding) and returned in the
  input order; results for one batch size are reproducible run to run. Across batch sizes, padding changes
  the float arithmetic slightly and a near-tie could in principle flip one greedy token.
* Under torchrun the batches are shared out over the ranks and gathered (:mod:`.parallel`): the same outputs.
* Only the new tokens are decoded (``skip_special_tokens=True``), up to the first EOS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch

from ..data.tokenize import special_prefix_ids
from .parallel import map_batches


def ensure_pad_token(tokenizer: Any) -> int:
    """Set a pad token if the tokenizer has none (UNK when it differs from EOS, else EOS); return its id."""
    if tokenizer.pad_token_id is None:
        unk, eos = tokenizer.unk_token_id, tokenizer.eos_token_id
        if unk is not None and unk != eos:
            tokenizer.pad_token = tokenizer.unk_token
        elif eos is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither pad, unk nor eos token")
    return tokenizer.pad_token_id


def encode_prompts(tokenizer: Any, prompts: Sequence[str], prefix: Optional[list[int]] = None) -> list[list[int]]:
    """Token ids of each prompt: ``prefix`` (default: the special prefix) + prompt (no special tokens), as in training
    (a chat template writes its own special tokens: pass ``[]``)."""
    prefix = special_prefix_ids(tokenizer) if prefix is None else prefix
    encoded = tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
    return [prefix + list(ids) for ids in encoded]


def truncate_left(ids: Sequence[int], max_tokens: int, n_prefix: int = 0) -> list[int]:
    """``ids`` cut to ``max_tokens`` by dropping tokens right after the ``n_prefix`` special prefix tokens."""
    if len(ids) <= max_tokens:
        return list(ids)
    if max_tokens <= n_prefix:
        raise ValueError(f"max_tokens = {max_tokens} leaves no room after {n_prefix} special prefix token(s)")
    return list(ids[:n_prefix]) + list(ids[len(ids) - (max_tokens - n_prefix):])


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [B, L], padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _greedy_kwargs(tokenizer: Any, max_new_tokens: int, pad_id: int) -> dict[str, Any]:
    return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                top_k=None, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 8, max_new_tokens: int = 32,
             progress: bool = True, desc: str = "generate", max_prompt_tokens: Optional[int] = None,
             prefix: Optional[list[int]] = None) -> list[str]:
    """Greedy continuations of ``prompts`` (see the module doc), in input order; ``prefix`` as in
    :func:`encode_prompts`.

    ``max_prompt_tokens``: longer prompts keep their last tokens (after the special prefix), so the model still
    sees the end of the prompt that its answer follows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: must be >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: must be >= 1")
    if not prompts:
        return []
    pad_id = ensure_pad_token(tokenizer)
    eos = tokenizer.eos_token_id
    prefix = special_prefix_ids(tokenizer) if prefix is None else prefix
    encoded = encode_prompts(tokenizer, prompts, prefix)
    if max_prompt_tokens is not None:
        n_prefix = len(prefix)
        encoded = [truncate_left(row, max_prompt_tokens, n_prefix) for row in encoded]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    device = model_device(model)
    was_training = model.training
    model.eval()
    kwargs = _greedy_kwargs(tokenizer, max_new_tokens, pad_id)

    def run_batch(b: int) -> list[str]:
        index = order[b * batch_size:(b + 1) * batch_size]
        ids, mask = left_pad([encoded[i] for i in index], pad_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        texts = []
        for row in out[:, ids.shape[1]:].tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
        return texts

    try:
        batches = map_batches(run_batch, math.ceil(len(order) / batch_size), desc=desc, progress=progress)
    finally:
        model.train(was_training)
    outputs: list[str] = [""] * len(prompts)
    for i, text in zip(order, (text for texts in batches for text in texts)):
        outputs[i] = text
    return outputs
