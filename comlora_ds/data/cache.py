"""Tokenise once: the training and validation datasets of a run, built by one process and read by every rank.

The cache folder is ``<data.cache_dir or $COMLORA_DS_CACHE or ~/.cache/comlora_ds>/tokenized/<key>``, the key a sha256
of the data's content (every file or folder, :func:`comlora_ds.checkpointing.manifest.data_fingerprint`), the tokenizer
(its saved files, after :func:`~comlora_ds.data.tokenize.prepare_tokenizer`), every ``data.*`` setting that changes the
rows, and :data:`FORMAT_VERSION`. Rank 0 computes the key and builds the folder when it is missing
(:func:`~comlora_ds.data.dataset.build_datasets`, written to a temporary folder and renamed: complete or absent); on a
node that does not see rank 0's folder (node-local disks), that node's local rank 0 builds it; every rank then reads it
with ``load_from_disk`` (memory-mapped Arrow: the rows are not in each rank's Python heap). A second run with the same
key reads the cache without tokenising. ``data.cache = false`` builds in every process and writes nothing. A bad row
raises on the building rank and every rank stops with that error.

An entry is used only when it verifies: its ``complete.json`` (written last) records the key it was built under and
the name and size of every file; the key must be the folder's name and every file present at its size, and
``report.json`` must read back. A damaged entry (a truncated Arrow or report file, a deleted split, an entry moved
under another key) is reported in one warning line and rebuilt, replacing it atomically. Sizes, not hashes, are
checked: a start then costs one ``stat`` per file, whatever the data size; a changed byte that keeps the size is the
one damage this does not see (the checkpoint manifest hashes, because a checkpoint is the training's only copy; a
cache entry can always be rebuilt from the data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import datasets

from ..config import DataConfig
from ..distributed import on_local_leaders, on_rank0
from ..errors import InputError
from .dataset import DataReport, build_datasets, empty_split, no_progress_bars

FORMAT_VERSION = "2"        # bump when the encoding of rows changes (2: chat turns tokenised at their boundaries)
_NOT_IN_KEY = ("cache_dir", "cache")
_REPORT = "report.json"
_DONE = "complete.json"     # written last: the key and every file's size


class CacheDirError(InputError, NotADirectoryError):
    pass


def cache_root(cfg: DataConfig) -> Path:
    from ..models.builtin_models import cache_root as comlora_cache

    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else comlora_cache()
    for folder in (root, root / "tokenized"):
        if folder.exists() and not folder.is_dir():
            raise CacheDirError(f"data.cache_dir = {str(root)!r}: {folder} is a file, not a folder; name a folder "
                                f"for the tokenise-once cache, or set data.cache=false")
    return root / "tokenized"


# how the tokenizer was loaded (HF_HUB_OFFLINE sets local_files_only), not what it is
_LOADING_KEYS = ("local_files_only", "name_or_path", "_commit_hash", "cache_dir", "revision", "token",
                 "trust_remote_code")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's saved files, its tokenizer_config.json without the loading options."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        h = hashlib.sha256()
        for file in sorted(Path(tmp).iterdir()):
            data = file.read_bytes()
            if file.name == "tokenizer_config.json":
                config = {k: v for k, v in json.loads(data).items() if k not in _LOADING_KEYS}
                data = json.dumps(config, sort_keys=True).encode()
            h.update(file.name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def cache_key(cfg: DataConfig, tokenizer: Any, data_fingerprint: dict | None = None) -> str:
    """``data_fingerprint``: :func:`comlora_ds.checkpointing.manifest.data_fingerprint` of ``cfg`` when the caller has
    it already (hashing large files once); computed here otherwise."""
    if data_fingerprint is None:
        from ..checkpointing.manifest import data_fingerprint as fingerprint_of

        data_fingerprint = fingerprint_of(cfg)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    parts = {"version": FORMAT_VERSION, "settings": settings, "data": data_fingerprint,
             "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != _DONE}


def damage(folder: Path) -> str | None:
    """Why the entry in ``folder`` cannot be used (None: it verifies; see the module doc). An absent entry is
    "missing"."""
    if not (folder / _DONE).is_file():
        return "missing" if not folder.exists() else f"no {_DONE} (an older or unfinished entry)"
    try:
        done = json.loads((folder / _DONE).read_text())
        recorded, key = dict(done["files"]), done["key"]
        report = json.loads((folder / _REPORT).read_text())
        DataReport(**report)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        return f"{_DONE} or {_REPORT} does not read back ({type(err).__name__})"
    if key != folder.name:
        return f"it was built under key {key}, not {folder.name} (built with other settings or data)"
    found = _files(folder)
    for name, size in recorded.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != size:
            return f"{name} has {found[name]} bytes, {size} were written (truncated or changed)"
    return None


def _publish(tmp: Path, folder: Path) -> None:
    """Renames ``tmp`` to ``folder``; a damaged ``folder`` is moved aside first, then removed."""
    aside = None
    if folder.exists():
        aside = folder.with_name(f".{folder.name}-damaged-{os.getpid()}")
        os.replace(folder, aside)
    os.replace(tmp, folder)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _build_into(folder: Path, cfg: DataConfig, tokenizer: Any, model_name: str) -> str:
    """How this process got the folder: built it (with the seconds it took) or found it complete."""
    problem = damage(folder)
    if problem is None:
        return f"read from the cache {folder}"
    if problem != "missing":
        warnings.warn(f"tokenise-once cache entry {folder} is damaged ({problem}); rebuilding it", stacklevel=2)
    start = time.perf_counter()
    train, val, report = build_datasets(cfg, tokenizer, model_name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        with no_progress_bars():
            train.save_to_disk(str(tmp / "train"))
            if len(val):            # datasets cannot load a saved split without rows
                val.save_to_disk(str(tmp / "validation"))
        (tmp / _REPORT).write_text(json.dumps(report.to_dict(), indent=1))
        (tmp / _DONE).write_text(json.dumps({"key": folder.name, "files": _files(tmp)}, indent=1))
        _publish(tmp, folder)
    except OSError:
        if damage(folder) is not None:       # not another process publishing the same key first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"tokenised into the cache {folder} in {time.perf_counter() - start:.1f} s"


def tokenised_datasets(cfg: DataConfig, tokenizer: Any, model_name: str = "the model",
                       data_fingerprint: dict | None = None) -> tuple[datasets.Dataset, datasets.Dataset, DataReport]:
    """:func:`~comlora_ds.data.dataset.build_datasets`, done once (see the module doc); call it on every rank.
    ``data_fingerprint`` as in :func:`cache_key`."""
    if not cfg.cache:
        return build_datasets(cfg, tokenizer, model_name)

    def build_on_rank0() -> tuple[str, str]:
        folder = cache_root(cfg) / cache_key(cfg, tokenizer, data_fingerprint)
        return str(folder), _build_into(folder, cfg, tokenizer, model_name)

    folder, how = on_rank0(build_on_rank0)
    folder = Path(folder)
    on_local_leaders(lambda: _build_into(folder, cfg, tokenizer, model_name), needed=damage(folder) is not None)
    report = DataReport(**{**json.loads((folder / _REPORT).read_text()), "cache": how})
    train = datasets.load_from_disk(str(folder / "train"))
    val = datasets.load_from_disk(str(folder / "validation")) if report.val_rows else empty_split(keep_raw=True)
    return train, val, report
