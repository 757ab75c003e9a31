"""Training step time (forward + backward + AdamW step), variants interleaved in one process.

Suites (issue 8, item 1):

* ``lora``       our K=1 vs PEFT LoRA at the same rank. Target: ratio <= 1.00. Our K=1 runs twice:
                 with the library's loss (per-sample mean response NLL, chunked CE, logits only at
                 response positions) and with HF's own loss on our layers (token mean over all logits,
                 exactly what PEFT computes), which separates the layer's cost from the loss's.
* ``components`` ComLoRA K=2, K=4 (batched) vs K x our K=1 step. Target: <= 1.05 x K. A K=4 run
                 without the selector (``comlora.no_selector``: L_LM only) shows what the selector and
                 the alignment/pairwise losses cost.
* ``execution``  batched vs the authors' K-sequential approach (K forwards, all graphs kept, one
                 backward) vs our component-sequential mode, at each micro-batch. Target: batched never
                 slower (<= 1.00); on a GPU faster at micro-batch <= 4.

Examples (the defaults are sized for a few minutes on a 2-core CPU)::

    python bench/step_time.py --suite lora
    python bench/step_time.py --suite components --model stories260k --seq-len 256 --micro-batch 8
    python bench/step_time.py --suite execution --micro-batches 1 2 4 8 --doc      # GPU: bigger sizes

``--doc`` writes the tables into docs/benchmarks.md (section "Training step time").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import device  # noqa: E402
from reports import machine, provenance, publish, table  # noqa: E402
from timing import add_timing_args, interleaved, timing_setup, verdict  # noqa: E402
from variants import BaseModel, build_variant, make_batch, Spec, supervised_tokens  # noqa: E402

SECTION = "Training step time"
INTRO = """\
Script: `bench/step_time.py`. One training step = zero_grad + forward + backward + `torch.optim.AdamW.step`
over the trainable parameters; "ours" is the library path (`build_model` + `step.forward_backward`).
All variants of a table live in one process, share the frozen base weights, and are timed interleaved:
warm-up, then several rounds, each running every variant in a fresh random order. `min` and `median` are
over all timed steps; ratios are given three ways: of the minima, of the medians, and the median over rounds
of the per-round ratio (paired, robust to load drifting between rounds). On the shared 2-core CPU other
engineers' jobs compete for the cores; the minimum is the least-disturbed estimate. Batches are random tokens,
no padding; the first half of each row is prompt (label -100) unless the table says otherwise. LoRA on all 7
linear modules (q,k,v,o,gate,up,down), alpha 16, dropout 0.05."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("lora", "components", "execution", "all"), default="all")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, stories260k, or a local HF folder")
    p.add_argument("--dtype", default="auto", help="base weights: auto (bf16 on GPU, fp32 on CPU), float32, ...")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=2, help="micro-batch of the lora and components suites")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4], help="execution suite")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="components suite")
    p.add_argument("--exec-k", type=int, default=2, help="K of the execution suite")
    p.add_argument("--response-frac", type=float, default=0.5,
                   help="fraction of each row that is response (supervised); 1.0 = train on every token")
    add_timing_args(p)
    p.add_argument("--doc", action="store_true", help="write the tables into docs/benchmarks.md")
    return p.parse_args(argv)


def timing_rows(t, ref: str, scale_of=lambda name: 1.0) -> list[list]:
    rows = []
    for name in t.names:
        r_min, r_med, r_pair = t.ratios(name, ref, scale_of(name))
        rows.append([name, t.min(name), t.median(name), r_min, r_med, r_pair])
    return rows


def lora_specs(rank: int) -> list[Spec]:
    """PEFT LoRA (the reference, first), our K=1, our K=1 layers with HF's loss."""
    return [Spec(kind="peft", rank=rank), Spec(rank=rank), Spec(rank=rank, loss="hf")]


def execution_specs(k: int, rank: int, micro_batch: int) -> list[Spec]:
    """Batched (first), the authors' K-sequential passes, our component-sequential mode."""
    return [Spec(k=k, rank=rank, label=f"B={micro_batch} batched"),
            Spec(kind="authors", k=k, rank=rank, label=f"B={micro_batch} K-sequential (authors)"),
            Spec(k=k, rank=rank, execution="sequential", label=f"B={micro_batch} ours sequential")]


def suite_lora(base, args):
    batch = make_batch(base.vocab, args.micro_batch, args.seq_len, args.response_frac)
    specs = lora_specs(args.rank)
    steps = {s.name(): build_variant(s, base, batch).step for s in specs}
    t = interleaved(steps, args.rounds, args.steps_per_round, args.warmup, clock=args.clock)
    ref = specs[0].name()
    rows = timing_rows(t, ref)
    header = ["variant", "min s", "median s", "ratio (min)", "ratio (median)", "ratio (paired)"]
    verdicts = " ".join(f"{n}: {verdict((r[3], r[5]), 1.0)} (min {r[3]:.3f}, paired {r[5]:.3f})."
                        for n, r in zip(t.names, rows) if n != ref)
    text = (f"Ratios against {ref}; target <= 1.00 (met: the ratio of minima and the paired ratio both <= 1.00). "
            f"{verdicts}\n\n" + table(header, rows) + f"\n\nNoise: {t.noise_note()}.")
    return "our K=1 vs PEFT LoRA", text, batch


def suite_components(base, args):
    batch = make_batch(base.vocab, args.micro_batch, args.seq_len, args.response_frac)
    one = Spec(rank=args.rank)
    specs = [one] + [Spec(k=k, rank=args.rank) for k in args.ks]
    k_max = max(args.ks)
    specs.append(Spec(k=k_max, rank=args.rank, selector=False))
    steps = {s.name(): build_variant(s, base, batch).step for s in specs}
    k_of = {s.name(): s.k for s in specs}
    t = interleaved(steps, args.rounds, args.steps_per_round, args.warmup, clock=args.clock)
    rows = timing_rows(t, one.name(), lambda n: k_of[n])
    header = ["variant", "min s", "median s", "t / (K x t_K=1) (min)", "(median)", "(paired)"]
    full, bare = specs[-2].name(), specs[-1].name()
    sel_cost = t.ratios(full, bare)
    verdicts = []
    for s, r in zip(specs[1:-1], rows[1:-1]):
        verdicts.append(f"K={s.k}: {verdict((r[3], r[5]), 1.05)} (min {r[3]:.3f}, paired {r[5]:.3f})")
    text = (f"Target t(K) <= 1.05 x K x t(K=1). {'; '.join(verdicts)}. Selector + alignment + pairwise losses at "
            f"K={k_max}: t(with) / t(without) = {sel_cost[0]:.3f} (min), {sel_cost[2]:.3f} (paired).\n\n"
            + table(header, rows) + f"\n\nNoise: {t.noise_note()}.")
    return "ComLoRA K components vs K x LoRA", text, batch


def suite_execution(base, args):
    k = args.exec_k
    steps, groups = {}, []
    for b in args.micro_batches:
        batch = make_batch(base.vocab, b, args.seq_len, args.response_frac, seed=b)
        specs = execution_specs(k, args.rank, b)
        for s in specs:
            steps[s.name()] = build_variant(s, base, batch).step
        groups.append((b, [s.name() for s in specs]))
    t = interleaved(steps, args.rounds, args.steps_per_round, args.warmup, clock=args.clock)
    header = ["micro-batch", "batched min / median s", "authors min / median s", "sequential min / median s",
              "batched / authors (min, median, paired)", "batched / sequential (min, median, paired)"]
    rows, verdicts = [], []
    for b, (bat, auth, seq) in groups:
        ra, rs = t.ratios(bat, auth), t.ratios(bat, seq)
        rows.append([b, f"{t.min(bat):.3f} / {t.median(bat):.3f}", f"{t.min(auth):.3f} / {t.median(auth):.3f}",
                     f"{t.min(seq):.3f} / {t.median(seq):.3f}", " / ".join(f"{x:.3f}" for x in ra),
                     " / ".join(f"{x:.3f}" for x in rs)])
        verdicts.append(f"B={b}: {verdict((ra[0], ra[2], rs[0], rs[2]), 1.0)}")
    text = (f"K={k}. Target: batched <= 1.00 x each sequential variant at every micro-batch (ratio of minima and "
            f"paired ratio): {'; '.join(verdicts)}.\n\n"
            + table(header, rows) + f"\n\nNoise: {t.noise_note()}.")
    return f"batched vs K-sequential (K={k})", text, None


def main(argv=None) -> int:
    args = parse_args(argv)
    clock = timing_setup(args)
    base = BaseModel(args.model, args.dtype)
    suites = ["lora", "components", "execution"] if args.suite == "all" else [args.suite]
    print(f"{machine()}; model {args.model} ({base.dtype}), device {device()}")
    for name in suites:
        print(f"\n== {name}")
        title, text, batch = {"lora": suite_lora, "components": suite_components,
                              "execution": suite_execution}[name](base, args)
        shape = (f"micro-batch {args.micro_batch} x seq {args.seq_len}" if batch is not None
                 else f"seq {args.seq_len}, micro-batches {args.micro_batches}")
        sup = f", {supervised_tokens(batch)} supervised tokens" if batch is not None else ""
        sub = f"{title}: {args.model}, r={args.rank}, {shape}, response fraction {args.response_frac}"
        if args.clock == "cpu":
            sub += ", CPU time, 1 thread"
        body = (f"{provenance()} "
                f"Base {str(base.dtype).replace('torch.', '')}{sup}; {args.rounds} rounds x "
                f"{args.steps_per_round} steps after {args.warmup} warm-up; {clock}.\n\n{text}")
        publish(SECTION, INTRO, sub, body, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
