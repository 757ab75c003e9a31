"""Every training format and file kind into conversation rows (data.sources), mixtures, and their refusals: file,
row and field named, before any model work."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from comlora_ds.config import ConfigError, DataConfig, SourceConfig, load_config
from comlora_ds.data.dataset import build_datasets
from comlora_ds.data.formats import DataError, check_data_files, load_llm_adapters
from comlora_ds.data.sources import read_source
from comlora_ds.data.tokenize import prepare_tokenizer
from comlora_ds.evaluation.convai2 import training_rows as convai2_rows
from comlora_ds.evaluation.mmlu import training_rows as mmlu_rows

from assets import commonsense_file, convai2_files, tiny_model_dir

ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "You are terse."}]
SHAREGPT = [{"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."},
                               {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
            {"system": "Be kind.", "conversations": [{"from": "human", "value": "Thanks"},
                                                     {"from": "gpt", "value": "Any time."}]}]
MESSAGES = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris."}]},
            {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]}]
MMLU = [{"subject": "astronomy", "question": f"Q{i}?", "choices": ["a", "b", "c", "d"], "answer": "ABCD"[i % 4]}
        for i in range(8)]


def _json(path: Path, rows, lines: bool = False) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) if lines else json.dumps(rows))
    return str(path)


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir()))


def test_alpaca_rows_with_optional_input_and_system(tmp_path: Path) -> None:
    rows = read_source(SourceConfig(path=_json(tmp_path / "a.json", ALPACA), format="alpaca"))
    assert rows[0] == {"messages": [_msg("user", "Name a colour."), _msg("assistant", "Blue.")], "input": "",
                       "answer": "", "source": str(tmp_path / "a.json")}
    assert rows[1]["messages"] == [_msg("system", "You are terse."), _msg("user", "Add the numbers."),
                                   _msg("assistant", "5")]
    assert rows[1]["input"] == "2 and 3"


def test_llm_adapters_rows_are_single_turn_with_their_answer() -> None:
    path = str(commonsense_file("ARC-Challenge"))
    rows, reference = read_source(SourceConfig(path=path)), load_llm_adapters(path)
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference):
        assert row["messages"] == [_msg("user", ref["instruction"]), _msg("assistant", ref["output"])]
        assert (row["input"], row["answer"]) == (ref["input"], ref["answer"])


def test_sharegpt_multi_turn_and_top_level_system(tmp_path: Path) -> None:
    rows = read_source(SourceConfig(path=_json(tmp_path / "s.jsonl", SHAREGPT, lines=True), format="sharegpt"))
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in rows[0]["messages"]] == ["Hi!", "Hello.", "2+2?", "4"]
    assert rows[1]["messages"][0] == _msg("system", "Be kind.")


def test_column_and_role_names_are_mappable(tmp_path: Path) -> None:
    renamed = [{"dialog": [{"speaker": "me", "text": t["value"]} if t["from"] == "human"
                           else {"speaker": "bot", "text": t["value"]} for t in SHAREGPT[0]["conversations"]]}]
    source = SourceConfig(path=_json(tmp_path / "r.json", renamed), format="sharegpt",
                          columns={"conversations": "dialog", "role": "speaker", "content": "text"},
                          roles={"user": "me", "assistant": "bot"})
    assert read_source(source)[0]["messages"] == read_source(
        SourceConfig(path=_json(tmp_path / "s.json", SHAREGPT[:1]), format="sharegpt"))[0]["messages"]
    alpaca = [{"prompt": "Q", "completion": "A"}]
    got = read_source(SourceConfig(path=_json(tmp_path / "p.json", alpaca), format="alpaca",
                                   columns={"instruction": "prompt", "output": "completion"}))
    assert got[0]["messages"] == [_msg("user", "Q"), _msg("assistant", "A")]


def test_parquet_csv_and_save_to_disk_folders_read_through_datasets(tmp_path: Path) -> None:
    want = read_source(SourceConfig(path=_json(tmp_path / "m.json", MESSAGES), format="messages"))
    datasets.Dataset.from_list(MESSAGES).to_parquet(tmp_path / "m.parquet")
    datasets.Dataset.from_list(MESSAGES).save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(MESSAGES[:1]),
                          "test": datasets.Dataset.from_list(MESSAGES[1:])}).save_to_disk(tmp_path / "dict")
    strip = [{k: v for k, v in r.items() if k != "source"} for r in want]
    for path in ("m.parquet", "saved"):
        got = read_source(SourceConfig(path=str(tmp_path / path), format="messages"))
        assert [{k: v for k, v in r.items() if k != "source"} for r in got] == strip
    assert [r["messages"] for r in read_source(SourceConfig(path=str(tmp_path / "dict"), format="messages",
                                                            split="test"))] == [strip[1]["messages"]]
    datasets.Dataset.from_list(ALPACA[:1]).to_csv(tmp_path / "a.csv")
    assert read_source(SourceConfig(path=str(tmp_path / "a.csv"), format="alpaca"))[0]["messages"] == \
        [_msg("user", "Name a colour."), _msg("assistant", "Blue.")]


def test_convai2_and_mmlu_sources_are_the_evaluation_rows(tmp_path: Path) -> None:
    part1 = convai2_files()[0]
    rows = read_source(SourceConfig(path=str(part1), format="convai2", max_history=3))
    reference = convai2_rows(part1, max_history=3)
    assert [(r["messages"][0]["content"], r["input"], r["messages"][1]["content"]) for r in rows] == \
        [(r["instruction"], r["input"], r["output"]) for r in reference]
    path = _json(tmp_path / "mmlu.jsonl", MMLU, lines=True)
    rows = read_source(SourceConfig(path=path, format="mmlu"))
    assert [(r["messages"][1]["content"], r["answer"]) for r in rows] == \
        [(r["output"], r["answer"]) for r in mmlu_rows(path)]


def test_a_mixture_samples_each_source_deterministically(tmp_path: Path, tok) -> None:
    a = _json(tmp_path / "a.json", [{"instruction": f"A{i}", "output": "x"} for i in range(10)])
    b = _json(tmp_path / "b.json", [{"instruction": f"B{i}", "output": "y"} for i in range(30)])
    cfg = DataConfig(sources=[SourceConfig(path=a, format="alpaca", num_samples=25),
                              SourceConfig(path=b, format="alpaca", weight=0.5)], val_size=0, max_length=64)
    train, _, report = build_datasets(cfg, tok)
    texts = [tok.decode(ids) for ids in train["input_ids"]]
    assert sum("A" in t.split("Instruction:")[1][:20] for t in texts) == 25 and len(texts) == 25 + 15
    assert report.mixture == {a: 25, b: 15}
    assert "mixture " + f"{a} 25 rows (62.5%), {b} 15 rows (37.5%)" in report.summary()
    # 25 of 10 rows: every row twice and 5 more; the same for the same seed, other rows for another seed
    again, _, _ = build_datasets(cfg, tok)
    assert again["input_ids"] == train["input_ids"]
    other, _, _ = build_datasets(DataConfig(sources=cfg.sources, val_size=0, max_length=64, seed=1), tok)
    assert sorted(map(tuple, other["input_ids"])) != sorted(map(tuple, train["input_ids"]))


def test_held_out_rows_never_reach_a_repeated_source(tmp_path: Path, tok) -> None:
    a = _json(tmp_path / "a.json", [{"instruction": f"Q{i}", "output": f"R{i}"} for i in range(20)])
    cfg = DataConfig(sources=[SourceConfig(path=a, format="alpaca", weight=3)], val_size=5, max_length=64)
    train, val, report = build_datasets(cfg, tok)
    assert len(train) == 45 and report.mixture == {a: 45}
    held_out = {m[0]["content"] for m in val["messages"]}
    assert not any(f"{q}\n" in tok.decode(ids) for ids in train["input_ids"] for q in held_out)


# ---------------------------------------------------------------- refusals: file, row, field named

@pytest.mark.parametrize("fmt, rows, message", [
    ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
     r"row 0: conversations\[1\]\.from = 'bot': must be one of human, gpt, system"),
    ("sharegpt", [{"conversations": []}], r"row 0: field 'conversations' is empty"),
    ("sharegpt", [SHAREGPT[0], {"conversations": [{"from": "human", "value": "a"}]}],
     r"row 1: field 'conversations' has no gpt turn: nothing to train on"),
    ("messages", [{"messages": [_msg("user", "a"), _msg("assistant", "b"), _msg("user", "c")]}],
     r"row 0: field 'messages' ends with a user turn that has no reply"),
    ("messages", [{"messages": [_msg("user", "a"), _msg("user", "b")]}],
     r"row 0: messages\[1\]\.role = 'user': expected a assistant turn"),
    ("messages", [{"messages": [_msg("user", "a"), _msg("system", "s"), _msg("assistant", "b")]}],
     r"row 0: messages\[1\]: a system turn is allowed only first"),
    ("messages", [{"messages": [_msg("user", "a"), {"role": "assistant", "content": None}]}],
     r"row 0: messages\[1\]: field 'content' must be a non-empty string, got None"),
    ("messages", [{"conversation": []}], r"row 0: field 'messages' must be a list of turns, got a missing field"),
    ("alpaca", [ALPACA[0], {"instruction": "x"}], r"row 1: field 'output' must be a non-empty string, got a missing"),
])
def test_bad_rows_are_named(tmp_path: Path, fmt: str, rows: list, message: str) -> None:
    path = _json(tmp_path / "bad.json", rows)
    with pytest.raises(DataError, match=f"bad.json {message}"):
        read_source(SourceConfig(path=path, format=fmt))


def test_a_parquet_file_with_other_columns_is_refused_naming_them(tmp_path: Path) -> None:
    datasets.Dataset.from_list([{"question": "q", "reply": "r"}]).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet: no column 'instruction' \(its columns: question, reply\); name "
                                        r"yours with columns, e.g. columns=\{instruction: <column>\}"):
        read_source(SourceConfig(path=str(tmp_path / "x.parquet"), format="alpaca"))
    with pytest.raises(DataError, match="columns names 'prompt', which format alpaca does not have"):
        read_source(SourceConfig(path=str(tmp_path / "x.parquet"), format="alpaca", columns={"prompt": "question"}))


def test_a_missing_split_and_an_unreadable_file_are_named(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": datasets.Dataset.from_list(MESSAGES)}).save_to_disk(tmp_path / "dict")
    with pytest.raises(DataError, match=r"dict: a DatasetDict without split 'validation' \(its splits: train\)"):
        read_source(SourceConfig(path=str(tmp_path / "dict"), format="messages", split="validation"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot be read with datasets"):
        read_source(SourceConfig(path=str(tmp_path / "broken.parquet"), format="messages"))


def test_source_settings_are_checked_by_the_config(tmp_path: Path) -> None:
    cases = {
        "data.sources=[{path: a.json, hub: x/y}]": r"data.sources\[0\].path = 'a.json': give exactly one of path and hub",
        "data.sources=[{path: a.json, format: yaml}]": r"data.sources\[0\].format = 'yaml': must be one of",
        "data.sources=[{path: a.json, weight: 1, num_samples: 3}]": r"data.sources\[0\].weight = 1.0: give num_samples or",
        "data.sources=[{path: a.json, max_history: 2}]": r"data.sources\[0\].max_history = 2: applies to format convai2",
        "data.sources=[{hub: x/y, format: convai2}]": r"data.sources\[0\].hub = 'x/y': format convai2 reads local files",
        "data.template=jinja": r"data.template = 'jinja': must be one of alpaca, chat",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[override])
    with pytest.raises(ConfigError, match="give data.sources or data.train_files, not both"):
        load_config(overrides=["data.sources=[{path: a.json}]", "data.train_files=[b.json]"])
    cfg = load_config(overrides=[f"data.sources=[{{path: {tmp_path / 'none.json'}}}]"])
    with pytest.raises(DataError, match=r"data.sources\[0\].path = '.*none.json': no such file"):
        check_data_files(cfg.data)


def test_a_mixture_that_selects_nothing_is_refused(tmp_path: Path, tok) -> None:
    a = _json(tmp_path / "a.json", [{"instruction": f"Q{i}", "output": "R"} for i in range(10)])
    with pytest.raises(DataError, match="the mixture's num_samples / weight select no training rows"):
        build_datasets(DataConfig(sources=[SourceConfig(path=a, format="alpaca", weight=0.01)], val_size=0), tok)
