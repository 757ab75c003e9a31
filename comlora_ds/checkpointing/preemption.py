"""Preemption: a stop signal goes to the training ranks, never to the launcher between them.

torchrun (torch 2.13) and the deepspeed launcher (0.19.8) both turn a SIGTERM into a failed job: torchrun forwards it,
waits ``--shutdown-timeout`` (30 s by default), SIGKILLs what is left and exits 1 whatever the ranks returned;
DeepSpeed's ``launch.py`` terminates the process tree (SIGKILL after a fixed 30 s) and exits 1. Neither handles SIGUSR1,
whose default action kills the launcher and orphans the ranks. A run that stopped cleanly is then reported as failed.

:func:`run_launcher` starts the launcher with SIGTERM and SIGUSR1 ignored (inherited by every process it starts; the
ranks install their own handlers, ``Trainer.train``), and on SIGTERM or SIGUSR1 sends SIGUSR1 to every descendant that
catches SIGUSR1 (the ``SigCgt`` mask of ``/proc/PID/status``, so Linux only): the ranks, and never a launcher or a
helper process that would die of it. A rank still loading its model catches nothing yet; it is signalled as soon as it
does. The ranks agree on the step to stop after (one all-reduce), write one checkpoint and exit 0, so the launcher and
this process exit 0 too. The grace period is the scheduler's (Slurm's ``--signal`` lead time, its preemption
GraceTime): no launcher timer starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RANK_STOP_SIGNAL = signal.SIGUSR1


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (False once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def run_launcher(command: list[str], poll_seconds: float = 0.2) -> int:
    """Runs ``command`` (torchrun / deepspeed ... launch/train.py ...) to the end; returns its exit code."""
    requested: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: None)      # Ctrl-C reaches the launcher through the terminal
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: requested.append(signum))
    launcher = subprocess.Popen(command, preexec_fn=_ignore_stop_signals)
    told: set[int] = set()
    while launcher.poll() is None:
        if requested:
            try:
                family = psutil.Process(launcher.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                family = []
            for process in family:
                if process.pid not in told and catches(process.pid, RANK_STOP_SIGNAL):
                    os.kill(process.pid, RANK_STOP_SIGNAL)
                    told.add(process.pid)
                    print(f"preemptible: {signal.Signals(requested[0]).name} received; asked process {process.pid} "
                          f"to checkpoint and stop", file=sys.stderr, flush=True)
        time.sleep(poll_seconds)
    code = launcher.returncode
    return code if code >= 0 else 128 - code
