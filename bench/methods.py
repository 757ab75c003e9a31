"""LoRA-Pro and LoRA-Dash against plain LoRA: training step time and optimizer-state memory, same model.

Variants (all on the same frozen base, the same batch, ComLoRA K components when K > 1), timed interleaved:

* ``LoRA``                       torch AdamW on the adapters (+ selector), the baseline;
* ``LoRA-Pro full``              ``LoRAProAdamW(mode="full")``: Adam moments of the [K, d_out, d_in] equivalent
                                 gradient (ZeRO stage 0 path);
* ``LoRA-Pro efficient``         ``LoRAProAdamW(mode="efficient")``: adjusted gradients, AdamW on the factors;
* ``LoRA-Pro efficient (ZeRO)``  the ZeRO >= 1 path without DeepSpeed: the gradient transform of
                                 ``before_optimizer_step`` on each pair's full gradient, then torch AdamW (the
                                 DeepSpeed run adds two all-reduces of LoRA-sized gradients per pair);
* ``LoRA-Dash pre-launch`` / ``LoRA-Dash dash phase``  DashLinear before / after the switch, torch AdamW.

One step = zero_grad + forward + backward (the library's ``forward_backward``) + optimizer step. Memory: the
bytes of every tensor in the optimizer state after the warm-up steps, plus LoRA-Dash's frozen U_S / V_S buffers;
the one-time switch (an fp32 SVD of every adapted W0) is timed separately.

    python bench/methods.py --model stories260k --ks 1 2 --doc
    python bench/methods.py --model smollm2-135m --ks 2 --seq-len 64 --micro-batch 2 --rounds 3 --doc
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from environment import device  # noqa: E402
from reports import machine, provenance, publish, table  # noqa: E402
from timing import interleaved  # noqa: E402
from variants import BaseModel, make_batch, run_config, Spec, supervised_tokens  # noqa: E402

from comlora_ds.methods import get_method  # noqa: E402
from comlora_ds.methods.lora_dash import dash_layers, switch_to_dash  # noqa: E402
from comlora_ds.methods.lora_pro import lora_pairs, lorapro_adjust  # noqa: E402
from comlora_ds.comlora.model import build_model, build_objective  # noqa: E402
from comlora_ds.training.step import forward_backward  # noqa: E402

SECTION = "Methods"
INTRO = """\
Script: `bench/methods.py`. LoRA-Pro and LoRA-Dash against plain LoRA on the same model, the same frozen base
weights and the same batch, one process, variants timed interleaved (`bench/timing.py`'s `interleaved`: warm-up,
then rounds in a fresh random order; on the shared CPU it waits for the cores to go quiet and redoes interrupted
steps). One step = zero_grad + forward + backward + optimizer step; no DeepSpeed, so the numbers are the methods'
own cost. "opt. state" is every tensor of the optimizer state after the warm-up (fp32); LoRA-Dash also keeps
its frozen U_S, V_S as buffers (column "buffers"). "LoRA-Pro efficient (ZeRO)" is the ZeRO >= 1 path's compute
(the gradient transform, then AdamW); a DeepSpeed run adds two all-reduces of LoRA-sized gradients per layer.
LoRA on all 7 linear modules, alpha 16, dropout 0.05, LoRA-Dash s_d = 8."""

VARIANTS = ("LoRA", "LoRA-Pro full", "LoRA-Pro efficient", "LoRA-Pro efficient (ZeRO)", "LoRA-Dash pre-launch",
            "LoRA-Dash dash phase")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stories260k", help="stories260k, smollm2-135m, or a local HF folder")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2], help="numbers of components K")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--doc", action="store_true", help="write the table into docs/benchmarks.md")
    return p.parse_args(argv)


def _cfg(k: int, rank: int, method: str, mode: str | None = None):
    cfg = run_config(Spec(k=k, rank=rank))
    cfg.adapter.method = method
    if mode:
        cfg.lora_pro.mode = mode
    return cfg.validate()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


class Variant:
    """A ready training step of one method; ``opt`` holds its optimizer for the memory count."""

    def __init__(self, name: str, k: int, base: BaseModel, batch: dict, rank: int, seed: int = 0):
        method, mode = {"LoRA": ("lora", None), "LoRA-Pro full": ("lora_pro", "full"),
                        "LoRA-Pro efficient": ("lora_pro", "efficient"),
                        "LoRA-Pro efficient (ZeRO)": ("lora_pro", "efficient"),
                        "LoRA-Dash pre-launch": ("lora_dash", None), "LoRA-Dash dash phase": ("lora_dash", None)}[name]
        cfg = _cfg(k, rank, method, mode)
        torch.manual_seed(seed)
        self.model = build_model(cfg, base.fresh()).to(device())
        self.objective = build_objective(cfg)
        params = self.model.trainable_parameters()
        self.transform = name == "LoRA-Pro efficient (ZeRO)"
        if method == "lora_pro" and not self.transform:
            self.opt = get_method(cfg).build_optimizer(self.model, [{"params": params, "weight_decay": 0.0}])
        else:
            self.opt = torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available())
        self.pairs = lora_pairs(self.model) if self.transform else []
        self.x_mode, self.delta = cfg.lora_pro.x_mode, cfg.lora_pro.delta
        self.switch_seconds = None
        if name == "LoRA-Dash dash phase":
            t0 = time.perf_counter()
            switch_to_dash(self.model, step=1)
            self.switch_seconds = time.perf_counter() - t0
        self.batch = batch
        self.buffer_bytes = sum(layer.dash_U.numel() * layer.dash_U.element_size() +
                                layer.dash_V.numel() * layer.dash_V.element_size()
                                for layer in dash_layers(self.model).values())

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        forward_backward(self.model, self.batch, self.objective, 0.5, lambda loss: loss.backward())
        if self.transform:
            with torch.no_grad():
                for pair in self.pairs:
                    ga, gb = lorapro_adjust(pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scaling, self.x_mode,
                                            self.delta)
                    pair.A.grad.copy_(ga)
                    pair.B.grad.copy_(gb)
        self.opt.step()


def run_k(base: BaseModel, args, k: int) -> tuple[str, str]:
    batch = make_batch(base.vocab, args.micro_batch, args.seq_len)
    variants = {name: Variant(name, k, base, batch, args.rank) for name in args.variants}
    t = interleaved({name: v.step for name, v in variants.items()}, args.rounds, args.steps_per_round,
                    args.warmup)
    ref = "LoRA" if "LoRA" in variants else args.variants[0]
    ref_state = state_bytes(variants[ref].opt)
    rows = []
    for name in t.names:
        r_min, r_med, r_pair = t.ratios(name, ref)
        state = state_bytes(variants[name].opt)
        rows.append([name, t.min(name) * 1e3, t.median(name) * 1e3, r_min, r_med, r_pair, state / 2 ** 20,
                     state / ref_state, variants[name].buffer_bytes / 2 ** 20])
    header = ["variant", "min ms", "median ms", "time / LoRA (min)", "(median)", "(paired)", "opt. state MiB",
              "opt. state / LoRA", "buffers MiB"]
    switch = next((v.switch_seconds for v in variants.values() if v.switch_seconds is not None), None)
    switch_note = f" LoRA-Dash's one-time switch (all layers' fp32 SVDs): {switch:.2f} s." if switch else ""
    lines = [table(header, rows), "", f"Noise: {t.noise_note()}.{switch_note}"]
    sub = (f"{args.model}, K = {k}, r = {args.rank}, micro-batch {args.micro_batch} x seq {args.seq_len} "
           f"({supervised_tokens(batch)} supervised tokens)")
    return sub, "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    base = BaseModel(args.model, args.dtype)
    print(f"{machine()}; model {args.model} ({base.dtype}), device {device()}")
    for k in args.ks:
        print(f"\n== K = {k}")
        sub, text = run_k(base, args, k)
        body = (f"{provenance()} Base "
                f"{str(base.dtype).replace('torch.', '')}; {args.rounds} rounds x {args.steps_per_round} steps after "
                f"{args.warmup} warm-up.\n\n{text}")
        publish(SECTION, INTRO, sub, body, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
