"""Where DeepSpeed's JIT-built C++ ops go, and the stale build lock that would hang every later run.

On CPU, DeepSpeed builds ``deepspeed_shm_comm`` in ``init_distributed`` (and ``cpu_adam`` / ``fused_adam`` when the
config asks for them) into torch's extensions folder, by default ``~/.cache/torch_extensions/py311_cpu/<op>/``. That
folder is keyed by the op's name only, so two virtualenvs rebuild the op in turn in one place, and a process killed
during a build leaves ``<op>/lock`` behind: torch's ``FileBaton`` then makes every later process wait for it forever,
with no message and no CPU (/work/shared/deepspeed_cpu.md, "a stale op-build lock"). So each virtualenv gets its own
folder, and a lock older than any build is refused by name before anything waits on it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..errors import InputError

# A cold build of the slowest op took 76 s on 2 busy cores; ten minutes is far beyond any build in progress.
STALE_LOCK_SECONDS = 600


class StaleBuildLockError(InputError, RuntimeError):
    pass


def build_locks() -> list[Path]:
    """Every op's build ``lock`` in the folder torch builds in: ``$TORCH_EXTENSIONS_DIR/<op>/lock``, else
    ``~/.cache/torch_extensions/<python>_<device>/<op>/lock``."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return sorted(Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/lock"))
    from torch.utils.cpp_extension import get_default_build_root
    return sorted(Path(get_default_build_root()).glob("*/*/lock"))


def use_own_extensions_dir() -> None:
    """Inside a virtualenv, and unless the user chose a folder, build ops under the virtualenv (``<venv>/
    torch_extensions``): one install never waits on, or rebuilds over, another's build. Ranks that a launcher starts
    run this too, so they agree on the folder."""
    if os.environ.get("TORCH_EXTENSIONS_DIR") or sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def check_build_locks(max_age: float = STALE_LOCK_SECONDS) -> None:
    """Refuse, naming the file, when an op's build ``lock`` is older than any build takes."""
    now = time.time()
    for lock in build_locks():
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:      # the build that held it just finished
            continue
        if age > max_age:
            raise StaleBuildLockError(
                f"{lock} is a stale DeepSpeed op-build lock ({age / 60:.0f} min old; a build takes a minute or two): "
                f"a build was killed while it held it, and every multi-rank run would wait on it forever. It is safe "
                f"to delete: rm {lock}")
