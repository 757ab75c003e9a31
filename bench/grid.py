"""What the reproduction drivers share: a time budget, subprocess stages that stop resumably when it runs out,
a lock per run folder so several drivers can share one grid, and the chunked run of a grid.

A stage is a command whose output files say it is done; a driver skips finished stages, so it can be stopped at
any time (Ctrl-C, or the budget: the trainer gets SIGTERM and writes a checkpoint) and run again to continue.

A finished run can also be archived (:func:`archive_run`): the numbers its report reads, in the run folder's own
layout, small enough to commit. A grid that takes several sessions keeps its finished rows that way even when the
machine's run folders are lost, and the report reads the archive like the run folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import numbers
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from environment import REPO


class Budget:
    def __init__(self, minutes: float):
        self.deadline = time.time() + 60 * minutes if minutes else None

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def exhausted(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


def run(cmd: list[str], budget: Budget, log: Path) -> bool:
    """Runs cmd (logging to a file); on budget exhaustion sends SIGTERM (the trainer checkpoints). True
    when it finished on its own with exit code 0."""
    print("$", shlex.join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            while proc.poll() is None:
                time.sleep(2)
                if budget.exhausted():
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
                    return False
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")
    return True


@contextlib.contextmanager
def claim(folder: Path):
    """An exclusive lock on one run folder (or the base evaluation) for as long as this driver works on it:
    several drivers over the same --out (one per GPU, or one per core here) then share the grid."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".driver.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"skipping {folder}: another driver is working on it", flush=True)
            yield False
            return
        yield True


def run_chunk(args, run_grid) -> bool:
    """The grid's unfinished work within ``--chunk-minutes`` (all of it without a budget), unless ``--report-only``;
    False (and a message) when the budget ran out first."""
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only or run_grid(args, Budget(args.chunk_minutes)):
        return True
    print("stopped (time budget); run again to continue")
    return False


def stage(cmd: list[str], done: Path, budget: Budget, log: Path) -> bool:
    """Run ``cmd`` unless ``done`` exists; True when ``done`` exists afterwards (False: stopped by the budget, or the
    command finished without writing it, e.g. a trainer stopped by SIGTERM)."""
    if done.exists():
        return True
    run(cmd, budget, log)
    return done.exists()


def component_evaluations(folder: Path) -> list[tuple[str, Path]]:
    """(model to evaluate, results folder) of a consolidated run: the merged winner, and each other component's
    model (written by ``consolidate.py --all-components``)."""
    winner = json.loads((folder / "export" / "report.json").read_text())["winner"]
    jobs = [(str(folder / "export" / "merged"), folder / "eval" / "winner")]
    components = sorted((folder / "export" / "components").glob("component_*"))
    return jobs + [(str(c), folder / "eval" / c.name) for c in components if c.name != f"component_{winner}"]


def display(commands: list[list[str]]) -> list[str]:
    """Commands as a user would type them from the repository root (python, relative paths, ../shared)."""
    shorten = {sys.executable: "python", str(REPO) + "/": "", str(REPO.parent / "shared"): "../shared"}
    texts = [shlex.join(c) for c in commands]
    for long, short in shorten.items():
        texts = [t.replace(long, short) for t in texts]
    return texts


def _numbers_only(row: dict) -> dict:
    """A predictions row without its texts (prompt, reference, reply: the reference is dataset text, which is never
    committed): what the paired tests read."""
    return {key: value for key, value in row.items() if isinstance(value, numbers.Number)}


def _copy_jsonl(source: Path, dest: Path, keep) -> None:
    rows = [keep(json.loads(line)) for line in source.read_text().splitlines() if line.strip()]
    dest.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows if row))


def check_archive_settings(archive: Path, settings: dict) -> None:
    """An archive holds the runs of one grid: its grid.json records the settings of the first run archived, and
    adding runs made with other settings is refused."""
    path = archive / "grid.json"
    if path.exists():
        written = json.loads(path.read_text())
        changed = {k: (written.get(k), v) for k, v in settings.items() if written.get(k) != v}
        if changed:
            raise SystemExit(f"{path}: this archive holds runs with other settings (archived, now: {changed}); "
                             "use another --archive or --tag")
    else:
        archive.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n")


def is_archived(archive: Path | None, folder: Path) -> bool:
    return archive is not None and (archive / folder.name).is_dir()


def _validation_and_diagnostics(record: dict) -> dict | None:
    kept = {key: record[key] for key in ("validation", "selector_diagnostics") if record.get(key)}
    return {"step": record["step"], **kept} if kept else None


def archive_run(folder: Path, dest: Path) -> None:
    """Copy a finished run's numbers to ``dest`` in the run folder's layout: validation.json and the per-row
    validation scores, the validations and selector diagnostics during training (metrics.jsonl), export/report.json
    and every evaluation's results.json and predictions.jsonl (numbers only). Written to a temporary folder and renamed, so an archived
    run is always complete."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("validation.json", "validation_scores.jsonl", "export/report.json", "data/data.json"):
        if (folder / name).exists():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, tmp / name)
    if (folder / "metrics.jsonl").exists():
        _copy_jsonl(folder / "metrics.jsonl", tmp / "metrics.jsonl", _validation_and_diagnostics)
    for results in sorted(folder.glob("eval/**/results.json")):
        out = tmp / results.parent.relative_to(folder)
        out.mkdir(parents=True)
        shutil.copyfile(results, out / "results.json")
        if (results.parent / "predictions.jsonl").exists():
            _copy_jsonl(results.parent / "predictions.jsonl", out / "predictions.jsonl", _numbers_only)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
