"""Every data format trains from launch/train.py: one 2-rank run on a mixture of an Alpaca file, a ShareGPT file, a
messages parquet, MMLU rows and a ConvAI2 text, rendered with the model's chat template and tokenised once into
the cache; its export remembers the template and evaluation renders with it. (With ../shared: ConvAI2 and MMLU
from the real files.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import pytest

from comlora_ds.config import load_config
from comlora_ds.data.cache import cache_root, tokenised_datasets
from comlora_ds.data.templates import TEMPLATE_FILE
from comlora_ds.data.tokenize import IGNORE_INDEX, prepare_tokenizer
from comlora_ds.evaluation.load import describe_target, training_template

from assets import convai2_files, tiny_model_dir
from helpers import base_overrides, ds_config, free_port, launch
from test_data_sources import ALPACA, MESSAGES, MMLU, SHAREGPT

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat_model(folder: Path) -> Path:
    """The tiny LLaMA with a ChatML template in its tokenizer."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir(), folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def sources(folder: Path) -> str:
    (folder / "alpaca.json").write_text(json.dumps(ALPACA * 8))
    (folder / "sharegpt.jsonl").write_text("\n".join(json.dumps(r) for r in SHAREGPT * 8))
    datasets.Dataset.from_list(MESSAGES * 8).to_parquet(folder / "messages.parquet")
    (folder / "mmlu.jsonl").write_text("\n".join(json.dumps(r) for r in MMLU * 2))
    entries = [f"{{path: {folder / 'alpaca.json'}, format: alpaca}}",
               f"{{path: {folder / 'sharegpt.jsonl'}, format: sharegpt}}",
               f"{{path: {folder / 'messages.parquet'}, format: messages}}",
               f"{{path: {folder / 'mmlu.jsonl'}, format: mmlu}}",
               f"{{path: {convai2_files()[0]}, format: convai2, max_history: 2, num_samples: 16}}"]
    return "[" + ", ".join(entries) + "]"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    model = chat_model(root / "model")
    overrides = base_overrides(root / "run", **{"model.name_or_path": model, "data.train_files": "[]",
                                                "data.sources": sources(root), "data.template": "chat",
                                                "data.max_length": 96, "data.cache_dir": root / "cache",
                                                "data.val_size": 8, "data.max_train_samples": "null",
                                                "train.max_steps": 2, "train.save_steps": 2})
    port = free_port()
    proc = launch(overrides, nproc=2, ds=ds_config(root, 2), port=port)
    return root, overrides, proc.stdout + proc.stderr, port


def test_the_mixture_of_every_format_trains_on_two_ranks(chat_run) -> None:
    root, _, log, port = chat_run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "DeepSpeed's shm names left"
    step = root / "run" / "checkpoints" / "step_00000002"
    report = json.loads((step / "data_report.json").read_text())
    assert report["template"] == "chat"
    assert {Path(name).name: n for name, n in report["rows_read"].items()} == {
        "alpaca.json": 16, "sharegpt.jsonl": 16, "messages.parquet": 16, "mmlu.jsonl": 16, "part1.txt": 16}
    assert sum(report["mixture"].values()) == report["train_rows"] == 80 - 8
    assert "mixture " in log and "template chat" in log
    losses = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2]
    rows = [json.loads(line) for line in (step / "validation_rows.jsonl").read_text().splitlines()]
    assert all(set(r) >= {"messages", "input", "answer", "source", "input_ids", "labels"} for r in rows)


def test_rank0_tokenised_once_and_a_second_run_reads_the_cache(chat_run, monkeypatch) -> None:
    root, overrides, log, _ = chat_run
    assert log.count("tokenised into the cache") == 1           # rank 0 built it; rank 1 read it
    step = root / "run" / "checkpoints" / "step_00000002"
    assert json.loads((step / "data_report.json").read_text())["cache"].startswith("tokenised into the cache")
    folders = list(cache_root(load_config(overrides=overrides).data).iterdir())     # the run's data.cache_dir
    assert [f.name for f in folders if not f.name.startswith(".")] and len(folders) == 1
    from transformers import AutoTokenizer

    import comlora_ds.data.cache as cache

    def no_build(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(cache, "build_datasets", no_build)
    saved = root / "run" / "checkpoints" / "step_00000002" / "run_config.yaml"
    cfg = load_config(saved)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(root / "model"))
    train, val, report = tokenised_datasets(cfg.data, tok)
    assert len(train) == report.train_rows == 72 and len(val) == 8 and report.cache.startswith("read from the cache")
    assert all(any(t != IGNORE_INDEX for t in labels) for labels in train["labels"])
    changed = load_config(saved, ["data.assistant_turns=last"])
    with pytest.raises(AssertionError, match="tokenised again"):       # another setting is another key
        tokenised_datasets(changed.data, tok)


def test_the_export_remembers_the_template_and_evaluation_uses_it(chat_run) -> None:
    from comlora_ds.evaluation.runner import EvalSettings, run_evaluation
    from comlora_ds.export.consolidate import consolidate

    root, _, _, _ = chat_run
    consolidate(root / "run" / "checkpoints", root / "export")
    for folder in ("adapter", "merged"):
        assert json.loads((root / "export" / folder / TEMPLATE_FILE).read_text())["template"] == "chat"
        assert training_template(describe_target(str(root / "export" / folder))) == "chat"
    assert training_template(describe_target(str(root / "run" / "checkpoints"), component=0)) == "chat"
    settings = dict(model=str(root / "export" / "merged"), task="commonsense", tasks=["sst2"], limit=3,
                    max_new_tokens=4, progress=False, choice=True)
    result = run_evaluation(EvalSettings(**settings))
    forced = run_evaluation(EvalSettings(**settings, template="alpaca"))
    assert (result["target"]["template"], forced["target"]["template"]) == ("chat", "alpaca")
    assert [e["generated"] for e in result["examples"]] != [e["generated"] for e in forced["examples"]]


def test_convai2_and_mmlu_from_the_shared_files_train(shared_data: Path, tmp_path: Path) -> None:
    entries = (f"[{{path: {shared_data / 'convai2' / 'valid_self_original_no_cands.dialogues_0000-0199.txt'}, "
               f"format: convai2, num_samples: 40}}, {{path: {shared_data / 'mmlu' / 'val.jsonl'}, format: mmlu, "
               f"num_samples: 40}}]")
    overrides = base_overrides(tmp_path / "run", **{"data.train_files": "[]", "data.sources": entries,
                                                    "data.cache": False, "data.max_train_samples": "null",
                                                    "data.max_length": 128, "train.max_steps": 2,
                                                    "train.save_steps": 2})
    launch(overrides, nproc=1, ds=ds_config(tmp_path, 2))
    report = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "data_report.json").read_text())
    assert list(report["mixture"].values()) == [40, 40]
    assert sum(report["rows_read"].values()) > 1500


def test_the_cache_returns_what_build_datasets_returns_even_without_validation_rows(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from comlora_ds.config import DataConfig
    from comlora_ds.data.dataset import build_datasets

    from assets import commonsense_file

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir()))
    for val_size in (0, 16):
        cfg = DataConfig(train_files=[str(commonsense_file("piqa"))], val_size=val_size, cache_dir=str(tmp_path))
        want_train, want_val, _ = build_datasets(cfg, tok)
        first = tokenised_datasets(cfg, tok)
        second = tokenised_datasets(cfg, tok)
        assert first[2].cache.startswith("tokenised into") and second[2].cache.startswith("read from")
        for train, val, _ in (first, second):
            assert train["input_ids"] == want_train["input_ids"] and train["labels"] == want_train["labels"]
            assert val.column_names == want_val.column_names and val.to_list() == want_val.to_list()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CACHE_DAMAGE = {
    "truncated report.json": (lambda entry: _truncate(entry / "report.json"), "does not read back"),
    "truncated arrow file": (lambda entry: _truncate(next((entry / "train").glob("*.arrow"))),
                             "bytes, "),
    "deleted train folder": (lambda entry: shutil.rmtree(entry / "train"), "is missing"),
    "deleted validation state": (lambda entry: (entry / "validation" / "state.json").unlink(),
                                 "validation/state.json is missing"),
}


@pytest.mark.parametrize("case", list(CACHE_DAMAGE))
def test_a_damaged_cache_entry_is_reported_and_rebuilt(tmp_path: Path, case: str) -> None:
    """Found in a bad-input trial: the cache counted as complete once report.json existed, so each of these ended in
    a traceback after the model had loaded, and the entry was never rebuilt."""
    from transformers import AutoTokenizer

    from comlora_ds.config import DataConfig
    from comlora_ds.data.cache import cache_key
    from comlora_ds.data.dataset import build_datasets

    from assets import commonsense_file

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir()))
    cfg = DataConfig(train_files=[str(commonsense_file("piqa"))], val_size=16, max_train_samples=64,
                     cache_dir=str(tmp_path))
    tokenised_datasets(cfg, tok)
    entry = cache_root(cfg) / cache_key(cfg, tok)
    damage, reason = CACHE_DAMAGE[case]
    damage(entry)
    with pytest.warns(UserWarning, match=f"tokenise-once cache entry {entry} is damaged .*{reason}.*; rebuilding it"):
        train, val, report = tokenised_datasets(cfg, tok)
    want_train, want_val, _ = build_datasets(cfg, tok)
    assert report.cache.startswith("tokenised into") and train["input_ids"] == want_train["input_ids"]
    assert val.to_list() == want_val.to_list()
    assert tokenised_datasets(cfg, tok)[2].cache.startswith("read from")       # whole again
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]        # nothing left aside


def test_an_entry_under_another_settings_key_is_not_used(tmp_path: Path) -> None:
    """A cache built with data.max_length=32, placed under the key of max_length=64, was used silently."""
    from transformers import AutoTokenizer

    from comlora_ds.config import DataConfig
    from comlora_ds.data.cache import cache_key

    from assets import commonsense_file

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir()))
    short, long = (DataConfig(train_files=[str(commonsense_file("piqa"))], val_size=8, max_train_samples=32,
                              max_length=n, cache_dir=str(tmp_path)) for n in (32, 64))
    tokenised_datasets(short, tok)
    os.replace(cache_root(short) / cache_key(short, tok), cache_root(long) / cache_key(long, tok))
    with pytest.warns(UserWarning, match="it was built under key .* \\(built with other settings or data\\)"):
        train, _, _ = tokenised_datasets(long, tok)
    assert max(len(ids) for ids in train["input_ids"]) > 32


def test_a_cache_dir_that_is_a_file_is_named(tmp_path: Path) -> None:
    from comlora_ds.config import DataConfig
    from comlora_ds.errors import InputError

    (tmp_path / "cache").write_text("")
    with pytest.raises(InputError, match=f"data.cache_dir = '{tmp_path / 'cache'}': .* is a file, not a folder"):
        cache_root(DataConfig(cache_dir=str(tmp_path / "cache")))
