"""Batched greedy generation on the real stories260K LLaMA (../shared/data): reference text, batching, padding, EOS."""

from __future__ import annotations

import pytest

from comlora_ds.evaluation.generate import encode_prompts, ensure_pad_token, generate, truncate_left


@pytest.fixture()
def stories(shared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = shared_data / "models" / "stories260K"
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_reference_continuation(stories):
    model, tok = stories
    (text,) = generate(model, tok, ["Once upon a time"], max_new_tokens=40, progress=False)
    # data/README.md section 4: the llama2.c reference output
    assert text.startswith(", there was a little girl named Lily. She loved to play outside in the park.")


def test_batched_equals_one_by_one_and_is_deterministic(stories):
    model, tok = stories
    prompts = ["Once upon a time", "Lily saw a big red ball and she wanted to play with it. One day",
               "The cat", "Tom and his mom went to the park to see the ducks. They"]
    single = [generate(model, tok, [p], max_new_tokens=12, progress=False)[0] for p in prompts]
    batched = generate(model, tok, prompts, batch_size=3, max_new_tokens=12, progress=False)
    assert batched == single
    assert generate(model, tok, prompts, batch_size=3, max_new_tokens=12, progress=False) == batched
    assert tok.pad_token_id == tok.unk_token_id == 0     # set because stories260K has no pad token


def test_prompt_ids_match_training_tokenisation(stories):
    _, tok = stories
    (ids,) = encode_prompts(tok, ["Hello there"])
    assert ids == [tok.bos_token_id] + tok("Hello there", add_special_tokens=False).input_ids


def test_stops_at_eos(stories):
    model, tok = stories
    ensure_pad_token(tok)
    (free,) = generate(model, tok, ["Once upon a time"], max_new_tokens=10, progress=False)
    ids = tok(free, add_special_tokens=False).input_ids
    stop = next(i for i, t in enumerate(ids) if i >= 3 and t not in ids[:i])
    tok.eos_token = tok.convert_ids_to_tokens(ids[stop])
    (cut,) = generate(model, tok, ["Once upon a time"], max_new_tokens=10, progress=False)
    assert cut == tok.decode(ids[:stop])


def test_prompt_truncation(stories):
    model, tok = stories
    assert truncate_left([1, 5, 6, 7, 8], 3, n_prefix=1) == [1, 7, 8]
    assert truncate_left([1, 5], 3, n_prefix=1) == [1, 5]
    with pytest.raises(ValueError, match="no room"):
        truncate_left([1, 5, 6], 1, n_prefix=1)
    long = "Once upon a time " * 60
    (a,) = generate(model, tok, [long], max_new_tokens=5, max_prompt_tokens=20, progress=False)
    tail = tok.decode(tok(long, add_special_tokens=False).input_ids[-19:])
    (b,) = generate(model, tok, [tail], max_new_tokens=5, progress=False)
    assert a == b


def test_argument_checks(stories):
    model, tok = stories
    assert generate(model, tok, [], progress=False) == []
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tok, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, ["a"], max_new_tokens=0)
