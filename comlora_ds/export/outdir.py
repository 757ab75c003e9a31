"""Output folder safety: check first, build in a temporary sibling, publish with one rename.

Nothing half-written ever appears at OUT: everything is written into ``.<OUT name>.consolidate-*`` beside it
and renamed into place at the end (a failure removes it). OUT may be replaced only when it is empty, holds the
same consolidation (same fingerprint in its report.json: re-running is idempotent), or holds an earlier export of
ours (a report.json with a fingerprint) and ``overwrite`` is set: a folder of anybody else's files is never replaced.
OUT may never be, or contain, the checkpoint or the base model (replacing it would delete them), nor be, contain or
sit inside any training run or checkpoint (a run's ``metrics.jsonl``, a ``latest`` file, a ``step_NNNNNNNN`` folder,
DeepSpeed's ``*_model_states.pt``), with or without ``overwrite``: consolidation deletes nothing that training wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..checkpointing.run_layout import LATEST, METRICS, TAG_PATTERN, TRAINER_STATE
from .errors import ConsolidationError

REPORT = "report.json"
TRAINING_MARKERS = (LATEST, METRICS, TRAINER_STATE)


def fingerprint(tensors: dict[str, torch.Tensor], checkpoint: Path, base: str, options: dict) -> str:
    """sha256 over the recovered tensors (names, shapes, bytes), the checkpoint and base paths and the options
    that decide what is written."""
    h = hashlib.sha256()
    h.update(json.dumps({"checkpoint": str(checkpoint), "base": base, **options}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{list(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _holds(out: Path, path: Path) -> bool:
    return out == path or out in path.parents


def training_output_in(out: Path) -> tuple[str, Path] | None:
    """("is inside" | "is" | "holds", folder) for the first training checkpoint or run folder that ``out`` sits inside,
    is, or contains; None when there is none. Inside a run folder is fine (the demo writes ``<run>/export``); inside
    a checkpoints folder or a checkpoint is not."""
    for folder in out.parents:
        if TAG_PATTERN.match(folder.name) or (folder / LATEST).is_file():
            return "is inside", folder
    if not out.is_dir():
        return None
    for root, dirs, files in os.walk(out):
        if any(name in TRAINING_MARKERS or name.endswith("_model_states.pt") for name in files) or \
                (Path(root) == out and TAG_PATTERN.match(out.name)) or any(TAG_PATTERN.match(d) for d in dirs):
            return ("is" if Path(root) == out else "holds"), Path(root)
    return None


def refuse_training_output(out: Path) -> None:
    """Checked first, before any tensor is read: OUT is never a training run or checkpoint, nor inside one, nor a
    folder of files that are not an export of ours."""
    found = training_output_in(out)
    if found is not None:
        relation, folder = found
        raise ConsolidationError(f"--out {out} {relation} a training run or checkpoint ({folder}); consolidation never "
                                 f"writes there, with or without --overwrite: choose another output folder")
    _refuse_foreign_files(out)


def _refuse_foreign_files(out: Path) -> None:
    if out.is_dir() and any(out.iterdir()) and _previous_export(out) is None:   # never replaced: it may be anybody's
        names = sorted(p.name for p in out.iterdir())
        raise ConsolidationError(f"--out {out} holds files that consolidation did not write ({', '.join(names[:3])}"
                                 f"{', ...' if len(names) > 3 else ''}; no {REPORT} of an export); --overwrite "
                                 f"replaces only an earlier export: choose another folder, or an empty one")


def check_output(out: Path, fp: str, overwrite: bool, protected: list[Path]) -> None:
    """Refuse an OUT we must not replace (after ``refuse_training_output``, which runs before any tensor is read).
    ``out`` and ``protected`` are absolute."""
    for path in protected:
        if _holds(out, path.resolve()):
            raise ConsolidationError(f"--out {out} is or contains {path}: replacing it would delete it; choose "
                                     f"another output folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConsolidationError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    _refuse_foreign_files(out)
    previous = _previous_export(out)
    if previous.get("fingerprint") == fp or overwrite:
        return
    raise ConsolidationError(f"--out {out} already holds a different model (consolidated from "
                             f"{previous.get('checkpoint', {}).get('path')}, winner {previous.get('winner')}); pass "
                             f"--overwrite to replace it, or choose another folder")


def _previous_export(out: Path) -> dict | None:
    """The report of the export in ``out`` when it is one of ours (a report.json with its fingerprint), else None."""
    try:
        report = json.loads((out / REPORT).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("fingerprint"), str):
        return None
    return report if isinstance(report.get("checkpoint", {}), dict) else None


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``; removed (with any parent folders this created) on failure."""
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.consolidate-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)          # mkdtemp makes it 0700; OUT gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:
                break
        raise


def publish(tmp: Path, out: Path) -> None:
    """Moves the finished folder to ``out`` (the old one, if any, is moved aside first, then deleted)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "previous")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
