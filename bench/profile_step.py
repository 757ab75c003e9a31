"""Where the time of one training step goes: torch.profiler over a few steps of chosen variants.

Prints, per variant, the top operators by self time (CPU, or CUDA on a GPU) and the time and call count
of the matmuls whose output has the vocabulary as last dimension (the lm_head) against the rest, which is
what shows the chunked CE's cost: 2 lm_head matmuls per step (forward, and the gradient w.r.t. the hidden
states taken in the forward), like HF's loss; checkpointing each chunk, as before, took 3.

    python bench/profile_step.py --variants peft chunked hf --response-frac 1.0
    python bench/profile_step.py --variants k4 k4-nosel --seq-len 64        # selector + losses at K=4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from reports import machine  # noqa: E402
from timing import wait_quiet  # noqa: E402
from variants import BaseModel, build_variant, make_batch, Spec  # noqa: E402

VARIANTS = {
    "peft": lambda r: Spec(kind="peft", rank=r),
    "chunked": lambda r: Spec(rank=r),
    "hf": lambda r: Spec(rank=r, loss="hf"),
    "k2": lambda r: Spec(k=2, rank=r),
    "k4": lambda r: Spec(k=4, rank=r),
    "k4-nosel": lambda r: Spec(k=4, rank=r, selector=False),
    "k2-seq": lambda r: Spec(k=2, rank=r, execution="sequential"),
    "k2-authors": lambda r: Spec(kind="authors", k=2, rank=r),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--variants", nargs="+", default=["peft", "chunked", "hf"], choices=sorted(VARIANTS))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--response-frac", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    base = BaseModel(args.model, args.dtype)
    batch = make_batch(base.vocab, args.micro_batch, args.seq_len, args.response_frac)
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"{machine()}; {args.model}, micro-batch {args.micro_batch} x seq {args.seq_len}, response fraction "
          f"{args.response_frac}, {args.steps} profiled steps per variant")
    summary = []
    for key in args.variants:
        spec = VARIANTS[key](args.rank)
        v = build_variant(spec, base, batch)
        v.step()
        wait_quiet()
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(args.steps):
                v.step()
        events = prof.key_averages(group_by_input_shape=True)
        total = sum(getattr(e, "self_device_time_total" if cuda else "self_cpu_time_total") for e in events)
        head_time, head_calls, mm_time = 0.0, 0, 0.0
        for e in events:
            if e.key not in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
                continue
            t = getattr(e, "self_device_time_total" if cuda else "self_cpu_time_total")
            if e.key in ("aten::matmul", "aten::linear"):
                continue                                  # wrappers; their self time is ~0
            mm_time += t
            if any(base.vocab in (s or []) for s in (e.input_shapes or [])):
                head_time += t
                head_calls += e.count
        print(f"\n== {spec.name()}: total self time {total / 1e6 / args.steps:.3f} s/step; all matmuls "
              f"{mm_time / 1e6 / args.steps:.3f} s/step; lm_head matmuls (a vocab-sized operand) "
              f"{head_time / 1e6 / args.steps:.3f} s/step in {head_calls // args.steps} calls/step")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
        summary.append((spec.name(), total / 1e6 / args.steps, mm_time / 1e6 / args.steps,
                        head_time / 1e6 / args.steps, head_calls // args.steps))
        del v
    print("\nvariant | self time s/step | matmuls s/step | lm_head matmuls s/step | lm_head matmul calls/step")
    for row in summary:
        print(f"{row[0]} | {row[1]:.3f} | {row[2]:.3f} | {row[3]:.3f} | {row[4]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
