"""Run a training launcher so that SIGTERM / SIGUSR1 (preemption, Slurm's --signal) stop the run cleanly.

    python launch/preemptible.py torchrun --nproc_per_node 8 --signals-to-handle SIGINT,SIGHUP,SIGQUIT \
        launch/train.py --deepspeed ds_configs/zero2.json --config my.yaml
    python launch/preemptible.py deepspeed --num_gpus 8 launch/train.py ...

On SIGTERM or SIGUSR1 every rank is sent SIGUSR1 (the launcher never sees it): the ranks agree on a step, write one
checkpoint and exit 0, and so does this command. launch/slurm.sbatch runs it on every node; docs/deepspeed.md has
the details (comlora_ds/checkpointing/preemption.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comlora_ds.checkpointing.preemption import run_launcher  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} LAUNCHER [ARGS...]   (e.g. torchrun ... launch/train.py ...)")
    sys.exit(run_launcher(sys.argv[1:]))
