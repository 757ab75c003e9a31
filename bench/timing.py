"""Timing side by side: every compared step interleaved round after round in one process (the load of a shared
CPU drifts over minutes, so only ratios measured side by side mean something), the quiet-machine wait, verdicts.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch  # noqa: E402

from environment import sync


# ------------------------------------------------------------------------------ interleaved timing
@dataclass
class Timings:
    names: list[str]
    times: dict[str, list[float]]            # every timed step, seconds
    rounds: dict[str, list[float]]           # per round: median step time of that round
    cpu_share: dict[str, list[float]]        # per timed step: CPU time / (wall * threads), relative to warm-up
    waited: float = 0.0                      # seconds spent waiting for other processes to go quiet
    redone: int = 0                          # steps re-run because another process interrupted them
    clock: str = "wall"

    def min(self, name: str) -> float:
        return min(self.times[name])

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def paired_ratio(self, name: str, ref: str, scale: float = 1.0) -> float:
        """Median over rounds of (this round's time / (scale * the reference's time in the same round))."""
        return statistics.median(a / (scale * b) for a, b in zip(self.rounds[name], self.rounds[ref]))

    def ratios(self, name: str, ref: str, scale: float = 1.0) -> tuple[float, float, float]:
        """(ratio of minima, ratio of medians, median of per-round ratios) against scale * ref."""
        return (self.min(name) / (scale * self.min(ref)), self.median(name) / (scale * self.median(ref)),
                self.paired_ratio(name, ref, scale))

    def contended(self) -> float:
        """Fraction of timed CPU steps that got < 85% of the CPU share of an undisturbed warm-up step."""
        shares = [s for v in self.cpu_share.values() for s in v]
        return sum(s < 0.85 for s in shares) / len(shares) if shares else 0.0

    def noise_note(self) -> str:
        spread = max((max(t) - min(t)) / statistics.median(t) for t in self.times.values())
        note = f"largest (max - min) / median spread of one variant: {spread:.0%}"
        if not torch.cuda.is_available() and self.clock == "wall":
            note += (f"; {self.contended():.0%} of the kept steps got < 85% of the CPU share of an undisturbed "
                     f"step; {self.redone} interrupted steps were redone and {self.waited:.0f} s spent "
                     f"waiting for other processes to leave the cores idle")
        return note


def _cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]                      # idle + iowait
    return sum(v[:8]) - idle, sum(v[:8])


def other_load(window: float = 0.3) -> float:
    """Cores kept busy by other processes over ``window`` seconds while this one sleeps (CPU only)."""
    time.sleep(0.05)                        # let this process's OpenMP workers stop spinning
    b0, t0 = _cpu_ticks()
    time.sleep(window)
    b1, t1 = _cpu_ticks()
    return (b1 - b0) / max(t1 - t0, 1) * os.cpu_count()


def wait_quiet(threshold: float = 0.3, max_wait: float = 60.0) -> float:
    """On a shared CPU, wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores.
    Returns the seconds waited. No-op on GPU."""
    if torch.cuda.is_available():
        return 0.0
    start = time.perf_counter()
    while other_load() >= threshold and time.perf_counter() - start < max_wait:
        time.sleep(1.0)
    return time.perf_counter() - start


def add_timing_args(p) -> None:
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: all cores)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: wall-clock step time (GPU: always). cpu: the process's CPU time, with --threads 1 "
                        "immune to other processes time-slicing the cores (a cost measure, not a latency)")


def timing_setup(args) -> str:
    """Applies --threads/--clock; returns a sentence describing the clock for the report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        args.clock = "wall"
        return "wall-clock, CUDA synchronised"
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            raise SystemExit("--clock cpu needs --threads 1 (with more threads, OpenMP spin-waits count as CPU time)")
        return ("process CPU time with 1 thread (--clock cpu --threads 1): the cost of the step, unaffected by other "
                "processes time-slicing the shared cores")
    return f"wall-clock, {torch.get_num_threads()} threads"


def interleaved(steps: dict[str, Callable[[], None]], rounds: int = 3, steps_per_round: int = 1,
                warmup: int = 1, log: Callable[[str], None] = print, seed: int = 0, quiet: bool = True,
                retries: int = 2, clock: str = "wall") -> Timings:
    """Warm every variant up, then ``rounds`` rounds; each round runs every variant ``steps_per_round``
    times, in a fresh random order (so no variant always follows the same neighbour).

    CPU only, with ``quiet``: before each variant's turn wait until other processes leave the cores
    idle (``wait_quiet``), and redo a step (at most ``retries`` times) that got < 85% of its threads'
    CPU time, i.e. that another process interrupted. The same rule applies to every variant.
    ``clock="cpu"`` (CPU, 1 thread) records the process CPU time instead, and needs neither."""
    if clock == "cpu":
        quiet = False
    names = list(steps)
    threads = torch.get_num_threads()
    cpu = not torch.cuda.is_available()
    expected = {}                           # CPU share of an undisturbed step (small ops use < all threads)
    for name in names:
        for i in range(warmup):
            if quiet and cpu and i == warmup - 1:
                wait_quiet()
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            expected[name] = (time.process_time() - c0) / ((time.perf_counter() - t0) * threads)
    sync()
    times = {n: [] for n in names}
    per_round = {n: [] for n in names}
    shares = {n: [] for n in names}
    rng = random.Random(seed)
    waited, redone = 0.0, 0
    for r in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if quiet and cpu:
                waited += wait_quiet()
            this = []
            for _ in range(steps_per_round):
                for attempt in range(retries + 1):
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    steps[name]()
                    sync()
                    wall, used = time.perf_counter() - t0, time.process_time() - c0
                    share = used / (wall * threads) / expected.get(name, 1.0)
                    if clock == "cpu":
                        wall = used
                    if not (quiet and cpu and share < 0.85 and attempt < retries):
                        break
                    redone += 1
                this.append(wall)
                if cpu:
                    shares[name].append(share)
            times[name] += this
            per_round[name].append(statistics.median(this))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {per_round[n][-1]:.3f}s" for n in names))
    return Timings(names, times, per_round, shares, waited, redone, clock)


# --------------------------------------------------------------------------------------- reports
def verdict(ratios: tuple[float, ...], target: float, tolerance: float = 0.01) -> str:
    """'met' when every estimate (e.g. ratio of minima and paired ratio) is <= target; 'met within noise'
    when they exceed it by at most ``tolerance`` (relative); else 'NOT met'."""
    worst = max(ratios)
    if worst <= target:
        return "met"
    return "met within noise (+1%)" if worst <= target * (1 + tolerance) else "NOT met"
