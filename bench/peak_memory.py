"""Peak memory of this process: CUDA's max_memory_allocated, or the resident set's high-water mark (VmHWM) on
the CPU, reset between measurements; sizes in MiB / GiB.
"""

from __future__ import annotations

from pathlib import Path

import torch

import environment  # noqa: F401  (before any DeepSpeed import: its CPU accelerator)


# ------------------------------------------------------------------------------------ peak memory
def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """The kB fields of ``/proc/<pid>/status`` (VmRSS, VmHWM, RssAnon, RssFile, ...) in bytes."""
    fields = (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(value.split()[0]) * 1024 for name, value in fields if value.strip().endswith("kB")}


def _vm(field_name: str) -> int:
    return proc_memory().get(field_name, 0)


def reset_peak() -> int:
    """Reset the peak counter; returns the current footprint (bytes) the peak is measured against."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:      # 5: reset VmHWM to the current RSS
            f.write("5")
    except OSError:
        pass
    return _vm("VmRSS")


def peak() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _vm("VmHWM")


def memory_kind() -> str:
    return "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM)"


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def mib(n: float) -> float:
    return n / 2 ** 20
