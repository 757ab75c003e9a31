"""Padded vs length-grouped vs packed micro-batches (issue 29, item 4): real-token throughput, pad fraction, peak RSS.

The rows are the trainer's own: the built-in commonsense training rows of ``launch/configs/demo_commonsense.yaml`` and
the ConvAI2 training rows of ``bench/reproduce_convai2.py`` (its default dialogues and data settings; skipped when
../shared/data/convai2 is absent), tokenised by ``data.dataset.build_datasets`` with the SmolLM2 tokenizer and the
Alpaca prompt, in the order of the trainer's sampler for ``data.seed``. Per setting (data, micro-batch B, K) one timed
step is a training forward + backward (``training.step.forward_backward``, no optimizer step) over the first
``--batches-per-step`` x B rows of that order, laid out three ways:

* padded:  the rows in the sampler's order, B per micro-batch, right-padded (``data.tokenize.ResponseCollator``);
* grouped: the same rows in ``data.packing.LengthGroupedSampler``'s order (sorted by length), padded;
* packed:  the padded micro-batches' rows as one sequence each (``data.packing.PackedCollator``).

The three layouts of a setting share one model and are timed interleaved (``timing.interleaved``): the same rows, so
the same real tokens per step. Reported: real (non-pad) tokens per second, the pad fraction of the batch tokens (on
these rows and over a whole epoch of the sampler), the speed-up over padded and the ceiling 1 / (1 - pad fraction).
Peak RSS of one micro-batch per layout, the step's largest, in a fresh process each (``launching.run_worker``).

    python bench/packing.py                                      # ~12 minutes on 2 shared cores
    python bench/packing.py --settings commonsense:8:2 --memory none --rounds 1     # a quick look
    python bench/packing.py --doc                                # writes the section "Padding-free packing"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from environment import REPO, device  # noqa: E402
from launching import run_worker, worker_result  # noqa: E402
from memory import release_free_memory  # noqa: E402
from peak_memory import memory_kind, mib, peak, reset_peak  # noqa: E402
from reports import machine, provenance, publish, table  # noqa: E402
from timing import add_timing_args, interleaved, timing_setup, verdict  # noqa: E402
from variants import BaseModel, Spec, resolve, run_config  # noqa: E402

from comlora_ds.config import ModelConfig, load_config  # noqa: E402
from comlora_ds.comlora.model import build_model, build_objective  # noqa: E402
from comlora_ds.data.packing import LengthGroupedSampler, PackedCollator, row_lengths  # noqa: E402
from comlora_ds.data.tokenize import ResponseCollator, prepare_tokenizer  # noqa: E402
from comlora_ds.models.base_model import load_tokenizer  # noqa: E402
from comlora_ds.training.step import forward_backward  # noqa: E402

SECTION = "Padding-free packing"
INTRO = """\
Script: `bench/packing.py` (issue 29, item 4). The trainer's rows (the demo's built-in commonsense training rows,
`launch/configs/demo_commonsense.yaml`: max_length 160; the ConvAI2 rows of `bench/reproduce_convai2.py`: dialogues
0-699, max_length 192), SmolLM2 tokenizer, Alpaca prompt, in the trainer's sampler order for data.seed 42. A step is a
training forward + backward (`step.forward_backward`, LoRA r=8 on the 7 linear modules, no optimizer step) over the
same rows laid out three ways: **padded** (sampler order, `ResponseCollator`), **grouped** (the same rows in
`LengthGroupedSampler` order, padded) and **packed** (the padded micro-batches as one sequence each, `PackedCollator`).
The three share one model and are timed interleaved, round after round. Real tokens are the rows' own tokens (each
processed K times by ComLoRA's replicated batch); the pad fraction is pad / batch tokens, on the timed rows and over a
whole epoch of the sampler (the grouped epoch sorts 50 micro-batches at a time, so it pads less than the few timed
ones); the ceiling of packing is 1 / (1 - the padded pad fraction). Peak RSS: the step's largest micro-batch of each
layout in a fresh process (warm-up, `malloc_trim`, reset, one measured forward + backward)."""

GPU_NOTE = """\
What the same pad fraction means on a GPU: the linear layers (and the lm_head at response positions) are
compute-bound matmuls whose time scales with the tokens they get, pad tokens included, so removing a pad fraction p
saves up to that share of their time, 1 / (1 - p) in throughput, and ComLoRA pays the padding K times (the batch is
replicated). Attention decides whether packing reaches the ceiling: FlashAttention-2 (`flash_attention_2`, the
library's packed GPU path) is varlen, sum n_b^2 score entries packed or padded (it unpads padded rows), so there
packing removes the pad tokens from the linear layers at no attention cost; sdpa with the block-diagonal mask that
transformers builds from the restarting position ids (the path measured here) computes the whole T x T score matrix
of the packed sequence, T = sum n_b, against B x L^2 padded (the "attention" column). On a GPU, pack with flash-attn
installed; packing with sdpa there trades the pad tokens for a larger attention. Small steps that do not fill the
GPU (a few hundred tokens) are latency-bound and gain less than the ceiling. The packed flash-attention 2 forward is
checked against the padded one by part 6 of `bench/gpu_check.py`."""

DENSE_MASK_NOTE = """\
Why packing stays below the ceiling with sdpa (or eager): the packed sequence's attention. The block-diagonal mask
reaches sdpa as a dense [T, T] boolean, so every score of the whole sequence is computed, masked and kept for the
backward, (sum n_b)^2 entries per head and layer where the padded batch has B x L^2 (the "attention" column). The
linear layers save the pad tokens, the attention gives part of it back, the more the larger and the more even the
rows (the same pad fraction with longer rows costs packing more). Length grouping pays nothing of the kind (its
attention is at most the padded one's) and pads little over a whole epoch ("pad (epoch)"; the few timed micro-batches
are sorted among themselves only), so where the attention column is large it is the faster layout on this path;
packing keeps the padded order and objective exactly. A block-sparse or varlen attention on the CPU
(flex_attention with a block mask; not among the implementations the library lets pack yet) would remove the
difference."""

LAYOUTS = ("padded", "grouped", "packed")
ETA = 0.5                      # the selector's mixing weight in the objective, as build_variant's default
TARGET_SHARE = 0.9             # packed >= 90% of the ceiling
TARGET_SPEEDUP = 1.3           # ... and >= 1.3 x padded at micro-batch 8 on the commonsense rows (the issue's)
# Sized for ~10-12 minutes on 2 shared cores (~7.5 ms of CPU per token and component): K=1 and K=2 at the issue's
# micro-batch 8 on commonsense, K=2 at 4; ConvAI2 at 8 with K=1 (its pad fraction does not depend on K).
DEFAULT_SETTINGS = ["commonsense:4:2", "commonsense:8:1", "commonsense:8:2", "convai2:8:1"]


# ------------------------------------------------------------------------------------------ data
def commonsense_data_config(work: Path):
    return load_config(REPO / "launch" / "configs" / "demo_commonsense.yaml", ["data.cache=false"]).data


def convai2_data_config(work: Path):
    """The data settings of reproduce_convai2's training runs, on the rows its prepare_data writes (None without the
    ConvAI2 files)."""
    import reproduce_convai2 as convai2

    args = convai2.parse_args(["--out", str(work / "convai2")])
    if not all(Path(f).exists() for f in args.files):
        return None
    convai2.prepare_data(args)
    overrides = [o for o in convai2.train_command(args, convai2.DEFAULT_VARIANTS[0], 1) if o.startswith("data.")]
    return load_config(None, [*overrides, "data.cache=false"]).data


DATA = {"commonsense": commonsense_data_config, "convai2": convai2_data_config}


@dataclass
class Rows:
    """One data set's tokenised training rows and the settings they came from."""
    name: str
    input_ids: list[list[int]]
    labels: list[list[int]]
    seed: int
    max_length: int

    @cached_property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def rows(self, indices: list[int]) -> list[dict]:
        return [{"input_ids": self.input_ids[i], "labels": self.labels[i]} for i in indices]


def load_rows(name: str, tokenizer, work: Path) -> Rows | None:
    from comlora_ds.data.dataset import build_datasets

    cfg = DATA[name](work)
    if cfg is None:
        return None
    train, _, _ = build_datasets(cfg, tokenizer)
    return Rows(name, [list(x) for x in train["input_ids"]], [list(x) for x in train["labels"]], cfg.seed,
                cfg.max_length)


def trainer_tokenizer(model: str):
    """The tokenizer as the trainer prepares it (a pad token distinct from EOS where it can, right padding)."""
    return prepare_tokenizer(load_tokenizer(resolve(model), ModelConfig()))


# ---------------------------------------------------------------------------------------- layouts
def sampler_order(num_rows: int, seed: int) -> list[int]:
    """The trainer's row order on one rank without length grouping (DistributedSampler, shuffle, drop_last)."""
    from torch.utils.data import DistributedSampler

    return list(DistributedSampler(range(num_rows), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True))


def chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]


def pad_fraction(lengths: list[int], micro_batches: list[list[int]]) -> float:
    """Pad tokens / batch tokens of right-padded micro-batches."""
    real = sum(lengths[i] for mb in micro_batches for i in mb)
    padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in micro_batches)
    return 1 - real / padded


def layouts(rows: Rows, micro_batch: int, count: int) -> dict[str, list[list[int]]]:
    """Each layout's micro-batches (row indices) over the first ``count`` x ``micro_batch`` rows of the sampler's
    order; grouped: those rows in LengthGroupedSampler's order (they fit in one of its groups: sorted, longest
    first)."""
    chosen = sampler_order(len(rows.input_ids), rows.seed)[:count * micro_batch]
    lengths = rows.lengths
    grouped = LengthGroupedSampler([lengths[i] for i in chosen], micro_batch, seed=rows.seed)
    padded = chunks(chosen, micro_batch)
    return {"padded": padded, "grouped": chunks([chosen[i] for i in grouped], micro_batch), "packed": padded}


def epoch_pad_fractions(rows: Rows, micro_batch: int) -> dict[str, float]:
    """Pad fraction over a whole epoch of each sampler (one rank, no accumulation); packed has none."""
    lengths = rows.lengths
    shuffled = sampler_order(len(lengths), rows.seed)
    grouped = list(LengthGroupedSampler(lengths, micro_batch, seed=rows.seed))
    return {"padded": pad_fraction(lengths, chunks(shuffled, micro_batch)),
            "grouped": pad_fraction(lengths, chunks(grouped, micro_batch)), "packed": 0.0}


def collate(layout: str, rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    collator = PackedCollator() if layout == "packed" else ResponseCollator(pad_token_id)
    return {k: v.to(device()) for k, v in collator(rows).items()}


def attention_entries(batch: dict[str, torch.Tensor], varlen: bool) -> int:
    """Attention score entries per head and layer of one replica: with a dense mask (sdpa, eager) B x L^2 padded and
    T^2 packed; varlen (flash_attention_2: padded rows are unpadded, packed rows cut at their boundaries) sum n_b^2."""
    if varlen:
        lengths = row_lengths(batch["segment_ids"]) if "segment_ids" in batch else batch["attention_mask"].sum(1)
        return int((lengths ** 2).sum())
    rows, length = batch["input_ids"].shape
    return rows * length ** 2


# ---------------------------------------------------------------------------------------- the step
@dataclass
class Trainee:
    model: torch.nn.Module
    objective: object


def trainee(base: BaseModel, k: int, rank: int) -> Trainee:
    """ComLoRA with K components (K=1: LoRA) on ``base``, as the variants' ``ours`` step builds it."""
    cfg = run_config(Spec(k=k, rank=rank))
    torch.manual_seed(0)
    return Trainee(build_model(cfg, base.fresh()).to(device()), build_objective(cfg))


def training_pass(t: Trainee, batches: list[dict[str, torch.Tensor]]) -> Callable[[], None]:
    """zero_grad, then a forward + backward per micro-batch (gradients accumulate, as over accumulation steps)."""
    def step():
        t.model.zero_grad(set_to_none=True)
        for batch in batches:
            forward_backward(t.model, batch, t.objective, ETA, lambda loss: loss.backward())
    return step


@dataclass
class Setting:
    data: str
    micro_batch: int
    k: int

    @staticmethod
    def parse(text: str) -> "Setting":
        data, micro_batch, k = text.split(":")
        if data not in DATA:
            raise argparse.ArgumentTypeError(f"{text}: the data is one of {', '.join(DATA)}")
        return Setting(data, int(micro_batch), int(k))

    def __str__(self) -> str:
        return f"{self.data}:{self.micro_batch}:{self.k}"


@dataclass
class Plan:
    """A setting's micro-batches per layout and what they hold."""
    setting: Setting
    micro_batches: dict[str, list[list[int]]]
    batches: dict[str, list[dict[str, torch.Tensor]]]
    epoch_pad: dict[str, float]
    real: int                                  # the rows' tokens, the same in every layout

    def real_tokens(self) -> int:
        return self.real

    def batch_tokens(self, layout: str) -> int:
        return sum(b["input_ids"].numel() for b in self.batches[layout])

    def pad(self, layout: str) -> float:
        return 1 - self.real_tokens() / self.batch_tokens(layout)

    def attention(self, layout: str, varlen: bool) -> float:
        def entries(name):
            return sum(attention_entries(b, varlen) for b in self.batches[name])
        return entries(layout) / entries("padded")

    def largest(self, layout: str) -> list[int]:
        """Row indices of the layout's micro-batch with the most batch tokens."""
        sizes = [b["input_ids"].numel() for b in self.batches[layout]]
        return self.micro_batches[layout][sizes.index(max(sizes))]


def plan(setting: Setting, rows: Rows, count: int, pad_token_id: int) -> Plan:
    micro_batches = layouts(rows, setting.micro_batch, count)
    batches = {layout: [collate(layout, rows.rows(mb), pad_token_id) for mb in mbs]
               for layout, mbs in micro_batches.items()}
    real = sum(rows.lengths[i] for mb in micro_batches["padded"] for i in mb)
    return Plan(setting, micro_batches, batches, epoch_pad_fractions(rows, setting.micro_batch), real)


# ------------------------------------------------------------------------------------------ memory
def worker(payload: dict) -> None:
    torch.set_num_threads(payload.get("threads") or torch.get_num_threads())
    base = BaseModel(payload["model"], payload["dtype"])
    step = training_pass(trainee(base, payload["k"], payload["rank"]),
                         [collate(payload["layout"], payload["rows"], payload["pad_token_id"])])
    step()
    release_free_memory()
    before = reset_peak()
    step()
    top = peak()
    worker_result({"before": before, "peak": top, "increment": top - before})


def measure_memory(p: Plan, rows: Rows, args, pad_token_id: int) -> dict[str, dict]:
    results = {}
    for layout in LAYOUTS:
        payload = {"model": args.model, "dtype": args.dtype, "k": p.setting.k, "rank": args.rank, "layout": layout,
                   "rows": rows.rows(p.largest(layout)), "pad_token_id": pad_token_id, "threads": args.threads}
        results[layout] = run_worker(Path(__file__), payload)
        print(f"  memory {p.setting} {layout}: step peak {mib(results[layout]['increment']):.0f} MiB, "
              f"absolute {mib(results[layout]['peak']):.0f} MiB", flush=True)
    return results


# ------------------------------------------------------------------------------------------ timing
def time_setting(p: Plan, t: Trainee, args):
    steps = {layout: training_pass(t, p.batches[layout]) for layout in LAYOUTS}
    print(f"\n== {p.setting}: {len(p.batches['padded'])} micro-batches, {p.real_tokens()} real tokens, pad "
          + ", ".join(f"{layout} {p.pad(layout):.1%}" for layout in LAYOUTS), flush=True)
    return interleaved(steps, args.rounds, args.steps_per_round, args.warmup, clock=args.clock)


def warm_up(t: Trainee, plans: list[Plan]) -> None:
    """First use of a model (lazy initialisation, the allocator's growth): its largest padded micro-batch once."""
    batch = max((b for p in plans for b in p.batches["padded"]), key=lambda b: b["input_ids"].numel())
    training_pass(t, [batch])()


@dataclass
class Measured:
    plan: Plan
    timings: object
    memory: dict[str, dict] | None

    def speedup(self, layout: str) -> tuple[float, float]:
        """(padded / layout time: of the minima, paired over rounds)."""
        r_min, _, r_pair = self.timings.ratios(layout, "padded")
        return 1 / r_min, 1 / r_pair

    def ceiling(self) -> float:
        return 1 / (1 - self.plan.pad("padded"))


def result_rows(m: Measured, varlen: bool) -> list[list]:
    p, s = m.plan, m.plan.setting
    rows = []
    for layout in LAYOUTS:
        fast, paired = m.speedup(layout)
        memory = (f"{mib(m.memory[layout]['increment']):.0f} / {mib(m.memory[layout]['peak']):.0f}" if m.memory
                  else "-")
        rows.append([s.data, s.micro_batch, s.k, layout, f"{p.pad(layout):.1%}", f"{p.epoch_pad[layout]:.1%}",
                     f"{m.timings.min(layout):.2f}", f"{p.real_tokens() / m.timings.min(layout):.0f}",
                     f"{fast:.3f} / {paired:.3f}", f"{m.ceiling():.3f}",
                     "-" if layout == "padded" else f"{fast / m.ceiling():.0%}",
                     f"{p.attention(layout, varlen):.2f}", memory])
    return rows


HEADER = ["data", "B", "K", "layout", "pad (timed rows)", "pad (epoch)", "min s", "real tokens/s",
          "speed-up vs padded (min / paired)", "ceiling 1/(1-pad)", "share of ceiling", "attention vs padded",
          "step / absolute peak RSS MiB"]


def target_verdict(m: Measured) -> str:
    """Packed >= 90% of the ceiling (and >= 1.3 x padded for the commonsense rows at micro-batch 8), both estimates."""
    s = m.plan.setting
    r_min, _, r_pair = m.timings.ratios("packed", "padded")
    need = TARGET_SHARE * m.ceiling()
    if s.data == "commonsense" and s.micro_batch == 8:
        need = max(need, TARGET_SPEEDUP)
    fast, paired = m.speedup("packed")
    return (f"{s}: packed {fast:.2f}x / {paired:.2f}x (min / paired) against >= {need:.2f}x: "
            f"{verdict((r_min, r_pair), 1 / need)}")


def sizes_line(rows: dict[str, Rows]) -> str:
    return "; ".join(f"{r.name}: {len(r.lengths)} training rows, {min(r.lengths)}-{max(r.lengths)} tokens (median "
                     f"{statistics.median(r.lengths):.0f}, max_length {r.max_length})" for r in rows.values())


def how_measured(args, base: BaseModel, clock: str, elapsed: float, skipped: list[str]) -> str:
    dtype = str(base.dtype).replace("torch.", "")
    missing = f" Not run (no data): {', '.join(skipped)}." if skipped else ""
    return (f"{provenance()} Base {dtype}, {base.config._attn_implementation} attention; {args.batches_per_step} "
            f"micro-batches per step; {args.rounds} rounds x {args.steps_per_round} steps after a warm-up micro-batch "
            f"per model ({args.warmup} warm-up steps per layout); {clock}; {elapsed / 60:.0f} minutes in all.{missing}")


def report(measured: list[Measured], rows: dict[str, Rows], args, base: BaseModel, how: str) -> str:
    noise = "; ".join(f"{m.plan.setting}: {m.timings.noise_note()}" for m in measured)
    memory = (f"Memory: {memory_kind()} of {', '.join(str(s) for s in args.memory)}, a fresh process per layout; the "
              f"other settings are not measured (time budget)." if args.memory
              else "Memory: not measured (--memory none).")
    varlen = base.config._attn_implementation == "flash_attention_2"
    notes = GPU_NOTE if varlen else f"{DENSE_MASK_NOTE}\n\n{GPU_NOTE}"
    return (f"{how}\n\nRows: {sizes_line(rows)}.\n\nTarget (packed real-token throughput >= {TARGET_SHARE:.0%} of "
            f"the ceiling, and >= {TARGET_SPEEDUP}x padded for commonsense at micro-batch 8): "
            + "; ".join(target_verdict(m) for m in measured) + ".\n\n"
            + table(HEADER, [r for m in measured for r in result_rows(m, varlen)])
            + f"\n\n{memory}\n\nNoise: {noise}.\n\n{notes}")


# --------------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, stories260k, or a local HF folder")
    p.add_argument("--dtype", default="auto", help="base weights: auto (bf16 on GPU, fp32 on CPU), float32, ...")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--settings", type=Setting.parse, nargs="+", default=[Setting.parse(s) for s in DEFAULT_SETTINGS],
                   help="DATA:MICRO_BATCH:K, DATA one of commonsense, convai2")
    p.add_argument("--batches-per-step", type=int, default=2, help="micro-batches of one timed step (>= 2: grouping "
                                                                   "needs several micro-batches to sort)")
    p.add_argument("--memory", nargs="+", default=["commonsense:8:1"],
                   help="settings whose peak RSS is measured in fresh processes, or 'none'")
    add_timing_args(p)
    p.set_defaults(rounds=2, steps_per_round=1, warmup=0, threads=1, clock="cpu")
    p.add_argument("--doc", action="store_true", help="write the section into docs/benchmarks.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.memory = [] if args.memory == ["none"] else [Setting.parse(s) for s in args.memory]
    unknown = {str(s) for s in args.memory} - {str(s) for s in args.settings}
    if unknown:
        p.error(f"--memory {' '.join(sorted(unknown))}: not among --settings")
    if args.batches_per_step < 2:
        p.error("--batches-per-step must be >= 2 (grouping sorts the rows of several micro-batches)")
    return args


def prepare(args, tokenizer) -> tuple[dict[str, Rows], list[Plan], list[str]]:
    """Each data set's rows, each setting's plan; the settings left out for want of data."""
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as work:
        rows = {name: r for name in dict.fromkeys(s.data for s in args.settings)
                if (r := load_rows(name, tokenizer, Path(work))) is not None}
    plans = [plan(s, rows[s.data], args.batches_per_step, tokenizer.pad_token_id) for s in args.settings
             if s.data in rows]
    return rows, plans, [str(s) for s in args.settings if s.data not in rows]


def time_all(plans: list[Plan], base: BaseModel, args, memory: dict[str, dict]) -> list[Measured]:
    """One model per K (its layouts and settings share it), warmed up, then every setting's interleaved timing."""
    measured = []
    for k in dict.fromkeys(p.setting.k for p in plans):
        t = trainee(base, k, args.rank)
        mine = [p for p in plans if p.setting.k == k]
        warm_up(t, mine)
        measured += [Measured(p, time_setting(p, t, args), memory.get(str(p.setting))) for p in mine]
    order = [str(s) for s in args.settings]
    return sorted(measured, key=lambda m: order.index(str(m.plan.setting)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    start = time.perf_counter()
    clock = timing_setup(args)
    tokenizer = trainer_tokenizer(args.model)
    rows, plans, skipped = prepare(args, tokenizer)
    memory = {str(p.setting): measure_memory(p, rows[p.setting.data], args, tokenizer.pad_token_id)
              for p in plans if str(p.setting) in map(str, args.memory)}      # before this process holds a model
    base = BaseModel(args.model, args.dtype)
    print(f"{machine()}; model {args.model} ({base.dtype}), device {device()}")
    measured = time_all(plans, base, args, memory)
    sub = f"{args.model}, r={args.rank}, {args.batches_per_step} micro-batches per step"
    if args.clock == "cpu":
        sub += ", CPU time, 1 thread"
    how = how_measured(args, base, clock, time.perf_counter() - start, skipped)
    body = report(measured, rows, args, base, how)
    publish(SECTION, INTRO, sub, body, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
