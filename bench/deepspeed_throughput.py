"""DeepSpeed training throughput (issue 8, item 5): 1 rank vs N ranks, ZeRO-2 and ZeRO-3, tokens/s.

Each configuration is the real CLI, ``torchrun --nproc_per_node N launch/train.py --deepspeed
ds_configs/zero{2,3}.json`` with the shipped configs, ComLoRA on real LLM-Adapters rows (ARC-Challenge from
../shared/data). Tokens/s is read from ``<output_dir>/metrics.jsonl`` (``tokens_per_s``: non-pad input
tokens of the global batch per optimizer step, all ranks summed, divided by the step's wall time), the
first ``--skip`` steps dropped. Configurations run interleaved, ``--repeats`` times each.

Same micro-batch per rank in every configuration (weak scaling: N ranks train an N x larger global batch
per step). On a CPU machine each rank gets ``cores / N`` threads (OMP_NUM_THREADS), so N ranks share the same
cores as 1 rank: a CPU can only show the communication overhead, not a speed-up. On a multi-GPU machine the
same command measures real data-parallel scaling (one GPU per rank):

    python bench/deepspeed_throughput.py                                     # 2-core CPU: 1 vs 2 ranks
    python bench/deepspeed_throughput.py --nprocs 1 2 4 8 --max-length 512 --micro-batch 8 --doc   # 8 GPUs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from environment import REPO, SHARED_DATA  # noqa: E402
from launching import free_port, run_training  # noqa: E402
from reports import provenance, publish, table  # noqa: E402

SECTION = "DeepSpeed throughput"
INTRO = """\
Script: `bench/deepspeed_throughput.py`. The real CLI under `torchrun`, shipped `ds_configs/zero2.json` and
`zero3.json` unchanged, ComLoRA batched, real ARC-Challenge rows. tokens/s = non-pad input tokens of the global
batch per optimizer step (summed over ranks, not multiplied by K) / step wall time, from `metrics.jsonl`, first
steps skipped; min/median are over the kept steps of all repeats. Same micro-batch per rank everywhere (weak
scaling). Item 4 of issue 8 (inference latency of the merged winner) is in the section written by
`bench/inference_latency.py`."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model.name_or_path (smollm2-135m or a local folder)")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=2, help="first optimizer steps not counted (start-up, caches)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--train-file", default=str(SHARED_DATA / "commonsense" / "train" / "ARC-Challenge.json"))
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of all ranks together (default: every core); each rank gets threads / N")
    p.add_argument("--clip-scopes", nargs="+", default=["global"], choices=["global", "per_group"],
                   help="train.clip_scope values to compare (per_group reads and writes every trainable gradient)")
    p.add_argument("--extra", nargs="*", default=[], help="more run-config overrides, key=value")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--doc", action="store_true")
    return p.parse_args(argv)


def run_one(args, nproc: int, stage: int, scope: str, workdir: Path) -> dict:
    out = workdir / f"z{stage}_n{nproc}_{scope}_{time.monotonic_ns()}"
    cores = args.threads or len(os.sched_getaffinity(0))
    threads = max(1, cores // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    overrides = {
        "model.name_or_path": args.model, "data.train_files": f"[{args.train_file}]", "data.val_size": 0,
        "data.max_length": args.max_length, "adapter.num_components": args.k, "adapter.rank": args.rank,
        "train.micro_batch_size": args.micro_batch, "train.max_steps": args.steps, "train.save_steps": 0,
        "train.output_dir": out, "logging.wandb_mode": "disabled", "train.clip_scope": scope,
        "data.max_train_samples": args.micro_batch * max(args.nprocs) * (args.steps + 1),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(REPO / "launch" / "train.py"), "--deepspeed", str(REPO / "ds_configs" / f"zero{stage}.json"),
           *[f"{k}={v}" for k, v in overrides.items()], *args.extra]
    records, wall = run_training(cmd, env, out)
    steps = [r for r in records if "tokens_per_s" in r and r["step"] > args.skip]
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"tokens_per_s": [r["tokens_per_s"] for r in steps], "step_time": [r["step_time"] for r in steps],
            "tokens": [r["tokens"] for r in steps], "wall": wall, "threads": threads}


def main(argv=None) -> int:
    args = parse_args(argv)
    configs = [(stage, n, scope) for stage in args.stages for n in args.nprocs for scope in args.clip_scopes]
    results = {c: {"tokens_per_s": [], "step_time": [], "tokens": [], "wall": []} for c in configs}
    workdir = Path(tempfile.mkdtemp(prefix="ds_throughput_"))
    threads = {}
    try:
        for rep in range(args.repeats):
            order = configs if rep % 2 == 0 else configs[::-1]
            for config in order:
                stage, n, scope = config
                r = run_one(args, n, stage, scope, workdir)
                threads[config] = r["threads"]
                for key in ("tokens_per_s", "step_time", "tokens"):
                    results[config][key] += r[key]
                results[config]["wall"].append(r["wall"])
                print(f"  repeat {rep + 1}: ZeRO-{stage}, {n} rank(s) x {r['threads']} thread(s), clip {scope}: tokens/s "
                      f"{[round(x) for x in r['tokens_per_s']]}, process wall {r['wall']:.0f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ref_n = min(args.nprocs)
    rows = []
    scope0 = args.clip_scopes[0]
    for stage, n, scope in configs:
        res, ref, base = results[(stage, n, scope)], results[(stage, ref_n, scope)], results[(stage, n, scope0)]
        med, best = statistics.median(res["tokens_per_s"]), max(res["tokens_per_s"])
        ref_med, ref_best = statistics.median(ref["tokens_per_s"]), max(ref["tokens_per_s"])
        rows.append([f"ZeRO-{stage}", n, scope, threads[(stage, n, scope)], int(statistics.median(res["tokens"])),
                     min(res["step_time"]), statistics.median(res["step_time"]), f"{best:.0f}", f"{med:.0f}",
                     best / ref_best, med / ref_med, med / statistics.median(base["tokens_per_s"])])
    z = {s: statistics.median(results[(s, n, c)]["tokens_per_s"]) for s, n, c in configs
         if n == max(args.nprocs) and c == scope0}
    z3_vs_z2 = (f" ZeRO-3 / ZeRO-2 at {max(args.nprocs)} ranks (median tokens/s): {z[3] / z[2]:.3f}."
                if 2 in z and 3 in z else "")
    hw = ("GPU: one GPU per rank." if torch.cuda.is_available() else
          f"CPU: {len(os.sched_getaffinity(0))} cores shared by all ranks; each rank runs cores / N threads "
          f"(OMP_NUM_THREADS), so N ranks get no extra hardware here: the ratio compares N single-threaded processes "
          f"with one multi-threaded process on the same cores, communication (gloo all-reduce / reduce-scatter, ZeRO-3 "
          f"parameter all-gathers) included. It can exceed 1 because the small matmuls of a 135M model use 2 threads "
          f"poorly; it is not a data-parallel speed-up.")
    body = (f"{provenance()} {hw} Model {args.model}, "
            f"K={args.k}, r={args.rank}, micro-batch {args.micro_batch} per rank, max_length {args.max_length}, "
            f"{args.steps} steps, first {args.skip} skipped, {args.repeats} repeat(s).{z3_vs_z2}\n\n"
            + table(["ZeRO", "ranks", "clip scope", "threads/rank", "tokens/step (global)", "step min s",
                     "step median s", "tokens/s best", "tokens/s median", f"vs {ref_n} rank (best)",
                     f"vs {ref_n} rank (median)", f"vs clip {scope0} (median)"], rows))
    sub = (f"{args.model}, ranks {args.nprocs}, ZeRO {args.stages}"
           + (f", clip {' vs '.join(args.clip_scopes)}" if args.clip_scopes != ["global"] else "")
           + f", {'GPU' if torch.cuda.is_available() else 'CPU'}")
    publish(SECTION, INTRO, sub, body, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
