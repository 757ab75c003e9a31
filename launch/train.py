"""Train ComLoRA / LoRA / LoRA-Pro / LoRA-Dash with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/zero2.json --config my.yaml adapter.rank=16
    python launch/train.py                      # the embedded demo: SmolLM2-135M on built-in SST-2 rows

Without --config the demo preset launch/configs/demo.yaml is used. Overrides are dotted keys
(``adapter.rank=16`` or ``--adapter.rank 16``); see docs/configuration.md for every field.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from comlora_ds.config import load_config  # noqa: E402
from comlora_ds.data.formats import check_data_files  # noqa: E402
from comlora_ds.errors import run_cli  # noqa: E402
from comlora_ds.methods import method_class  # noqa: E402


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"), help="DeepSpeed JSON config")
    parser.add_argument("--config", default=None, help="run config YAML (default: launch/configs/demo.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _train(argv))


def _train(argv: list[str] | None) -> int:
    args, overrides = parse_args(argv)
    # validated before the heavy imports: a bad value fails in about a second
    cfg = load_config(args.config or REPO / "launch" / "configs" / "demo.yaml", overrides)
    check_data_files(cfg.data)
    method_class(cfg.adapter.method)
    from comlora_ds.engine import Trainer

    trainer = Trainer(cfg, args.deepspeed)
    result = trainer.train()
    trainer.close()
    if result.checkpoint is not None and trainer.rank == 0:
        print(f"checkpoint: {result.checkpoint}\nnext: python launch/consolidate.py {result.checkpoint.parent} "
              f"--out {result.output_dir / 'export'}")
    return 0


if __name__ == "__main__":
    code = main()
    if code == 0:   # a finished run (the engine is imported): leave without interpreter finalization
        from comlora_ds.engine import exit_process

        exit_process(code)
    sys.exit(code)
