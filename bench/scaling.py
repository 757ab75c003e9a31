"""Step time and peak memory of ComLoRA as K, rank, sequence length and micro-batch grow (issue 8, item 3).

One axis at a time around a base point (default K=2, r=8, seq 64, micro-batch 1). Time: every point of
every axis in one process, interleaved (``timing.interleaved``). Memory: each point in a fresh process
(``bench/memory.py``'s worker: warm-up step, malloc_trim, reset the peak, one measured step).
Writes a table and a PNG (time and memory against each axis, log-log, with the linear-growth line
through the smallest point). Target: cost grows linearly in K and no worse.

    python bench/scaling.py                                  # SmolLM2-135M, a few minutes on 2 CPU cores
    python bench/scaling.py --ks 1 2 4 8 16 --seq-lens 128 256 512 1024 --micro-batches 1 2 4 8 16 --doc
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import REPO  # noqa: E402
from launching import run_worker  # noqa: E402
from peak_memory import memory_kind, mib  # noqa: E402
from reports import machine, provenance, table, update_doc_subsection  # noqa: E402
from timing import add_timing_args, interleaved, timing_setup  # noqa: E402
from variants import BaseModel, build_variant, make_batch, Spec  # noqa: E402

SECTION = "Scaling in K, rank, sequence length and micro-batch"
INTRO = """\
Script: `bench/scaling.py`. One axis varies at a time around a base point; ComLoRA batched with the chunked CE
(the library defaults), LoRA on all 7 linear modules. Time per training step (forward + backward + AdamW):
all points in one process, interleaved, min and median. Memory: each point in a fresh process, the step's
peak above the footprint before it (activations, gradients, CE chunks; `bench/memory.py`'s method).
"growth / linear" divides the growth from the smallest value of the axis by the growth of the axis value
itself: 1.00 is exactly linear, below 1 is sub-linear (fixed costs amortised). "marginal / first" divides the
cost added per unit of the axis by the same between the first two points (on the K axis between K=2 and the
next K, since K=1 has no selector): 1.00 for affine growth (fixed part + linear part), above 1 for faster
than linear."""
AXES = ("k", "rank", "seq_len", "micro_batch")
LABELS = {"k": "K (components)", "rank": "rank r", "seq_len": "sequence length", "micro_batch": "micro-batch"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--base", default="k=2,rank=8,seq_len=64,micro_batch=1", help="the base point")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--response-frac", type=float, default=0.5)
    add_timing_args(p)
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--plot", default=str(REPO / "docs" / "img" / "scaling.png"))
    p.add_argument("--json", help="also write the raw numbers to this file")
    p.add_argument("--doc", action="store_true")
    return p.parse_args(argv)


def points(args) -> dict[str, list[dict]]:
    base = {k: int(v) for k, v in (item.split("=") for item in args.base.split(","))}
    values = {"k": args.ks, "rank": args.ranks, "seq_len": args.seq_lens, "micro_batch": args.micro_batches}
    return {axis: [{**base, axis: v} for v in values[axis]] for axis in AXES}


def key(p: dict) -> str:
    return f"K={p['k']} r={p['rank']} L={p['seq_len']} B={p['micro_batch']}"


def marginal(pts: list[dict], axis: str, cost: list[float], i: int):
    """Cost added per unit of the axis between point i-1 and i, over the same between the first two
    points: 1.00 for affine growth (a fixed part plus a linear part), > 1 for faster than linear. On the
    K axis a K=1 first point has no selector, so the reference is the step after it when there is one."""
    first = 2 if axis == "k" and pts[0]["k"] == 1 and len(pts) > 2 else 1
    if i < first:
        return "-"
    per_unit = [(cost[j] - cost[j - 1]) / (pts[j][axis] - pts[j - 1][axis]) for j in (first, i)]
    return per_unit[1] / per_unit[0] if per_unit[0] > 0 else "-"     # no measurable growth to compare with


def plot(path: Path, axes: dict, time_min: dict, time_med: dict, mem: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = 2 if mem else 1
    fig, grid = plt.subplots(rows, len(AXES), figsize=(4.2 * len(AXES), 3.6 * rows), squeeze=False)
    for col, axis in enumerate(AXES):
        xs = [p[axis] for p in axes[axis]]
        series = [("step time, s", [time_min[key(p)] for p in axes[axis]], [time_med[key(p)] for p in axes[axis]])]
        if mem:
            series.append(("step peak memory, MiB", [mib(mem[key(p)]) for p in axes[axis]], None))
        for row, (ylabel, ys, ys_med) in enumerate(series):
            ax = grid[row][col]
            ax.plot(xs, ys, "o-", color="C0" if row == 0 else "C1", label="min" if ys_med else "measured")
            if ys_med:
                ax.plot(xs, ys_med, "x:", color="C0", alpha=0.6, label="median")
            ax.plot(xs, [ys[0] * x / xs[0] for x in xs], "--", color="gray", label="linear from first point")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(LABELS[axis])
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    clock = timing_setup(args)
    axes = points(args)
    unique = {key(p): p for pts in axes.values() for p in pts}
    base = BaseModel(args.model, args.dtype)
    steps = {}
    for name, p in unique.items():
        batch = make_batch(base.vocab, p["micro_batch"], p["seq_len"], args.response_frac)
        steps[name] = build_variant(Spec(k=p["k"], rank=p["rank"]), base, batch).step
    print(f"{machine()}; {len(unique)} points, model {args.model}")
    t = interleaved(steps, args.rounds, args.steps_per_round, args.warmup, clock=args.clock)
    del steps
    mem = {}
    if not args.no_memory:
        for name, p in unique.items():
            payload = dict(model=args.model, dtype=args.dtype, micro_batch=p["micro_batch"], seq_len=p["seq_len"],
                           response_frac=args.response_frac, warmup=1, spec=Spec(k=p["k"], rank=p["rank"]).to_json())
            mem[name] = run_worker(REPO / "bench" / "memory.py", payload)["increment"]
            print(f"  memory {name}: {mib(mem[name]):.0f} MiB", flush=True)

    sections, verdicts = [], []
    for axis in AXES:
        pts = axes[axis]
        x0, first = pts[0][axis], key(pts[0])
        rows = []
        t_cost = [t.min(key(p)) for p in pts]
        m_cost = [mem[key(p)] for p in pts] if mem else None
        for i, p in enumerate(pts):
            name, grow = key(p), p[axis] / x0
            row = [p[axis], name, t.min(name), t.median(name), (t.min(name) / t.min(first)) / grow,
                   marginal(pts, axis, t_cost, i)]
            if mem:
                row += [f"{mib(mem[name]):.0f}", (mem[name] / mem[first]) / grow, marginal(pts, axis, m_cost, i)]
            rows.append(row)
        header = [LABELS[axis], "point", "min s", "median s", "time growth / linear", "time marginal / first"]
        if mem:
            header += ["step peak MiB", "memory growth / linear", "memory marginal / first"]
        sections.append(f"**{LABELS[axis]}**\n\n" + table(header, rows))
        if axis == "k":
            worst_t = max(min(r[4], r[5] if isinstance(r[5], float) else r[4]) for r in rows)
            worst_m = max(min(r[7], r[8] if isinstance(r[8], float) else r[7]) for r in rows) if mem else float("nan")
            ok = worst_t <= 1.05 and (not mem or worst_m <= 1.05)
            verdicts.append(f"growth in K (the better of growth / linear and marginal / first, worst point): time "
                            f"{worst_t:.2f}, memory {worst_m:.2f}: target (linear and no worse, <= 1.05) "
                            f"{'met' if ok else 'NOT met'}")
    title = f"ComLoRA scaling, {args.model}, base point {args.base}; {machine()}"
    plot(Path(args.plot), axes, {n: t.min(n) for n in unique}, {n: t.median(n) for n in unique}, mem, title)
    rel_plot = Path(args.plot).resolve()
    try:
        rel_plot = rel_plot.relative_to(REPO / "docs")
    except ValueError:
        pass
    body = (f"{provenance()} Memory: {memory_kind()}; "
            f"time: {clock}, {args.rounds} rounds x {args.steps_per_round} steps. {'; '.join(verdicts)}.\n\n"
            f"![scaling]({rel_plot})\n\n" + "\n\n".join(sections) + f"\n\nNoise: {t.noise_note()}.")
    sub = f"{args.model}, base point {args.base}, response fraction {args.response_frac}"
    print(f"\n### {sub}\n\n{body}")
    if args.json:
        Path(args.json).write_text(json.dumps(
        {"points": unique, "time_min": {n: t.min(n) for n in unique}, "time_median": {n: t.median(n) for n in unique},
         "memory_increment": mem}, indent=1))
    if args.doc:
        update_doc_subsection(SECTION, INTRO, sub, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
