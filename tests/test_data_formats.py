"""LLM-Adapters file reading: the real files in shared/data, and one hand-built bad file per error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comlora_ds.data.formats import DataError, load_llm_adapters

from assets import commonsense_file

COMMONSENSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"

# Row counts from shared/data/README.md (section 1).
REAL_FILES = {
    "test/boolq.json": 3270, "test/piqa.json": 1838, "test/social_i_qa.json": 1954,
    "test/ARC-Challenge.json": 1172, "test/ARC-Easy.json": 2376, "test/openbookqa.json": 500,
    "train/boolq.json": 9427, "train/ARC-Challenge.json": 1119, "train/ARC-Easy.json": 2251,
    "train/openbookqa.json": 4957,
}


@pytest.mark.shared
@pytest.mark.parametrize("name,count", sorted(REAL_FILES.items()))
def test_real_llm_adapters_files(name: str, count: int) -> None:
    rows = load_llm_adapters(COMMONSENSE / name)
    assert len(rows) == count
    raw = json.loads((COMMONSENSE / name).read_text())
    assert rows == raw  # the four fields, unchanged
    assert all(r["output"] == "the correct answer is " + r["answer"] and r["input"] == "" for r in rows)


def test_jsonl_gives_the_same_rows(tmp_path: Path) -> None:
    rows = load_llm_adapters(commonsense_file("openbookqa"))[:50]
    path = tmp_path / "obqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_llm_adapters(path) == rows


def test_optional_fields_default_to_empty_and_extra_keys_drop(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Say hi", "output": "hi", "id": 7},
                                {"instruction": "Echo", "input": "x", "output": "x", "answer": None}]))
    assert load_llm_adapters(path) == [
        {"instruction": "Say hi", "input": "", "output": "hi", "answer": ""},
        {"instruction": "Echo", "input": "x", "output": "x", "answer": ""},
    ]


GOOD = {"instruction": "Q?", "input": "", "output": "the correct answer is true", "answer": "true"}

BAD_FILES = [
    ("malformed.json", '[\n  {"instruction": "a",\n   "output": }\n]', r"malformed\.json: malformed JSON at line 3 column 14"),
    ("object.json", json.dumps({"rows": [GOOD]}), r"top level must be a JSON array of objects, got dict"),
    ("notobj.json", json.dumps([GOOD, "text"]), r"notobj\.json row 1: expected a JSON object"),
    ("missing.json", json.dumps([GOOD, GOOD, {"output": "x"}]),
     r"missing\.json row 2: field 'instruction' must be a non-empty string, got a missing field"),
    ("none.json", json.dumps([GOOD] * 17 + [{**GOOD, "output": None}]),
     r"none\.json row 17: field 'output' must be a non-empty string, got None$"),
    ("blank.json", json.dumps([{**GOOD, "output": "  "}]), r"row 0: field 'output' must be a non-empty string, got '  '"),
    ("int_instr.json", json.dumps([{**GOOD, "instruction": 3}]), r"row 0: field 'instruction' must be a non-empty string, got 3"),
    ("int_answer.json", json.dumps([{**GOOD, "answer": 1.5}]), r"row 0: field 'answer' must be a string \(or absent\), got float 1\.5"),
    ("list_input.json", json.dumps([{**GOOD, "input": ["a"]}]), r"row 0: field 'input' must be a string \(or absent\), got list"),
    ("empty_list.json", "[]", r"empty_list\.json: contains no rows"),
    ("empty.json", "", r"empty\.json: the file is empty"),
    ("spaces.json", " \n\t", r"the file is empty"),
    ("bad.jsonl", json.dumps(GOOD) + "\n\n" + '{"instruction": "a", "output"\n', r"bad\.jsonl: malformed JSON at line 3 column"),
    ("field.jsonl", json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "output": ""}) + "\n",
     r"field\.jsonl line 3 \(row 1\): field 'output' must be a non-empty string, got ''"),
    ("empty.jsonl", "\n\n", r"the file is empty"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, r"deep\.json: JSON nested too deeply to be rows"),   # RecursionError
    ("deep.jsonl", json.dumps(GOOD) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n",
     r"deep\.jsonl: line 2 is JSON nested too deeply to be a row"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_raise_data_error_naming_file_row_and_field(tmp_path: Path, name: str, content: str,
                                                              message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_llm_adapters(path)


def test_data_files_are_checked_where_they_are_read_not_by_the_config(tmp_path: Path) -> None:
    from comlora_ds.config import DataConfig, load_config
    from comlora_ds.data.formats import check_data_files

    cfg = load_config(overrides=["data.train_files=[/nonexistent/train.json]"])     # a saved config whose data moved
    with pytest.raises(DataError, match=r"data.train_files\[0\] = '/nonexistent/train.json': no such file"):
        check_data_files(cfg.data)
    with pytest.raises(DataError, match=rf"data.val_files\[0\] = '{tmp_path}': is a folder but not one written by datasets' save_to_disk; name the data"):
        check_data_files(DataConfig(val_files=[str(tmp_path)]))
    from comlora_ds.data.dataset import build_datasets

    with pytest.raises(DataError, match="no such file"):                 # before the tokenizer is touched
        build_datasets(cfg.data, tokenizer=None)


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.json: no such file"):
        load_llm_adapters(tmp_path / "nope.json")
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "caf\u00e9", "output": "x"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.json: not UTF-8"):
        load_llm_adapters(path)


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)
