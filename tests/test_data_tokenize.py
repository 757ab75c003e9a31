"""Tokenisation, label masking and padding, with the real stories260K SentencePiece tokenizer (../shared/data; those
tests are marked ``shared``) and a tiny byte-level BPE tokenizer trained here (the SmolLM2 / LLaMA-3 kind, which
merges across the boundary), on real BoolQ rows (tests/assets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from comlora_ds.data.formats import load_llm_adapters
from comlora_ds.data.prompts import build_prompt
from comlora_ds.data.tokenize import (IGNORE_INDEX, ResponseCollator, prepare_tokenizer, special_prefix_ids,
                                      tokenize_example)

from assets import commonsense_file


@pytest.fixture(scope="module")
def stories(shared_data) -> Path:
    return shared_data / "models" / "stories260K"


@pytest.fixture(scope="module")
def tok(stories):
    return prepare_tokenizer(AutoTokenizer.from_pretrained(stories))


@pytest.fixture(scope="module")
def boolq() -> list[dict[str, str]]:
    return load_llm_adapters(commonsense_file("boolq"))[:200]


def _bpe_tokenizer(texts: list[str], **special: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenisation, no BOS) trained on ``texts``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special.values()), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def supervised(example: dict) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


# ---------------------------------------------------------------- prepare_tokenizer

def test_prepare_tokenizer_pads_with_unk_on_the_right(tok) -> None:
    assert (tok.pad_token, tok.pad_token_id, tok.padding_side) == ("<unk>", 0, "right")
    assert tok.eos_token_id == 2


def test_prepare_tokenizer_replaces_a_pad_equal_to_eos(stories) -> None:
    t = AutoTokenizer.from_pretrained(stories)
    t.pad_token = t.eos_token  # what SmolLM2-Instruct ships
    t.padding_side = "left"
    prepare_tokenizer(t)
    assert (t.pad_token_id, t.padding_side) == (t.unk_token_id, "right")


def test_prepare_tokenizer_falls_back_to_eos_without_unk() -> None:
    t = _bpe_tokenizer(["hello world"], eos_token="<eos>")
    assert t.pad_token is None and t.unk_token is None
    assert prepare_tokenizer(t).pad_token == "<eos>"


def test_prepare_tokenizer_needs_eos() -> None:
    with pytest.raises(ValueError, match="no EOS token"):
        prepare_tokenizer(_bpe_tokenizer(["hello world"], unk_token="<unk>"))


# ---------------------------------------------------------------- tokenize_example

def test_layout_bos_prompt_response_eos(tok, boolq) -> None:
    row = boolq[0]
    prompt = build_prompt(row["instruction"])
    ex = tokenize_example(tok, prompt, row["output"], max_length=1024)
    p = tok(prompt, add_special_tokens=False).input_ids
    r = tok(row["output"], add_special_tokens=False).input_ids
    assert special_prefix_ids(tok) == [tok.bos_token_id]
    assert ex["input_ids"] == [tok.bos_token_id] + p + r + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * (1 + len(p)) + r + [tok.eos_token_id]
    assert ex["truncated"] is False
    assert tok.decode(supervised(ex)) == "the correct answer is false</s>"


def test_separate_equals_joint_tokenisation_for_sentencepiece(tok, boolq) -> None:
    """stories260K strips the prompt's trailing spaces, so splitting at the boundary changes no id."""
    for row in boolq:
        prompt = build_prompt(row["instruction"])
        ex = tokenize_example(tok, prompt, row["output"], max_length=4096)
        assert ex["input_ids"] == tok(prompt + row["output"]).input_ids + [tok.eos_token_id]
        n_prompt = len(tok(prompt).input_ids)
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in ex["labels"][n_prompt:]


def test_boundary_is_exact_where_bpe_would_merge_across_it(boolq) -> None:
    texts = [build_prompt(r["instruction"]) + r["output"] for r in boolq]
    bpe = prepare_tokenizer(_bpe_tokenizer(texts, eos_token="<eos>", unk_token="<unk>"))
    prompt, response = build_prompt(boolq[0]["instruction"]), boolq[0]["output"]
    joint = bpe(prompt + response).input_ids
    assert bpe.decode(joint[len(bpe(prompt).input_ids):]) != response  # the joint text merged the boundary
    ex = tokenize_example(bpe, prompt, response, max_length=4096)
    assert special_prefix_ids(bpe) == []
    assert bpe.decode(supervised(ex)) == response + "<eos>"
    assert bpe.decode(ex["input_ids"]) == prompt + response + "<eos>"


def test_train_on_prompt_supervises_everything(tok) -> None:
    ex = tokenize_example(tok, build_prompt("Q?"), "yes", max_length=512, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_truncate_keeps_the_response_and_cuts_the_prompt_from_the_left(tok, boolq) -> None:
    prompt, response = build_prompt(boolq[1]["instruction"]), boolq[1]["output"]
    full = tokenize_example(tok, prompt, response, max_length=4096)
    n_resp = len(supervised(full))
    ex = tokenize_example(tok, prompt, response, max_length=n_resp + 11)
    assert ex["truncated"] is True and len(ex["input_ids"]) == n_resp + 11
    assert ex["input_ids"][0] == tok.bos_token_id
    assert ex["input_ids"][1:] == full["input_ids"][-(n_resp + 10):]  # the prompt's last 10 tokens + response
    assert supervised(ex) == supervised(full)


def test_truncate_when_the_response_alone_is_too_long(tok) -> None:
    prompt, response = build_prompt("Tell a story."), "Once upon a time there was a little girl named Lily. " * 3
    ex = tokenize_example(tok, prompt, response, max_length=21)
    assert len(ex["input_ids"]) == 21 and ex["truncated"]
    n_sup = len(supervised(ex))
    assert n_sup == 20 - 10 and ex["labels"][:11] == [IGNORE_INDEX] * 11  # BOS + budget // 2 prompt tokens
    assert tok.eos_token_id not in ex["input_ids"]
    assert tok.decode(supervised(ex)).startswith("Once upon")


@pytest.mark.parametrize("max_length", [3, 5, 16, 40])
def test_truncated_rows_always_keep_a_supervised_token(tok, boolq, max_length: int) -> None:
    for row in boolq[:20]:
        ex = tokenize_example(tok, build_prompt(row["instruction"]), row["output"], max_length=max_length)
        assert len(ex["input_ids"]) <= max_length and len(ex["input_ids"]) == len(ex["labels"])
        assert len(supervised(ex)) >= 1


def test_drop_returns_none_only_when_too_long(tok) -> None:
    prompt = build_prompt("Q?")
    n = len(tokenize_example(tok, prompt, "yes", max_length=4096)["input_ids"])
    assert tokenize_example(tok, prompt, "yes", max_length=n, overlong="drop") is not None
    assert tokenize_example(tok, prompt, "yes", max_length=n - 1, overlong="drop") is None


def test_bad_arguments(tok) -> None:
    with pytest.raises(ValueError, match="overlong = 'cut'"):
        tokenize_example(tok, "a b c", "d", max_length=64, overlong="cut")
    with pytest.raises(ValueError, match="max_length = 2 leaves no room"):
        tokenize_example(tok, "a b c d e f", "d", max_length=2)


# ---------------------------------------------------------------- ResponseCollator

def test_collator_right_pads_and_masks() -> None:
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "instruction": "ignored"},
            {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]
    batch = ResponseCollator(pad_token_id=0)(rows)
    assert {k: v.dtype for k, v in batch.items()} == {k: torch.long for k in ("input_ids", "attention_mask", "labels")}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collator_pad_to_multiple_of() -> None:
    rows = [{"input_ids": [1] * 9, "labels": [1] * 9}, {"input_ids": [2] * 3, "labels": [2] * 3}]
    batch = ResponseCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [9, 3]
    assert (batch["labels"][:, 9:] == IGNORE_INDEX).all() and (batch["input_ids"][:, 9:] == 0).all()
    assert ResponseCollator(0, pad_to_multiple_of=8)(rows[1:])["input_ids"].shape == (1, 8)


def test_collator_on_tokenised_examples(tok, boolq) -> None:
    examples = [tokenize_example(tok, build_prompt(r["instruction"]), r["output"], max_length=512) for r in boolq[:4]]
    batch = ResponseCollator(tok.pad_token_id)(examples)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert batch["labels"][i, :n].tolist() == ex["labels"]
        assert tok.decode([t for t in batch["labels"][i].tolist() if t != IGNORE_INDEX]) == boolq[i]["output"] + "</s>"


def test_collator_errors() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        ResponseCollator(0)([])
    with pytest.raises(ValueError, match="batch row 0"):
        ResponseCollator(0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="pad_token_id"):
        ResponseCollator(None)
    with pytest.raises(ValueError, match="pad_to_multiple_of = 0"):
        ResponseCollator(0, pad_to_multiple_of=0)
