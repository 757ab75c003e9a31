"""Output folder safety: check first, build in a temporary sibling, publish with one rename.

Nothing half-written ever appears at OUT: everything is written into ``.<OUT name>.consolidate-*`` beside it
and renamed into place at the end (a failure removes it). OUT may be replaced only when it is empty, holds the
same consolidation (same fingerprint in its report.json: re-running is idempotent), or ``overwrite`` is set.
OUT may never be, or contain, the checkpoint or the base model (replacing it would delete them).
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

from .errors import ConsolidationError

REPORT = "report.json"


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


def check_output(out: Path, fp: str, overwrite: bool, protected: list[Path]) -> None:
    """Refuse an OUT we must not replace. ``out`` and ``protected`` are absolute."""
    for path in protected:
        if _holds(out, path.resolve()):
            raise ConsolidationError(f"--out {out} is or contains {path}: replacing it would delete it; choose "
                                     f"another output folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConsolidationError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()) or overwrite:
        return
    report = out / REPORT
    try:
        previous = json.loads(report.read_text()) if report.is_file() else None
    except ValueError:
        previous = None
    if previous and previous.get("fingerprint") == fp:
        return
    what = (f"a different model (consolidated from {previous.get('checkpoint', {}).get('path')}, winner "
            f"{previous.get('winner')})" if previous else "files that consolidation did not write")
    raise ConsolidationError(f"--out {out} already holds {what}; pass --overwrite to replace it, or choose "
                             f"another folder")


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
