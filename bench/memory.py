"""Peak training-step memory of ComLoRA (issue 8, item 2): chunked vs naive full-logits CE, batched vs
component-sequential execution.

Each variant runs in a fresh Python process (peak RSS only grows within a process): build the model,
one warm-up step (AdamW state, first-use caches), ``malloc_trim`` so freed heap pages go back to the OS,
reset the peak (CPU: ``echo 5 > /proc/self/clear_refs`` resets VmHWM to the current RSS; GPU:
``torch.cuda.reset_peak_memory_stats``), one measured step, read the peak (CPU: VmHWM; GPU:
``torch.cuda.max_memory_allocated``). Reported: the step's peak above the footprint before it (model,
optimizer state), and the absolute peak. Variants run interleaved, ``--repeats`` times each.

The naive CE (``variants.NaiveCEModel``) materialises fp32 logits for the whole replicated batch,
K x B x L x V x 4 bytes, then takes the per-sample masked mean; the library's ``response_nll`` computes
logits only at response positions, ``ce_chunk_size`` tokens at a time, each chunk freed before the next.

    python bench/memory.py                                   # SmolLM2-135M, K=4, micro-batch 1 x 256
    python bench/memory.py --micro-batch 2 --seq-len 512 --doc
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from launching import run_worker, worker_result  # noqa: E402
from peak_memory import memory_kind, mib, peak, reset_peak  # noqa: E402
from reports import provenance, publish, table  # noqa: E402
from variants import BaseModel, build_variant, make_batch, Spec, supervised_tokens  # noqa: E402

SECTION = "Peak memory"
INTRO = """\
Script: `bench/memory.py`. Each variant in a fresh process: build, one warm-up step, `malloc_trim`, reset the
peak counter (CPU: `/proc/self/clear_refs` -> VmHWM; GPU: `torch.cuda.reset_peak_memory_stats`), one measured
step (forward + backward + AdamW). "step peak" is the peak above the footprint just before the step (model,
AdamW state); "absolute" is the process's peak. The logits term is the size of fp32 logits for the replicated
batch, K x B x L x V x 4 bytes, which the naive CE materialises and the chunked CE must not. The chunked CE holds one
chunk's logits (ce_chunk_size supervised tokens x V x 4 bytes) and, while they exist, their gradient; it saves
the term only down to that: with the default 1024-token chunk and this CPU-sized batch (K x 128 = 512 supervised
tokens) the one chunk *is* all the logits, so compare the ce_chunk_size 128 run. At real sizes (LLaMA-3-8B,
V = 128256, K = 4, micro-batch 4 x 512, half supervised: 4 GiB of fp32 logits) the default chunk holds 0.5 GiB.
The rest of the step peak is the decoder's activations (no activation checkpointing in these runs), which the
sequential mode divides by about K."""


def release_free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(payload: dict) -> None:
    torch.set_num_threads(payload.get("threads") or torch.get_num_threads())
    spec = Spec.from_json(payload["spec"])
    base = BaseModel(payload["model"], payload["dtype"])
    batch = make_batch(base.vocab, payload["micro_batch"], payload["seq_len"], payload["response_frac"])
    variant = build_variant(spec, base, batch)
    for _ in range(payload["warmup"]):
        variant.step()
    release_free_memory()
    before = reset_peak()
    variant.step()
    top = peak()
    worker_result({"before": before, "peak": top, "increment": top - before,
                   "vocab": base.vocab, "supervised": supervised_tokens(batch)})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--response-frac", type=float, default=0.5)
    p.add_argument("--ce-chunk-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--doc", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    k = args.k
    common = dict(k=k, rank=args.rank, ce_chunk_size=args.ce_chunk_size)
    specs = [Spec(**common, loss="chunked", label="batched, chunked CE (ours)"),
             Spec(**common, loss="full", label="batched, naive full-logits CE"),
             Spec(**common, loss="chunked", execution="sequential", label="sequential, chunked CE (ours)"),
             Spec(**common, loss="full", execution="sequential", label="sequential, naive full-logits CE")]
    payload = dict(model=args.model, dtype=args.dtype, micro_batch=args.micro_batch, seq_len=args.seq_len,
                   response_frac=args.response_frac, warmup=args.warmup)
    results = {s.label: [] for s in specs}
    for rep in range(args.repeats):
        order = specs if rep % 2 == 0 else specs[::-1]
        for s in order:
            r = run_worker(Path(__file__), {**payload, "spec": s.to_json()})
            results[s.label].append(r)
            print(f"  repeat {rep + 1}: {s.label}: step peak {mib(r['increment']):.0f} MiB, "
                  f"absolute {mib(r['peak']):.0f} MiB", flush=True)

    any_r = next(iter(results.values()))[0]
    vocab, n_sup = any_r["vocab"], any_r["supervised"]
    term = k * args.micro_batch * args.seq_len * vocab * 4
    seq_term = term // k
    inc = {label: statistics.median(r["increment"] for r in rs) for label, rs in results.items()}
    lo = {label: min(r["increment"] for r in rs) for label, rs in results.items()}
    hi = {label: max(r["increment"] for r in rs) for label, rs in results.items()}
    absolute = {label: statistics.median(r["peak"] for r in rs) for label, rs in results.items()}
    rows = [[label, f"{mib(inc[label]):.0f} ({mib(lo[label]):.0f}-{mib(hi[label]):.0f})", f"{mib(absolute[label]):.0f}"]
            for label in results]
    b_chunk, b_full, s_chunk, s_full = (s.label for s in specs[:4])
    saving_b, saving_s = inc[b_full] - inc[b_chunk], inc[s_full] - inc[s_chunk]
    chunk_logits = min(args.ce_chunk_size, k * n_sup) * vocab * 4
    summary = table(["quantity", "MiB"], [
        ["K x B x L x V x 4 (fp32 logits, replicated batch)", f"{mib(term):.0f}"],
        ["saving of the chunked CE, batched (naive - chunked step peak)", f"{mib(saving_b):.0f} "
         f"({saving_b / term:.2f} x the term)"],
        ["B x L x V x 4 (one component's logits)", f"{mib(seq_term):.0f}"],
        ["saving of the chunked CE, sequential", f"{mib(saving_s):.0f} ({saving_s / seq_term:.2f} x the term)"],
        ["one chunk's fp32 logits, min(ce_chunk_size, K x supervised) x V x 4", f"{mib(chunk_logits):.0f}"],
        ["batched / sequential step peak, chunked CE", f"{inc[b_chunk] / inc[s_chunk]:.2f} x"],
        ["batched / sequential step peak, naive CE", f"{inc[b_full] / inc[s_full]:.2f} x"],
    ])
    removable = term - chunk_logits
    met = saving_b >= 0.9 * removable
    verdict = (f"Target (the chunked CE removes the K*B*L*V fp32 logits term, all but one chunk's logits): "
               f"{'met' if met else 'NOT met'}: the measured saving is {mib(saving_b):.0f} MiB = "
               f"{saving_b / removable:.2f} x (term - one chunk) = {mib(removable):.0f} MiB (a naive CE also holds "
               f"the logits' log-softmax and gradient, so more than 1 x is possible).")
    body = (f"{provenance()} {memory_kind()}; "
            f"{args.repeats} fresh processes per variant, median (min-max) shown.\n\n{verdict}\n\n"
            + table(["variant", "step peak MiB, median (min-max)", "absolute peak MiB"], rows) + "\n\n" + summary)
    sub = (f"{args.model}, K={k}, r={args.rank}, micro-batch {args.micro_batch} x seq {args.seq_len}, "
           f"response fraction {args.response_frac}, ce_chunk_size {args.ce_chunk_size}")
    publish(SECTION, INTRO, sub, body, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
