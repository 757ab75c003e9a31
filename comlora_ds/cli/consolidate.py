"""Consolidate a ComLoRA training checkpoint: winner as a PEFT adapter, merged HF model, report.

    comlora-consolidate outputs/run/checkpoints --out outputs/run/export
    comlora-consolidate outputs/run --checkpoint best --out outputs/run/export_best
    comlora-consolidate outputs/run/checkpoints/step_00000200 --out export --winner 1 --all-components

(``python launch/consolidate.py ...`` in a checkout.) CHECKPOINT is a run's checkpoints/ folder (the checkpoint its
'latest' names, or with --checkpoint best the one its 'best' names: train.save_best), one step_NNNNNNNN folder, or
the run folder; ZeRO-2 or ZeRO-3, any world size; no GPU and no launcher needed. Writes OUT/adapter (PEFT),
OUT/merged (HF safetensors), OUT/report.json, OUT/report.md, OUT/plots/*.png (and OUT/components/component_K with
--all-components). Exit code 2 with "error: ..." when it refuses; nothing is written then. See docs/export.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ..errors import OneLineArgumentParser

    p = OneLineArgumentParser(prog="comlora-consolidate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoints folder, step_NNNNNNNN folder or run folder")
    p.add_argument("--checkpoint", dest="pointer", choices=("latest", "best"), default="latest",
                   help="of a run or checkpoints folder: the latest checkpoint, or the best validated one")
    p.add_argument("--out", required=True, help="output folder (built beside it, renamed into place at the end)")
    p.add_argument("--winner", type=int, default=None,
                   help="export this component instead of the selector's choice (scores are still reported)")
    p.add_argument("--winner-rule", choices=("selector", "val_loss", "soup"), default="selector",
                   help="what is exported: selector = the selector's winner (the paper's eq. 12; default), val_loss = "
                        "the lowest-validation-loss component, soup = the uniform average of the K components' "
                        "updates (one PEFT LoRA of rank K*r)")
    p.add_argument("--base", default=None, help="base model folder or hub id (default: the run's model.name_or_path)")
    p.add_argument("--all-components", action="store_true", help="also write every component as a PEFT adapter")
    p.add_argument("--no-adapter", action="store_true", help="do not write the winner's PEFT adapter")
    p.add_argument("--no-merged", action="store_true", help="do not write the merged model")
    p.add_argument("--skip-validation", action="store_true",
                   help="do not score the validation split (no full model in memory; needs --winner when K > 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an OUT that holds a different model")
    p.add_argument("--batch-size", type=int, default=None,
                   help="validation batch size (default: the run's micro-batch size)")
    p.add_argument("--device", default=None,
                   help="device for validation scoring (cpu, cuda, cuda:1, ...); default: a GPU when there is one, "
                        "else cpu. Attention: flash-attention 2 on a GPU in bf16/fp16 when flash-attn is installed, "
                        "else sdpa")
    p.add_argument("--score-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="base dtype for scoring; auto: bf16 on a bf16-capable GPU (fp16 on older ones), fp32 on CPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ..errors import run_cli

    return run_cli(lambda: _consolidate(parse_args(argv)))


def _consolidate(args: argparse.Namespace) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")      # zero_to_fp32 needs no accelerator
    from ..export.consolidate import consolidate

    report = consolidate(args.checkpoint, args.out, pointer=args.pointer, winner=args.winner,
                         winner_rule=args.winner_rule, base=args.base,
                         all_components=args.all_components, adapter=not args.no_adapter,
                         merged=not args.no_merged, score=not args.skip_validation, overwrite=args.overwrite,
                         batch_size=args.batch_size, device=args.device, score_dtype=args.score_dtype,
                         log=lambda msg: print(msg, file=sys.stderr, flush=True))
    v = report["validation"]
    print(f"winner: {report['winner'] if report['winner'] == 'soup' else 'component ' + str(report['winner'])} "
          f"(by {report['winner_by']})")
    if v:
        print(f"validation loss per component: {[round(x, 4) for x in v['mean_loss']]}; lowest-loss component "
              f"{v['lowest_loss_component']}; selector winner is lowest-loss: {v['selector_winner_is_lowest_loss']}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
