"""Test-only fault injection, loaded through PYTHONPATH by tests/test_reliability.py (never by the
library). Each fault is switched on by an environment variable:

COMLORA_TEST_KILL_IN_CHECKPOINT="STEP:RANK"  that rank SIGKILLs itself right after DeepSpeed wrote its
                                             files of the step-STEP checkpoint, before it is published.
COMLORA_TEST_NAN_AT_FORWARD="N:K"            the N-th training forward (1-based) returns NaN losses
                                             for component K.
COMLORA_TEST_FILL_DISK_AFTER="STEP"          after the step-STEP checkpoint is published, a ballast
                                             file leaves 4 MiB free on the checkpoint filesystem.
"""

import os
import signal
import sys


def _kill_in_checkpoint(spec):
    import deepspeed

    step, rank = (int(x) for x in spec.split(":"))
    original = deepspeed.DeepSpeedEngine.save_checkpoint

    def save_then_die(self, save_dir, tag=None, *args, **kwargs):
        result = original(self, save_dir, tag, *args, **kwargs)
        if str(tag).endswith(f"step_{step:08d}") and int(os.environ.get("RANK", 0)) == rank:
            print(f"fault injected: rank {rank} killed inside checkpoint {tag}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    deepspeed.DeepSpeedEngine.save_checkpoint = save_then_die


def _nan_at_forward(spec):
    import torch

    from comlora_ds.comlora import model

    call, component = (int(x) for x in spec.split(":"))
    original, count = model.response_nll, [0]

    def poisoned(hidden, labels, lm_head, chunk_size=1024, segment_ids=None):
        losses = original(hidden, labels, lm_head, chunk_size, segment_ids)
        if torch.is_grad_enabled():
            count[0] += 1
            if count[0] == call:
                rows = losses.shape[0] // 2        # the K = 2 replicated batch: component-major halves
                mask = torch.zeros_like(losses)
                mask[component * rows:(component + 1) * rows] = float("nan")
                losses = losses + mask
        return losses

    model.response_nll = poisoned


def _fill_disk_after(spec):
    import shutil
    from pathlib import Path

    from comlora_ds.checkpointing import checkpoint

    step, original = int(spec), checkpoint.save_checkpoint

    def save_then_fill(engine, save_dir, at_step, *args, **kwargs):
        folder = original(engine, save_dir, at_step, *args, **kwargs)
        if at_step == step and int(os.environ.get("RANK", 0)) == 0:
            ballast = Path(save_dir).parent.parent / "ballast"
            ballast.write_bytes(b"\0" * (shutil.disk_usage(save_dir).free - 4 * 2**20))
        return folder

    checkpoint.save_checkpoint = save_then_fill


for _name, _inject in (("COMLORA_TEST_KILL_IN_CHECKPOINT", _kill_in_checkpoint),
                       ("COMLORA_TEST_NAN_AT_FORWARD", _nan_at_forward),
                       ("COMLORA_TEST_FILL_DISK_AFTER", _fill_disk_after)):
    if os.environ.get(_name):
        _inject(os.environ[_name])
