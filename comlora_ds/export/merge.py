"""The streamed merge: base safetensors shards -> merged shards, one tensor in memory at a time.

Every shard of the base (``model.safetensors`` or the files of ``model.safetensors.index.json``) is rewritten
under its own name: the header is copied byte for byte (merging changes no name, shape or dtype, so every
offset stays valid), tensors that are not adapted are copied as raw bytes through a fixed 4 MiB buffer, and
each adapted weight ``W0`` is read alone, merged in fp32 (``W0.float() + scaling * B_k A_k``, the expression of
``ComLoRALinear.merge``), checked for NaN/Inf and cast back to the shard's dtype. A shard is complete on disk
before the next is opened. Peak memory is therefore about three fp32 copies of the largest adapted matrix plus
the adapters, independent of shard and model size (measured in docs/benchmarks.md).

Tied embeddings: ``lm_head`` is never a target module (adapter.target_modules only names the attention and MLP
projections), so a tied ``lm_head``/``embed_tokens`` pair is copied unchanged and stays tied.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConsolidationError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
CONFIG_FILES = ("config.json", "generation_config.json")
COPY_BUFFER = 4 * 2 ** 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Shard:
    name: str
    path: Path
    header: bytes              # the 8-byte length + the JSON header, verbatim
    entries: dict[str, Entry]

    @property
    def data_start(self) -> int:
        return len(self.header)


def read_shard(path: Path) -> Shard:
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ConsolidationError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", prefix)
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except ValueError:
        raise ConsolidationError(f"{path} is not a safetensors file (unreadable header)") from None
    entries = {name: Entry(e["dtype"], tuple(e["shape"]), *e["data_offsets"])
               for name, e in header.items() if name != "__metadata__"}
    return Shard(path.name, path, prefix + raw, entries)


def base_shards(base_dir: Path) -> tuple[list[Shard], Path | None]:
    """The base's safetensors shards in index order (or the single file) and the index file, if any."""
    index = base_dir / SAFE_INDEX
    if index.is_file():
        names = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    elif (base_dir / SAFE_WEIGHTS).is_file():
        names, index = [SAFE_WEIGHTS], None
    else:
        found = sorted(p.name for p in base_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise ConsolidationError(f"base model {base_dir} has no safetensors weights ({SAFE_WEIGHTS} or {SAFE_INDEX}); "
                                 f"found {found or 'nothing'}: re-save it with "
                                 f"save_pretrained(safe_serialization=True)")
    missing = [n for n in names if not (base_dir / n).is_file()]
    if missing:
        raise ConsolidationError(f"base model {base_dir}: shard(s) {missing} named in {SAFE_INDEX} are missing")
    return [read_shard(base_dir / n) for n in names], index


def plan_merge(shards: list[Shard], shapes: dict[str, tuple[int, int]], base_dir: Path) -> dict[str, str]:
    """Adapted weight name -> the shard holding it; refuses names, shapes or dtypes the base does not have."""
    where, problems = {}, []
    for name, shape in shapes.items():
        holders = [s for s in shards if name in s.entries]
        if not holders:
            problems.append(f"{name}: not in the base's safetensors files")
            continue
        entry = holders[0].entries[name]
        if entry.shape != tuple(shape):
            problems.append(f"{name}: the adapter needs [{shape[0]}, {shape[1]}], the base has {list(entry.shape)}")
        elif entry.dtype not in _DTYPES:
            problems.append(f"{name}: dtype {entry.dtype} cannot be merged into (quantised base?)")
        where[name] = holders[0].name
    if problems:
        raise ConsolidationError(f"cannot merge into base model {base_dir}:\n  " + "\n  ".join(problems[:8]))
    return where


def _copy_bytes(src, dst, count: int, buffer: memoryview) -> None:
    while count > 0:
        n = src.readinto(buffer[:min(count, len(buffer))])
        if not n:
            raise ConsolidationError(f"{src.name} ends early: truncated safetensors file")
        dst.write(buffer[:n])
        count -= n


def _merged_tensor(src, shard: Shard, name: str, entry: Entry, delta: Callable[[], torch.Tensor]) -> torch.Tensor:
    src.seek(shard.data_start + entry.begin)
    raw = bytearray(entry.end - entry.begin)
    if src.readinto(raw) != len(raw):
        raise ConsolidationError(f"{shard.path} ends early: truncated safetensors file")
    dtype = _DTYPES[entry.dtype]
    weight = torch.frombuffer(raw, dtype=dtype).view(entry.shape)
    merged = weight.float() if dtype != torch.float32 else weight     # fp32 bases: in place, no copy
    del weight
    merged += delta()
    if not torch.isfinite(merged).all():
        raise ConsolidationError(f"merging into {name} gives NaN or Inf: the adapter is broken; nothing was published")
    return merged.to(dtype)


def write_merged_shard(shard: Shard, out_path: Path, deltas: dict[str, Callable[[], torch.Tensor]],
                       buffer: memoryview) -> int:
    """Rewrites one shard with the deltas of the adapted tensors it holds; returns how many it merged."""
    merged = 0
    with open(shard.path, "rb") as src, open(out_path, "wb") as dst:
        dst.write(shard.header)
        src.seek(shard.data_start)
        position = 0
        for name, entry in sorted(shard.entries.items(), key=lambda item: item[1].begin):
            _copy_bytes(src, dst, entry.begin - position, buffer)        # gap bytes, if a writer left any
            if name in deltas:
                tensor = _merged_tensor(src, shard, name, entry, deltas[name])
                dst.write(tensor.contiguous().view(torch.uint8).numpy().data)
                del tensor
                merged += 1
                src.seek(shard.data_start + entry.end)
            else:
                _copy_bytes(src, dst, entry.end - entry.begin, buffer)
            position = entry.end
        shutil.copyfileobj(src, dst, COPY_BUFFER)                        # trailing bytes, if any
    if out_path.stat().st_size != shard.path.stat().st_size:
        raise ConsolidationError(f"writing {out_path} went wrong: {out_path.stat().st_size} bytes, the base shard has "
                                 f"{shard.path.stat().st_size}")
    return merged


def stream_merge(base_dir: Path, out_dir: Path, deltas: dict[str, Callable[[], torch.Tensor]],
                 shapes: dict[str, tuple[int, int]]) -> dict:
    """Writes the merged shards, the index and the config files of ``base_dir`` into ``out_dir``.

    ``deltas``: base weight name -> function returning its fp32 delta; ``shapes``: the [d_out, d_in] each needs
    (checked against every shard header before anything is written)."""
    shards, index = base_shards(base_dir)
    plan_merge(shards, shapes, base_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = memoryview(bytearray(COPY_BUFFER))
    merged = sum(write_merged_shard(shard, out_dir / shard.name, deltas, buffer) for shard in shards)
    if merged != len(deltas):
        raise ConsolidationError(f"merged {merged} of {len(deltas)} adapted weights into {base_dir}")
    for name in ([index.name] if index else []) + [n for n in CONFIG_FILES if (base_dir / n).is_file()]:
        shutil.copy2(base_dir / name, out_dir / name)
    dtypes = sorted({e.dtype for s in shards for e in s.entries.values()})
    return {"shards": [s.name for s in shards], "merged_weights": merged, "dtypes": dtypes,
            "largest_shard_bytes": max(s.path.stat().st_size for s in shards),
            "total_bytes": sum(s.path.stat().st_size for s in shards)}
