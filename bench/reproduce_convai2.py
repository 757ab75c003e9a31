"""Reproduce the paper's ConvAI2 comparison (Table 4) at a scale this machine can run: ComLoRA vs LoRA vs best-of-K.

    python bench/reproduce_convai2.py --out outputs/convai2                       # everything, resumable
    python bench/reproduce_convai2.py --out outputs/convai2 --chunk-minutes 40    # stop after ~40 min
    python bench/reproduce_convai2.py --out outputs/convai2 --report docs/results.md

Data: the ParlAI ConvAI2 self-persona file in ../shared/data/convai2 (dialogues 0-799 in two parts). Training rows
come from dialogues 0-699 (``comlora_ds.evaluation.convai2.training_rows``: persona + the last --max-history
dialogue lines as the prompt, the self response as the target), the validation split for winner selection is
--val-size of those rows, and the test set is dialogues 700-799, each cut to its first --test-turns turns (a
dialogue's first turns are exactly the examples the whole dialogue gives for them, so the cut file is valid
ParlAI text), written to <out>/data/. Every variant and seed sees the same rows in the same order (data.seed 42).

Each variant x seed (default LoRA r=4, LoRA r=8, ComLoRA K=2 r=4; also lora_r16, comlora_k2_r8) trains under
DeepSpeed (validating every --eval-steps: the components' divergence over training), is consolidated (every ComLoRA
component as its own model too, and the soup of the K components: ``--winner-rule soup``) and evaluated on the test
dialogues: BLEU, METEOR, ROUGE-L, BERTScore of greedy replies and the reference responses' NLL. The untouched base
is evaluated the same way. The report (bench/reproduce_convai2_report.py) adds best-of-K LoRA (K independent LoRA
runs, the lowest validation loss kept), ComLoRA under each winner rule (selector, val_loss, soup), paired tests over
the test examples, the paper's Table 10 view and the divergence over training. ``--train-only`` trains and stops
(the other stages run on a later call), e.g. to keep both cores on training. A finished run keeps only what the
report reads (validation.json, export/report.json, eval/) and its checkpoint; its merged
models are deleted unless --keep-models.

Every stage is skipped when its output exists and training resumes from its last checkpoint, so the script can be
stopped at any time and run again; several drivers may share one --out (each run folder is locked), e.g. one per
core: ``OMP_NUM_THREADS=1 python bench/reproduce_convai2.py --out X &`` twice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
from pathlib import Path

from grid import (REPO, Budget, archive_run, check_archive_settings, claim, component_evaluations, display,
                  is_archived, run_chunk, stage)

SHARED = REPO.parent / "shared" / "data" / "convai2"
PARTS = ("valid_self_original_no_cands.dialogues_0000-0199.txt", "valid_self_original_no_cands.dialogues_0200-0799.txt")
VARIANTS = {
    "lora_r4": ["adapter.num_components=1", "adapter.rank=4", "adapter.alpha=8"],
    "lora_r8": ["adapter.num_components=1", "adapter.rank=8", "adapter.alpha=16"],
    "lora_r16": ["adapter.num_components=1", "adapter.rank=16", "adapter.alpha=32"],
    "comlora_k2_r4": ["adapter.num_components=2", "adapter.rank=4", "adapter.alpha=8",
                      "comlora.annealing=exponential", "comlora.noise=0.1"],
    "comlora_k2_r8": ["adapter.num_components=2", "adapter.rank=8", "adapter.alpha=16",
                      "comlora.annealing=exponential", "comlora.noise=0.1"],
}
DEFAULT_VARIANTS = ["lora_r4", "lora_r8", "comlora_k2_r4"]


def _span(text: str) -> tuple[int, int]:
    start, _, end = text.partition(":")
    return int(start), int(end)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--files", nargs="+", default=[str(SHARED / name) for name in PARTS],
                   help="ParlAI self-persona files, read in order as one dialogue list")
    p.add_argument("--train-dialogues", type=_span, default=(0, 700), help="START:END (Python slice)")
    p.add_argument("--test-dialogues", type=_span, default=(700, 800), help="START:END (Python slice)")
    p.add_argument("--test-turns", type=int, default=2, help="first N turns of each test dialogue; 0 = all")
    p.add_argument("--max-history", type=int, default=1, help="dialogue lines in the prompt (training and test)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--eval-steps", type=int, default=0,
                   help="validate every N steps during training (divergence over training in metrics.jsonl); 0 = off")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--val-size", type=int, default=60)
    p.add_argument("--extra", nargs="*", default=[], help="more run-config overrides for every variant")
    p.add_argument("--tag", default="convai2", help="run-folder suffix and results-page section")
    p.add_argument("--launcher", default=f"{sys.executable}", help="e.g. 'deepspeed --num_gpus 8'")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--bertscore-model", help="local BERTScore model folder (default: the offline MiniLM)")
    p.add_argument("--bertscore-layers", type=int)
    p.add_argument("--keep-models", action="store_true",
                   help="keep each run's merged models after its evaluations (default: delete them; the checkpoint "
                        "stays, so a run can be consolidated again)")
    p.add_argument("--chunk-minutes", type=float, default=0, help="stop (resumably) after this long; 0 = never")
    p.add_argument("--train-only", action="store_true",
                   help="only train (no consolidation or evaluation yet); a later run without it does the rest")
    p.add_argument("--archive", type=Path,
                   help="copy each finished run's numbers here (small, committable: e.g. docs/runs/<tag>); a run "
                        "already archived is not run again, and the report reads the archive")
    p.add_argument("--report", type=Path, help="write the results section here (e.g. docs/results.md)")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def read_dialogue_lines(files: list[str]) -> list[list[str]]:
    """The files' lines grouped by dialogue (a line numbered 1 starts one), in file order."""
    dialogues: list[list[str]] = []
    for name in files:
        for line in Path(name).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            if line.startswith("1 ") or not dialogues:
                dialogues.append([])
            dialogues[-1].append(line)
    return dialogues


def first_turns(lines: list[str], turns: int) -> list[str]:
    """A dialogue's persona lines and its first ``turns`` turn lines (those with a tab); 0 keeps all."""
    if turns == 0:
        return lines
    kept, seen = [], 0
    for line in lines:
        if "\t" in line:
            seen += 1
            if seen > turns:
                break
        kept.append(line)
    return kept


def data_paths(args) -> dict[str, Path]:
    folder = args.out / "data"
    return {"train": folder / "train.json", "test": folder / "test.txt", "info": folder / "data.json"}


def prepare_data(args) -> dict[str, Path]:
    """Write the training rows (JSON) and the test dialogues (ParlAI text) once; later calls check the sources."""
    from comlora_ds.evaluation.convai2 import parse_convai2, training_rows

    paths = data_paths(args)
    sources = {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in args.files}
    info = {"files": sources, "train_dialogues": list(args.train_dialogues),
            "test_dialogues": list(args.test_dialogues), "test_turns": args.test_turns,
            "max_history": args.max_history}
    if paths["info"].exists():
        written = json.loads(paths["info"].read_text())
        if {k: written.get(k) for k in info} != info:
            raise SystemExit(f"{paths['info']}: the data of this --out was made from other sources or settings "
                             f"({written}); use another --out")
        return paths
    dialogues = read_dialogue_lines(args.files)
    train_lines = dialogues[slice(*args.train_dialogues)]
    test_lines = [first_turns(d, args.test_turns) for d in dialogues[slice(*args.test_dialogues)]]
    if not train_lines or not test_lines:
        raise SystemExit(f"{len(dialogues)} dialogues in {', '.join(args.files)}: the train slice "
                         f"{args.train_dialogues} or the test slice {args.test_dialogues} is empty")
    folder = paths["train"].parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(line for d in train_lines for line in d) + "\n")
    rows = training_rows(folder / "train.txt", max_history=args.max_history)
    paths["train"].write_text(json.dumps(rows, indent=1))
    paths["test"].write_text("\n".join(line for d in test_lines for line in d) + "\n")
    info.update(train_rows=len(rows), test_rows=sum(len(d.turns) for d in parse_convai2(paths["test"])),
                train_dialogue_count=len(train_lines), test_dialogue_count=len(test_lines))
    paths["info"].write_text(json.dumps(info, indent=1))
    return paths


GRID_SETTINGS = ("model", "max_steps", "eval_steps", "micro_batch", "lr", "max_length", "val_size", "extra",
                 "max_history", "test_turns", "eval_batch", "max_new_tokens", "bertscore_model", "ds_config")


def check_archive(args) -> None:
    """An archive holds the runs of one grid: refuse to add runs made with other settings (or from other data)."""
    settings = {key: getattr(args, key) for key in GRID_SETTINGS}
    settings["ds_config"] = Path(settings["ds_config"]).name
    check_archive_settings(args.archive, settings)
    data = data_paths(args)["info"]
    archived = args.archive / "data" / "data.json"
    if archived.exists() and json.loads(archived.read_text()) != json.loads(data.read_text()):
        raise SystemExit(f"{archived}: this archive's runs saw other data than {data}")
    archived.parent.mkdir(exist_ok=True)
    shutil.copyfile(data, archived)


def run_dir(args, variant: str, seed: int) -> Path:
    return args.out / f"{variant}{'-' + args.tag if args.tag else ''}-seed{seed}"


def train_command(args, variant: str, seed: int) -> list[str]:
    overrides = [f"model.name_or_path={args.model}", f"data.train_files=[{data_paths(args)['train']}]",
                 f"data.max_length={args.max_length}", f"data.val_size={args.val_size}", "data.seed=42",
                 f"train.seed={seed}", f"train.output_dir={run_dir(args, variant, seed)}",
                 f"train.micro_batch_size={args.micro_batch}", f"train.learning_rate={args.lr}",
                 "train.lr_scheduler=linear", "train.warmup_ratio=0.03", f"train.max_steps={args.max_steps}",
                 "train.save_steps=25", "train.save_total_limit=1", "train.resume=auto",
                 "logging.wandb_mode=offline", "logging.winner_window=10", *VARIANTS[variant], *args.extra]
    if args.eval_steps:
        overrides.append(f"train.eval_steps={args.eval_steps}")
    return [*shlex.split(args.launcher), str(REPO / "launch" / "train.py"), "--deepspeed", args.ds_config, *overrides]


def consolidate_command(args, variant: str, seed: int, rule: str = "selector") -> list[str]:
    """The selector's winner and every component (``export/``; its report also scores the soup: every rule's
    validation loss), or with ``rule = "soup"`` the merged soup of the K components (``export_soup/``, not scored
    again); the lowest-validation-loss component is one of the former."""
    folder = run_dir(args, variant, seed)
    if rule == "soup":
        return [sys.executable, str(REPO / "launch" / "consolidate.py"), str(folder / "checkpoints"), "--out",
                str(folder / "export_soup"), "--winner-rule", "soup", "--no-adapter", "--skip-validation"]
    return [sys.executable, str(REPO / "launch" / "consolidate.py"), str(folder / "checkpoints"), "--out",
            str(folder / "export"), "--all-components", "--no-adapter"]


def is_comlora(variant: str) -> bool:
    return "adapter.num_components=1" not in VARIANTS[variant]


def evaluate_command(args, model: str, out: Path) -> list[str]:
    cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), model, "--task", "convai2", "--data",
           str(data_paths(args)["test"]), "--max-history", str(args.max_history), "--batch-size",
           str(args.eval_batch), "--max-new-tokens", str(args.max_new_tokens), "--out", str(out), "--no-progress",
           "--predictions"]
    if args.bertscore_model:
        cmd += ["--bertscore-model", args.bertscore_model, "--bertscore-layers", str(args.bertscore_layers)]
    return cmd


def run_grid(args, budget: Budget) -> bool:
    """Every stage not done yet, in order; False when the time budget ran out."""
    prepare_data(args)
    if args.archive:
        check_archive(args)
    logs = args.out / "logs"
    base = args.out / "base"
    if not args.train_only and not is_archived(args.archive, base):
        with claim(base) as mine:
            out = base / "eval"
            if mine:
                if not stage(evaluate_command(args, args.model, out), out / "results.json", budget,
                             logs / "base.eval.log"):
                    return False
                if args.archive:
                    archive_run(base, args.archive / "base")
    for seed in args.seeds:
        for variant in args.variants:
            folder = run_dir(args, variant, seed)
            if is_archived(args.archive, folder):          # done, even where its run folder is gone: not made again
                continue
            with claim(folder) as mine:
                if not mine:
                    continue
                if not stage(train_command(args, variant, seed), folder / "validation.json", budget,
                             logs / f"{folder.name}.train.log"):
                    return False
                if args.train_only:
                    continue
                if not stage(consolidate_command(args, variant, seed), folder / "export" / "report.json", budget,
                             logs / f"{folder.name}.consolidate.log"):
                    return False
                jobs = component_evaluations(folder)
                if is_comlora(variant):
                    if not stage(consolidate_command(args, variant, seed, "soup"),
                                 folder / "export_soup" / "report.json", budget,
                                 logs / f"{folder.name}.consolidate_soup.log"):
                        return False
                    jobs.append((str(folder / "export_soup" / "merged"), folder / "eval" / "soup"))
                for model, out in jobs:
                    if not stage(evaluate_command(args, model, out), out / "results.json", budget,
                                 logs / f"{folder.name}.{out.name}.eval.log"):
                        return False
                if not args.keep_models:
                    prune_models(folder)
                if args.archive:
                    archive_run(folder, args.archive / folder.name)
    return True


def prune_models(folder: Path) -> None:
    """Delete a finished run's merged models (the base's size each, K of them for ComLoRA): the report needs only
    validation.json, export/report.json and eval/; the checkpoint stays for a new consolidation."""
    for model in [folder / "export" / "merged", folder / "export_soup" / "merged",
                  *(folder / "export" / "components").glob("component_*")]:
        if model.is_dir():
            shutil.rmtree(model)


def archived_run_dir(args, variant: str, seed: int) -> Path:
    return args.archive / run_dir(args, variant, seed).name


def example_commands(args) -> list[str]:
    """What the driver runs for each variant's first seed (the results page quotes them)."""
    seed = args.seeds[0]
    commands = [evaluate_command(args, args.model, args.out / "base" / "eval")]
    for variant in args.variants:
        folder = run_dir(args, variant, seed)
        commands += [train_command(args, variant, seed), consolidate_command(args, variant, seed),
                     evaluate_command(args, str(folder / "export" / "merged"), folder / "eval" / "winner")]
        if is_comlora(variant):
            commands += [consolidate_command(args, variant, seed, "soup"),
                         evaluate_command(args, str(folder / "export_soup" / "merged"), folder / "eval" / "soup")]
    return display(commands)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not run_chunk(args, run_grid):
        return
    if args.report:
        from reproduce_convai2_report import write_report

        write_report(args, archived_run_dir if args.archive else run_dir, example_commands(args))
        print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
