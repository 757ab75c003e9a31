"""From a conversation to training token ids and labels, and to the prompt an evaluation generates from.

A row (see :mod:`comlora_ds.data.sources`) is a conversation: ``messages`` = an optional system turn, then user and
assistant turns alternating, ending with an assistant turn; ``input`` = the Alpaca "input" (context) of the first
user turn, kept apart so that the Alpaca template renders LLM-Adapters rows byte for byte as before.

``data.template``:

* ``alpaca``: every (user, assistant) pair is ``[special prefix, first pair only] + build_prompt(user, input) +
  assistant + EOS``, the parts tokenised separately (:mod:`comlora_ds.data.tokenize` says why); a single-turn row is
  exactly the LLM-Adapters training text. A system turn is written in front of the first prompt, followed by a
  blank line.
* ``chat``: the tokenizer's own chat template (``apply_chat_template``), with ``input`` appended to the first user
  turn after a newline (LLaMA-Factory's Alpaca conversion). Every assistant turn spans from the end of its
  generation prompt (``messages[:i]`` rendered with ``add_generation_prompt=True``) to the end of ``messages[:i + 1]``
  rendered, i.e. the reply and the template's end-of-turn text. The rendered text is cut at those boundaries and each
  piece tokenised alone (as the Alpaca path tokenises prompt and response apart), so the tokens before a reply are
  exactly the tokens generation sees for that prompt and every character of a supervised turn is a target, also
  when the reply starts with whitespace (tokenised whole, BPE merged it with the prompt's last newline). Where no
  merge crosses a boundary the ids equal ``apply_chat_template(messages, tokenize=True)``. No EOS is added: the
  template ends a turn itself.

``data.assistant_turns = last`` supervises only the last assistant turn of a multi-turn row.

Evaluation uses :class:`PromptRenderer`: the same template renders one user turn as a prompt, and knows what comes
in front of the prompt's tokens (the special prefix for Alpaca; nothing for chat, whose template writes its own BOS)
and what ends a response (EOS for Alpaca; the template's end-of-turn text for chat).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .formats import DataError
from .prompts import build_prompt
from .tokenize import IGNORE_INDEX, fit_example, special_prefix_ids

TEMPLATES = ("alpaca", "chat")
TEMPLATE_FILE = "training_template.json"   # beside an exported adapter / merged model: how its prompts were rendered


def _user_text(content: str, input: str) -> str:  # noqa: A002 - the Alpaca field name
    return f"{content}\n{input}" if input else content


def check_chat_template(tokenizer: Any, model: str) -> None:
    """DataError when ``tokenizer`` has no chat template (asked for ``data.template = chat``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.template = 'chat': the tokenizer of {model} has no chat template (tokenizer_config.json "
                        "has no chat_template); use data.template=alpaca or a model that ships one (an Instruct model)")


def _render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def chat_messages(row: dict) -> list[dict[str, str]]:
    """The row's messages with ``input`` folded into the first user turn."""
    messages = [dict(m) for m in row["messages"]]
    if row.get("input"):
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first]["content"] = _user_text(messages[first]["content"], row["input"])
    return messages


def chat_spans(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn (reply + end of turn)."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        upto = _render(tokenizer, messages[:i + 1])
        end = len(upto)
        if not text.startswith(upto) or start > end:
            raise DataError("the tokenizer's chat template renders a conversation differently from its beginning "
                            "(a later turn changes earlier text), so the assistant turns cannot be located; use "
                            "data.template=alpaca")
        spans.append((start, end))
    return text, spans


def _encode_chat(row: dict, tokenizer: Any, assistant_turns: str) -> tuple[list[int], list[int], int]:
    text, spans = chat_spans(tokenizer, chat_messages(row))
    supervised = set(spans[-1:] if assistant_turns == "last" else spans)
    # Cut at every turn's generation-prompt end and turn end, each piece tokenised alone: a reply that starts with
    # whitespace would otherwise merge with the prompt's last newline ('\n' + '  No' -> '\n ', ' No'), so its first
    # character was never a target and training saw a context that generation (the prompt alone) never produces.
    cuts = sorted({0, len(text), *(c for span in spans for c in span)})
    ids, labels = [], []
    for piece in zip(cuts, cuts[1:]):
        piece_ids = tokenizer(text[piece[0]:piece[1]], add_special_tokens=False, verbose=False)["input_ids"]
        ids += piece_ids
        labels += piece_ids if piece in supervised else [IGNORE_INDEX] * len(piece_ids)
    prefix = special_prefix_ids(tokenizer)
    n_prefix = len(prefix) if prefix and ids[:len(prefix)] == prefix else 0
    return ids, labels, n_prefix


def _alpaca_prompts(row: dict) -> tuple[list[str], list[str]]:
    """(prompt text, reply) of every pair; the system turn goes in front of the first prompt."""
    messages = row["messages"]
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    users = [m["content"] for m in messages if m["role"] == "user"]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    prompts = [system + build_prompt(users[0], row.get("input", ""))] + [build_prompt(u) for u in users[1:]]
    return prompts, replies


def _encode_alpaca(row: dict, tokenizer: Any, assistant_turns: str) -> tuple[list[int], list[int], int]:
    prompts, replies = _alpaca_prompts(row)
    prefix = special_prefix_ids(tokenizer)
    prompt_ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    reply_ids = tokenizer(replies, add_special_tokens=False, verbose=False)["input_ids"]
    ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    for turn, (p, r) in enumerate(zip(prompt_ids, reply_ids)):
        supervised = assistant_turns == "all" or turn == len(replies) - 1
        reply = list(r) + [tokenizer.eos_token_id]
        ids += list(p) + reply
        labels += [IGNORE_INDEX] * len(p) + (reply if supervised else [IGNORE_INDEX] * len(reply))
    return ids, labels, len(prefix)


def encode_row(row: dict, tokenizer: Any, template: str, max_length: int, *, assistant_turns: str = "all",
               train_on_prompt: bool = False, overlong: str = "truncate") -> Optional[dict[str, Any]]:
    """``{"input_ids", "labels", "truncated"}`` of one row, or None when it is dropped for its length."""
    encode = _encode_chat if template == "chat" else _encode_alpaca
    ids, labels, n_prefix = encode(row, tokenizer, assistant_turns)
    return fit_example(ids, labels, n_prefix, max_length, train_on_prompt, overlong)


class PromptRenderer:
    """The prompt of a training template for one user turn, and the tokens around it (see the module doc)."""

    def __init__(self, template: str = "alpaca", tokenizer: Any = None, model: str = "the model"):
        if template not in TEMPLATES:
            raise DataError(f"prompt template {template!r}: must be one of {', '.join(TEMPLATES)}")
        if template == "chat":
            check_chat_template(tokenizer, model)
        self.template, self.tokenizer = template, tokenizer

    def prompt(self, instruction: str, input: str = "") -> str:  # noqa: A002
        if self.template == "alpaca":
            return build_prompt(instruction, input)
        return _render(self.tokenizer, [{"role": "user", "content": _user_text(instruction, input)}], True)

    def prefix_ids(self, tokenizer: Any) -> list[int]:
        """Tokens in front of the prompt's own tokens (the prompt is tokenised without special tokens)."""
        return special_prefix_ids(tokenizer) if self.template == "alpaca" else []

    def response_end(self, tokenizer: Any) -> list[int]:
        """Tokens that end a response in training: EOS, or the chat template's end of an assistant turn."""
        if self.template == "alpaca":
            return [tokenizer.eos_token_id]
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        text, (span,) = chat_spans(tokenizer, probe)
        after_reply = text[span[0]:span[1]].split("b", 1)[1]
        return tokenizer(after_reply, add_special_tokens=False, verbose=False)["input_ids"]


def write_template_file(folder: Path, data_cfg: Any) -> None:
    (Path(folder) / TEMPLATE_FILE).write_text(json.dumps({"template": data_cfg.template,
                                                          "assistant_turns": data_cfg.assistant_turns}) + "\n")


def read_template_file(folder: Path) -> Optional[str]:
    """The template an exported model was trained with, or None when the folder has no such file."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    template = json.loads(path.read_text()).get("template")
    if template not in TEMPLATES:
        raise DataError(f"{path}: template {template!r} is not one of {', '.join(TEMPLATES)}")
    return template
