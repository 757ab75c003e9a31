"""GPU check (issue 20, item 5): one run on one GPU, under 10 minutes, with the installed project and the built-in
SmolLM2-135M only. Side by side:

1. flash-attention 2 vs sdpa: bf16 logits and adapter (lora_A / lora_B) gradients of the model with ComLoRA K=2
   adapters injected, on unpadded, right-padded and left-padded batches (non-pad positions compared). Skipped,
   not failed, without CUDA or without the flash-attn package.
2. step time of our K=1 vs PEFT LoRA (``step_time.lora_specs``, interleaved timing).
3. step time of ComLoRA K=2 batched vs the authors' K separate passes vs our component-sequential mode
   (``step_time.execution_specs``).
4. peak memory of every variant of 2 and 3, each in a fresh process (``memory.py``'s worker).
5. two optimizer steps of ``launch/train.py`` (the demo run config) under the ``deepspeed`` launcher with
   ``ds_configs/zero2.json`` and with ``zero3.json``; their losses must agree.
6. packed rows (``data.packing = padding_free``) with flash-attention 2: the per-row losses of a ComLoRA K=2 forward on
   a packed batch (varlen row boundaries for the K replicas) against the same rows padded, in bf16. Skipped, not
   failed, as part 1.

Correctness checks (1, 5, 6) decide the exit code (1 when one fails or does not finish in the time budget); the
performance targets (2, 3, 4) are reported as met / not met. Parts 4 and 5 run in subprocesses concurrently with
each other (peak memory is per process), after the in-process timings.

    bash bench/gpu_check.sh                                  # GPU: writes the "GPU check" section of docs/benchmarks.md
    python bench/gpu_check.py --device cpu --tiny --model PATH --json out.json   # CPU smoke run of parts 2-5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import memory  # noqa: E402
from environment import REPO, device  # noqa: E402
from launching import free_port, run_training, run_worker  # noqa: E402
from peak_memory import memory_kind, mib  # noqa: E402
from reports import DOC, command_line, machine, table, today, update_doc_section  # noqa: E402
from timing import interleaved, verdict  # noqa: E402
from variants import BaseModel, build_variant, make_batch, run_config, Spec  # noqa: E402
from step_time import execution_specs, lora_specs, timing_rows  # noqa: E402

from comlora_ds.comlora.inject import active_component  # noqa: E402
from comlora_ds.comlora.model import build_model  # noqa: E402
from comlora_ds.data.packing import PackedCollator  # noqa: E402
from comlora_ds.data.tokenize import ResponseCollator  # noqa: E402

SECTION = "GPU check"
INTRO = """\
Script: `bench/gpu_check.py` (entry point `bench/gpu_check.sh`), one run on one GPU: (1) flash-attention 2 vs sdpa,
bf16 logits and lora_A / lora_B gradients of SmolLM2-135M with ComLoRA K=2 adapters (random non-zero B) on
unpadded, right-padded and left-padded batches, non-pad positions only; (2) step time of our K=1 vs PEFT LoRA;
(3) ComLoRA K=2 batched vs the authors' K separate passes vs our component-sequential mode; (4) peak memory of
each variant in a fresh process; (5) two steps of `launch/train.py` under the `deepspeed` launcher with ZeRO-2 and
ZeRO-3 (demo run config); (6) packed rows with flash-attention 2: per-row ComLoRA K=2 losses packed vs padded. Timings
are interleaved as in `bench/step_time.py`; memory as in `bench/memory.py`."""

# bf16 tolerance of flash-attention: its error against the fp32 sdpa run may exceed sdpa-bf16's own error against
# it by this factor plus the slack. A fixed bound would be a guess: on the CPU, eager vs sdpa in bf16 on SmolLM2 already
# differ by 1.7e-2 (logits) and 0.18 (adapter gradients) in relative L2 error.
NOISE_FACTOR, NOISE_SLACK = 1.5, 1e-3
LOSS_TOL = 2e-2     # ZeRO-3 vs ZeRO-2 loss per step, relative
PACKED_TOL = 5e-3   # packed vs padded per-row loss with flash-attention 2 (bf16), relative, beyond sdpa's difference
MIN_PART_S = 20     # a part does not start with less of the time budget left
NAMES = {1: "flash-attention 2 vs sdpa (bf16 logits, adapter gradients)",
         2: "step time: our K=1 vs PEFT LoRA",
         3: "step time: K=2 batched vs K separate passes vs component-sequential",
         4: "peak memory per variant",
         5: "launch/train.py under deepspeed, ZeRO-2 and ZeRO-3, 2 steps",
         6: "packed rows with flash-attention 2 (per-row losses vs padded, K=2)"}
CORRECTNESS = {1, 5, 6}


@dataclass(frozen=True)
class Sizes:
    seq_len: int
    micro_batch: int
    rounds: int
    steps_per_round: int
    warmup: int
    attn_batch: int
    attn_seq_len: int
    train_micro_batch: int
    train_max_length: int


SIZES = {"gpu": Sizes(512, 8, 5, 5, 2, 4, 256, 8, 256),      # an H100 / H200: a few minutes in all
         "tiny": Sizes(32, 2, 2, 1, 1, 3, 16, 2, 32)}         # the CPU smoke run


@dataclass
class Check:
    part: int
    name: str
    status: str          # PASS, FAIL (a correctness check) / met, NOT met (a target) / SKIP / TIMEOUT
    correctness: bool
    summary: str
    body: str = ""
    data: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.correctness and self.status in ("FAIL", "TIMEOUT")


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def exhausted(self) -> bool:
        return self.left() < MIN_PART_S


def result(part: int, status: str, summary: str, body: str = "", data: dict | None = None) -> Check:
    return Check(part, NAMES[part], status, part in CORRECTNESS, summary, body, data or {})


def timed_out(part: int) -> Check:
    return result(part, "TIMEOUT", "not run: the time budget (--budget-s) was spent")


# --------------------------------------------------------------------- 1. flash-attention 2 vs sdpa
@dataclass
class Outputs:
    logits: torch.Tensor             # [K * B, L, V], the model's dtype
    mask: torch.Tensor               # [K * B, L] bool, True at non-pad positions
    grads: dict[str, torch.Tensor]   # adapter parameter name -> its gradient


def padded_batch(vocab: int, batch_size: int, seq_len: int, side: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; row i is shorter by i * seq_len / (2 * batch_size) tokens, padded on ``side`` (none, right,
    left) with id 0 and attention mask 0. Labels are -100 at pad positions and at each row's first token: with left
    padding its predictor is a pad position, whose output differs between attention implementations."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(input_ids)
    if side != "none":
        for row in range(1, batch_size):
            pad = row * seq_len // (2 * batch_size)
            if side == "right":
                mask[row, seq_len - pad:] = 0
            else:
                mask[row, :pad] = 0
    input_ids = input_ids.masked_fill(mask == 0, 0)
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)
    labels[:, 0] = -100
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device()) for k, v in batch.items()}


def adapted(base: BaseModel, k: int = 2, seed: int = 0):
    """``base`` with K ComLoRA components (no dropout, no selector), the same adapter weights for the same seed whatever
    the attention; B is random so that the adapters change the output and lora_A gets a gradient too."""
    torch.manual_seed(seed)
    model = build_model(run_config(Spec(k=k, dropout=0.0, selector=False)), base.fresh()).to(device())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
    return model


def adapter_outputs(base: BaseModel, batch: dict[str, torch.Tensor], k: int = 2, seed: int = 0) -> Outputs:
    """Logits and adapter gradients (HF's token-mean loss) of ``base`` with K batched ComLoRA components
    (:func:`adapted`)."""
    model = adapted(base, k, seed)
    replicated = {name: t.repeat(k, 1) for name, t in batch.items()}      # component-major, as the training step
    with active_component(model.llm, None):
        out = model.llm(**replicated, use_cache=False)
    out.loss.backward()
    grads = {name: p.grad.detach().float() for name, p in model.named_parameters()
             if "lora_A" in name or "lora_B" in name}
    return Outputs(out.logits.detach(), replicated["attention_mask"].bool(), grads)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def compare_outputs(got: Outputs, ref: Outputs) -> dict:
    """Relative L2 errors of ``got`` against ``ref`` at non-pad positions: logits, every adapter gradient together,
    and the worst single gradient tensor."""
    if not torch.equal(got.mask, ref.mask):
        raise ValueError("the two outputs come from different batches")
    logits_got, logits_ref = got.logits[got.mask].float(), ref.logits[ref.mask].float()
    per_tensor = {name: relative_error(got.grads[name], g) for name, g in ref.grads.items()}
    worst = max(per_tensor, key=per_tensor.get)
    flat = (lambda o: torch.cat([o.grads[name].flatten() for name in ref.grads]))
    return {"tokens": int(ref.mask.sum()), "logits_rel": relative_error(logits_got, logits_ref),
            "logits_max_abs": float((logits_got - logits_ref).abs().max()),
            "grad_rel": relative_error(flat(got), flat(ref)), "worst_grad": worst,
            "worst_grad_rel": per_tensor[worst], "finite": bool(torch.isfinite(logits_got).all())
            and all(bool(torch.isfinite(g).all()) for g in got.grads.values())}


def compare_attention(ref: BaseModel, other: BaseModel, batch_size: int, seq_len: int,
                      sides: tuple[str, ...] = ("none", "right", "left"), exact: BaseModel | None = None) -> dict:
    """``compare_outputs`` of ``other`` against ``ref`` (same weights, another attention implementation) per padding
    side; with ``exact`` (e.g. ``ref``'s implementation in fp32) also each one's error against it: ``ref_vs_exact``
    is the rounding noise that ``other_vs_exact`` must stay within (``within_noise``)."""
    results = {}
    for side in sides:
        batch = padded_batch(ref.vocab, batch_size, seq_len, side)
        got, want = adapter_outputs(other, batch), adapter_outputs(ref, batch)
        results[side] = compare_outputs(got, want)
        if exact is not None:
            truth = adapter_outputs(exact, batch)
            results[side].update(ref_vs_exact=compare_outputs(want, truth), other_vs_exact=compare_outputs(got, truth))
    return results


def within_noise(r: dict) -> bool:
    return r["finite"] and all(r["other_vs_exact"][key] <= NOISE_FACTOR * r["ref_vs_exact"][key] + NOISE_SLACK
                               for key in ("logits_rel", "grad_rel"))


def flash_missing() -> str | None:
    """Why flash-attention 2 cannot run here, or None."""
    if not torch.cuda.is_available():
        return "skipped: flash-attention 2 needs CUDA (this run is on the CPU)"
    if importlib.util.find_spec("flash_attn") is None:
        return "skipped: flash-attn is not installed (pip install -e \".[flash-attn]\")"
    return None


def part_attention(args, sizes: Sizes) -> Check:
    if flash_missing():
        return result(1, "SKIP", flash_missing())
    sdpa = BaseModel(args.model, "bfloat16", "sdpa")
    flash = BaseModel(args.model, "bfloat16", "flash_attention_2")
    exact = BaseModel(args.model, "float32", "sdpa")
    results = compare_attention(sdpa, flash, sizes.attn_batch, sizes.attn_seq_len, exact=exact)
    del sdpa, flash, exact
    torch.cuda.empty_cache()
    ok = all(within_noise(r) for r in results.values())

    def pair(r, key):
        return f"{r['other_vs_exact'][key]:.2e} / {r['ref_vs_exact'][key]:.2e}"
    rows = [[side, r["tokens"], f"{r['logits_rel']:.2e}", f"{r['grad_rel']:.2e}", pair(r, "logits_rel"),
             pair(r, "grad_rel"), "yes" if within_noise(r) else "NO"] for side, r in results.items()]
    body = (f"bf16 base, ComLoRA K=2 r=8 on all 7 linear modules (random non-zero B), HF's token-mean loss, batch "
            f"{sizes.attn_batch} x {sizes.attn_seq_len}, rows padded by up to half their length; relative L2 errors "
            f"over the non-pad positions (logits) and over all lora_A / lora_B gradients together. Tolerance: flash's "
            f"error against sdpa in fp32 <= {NOISE_FACTOR:g} x sdpa-bf16's own error against it + {NOISE_SLACK:g}.\n\n"
            + table(["padding", "non-pad tokens (K x B rows)", "flash vs sdpa: logits", "flash vs sdpa: gradients",
                     "vs fp32, flash / sdpa: logits", "vs fp32, flash / sdpa: gradients", "within tolerance"], rows))
    worst = max(results.values(), key=lambda r: r["grad_rel"])
    return result(1, "PASS" if ok else "FAIL",
                  f"flash vs sdpa (bf16): logits {max(r['logits_rel'] for r in results.values()):.2e}, gradients "
                  f"{worst['grad_rel']:.2e}; {'within' if ok else 'NOT within'} {NOISE_FACTOR:g} x sdpa-bf16's error "
                  f"vs fp32 + {NOISE_SLACK:g}", body, results)


# ------------------------------------------------------------- 6. packed rows with flash-attention 2
def uneven_rows(vocab: int, batch_size: int, seq_len: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random rows, each seq_len / (batch_size + 1) shorter than the one before (at least 4 tokens); the first half of
    each row is prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch_size):
        n = max(4, seq_len - i * seq_len // (batch_size + 1))
        ids = torch.randint(3, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[:n // 2] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def packed_vs_padded(base: BaseModel, rows: list[dict[str, torch.Tensor]], k: int = 2) -> dict:
    """Per-row ComLoRA losses [K, B] (fp32 from the model's dtype) of the same rows packed and right-padded, and their
    largest difference relative to the padded loss."""
    model = adapted(base, k)
    losses = {}
    with torch.no_grad():
        for layout, collate in (("packed", PackedCollator()), ("padded", ResponseCollator(pad_token_id=0))):
            batch = {name: t.to(device()) for name, t in collate(rows).items()}
            losses[layout] = model(**batch, use_selector=False).losses.float().cpu()
    diff = (losses["packed"] - losses["padded"]).abs() / losses["padded"].abs().clamp_min(1e-6)
    return {"packed": losses["packed"].tolist(), "padded": losses["padded"].tolist(), "max_rel": float(diff.max()),
            "finite": bool(torch.isfinite(losses["packed"]).all())}


def part_packed(args, sizes: Sizes) -> Check:
    if flash_missing():
        return result(6, "SKIP", flash_missing())
    rows, results = None, {}
    for attn in ("flash_attention_2", "sdpa"):
        base = BaseModel(args.model, "bfloat16", attn)
        if rows is None:
            rows = uneven_rows(base.vocab, sizes.attn_batch, sizes.attn_seq_len)
        results[attn] = packed_vs_padded(base, rows)
        del base
    torch.cuda.empty_cache()
    flash, sdpa = results["flash_attention_2"], results["sdpa"]
    ok = flash["finite"] and flash["max_rel"] <= NOISE_FACTOR * sdpa["max_rel"] + PACKED_TOL
    lengths = [len(r["input_ids"]) for r in rows]
    body = (f"bf16 base, ComLoRA K=2 r=8 (random non-zero B), {len(rows)} rows of {lengths} tokens (half prompt), "
            f"packed into one sequence (`PackedCollator`, varlen boundaries for the K replicas) and right-padded; the "
            f"largest relative difference of a per-row response loss L[k, b]. Tolerance: flash's <= {NOISE_FACTOR:g} x "
            f"sdpa's own packed-vs-padded difference in bf16 + {PACKED_TOL:g} (rows attending across a boundary "
            f"change a loss by far more).\n\n"
            + table(["attention", "max relative difference", "finite"],
                    [[attn, f"{r['max_rel']:.2e}", r["finite"]] for attn, r in results.items()]))
    return result(6, "PASS" if ok else "FAIL",
                  f"packed vs padded per-row losses, flash {flash['max_rel']:.2e}, sdpa {sdpa['max_rel']:.2e} (bf16); "
                  f"{'within' if ok else 'NOT within'} {NOISE_FACTOR:g} x sdpa's + {PACKED_TOL:g}", body, results)


# ------------------------------------------------------------------------------ 2, 3. step time
def timed(base: BaseModel, specs: list[Spec], batch, sizes: Sizes):
    steps = {s.name(): build_variant(s, base, batch).step for s in specs}
    t = interleaved(steps, sizes.rounds, sizes.steps_per_round, sizes.warmup, quiet=False)
    return t, {name: {"min_s": t.min(name), "median_s": t.median(name), "times_s": t.times[name]} for name in t.names}


TIMING_HEADER = ["variant", "min s", "median s", "ratio (min)", "ratio (median)", "ratio (paired)"]


def variant_specs(args, sizes: Sizes) -> tuple[list[Spec], list[Spec]]:
    """Part 2's (PEFT LoRA first, our K=1) and part 3's (K=2 batched first, the authors' passes, sequential)."""
    return lora_specs(args.rank)[:2], execution_specs(2, args.rank, sizes.micro_batch)


def part_lora(base: BaseModel, specs: list[Spec], sizes: Sizes) -> Check:
    batch = make_batch(base.vocab, sizes.micro_batch, sizes.seq_len)
    t, data = timed(base, specs, batch, sizes)
    ref, ours = specs[0].name(), specs[1].name()
    rows = timing_rows(t, ref)
    r_min, _, r_pair = t.ratios(ours, ref)
    met = verdict((r_min, r_pair), 1.0)
    body = (f"Micro-batch {sizes.micro_batch} x seq {sizes.seq_len}, half of each row supervised; ratios against "
            f"{ref}; target <= 1.00: {met}.\n\n" + table(TIMING_HEADER, rows) + f"\n\nNoise: {t.noise_note()}.")
    return result(2, "NOT met" if met == "NOT met" else "met",
                 f"t(ours) / t(PEFT) = {r_min:.3f} (min), {r_pair:.3f} (paired); target <= 1.00", body, data)


def part_execution(base: BaseModel, specs: list[Spec], sizes: Sizes) -> Check:
    batch = make_batch(base.vocab, sizes.micro_batch, sizes.seq_len)
    t, data = timed(base, specs, batch, sizes)
    batched = specs[0].name()
    ratios = {s.name(): t.ratios(batched, s.name()) for s in specs[1:]}
    rows = timing_rows(t, batched)
    met = verdict(tuple(x for r in ratios.values() for x in (r[0], r[2])), 1.0)
    said = "; ".join(f"vs {n}: {r[0]:.3f} (min), {r[2]:.3f} (paired)" for n, r in ratios.items())
    body = (f"ComLoRA K=2, micro-batch {sizes.micro_batch} x seq {sizes.seq_len}; ratios of each variant against "
            f"batched; target: batched <= 1.00 x each sequential variant: {met}.\n\n"
            + table(TIMING_HEADER, rows) + f"\n\nNoise: {t.noise_note()}.")
    return result(3, "NOT met" if met == "NOT met" else "met", f"t(batched) / t(other) {said}; target <= 1.00",
                 body, data)


# ------------------------------------------------------------------------------------ 4. memory
def measure_memory(spec: Spec, args, sizes: Sizes, budget: Budget) -> dict:
    payload = {"model": args.model, "dtype": "auto", "micro_batch": sizes.micro_batch, "seq_len": sizes.seq_len,
               "response_frac": 0.5, "warmup": 1, "threads": 1, "spec": spec.to_json()}
    return run_worker(Path(memory.__file__), payload, timeout=max(1, int(budget.left())))


def memory_check(results: dict[str, dict], batched: str, sequential: str) -> Check:
    rows = [[name, f"{mib(r['increment']):.0f}", f"{mib(r['peak']):.0f}"] for name, r in results.items()]
    ratio = results[batched]["increment"] / max(results[sequential]["increment"], 1)
    body = (f"{memory_kind()}, one fresh process per variant (the sizes of parts 2 and 3): one warm-up step, then the "
            f"peak of one step above the footprint before it (model, AdamW state), and the process's absolute "
            f"peak.\n\n" + table(["variant", "step peak MiB", "absolute peak MiB"], rows))
    return result(4, "met" if ratio > 1 else "NOT met",
                 f"batched / sequential step peak (K=2) = {ratio:.2f} x; expected > 1 (sequential holds one "
                 f"component's activations)", body, results)


# --------------------------------------------------------------------------------- 5. ZeRO runs
def zero_run(stage: int, args, sizes: Sizes, workdir: Path, budget: Budget) -> dict:
    out = workdir / f"zero{stage}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    overrides = {"model.name_or_path": args.model, "train.max_steps": 2, "train.save_steps": 0, "data.val_size": 0,
                 "data.max_train_samples": 2 * sizes.train_micro_batch, "train.micro_batch_size": sizes.train_micro_batch,
                 "data.max_length": sizes.train_max_length, "train.output_dir": out, "logging.wandb_mode": "disabled",
                 "logging.log_steps": 1}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), "--deepspeed", str(REPO / "ds_configs" / f"zero{stage}.json"),
           "--config", str(REPO / "launch" / "configs" / "demo.yaml"), *[f"{k}={v}" for k, v in overrides.items()]]
    records, wall = run_training(cmd, env, out, timeout=max(1, budget.left()), quiet=False)
    steps = [r for r in records if "loss" in r]
    return {"steps": [r["step"] for r in steps], "loss": [r["loss"] for r in steps],
            "step_time": [r["step_time"] for r in steps], "tokens_per_s": [r["tokens_per_s"] for r in steps],
            "wall": wall}


def zero_check(runs: dict[int, dict], sizes: Sizes) -> Check:
    z2, z3 = runs[2], runs[3]
    complete = all(r["steps"] == [1, 2] and all(map(math.isfinite, r["loss"])) for r in runs.values())
    agree = complete and all(abs(a - b) <= LOSS_TOL * max(1.0, abs(a)) for a, b in zip(z2["loss"], z3["loss"]))
    rows = [[f"ZeRO-{stage}", " / ".join(f"{x:.4f}" for x in r["loss"]), " / ".join(f"{x:.3f}" for x in r["step_time"]),
             " / ".join(f"{x:.0f}" for x in r["tokens_per_s"]), f"{r['wall']:.0f}"] for stage, r in runs.items()]
    body = (f"`deepspeed --num_gpus 1 launch/train.py --deepspeed ds_configs/zero{{2,3}}.json --config "
            f"launch/configs/demo.yaml train.max_steps=2 ...` (micro-batch {sizes.train_micro_batch}, max_length "
            f"{sizes.train_max_length}). Pass: both runs exit 0 with 2 logged steps of finite loss, and ZeRO-3's losses "
            f"equal ZeRO-2's within {LOSS_TOL:g} (relative). A functional check: the runs share the machine with "
            f"part 4's processes, so their step times are no benchmark (`bench/deepspeed_throughput.py` is).\n\n"
            + table(["config", "loss step 1 / 2", "step time s", "tokens/s", "process wall s"], rows))
    return result(5, "PASS" if agree else "FAIL",
                 f"losses ZeRO-2 {[round(x, 4) for x in z2['loss']]}, ZeRO-3 {[round(x, 4) for x in z3['loss']]}",
                 body, {f"zero{stage}": r for stage, r in runs.items()})


def parts_subprocess(specs: list[Spec], args, sizes: Sizes, budget: Budget) -> list[Check]:
    """Parts 4 and 5 (those in ``--parts``) together: memory workers and the two ZeRO runs in a pool of ``--jobs``
    threads. A worker or run that fails or outlives the budget fails its part, not the other."""
    parts = [part for part in (4, 5) if part in args.parts]
    if budget.exhausted():
        return [timed_out(part) for part in parts]
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            submit = {4: lambda: {s.name(): pool.submit(measure_memory, s, args, sizes, budget) for s in specs},
                      5: lambda: {stage: pool.submit(zero_run, stage, args, sizes, workdir, budget) for stage in (2, 3)}}
            futures = {part: submit[part]() for part in parts}
            checks = []
            for part, jobs in futures.items():
                try:
                    done = {key: f.result() for key, f in jobs.items()}
                    checks.append(memory_check(done, specs[-3].name(), specs[-1].name()) if part == 4
                                  else zero_check(done, sizes))
                except Exception as e:
                    status = "TIMEOUT" if "Timeout" in type(e).__name__ else "FAIL"
                    checks.append(result(part, status, f"{type(e).__name__}: {str(e)[-1500:]}"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return checks


# --------------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the smoke run of a machine without a GPU (part 1 is skipped); hide a GPU with "
                        "CUDA_VISIBLE_DEVICES= to use it there")
    p.add_argument("--tiny", action="store_true", help="CPU-sized batches, rounds and runs (the test's sizes)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (built in) or a local HF folder")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="total time guard: a part that would start with less than 20 s left is reported TIMEOUT, "
                        "subprocesses are stopped when it runs out")
    p.add_argument("--parts", type=int, nargs="+", choices=sorted(NAMES), default=sorted(NAMES),
                   help="the parts to run (default: all six)")
    p.add_argument("--jobs", type=int, default=4, help="concurrent processes of parts 4 and 5")
    p.add_argument("--json", type=Path, help="write every check and its numbers here")
    p.add_argument("--doc", type=Path, nargs="?", const=DOC,
                   help=f"write the section '{SECTION}' into this file (default {DOC.relative_to(REPO)}, GPU runs only)")
    return p.parse_args(argv)


def summary_table(checks: list[Check]) -> str:
    return table(["part", "check", "kind", "status", "result"],
                 [[c.part, c.name, "correctness" if c.correctness else "target", c.status, c.summary] for c in checks])


def report(checks: list[Check], sizes: Sizes, elapsed: float) -> str:
    parts = "\n\n".join(f"### {c.part}. {c.name}\n\n{c.body or c.summary}" for c in checks)
    return (f"{INTRO}\n\n{machine()}, {today()}. `{command_line()}`. Sizes {asdict(sizes)}; {elapsed:.0f} s in all.\n\n{summary_table(checks)}"
            f"\n\n{parts}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("error: --device cuda: torch sees no CUDA GPU; for the CPU smoke run use --device cpu --tiny",
              file=sys.stderr)
        return 2
    if args.device == "cpu" and cuda:
        print("error: --device cpu with a visible GPU: run with CUDA_VISIBLE_DEVICES= (the bench code uses CUDA "
              "whenever it sees it)", file=sys.stderr)
        return 2
    if args.doc == DOC and not cuda:
        print(f"error: the '{SECTION}' section of {DOC.relative_to(REPO)} is for GPU runs; give --doc another file",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    budget = Budget(args.budget_s)
    sizes = SIZES["tiny" if args.tiny else "gpu"]
    print(f"{machine()}; model {args.model}; sizes {asdict(sizes)}; budget {args.budget_s:.0f} s", flush=True)

    checks = [timed_out(part) if budget.exhausted() else run(args, sizes)
              for part, run in ((1, part_attention), (6, part_packed)) if part in args.parts]
    lora, execution = variant_specs(args, sizes)
    timings = [(part, run, specs) for part, run, specs in ((2, part_lora, lora), (3, part_execution, execution))
               if part in args.parts]
    base = BaseModel(args.model) if timings else None
    for part, run, specs in timings:
        checks.append(timed_out(part) if budget.exhausted() else run(base, specs, sizes))
        print(f"[{part}] {checks[-1].status}: {checks[-1].summary}", flush=True)
    del base
    checks += parts_subprocess(lora + execution, args, sizes, budget)
    checks.sort(key=lambda c: c.part)

    text = report(checks, sizes, time.monotonic() - start)
    print("\n" + summary_table(checks))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "sizes": asdict(sizes), "model": args.model,
                                         "checks": [asdict(c) for c in checks]}, indent=1))
    if args.doc:
        update_doc_section(SECTION, text, args.doc)
        print(f"wrote the '{SECTION}' section of {args.doc}")
    failed = [c for c in checks if c.failed]
    print("GPU check: " + ("FAILED: " + ", ".join(f"part {c.part}" for c in failed) if failed
                           else "every correctness check passed or was skipped"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
