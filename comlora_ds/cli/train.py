"""Train ComLoRA / LoRA / LoRA-Pro / LoRA-Dash with DeepSpeed.

    deepspeed --num_gpus 8 $(which comlora-train) --deepspeed zero2 --config my.yaml adapter.rank=16
    deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/zero2.json --config my.yaml   # in a checkout
    torchrun --nproc_per_node 2 --no-python comlora-train --deepspeed zero3 --config my.yaml
    comlora-train                               # the embedded demo: SmolLM2-135M on built-in SST-2 rows

--deepspeed and --config take a path or the name of a shipped file (zero2, zero3, zero3_offload; demo,
demo_commonsense, llama2_7b_commonsense, llama3_8b_commonsense); without --config the demo preset is used.
Overrides are dotted keys (``adapter.rank=16`` or ``--adapter.rank 16``); see docs/configuration.md for every field.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..checkpointing.checkpoint import check_start
from ..config import load_config
from ..data.formats import check_data_files
from ..errors import run_cli
from ..methods import method_class
from ..presets import ds_config_path, run_config_path
from ..training.ds_config import load_ds_config


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="comlora-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", default="zero2", help="DeepSpeed JSON config: a path or a shipped name")
    parser.add_argument("--config", default="demo", help="run config YAML: a path or a shipped name")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _train(argv))


def _train(argv: list[str] | None) -> int:
    args, overrides = parse_args(argv)
    # validated before the heavy imports: a bad value fails in about a second
    ds_config = load_ds_config(ds_config_path(args.deepspeed))
    cfg = load_config(run_config_path(args.config), overrides)
    check_data_files(cfg.data)
    method_class(cfg.adapter.method)
    check_start(cfg, int(os.environ.get("WORLD_SIZE", 1)))     # the Trainer repeats it, for library callers
    from ..training.engine import Trainer

    trainer = Trainer(cfg, ds_config)
    result = trainer.train()
    trainer.close()
    if result.checkpoint is not None and trainer.rank == 0:
        print(f"checkpoint: {result.checkpoint}\nnext: comlora-consolidate {result.checkpoint.parent} "
              f"--out {result.output_dir / 'export'}")
    return 0


def run() -> None:
    """The console script: a finished run (the engine is imported) leaves without interpreter finalization."""
    code = main()
    if code == 0:
        from ..training.engine import exit_process

        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
