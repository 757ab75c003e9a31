"""Reproduce the paper's commonsense comparison at a scale this machine can run: ComLoRA vs LoRA.

    python bench/reproduce_commonsense.py --out outputs/repro              # everything, resumable
    python bench/reproduce_commonsense.py --out outputs/repro --chunk-minutes 40   # stop after ~40 min
    python bench/reproduce_commonsense.py --out outputs/repro --report docs/results.md

Trains each variant x seed (default: LoRA r=8, LoRA r=16, ComLoRA K=2 r=8 with exponential annealing,
top-N = K, noise 0.1) on the LLM-Adapters commonsense training rows with the paper's 120-row
validation split, consolidates the ZeRO checkpoint (every ComLoRA component as its own adapter too),
evaluates the merged winner and each component on the LLM-Adapters test sets, and writes a results
page (paper Table 3 and Table 10 shaped). A sweep (``--tag lr1e-4 --lr 1e-4``, ``--tag sel192 --extra ...``)
gets its own run folders and its own section of the same page; each run of the report rewrites only its own
section and keeps the hand-written ``## Notes`` at the end.

Every stage is skipped when its output exists, and training resumes from its last checkpoint: the
script can be stopped at any time (Ctrl-C, or --chunk-minutes sends the trainer SIGTERM, which writes
a checkpoint) and run again to continue. Several drivers may run at once over the same --out (e.g. one
per GPU with CUDA_VISIBLE_DEVICES, or two single-thread drivers on a small CPU box): each run folder is
locked by the driver working on it and the others move on to the next one. The same script takes a larger model and the full
commonsense_170k on GPUs, e.g.

    python bench/reproduce_commonsense.py --out runs/llama3 --model meta-llama/Meta-Llama-3-8B \\
        --train-files commonsense_170k.json --epochs 3 --max-steps 0 --micro-batch 4 --lr 1e-4 \\
        --launcher "deepspeed --num_gpus 8" --ds-config ds_configs/zero2.json --test-dir dataset --eval-limit 0
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from grid import REPO, Budget, claim, component_evaluations, display, run_chunk, stage

SHARED = REPO.parent / "shared" / "data" / "commonsense"
TRAIN_TASKS = ("boolq", "ARC-Challenge", "ARC-Easy", "openbookqa")
TEST_TASKS = ("boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa")
VARIANTS = {
    "lora_r8": ["adapter.num_components=1", "adapter.rank=8", "adapter.alpha=16"],
    "lora_r16": ["adapter.num_components=1", "adapter.rank=16", "adapter.alpha=32"],
    "comlora_k2_r8": ["adapter.num_components=2", "adapter.rank=8", "adapter.alpha=16",
                      "comlora.annealing=exponential", "comlora.noise=0.1"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train-files", nargs="+", default=[str(SHARED / "train" / f"{t}.json") for t in TRAIN_TASKS])
    p.add_argument("--test-dir", default=str(SHARED / "test"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--max-steps", type=int, default=500, help="0: use --epochs")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--extra", nargs="*", default=[], help="more run-config overrides for every variant")
    p.add_argument("--tag", default="", help="suffix of the run folders (for sweeps: --tag lr1e-4)")
    p.add_argument("--launcher", default=f"{sys.executable}", help="e.g. 'deepspeed --num_gpus 8'")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--eval-limit", type=int, default=200, help="first N test rows per task; 0 = all")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--chunk-minutes", type=float, default=0, help="stop (resumably) after this long; 0 = never")
    p.add_argument("--report", type=Path, help="write the results page here (e.g. docs/results.md)")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args()


def run_dir(args, variant: str, seed: int) -> Path:
    return args.out / f"{variant}{'-' + args.tag if args.tag else ''}-seed{seed}"


def train_command(args, variant: str, seed: int) -> list[str]:
    steps = [f"train.max_steps={args.max_steps}"] if args.max_steps else [f"train.num_epochs={args.epochs}"]
    overrides = [f"model.name_or_path={args.model}", f"data.train_files=[{','.join(args.train_files)}]",
                 f"data.max_length={args.max_length}", "data.val_size=120", "data.seed=42", f"train.seed={seed}",
                 f"train.output_dir={run_dir(args, variant, seed)}", f"train.micro_batch_size={args.micro_batch}",
                 f"train.gradient_accumulation_steps={args.grad_accum}", f"train.learning_rate={args.lr}",
                 "train.lr_scheduler=linear", "train.warmup_ratio=0.03", "train.save_steps=50",
                 "train.save_total_limit=1", "train.resume=auto", "logging.wandb_mode=offline",
                 "logging.winner_window=25", *steps, *VARIANTS[variant], *args.extra]
    return [*shlex.split(args.launcher), str(REPO / "launch" / "train.py"), "--deepspeed", args.ds_config, *overrides]


def train(args, variant: str, seed: int, budget: Budget) -> bool:
    folder = run_dir(args, variant, seed)
    return stage(train_command(args, variant, seed), folder / "validation.json", budget,
                 folder.parent / "logs" / f"{folder.name}.train.log")


def consolidate_command(args, variant: str, seed: int) -> list[str]:
    folder = run_dir(args, variant, seed)
    return [sys.executable, str(REPO / "launch" / "consolidate.py"), str(folder / "checkpoints"), "--out",
            str(folder / "export"), "--all-components", "--no-adapter"]


def consolidate(args, variant: str, seed: int, budget: Budget) -> bool:
    folder = run_dir(args, variant, seed)
    return stage(consolidate_command(args, variant, seed), folder / "export" / "report.json", budget,
                 folder.parent / "logs" / f"{folder.name}.consolidate.log")


def evaluate_command(args, model: str, out: Path, choice: bool = False) -> list[str]:
    cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), model, "--task", "commonsense", "--data",
           args.test_dir, "--tasks", ",".join(TEST_TASKS), "--batch-size", str(args.eval_batch),
           "--max-new-tokens", "16", "--out", str(out), "--no-progress", "--predictions"]
    if args.eval_limit:
        cmd += ["--limit", str(args.eval_limit)]
    return cmd + (["--choice"] if choice else [])


def evaluate(args, model: str, out: Path, budget: Budget, choice: bool = False) -> bool:
    return stage(evaluate_command(args, model, out, choice), out / "results.json", budget,
                 args.out / "logs" / f"{'.'.join(out.relative_to(args.out).parts)}.log")


def example_commands(args) -> list[str]:
    """What the driver runs for each variant's first seed (the results page quotes them)."""
    seed = args.seeds[0]
    commands = [evaluate_command(args, args.model, args.out / "base" / "eval", choice=True)]
    for variant in args.variants:
        folder = run_dir(args, variant, seed)
        commands += [train_command(args, variant, seed), consolidate_command(args, variant, seed),
                     evaluate_command(args, str(folder / "export" / "merged"), folder / "eval" / "winner")]
        if variant.startswith("comlora"):
            component = folder / "export" / "components" / "component_<k>"
            commands.append(evaluate_command(args, str(component), folder / "eval" / "component_<k>"))
    return display(commands)


def run_grid(args, budget: Budget) -> bool:
    """Every stage not done yet, in order; False when the time budget ran out."""
    with claim(args.out / "base") as mine:
        if mine and not evaluate(args, args.model, args.out / "base" / "eval", budget, choice=True):
            return False
    for seed in args.seeds:
        for variant in args.variants:
            with claim(run_dir(args, variant, seed)) as mine:
                if not mine:
                    continue
                if not (train(args, variant, seed, budget) and consolidate(args, variant, seed, budget)):
                    return False
                for model, out in component_evaluations(run_dir(args, variant, seed)):
                    if not evaluate(args, model, out, budget):
                        return False
    return True


def main() -> None:
    args = parse_args()
    if not run_chunk(args, run_grid):
        return
    if args.report:
        from reproduce_report import write_report

        write_report(args, VARIANTS, TEST_TASKS, run_dir, example_commands(args))
        print(f"wrote {args.report}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
