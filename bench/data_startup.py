"""Time to the first optimizer step with N ranks: every rank tokenising (data.cache=false, what every run did before
the tokenise-once cache), the cache built by rank 0 (a new key), and the cache read (the second run).

Each run is the real CLI, ``torchrun --nproc_per_node N launch/train.py --deepspeed ds_configs/zero2.json``, on
the real LLM-Adapters training rows of ../shared/data/commonsense/train (17,754 rows) with SmolLM2-135M. The clock
starts when torchrun is started and stops when ``metrics.jsonl`` has its first line (written right after optimizer
step 1); the run is then stopped. Peak resident memory (VmHWM) of each rank process is read at that moment. The three
settings run interleaved, ``--repeats`` times each; the medians are reported.

    python bench/data_startup.py                 # 2 ranks, 2 repeats
    python bench/data_startup.py --doc           # also write the docs/benchmarks.md section
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import REPO, SHARED_DATA  # noqa: E402
from launching import cpu_training_env  # noqa: E402
from peak_memory import proc_memory  # noqa: E402
from reports import provenance, publish, table  # noqa: E402

SECTION = "Data start-up: tokenise once"
INTRO = """\
Script: `bench/data_startup.py`. Seconds from starting `torchrun` to the first optimizer step's line in
`metrics.jsonl`, with the real CLI and shipped ZeRO-2 config, on the 17,754 LLM-Adapters commonsense training rows
of ../shared/data (SmolLM2-135M tokenizer, max_length 256). "every rank tokenises" is `data.cache=false` (the path
every run took before the cache); "rank 0 builds the cache" is a first run with the cache on (a new key: the other
ranks wait, then memory-map it); "cache read" is the next run with the same data and settings. Peak RSS is each rank
process's VmHWM at the first step."""
CASES = {"every rank tokenises": "off", "rank 0 builds the cache": "cold", "cache read": "warm"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--doc", action="store_true", help="write the docs/benchmarks.md section")
    return p.parse_args(argv)


def _peak_rss_mib(pid: int) -> float:
    try:
        return proc_memory(pid)["VmHWM"] / 2**20
    except (OSError, KeyError):
        return float("nan")


def _rank_pids(root: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(root).children(recursive=True)
            if "launch/train.py" in " ".join(c.cmdline())]


def one_run(args, work: Path, case: str, cache_dir: Path, port: int) -> tuple[float, list[float]]:
    out = work / f"run_{case}_{time.monotonic_ns()}"
    files = sorted(str(p) for p in (SHARED_DATA / "commonsense" / "train").glob("*.json"))
    overrides = [f"model.name_or_path={args.model}", f"data.train_files=[{','.join(files)}]", "data.max_length=256",
                 "data.val_size=0", "train.max_steps=50", "train.save_steps=1000", "train.micro_batch_size=2",
                 "adapter.num_components=2", "logging.wandb_mode=disabled", f"train.output_dir={out}",
                 f"data.cache={'false' if case == 'off' else 'true'}", f"data.cache_dir={cache_dir}"]
    env = cpu_training_env()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nprocs}",
                             f"--master_port={port}", str(REPO / "launch" / "train.py"), "--deepspeed",
                             str(REPO / "ds_configs" / "zero2.json"), *overrides], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    try:
        while not (metrics.is_file() and metrics.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"{case}: the run ended before its first step:\n{proc.stderr.read()[-3000:]}")
            if time.perf_counter() - start > args.timeout:
                raise RuntimeError(f"{case}: no first step after {args.timeout} s")
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        rss = [_peak_rss_mib(pid) for pid in _rank_pids(proc.pid)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)
    return seconds, rss


def main(argv=None) -> None:
    import socket

    args = parse_args(argv)
    if not (SHARED_DATA / "commonsense" / "train").is_dir():
        sys.exit(f"needs {SHARED_DATA}/commonsense/train (the LLM-Adapters training rows)")
    results: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for repeat in range(args.repeats):
            cache_dir = work / f"cache_{repeat}"          # a new key for every "cold" run
            for name, case in CASES.items():
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                seconds, rss = one_run(args, work, case, cache_dir, port)
                results[name].append((seconds, rss))
                print(f"repeat {repeat}: {name}: {seconds:.1f} s to the first step, peak RSS per rank "
                      f"{', '.join(f'{r:.0f}' for r in rss)} MiB", flush=True)
    base = statistics.median(s for s, _ in results["every rank tokenises"])
    rows = []
    for name, runs in results.items():
        median = statistics.median(s for s, _ in runs)
        rss = statistics.median(max(r) for _, r in runs)
        rows.append([name, f"{median:.1f}", f"{base / median:.2f}x", f"{rss:.0f}",
                     ", ".join(f"{s:.1f}" for s, _ in runs)])
    body = (provenance() + f" {args.nprocs} ranks, {args.repeats} repeats interleaved.\n\n"
            + table(["data path", "median s to step 1", "speed-up vs every rank", "peak RSS of the largest rank (MiB)",
                     "each run (s)"], rows))
    publish(SECTION, INTRO, f"{args.nprocs} ranks, {args.model}", body, args.doc)


if __name__ == "__main__":
    main()
