"""Writing results: the machine and date, markdown tables, the command line, and docs/benchmarks.md, where each
script rewrites only its own section (and inside it only its configuration's block).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch  # noqa: E402

from environment import REPO

DOC = REPO / "docs" / "benchmarks.md"


DOC_HEADER = ("# Benchmarks\n\nMeasured numbers of comlora_ds. Each section names its script, the exact command, "
              "the machine and the date; rerun the command to refresh it.\n")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible), torch {torch.__version__}"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB, no GPU, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def today() -> str:
    return datetime.date.today().isoformat()


def table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO))] + sys.argv[1:])


def provenance() -> str:
    """The opening of a docs/benchmarks.md section: machine, date and the command that rewrites it."""
    return f"{machine()}, {today()}. `{command_line().replace(' --doc', '')} --doc`."


def update_doc_section(title: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the ``## title`` section of docs/benchmarks.md, leaving every other section
    as it is in the file right now (another script may own them)."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else DOC_HEADER
    heading = f"## {title}"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    new = [heading, "", *body.strip().splitlines(), ""]
    if start is None:
        lines = lines + ([""] if lines and lines[-1].strip() else []) + new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + new + lines[end:]
    doc.write_text("\n".join(lines).rstrip() + "\n")


def publish(section: str, intro: str, sub: str, body: str, write: bool) -> None:
    """Print a result block; with ``write`` (the scripts' --doc) also put it into docs/benchmarks.md."""
    print(f"\n### {sub}\n\n{body}")
    if write:
        update_doc_subsection(section, intro, sub, body)


def update_doc_subsection(section: str, intro: str, sub: str, body: str, doc: Path = DOC) -> None:
    """Replace (or add) the ``### sub`` block inside the ``## section`` section (created with ``intro``
    if absent); other ### blocks of the section, e.g. other models' runs, stay."""
    text = doc.read_text() if doc.exists() else DOC_HEADER
    lines = text.splitlines()
    heading = f"## {section}"
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        current = intro.strip().splitlines()
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        current = lines[start + 2:end]
    sub_heading = f"### {sub}"
    i = next((j for j, line in enumerate(current) if line.strip() == sub_heading), None)
    block = [sub_heading, "", *body.strip().splitlines(), ""]
    if i is None:
        current = [*current, *([""] if current and current[-1].strip() else []), *block]
    else:
        end = next((j for j in range(i + 1, len(current)) if current[j].startswith("### ")), len(current))
        current = current[:i] + block + current[end:]
    update_doc_section(section, "\n".join(current), doc)
