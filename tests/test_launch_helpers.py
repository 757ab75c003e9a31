"""The suite's launcher helper kills a timed-out launcher together with the processes it started (torchrun's ranks
used to be orphaned and keep running after the test's timeout killed torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers import run_in_group

CHILD = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
        "print(p.pid, flush=True); time.sleep(60)"


def test_a_timeout_kills_the_launcher_and_its_children(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_in_group([sys.executable, "-c", CHILD], timeout=3)
    child = int(info.value.output.split()[0])
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{child}") and \
            open(f"/proc/{child}/stat").read().split()[2] != "Z":
        time.sleep(0.1)
    alive = os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z"
    assert not alive, "the launcher's child outlived the timeout"


def test_a_finished_command_returns_like_subprocess_run():
    done = run_in_group([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                        timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
