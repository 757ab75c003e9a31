"""Summed log-likelihood of responses after their prompts, tokenised exactly as in training.

Used by rank classification (:func:`comlora_ds.evaluation.commonsense.choice_predictions`: the offered answer with
the highest likelihood) and by the ConvAI2 response NLL / perplexity (:mod:`comlora_ds.evaluation.convai2`).
A response is scored on the tokens training supervises: its own tokens and the EOS that ends it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch

from ..data.templates import PromptRenderer
from .parallel import map_batches


@torch.no_grad()
def response_logprobs(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8,
                      max_length: int = 2048,
                      renderer: Optional[PromptRenderer] = None) -> tuple[list[float], list[int]]:
    """Per (prompt, response) pair: the summed log-probability of the response tokens and their count.

    The prompt is text ``renderer`` made (default: the Alpaca template); the response ends as it did in training
    (EOS, or the chat template's end of turn). Pairs longer than ``max_length`` keep the response and lose the
    prompt's left end, as in training."""
    from ..comlora.losses import response_token_counts
    from ..data.tokenize import IGNORE_INDEX, ResponseCollator, fit_example
    from .generate import ensure_pad_token, model_device

    renderer = renderer or PromptRenderer()
    collate = ResponseCollator(ensure_pad_token(tokenizer))
    prefix, end = renderer.prefix_ids(tokenizer), renderer.response_end(tokenizer)
    prompt_ids = tokenizer([p for p, _ in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    response_ids = tokenizer([r for _, r in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    sequences = [fit_example(prefix + list(p) + list(r) + end, [IGNORE_INDEX] * (len(prefix) + len(p)) + list(r) + end,
                             len(prefix), max_length) for p, r in zip(prompt_ids, response_ids)]
    device = model_device(model)
    was_training = model.training
    model.eval()

    def run_batch(b: int) -> tuple[list[float], list[int]]:
        batch = {k: v.to(device) for k, v in collate(sequences[b * batch_size:(b + 1) * batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)       # response positions only
        logp = torch.log_softmax(logits[:, :-1][rows, cols].float(), -1)
        picked = logp.gather(-1, targets[rows, cols][:, None])[:, 0]
        return (torch.zeros(len(targets), device=device).index_add_(0, rows, picked).tolist(),
                response_token_counts(batch["labels"]).tolist())

    try:
        batches = map_batches(run_batch, math.ceil(len(sequences) / batch_size), desc="likelihood", progress=False)
    finally:
        model.train(was_training)
    return [s for sums, _ in batches for s in sums], [c for _, counts in batches for c in counts]
