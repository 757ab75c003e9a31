"""Tokenisation with response-only labels, and the padding collator.

One example is ``[special prefix] + prompt + response + [EOS]``: the special prefix is whatever the tokenizer
puts in front of a text by itself (BOS for LLaMA / SentencePiece tokenizers, nothing for SmolLM2's byte-level
BPE), then the prompt and the response **tokenised separately** and concatenated. Labels are -100 on the prefix
and the prompt (unless ``train_on_prompt``), the response tokens and the EOS are supervised.

Why separately: the prompt/response boundary is then exact by construction, and the training sequence is the
one the model sees at generation time, where the prompt is tokenised alone and the answer is generated after
its last token. Tokenising the joined text instead lets BPE merge across the boundary: with the LLM-Adapters
template (the prompt ends in 16 spaces) SmolLM2's tokenizer makes ``"\\n" + 15 spaces`` and ``" the"`` from
the joined text but ``"\\n" + 16 spaces`` and ``"the"`` from the parts, so a boundary computed from the
prompt's own length (upstream's approach) would be off by one token. For SentencePiece tokenizers that strip
trailing spaces (the stories260K test model) both ways give the same ids.

Overlong examples (more than ``max_length`` tokens):

* ``"drop"``: :func:`tokenize_example` returns None.
* ``"truncate"``: the response (+ EOS) is kept whole and the prompt is cut **from the left** (the special
  prefix stays), like TRL's ``truncation_mode="keep_end"``: the model still sees the end of the question and
  the "### Response:" marker that the answer follows. Only when the response alone does not fit does it lose
  its tail (and the EOS); the prompt then keeps its last ``budget // 2`` tokens. Every returned example has
  at least one supervised label.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.nn.utils.rnn import pad_sequence

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
OVERLONG_POLICIES = ("truncate", "drop")


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token distinct from EOS where it can, and pad on the right (training).

    No pad token, or a pad token equal to EOS (SmolLM2-Instruct ships pad = ``<|im_end|>`` = EOS): use UNK when
    the tokenizer has one that differs from EOS (what LLM-Adapters does), else EOS. Padded positions are masked
    by the collator either way; a distinct pad only keeps EOS recognisable in padded batches. Returns the same
    tokenizer object, modified in place.
    """
    pad, eos, unk = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token; responses must end with one")
    if pad is None or pad == eos:
        old = tokenizer.pad_token
        new = tokenizer.unk_token if unk is not None and unk != eos else tokenizer.eos_token
        if new != old:
            tokenizer.pad_token = new
            logger.info("tokenizer pad token: %r -> %r (id %d)", old, new, tokenizer.pad_token_id)
    tokenizer.padding_side = "right"
    return tokenizer


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer adds in front of a text by itself (e.g. ``[bos]``; ``[]`` for most BPE tokenizers).

    Found by comparing the encodings of a probe text with and without special tokens, so any post-processor
    template is honoured; special tokens the tokenizer appends (an automatic EOS) are ignored, we add EOS.
    """
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def assemble_example(prefix: Sequence[int], prompt_ids: Sequence[int], response_ids: Sequence[int],
                     eos_token_id: int, max_length: int, train_on_prompt: bool = False,
                     overlong: str = "truncate") -> Optional[dict[str, Any]]:
    """Build ``{"input_ids", "labels", "truncated"}`` from already tokenised parts (see the module doc)."""
    prefix, prompt, response = list(prefix), list(prompt_ids), list(response_ids) + [eos_token_id]
    labels = [IGNORE_INDEX] * (len(prefix) + len(prompt)) + response
    return fit_example(prefix + prompt + response, labels, len(prefix), max_length, train_on_prompt, overlong)


def fit_example(input_ids: Sequence[int], labels: Sequence[int], n_prefix: int, max_length: int,
                train_on_prompt: bool = False, overlong: str = "truncate") -> Optional[dict[str, Any]]:
    """An example (``labels`` = response-only) made to fit ``max_length``; ``n_prefix`` leading special tokens stay.

    One supervised block at the end (a single-turn example): the module doc's policy. Several turns: the tail is
    cut (the later turns go); when that leaves nothing supervised, the example is cut after its first supervised
    block and that part gets the single-turn policy. ``train_on_prompt``: labels = ids after fitting."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong = {overlong!r}: must be one of {', '.join(OVERLONG_POLICIES)}")
    ids, labels = list(input_ids), list(labels)
    truncated = len(ids) > max_length
    if truncated:
        if overlong == "drop":
            return None
        if max_length - n_prefix < 2:
            raise ValueError(f"max_length = {max_length} leaves no room for a prompt and a response token "
                             f"after {n_prefix} special prefix token(s)")
        supervised = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
        first_end = next((i for i in range(supervised[0], len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        if first_end < len(labels) and any(t != IGNORE_INDEX for t in labels[first_end:]):
            if any(t != IGNORE_INDEX for t in labels[:max_length]):
                ids, labels = ids[:max_length], labels[:max_length]
                return _finish(ids, labels, train_on_prompt, truncated)
            ids, labels = ids[:first_end], labels[:first_end]
        ids, labels = _keep_end(ids, labels, n_prefix, supervised[0], max_length)
    return _finish(ids, labels, train_on_prompt, truncated)


def _keep_end(ids: list[int], labels: list[int], n_prefix: int, start: int,
              max_length: int) -> tuple[list[int], list[int]]:
    """Single-turn fit: the response (from ``start``) whole and the prompt cut from the left, or, when the response
    alone does not fit, the prompt's last ``budget // 2`` tokens and the response's head."""
    if len(ids) <= max_length:
        return ids, labels
    prefix, prompt, response = ids[:n_prefix], ids[n_prefix:start], ids[start:]
    budget = max_length - n_prefix
    if len(response) < budget:
        prompt = prompt[len(prompt) - (budget - len(response)):]
    else:
        keep = min(len(prompt), budget // 2)
        prompt = prompt[len(prompt) - keep:] if keep else []
        response = response[:budget - keep]
    return prefix + prompt + response, [IGNORE_INDEX] * (n_prefix + len(prompt)) + labels[start:start + len(response)]


def _finish(ids: list[int], labels: list[int], train_on_prompt: bool, truncated: bool) -> dict[str, Any]:
    return {"input_ids": ids, "labels": list(ids) if train_on_prompt else labels, "truncated": truncated}


def tokenize_example(tokenizer: Any, prompt: str, response: str, max_length: int,
                     train_on_prompt: bool = False, overlong: str = "truncate") -> Optional[dict[str, Any]]:
    """Tokenise one (prompt, response) pair into ``{"input_ids", "labels", "truncated"}`` (lists of ints and a
    bool), or None when it is longer than ``max_length`` and ``overlong == "drop"``."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token; call prepare_tokenizer first")
    prompt_ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
    return assemble_example(special_prefix_ids(tokenizer), prompt_ids, response_ids, tokenizer.eos_token_id,
                            max_length, train_on_prompt, overlong)


@dataclass
class ResponseCollator:
    """Right-pad a list of rows (``input_ids``, ``labels``; lists or 1-D tensors) into LongTensors.

    Returns ``input_ids [B, L]`` (padded with ``pad_token_id``), ``attention_mask [B, L]`` (1 on real tokens)
    and ``labels [B, L]`` (-100 on padding). ``L`` is the longest row, rounded up to ``pad_to_multiple_of``
    when given. Other keys of the rows (raw text columns) are ignored.
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("ResponseCollator needs a pad_token_id (see prepare_tokenizer)")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of = {self.pad_to_multiple_of}: must be >= 1")

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("ResponseCollator got an empty batch")
        ids = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
        labels = [torch.as_tensor(row["labels"], dtype=torch.long) for row in rows]
        for i, (x, y) in enumerate(zip(ids, labels)):
            if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
                raise ValueError(f"batch row {i}: input_ids {tuple(x.shape)} and labels {tuple(y.shape)} must be "
                                 "equal, non-empty 1-D sequences")
        mask = [torch.ones_like(x) for x in ids]
        batch = {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence(mask, batch_first=True, padding_value=0),
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }
        multiple = self.pad_to_multiple_of
        extra = (-batch["input_ids"].shape[1]) % multiple if multiple else 0
        if extra:
            fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
            batch = {k: torch.nn.functional.pad(v, (0, extra), value=fills[k]) for k, v in batch.items()}
        return batch
