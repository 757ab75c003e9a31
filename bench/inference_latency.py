"""Inference latency of the consolidated (merged) winner vs the base model vs the unmerged K-component model.

The merged winner is the base architecture with different weights, so its latency should equal the base
model's (target ratio 1.00 within noise); the unmerged model (K adapters injected, only the winner active:
what evaluating straight from a training checkpoint would run) pays for the extra LoRA matmuls. A real model
(default: the built-in SmolLM2-135M, fp32) gets K = 2, r = 8 adapters on all 7 projections with random values
(latency does not depend on them); the merged model is written by ``stream_merge`` and loaded with stock
``AutoModelForCausalLM.from_pretrained``. The three are timed side by side in this process, interleaved in a
fresh random order every round (bench/timing.py ``interleaved``), on a prefill forward and on greedy decoding.

    python bench/inference_latency.py                       # 4 x 128 forward, 1 x 32 + 32 new tokens decode
    python bench/inference_latency.py --rounds 7 --write-doc
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
from pathlib import Path

import torch

from reports import command_line, machine, table, today, update_doc_section
from timing import interleaved
from variants import resolve

from comlora_ds.comlora.inject import adapter_layers, inject_adapters  # noqa: E402
from comlora_ds.export.factors import ComponentExporter  # noqa: E402
from comlora_ds.export.merge import stream_merge  # noqa: E402
from merge_memory import synthetic_adapters  # noqa: E402

SECTION = "Consolidation: inference latency of the merged winner"
WINNER = 1


def build_models(base_dir: Path, work: Path, k: int, rank: int) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    cfg, tensors = synthetic_adapters(base_dir, k, rank)
    exporter = ComponentExporter(tensors, cfg.adapter)
    shapes = {f"{m}.weight": (t["lora_B"].shape[1], t["lora_A"].shape[2]) for m, t in exporter.layers.items()}
    stream_merge(base_dir, work / "merged", exporter.weight_deltas(WINNER), shapes)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32).eval()
    unmerged = copy.deepcopy(base)
    a = cfg.adapter
    inject_adapters(unmerged, a.target_modules, a.num_components, a.rank, a.alpha)
    unmerged.load_state_dict({name[len("llm."):]: t for name, t in tensors.items()}, strict=False)
    for layer in adapter_layers(unmerged).values():
        layer.active_component = WINNER
    return {"base": base, "merged": merged, "unmerged": unmerged.eval()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in name or model folder")
    p.add_argument("--components", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--no-quiet", action="store_true", help="do not wait for other processes to leave the CPU idle")
    p.add_argument("--write-doc", action="store_true", help="update this section of docs/benchmarks.md")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="inference_latency."))
    try:
        models = build_models(Path(resolve(args.model)), work, args.components, args.rank)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    vocab = models["base"].config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    prompt = {"input_ids": torch.randint(0, vocab, (1, args.prompt_len), generator=g)}
    prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
    with torch.no_grad():
        reference = models["base"](**batch).logits
        outputs = {name: m(**batch).logits for name, m in models.items()}
    drift = {name: (out - outputs["unmerged"]).abs().max().item() for name, out in outputs.items()}
    assert drift["merged"] < 1e-3 * reference.abs().max().item(), drift      # the merge is the winner

    def forward(model):
        def step():
            with torch.no_grad():
                model(**batch, use_cache=False)
        return step

    def decode(model):
        def step():
            with torch.no_grad():
                model.generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=0)
        return step

    results = {}
    for kind, make in (("forward", forward), ("decode", decode)):
        print(f"{kind}:", flush=True)
        results[kind] = interleaved({name: make(m) for name, m in models.items()}, rounds=args.rounds,
                                    steps_per_round=args.steps_per_round, quiet=not args.no_quiet)
    rows = []
    for kind, t in results.items():
        for name in models:
            rmin, rmed, paired = t.ratios(name, "base")
            rows.append([kind, name, f"{t.min(name) * 1000:.1f}", f"{t.median(name) * 1000:.1f}",
                         f"{rmin:.3f}", f"{rmed:.3f}", f"{paired:.3f}"])
    result = table(["workload", "model", "min (ms)", "median (ms)", "ratio of minima vs base",
                    "ratio of medians", "median per-round ratio"], rows)
    notes = "; ".join(f"{kind}: {t.noise_note()}" for kind, t in results.items())
    print(result)
    print(notes)
    if args.write_doc:
        def ratios(name, kind):
            return " / ".join(f"{x:.3f}" for x in results[kind].ratios(name, "base"))

        summary = (f"merged / base = {ratios('merged', 'forward')} on the forward and {ratios('merged', 'decode')} on "
                   f"decoding (ratio of minima / of medians / median per-round ratio); the unmerged model: "
                   f"{ratios('unmerged', 'forward')} and {ratios('unmerged', 'decode')}")
        body = f"""`bench/inference_latency.py`: the merged winner written by `launch/consolidate.py`'s merge, loaded
with stock `AutoModelForCausalLM`, against the base model and against the unmerged model
(K = {args.components} adapters of rank {args.rank} on all 7 projections, the winner active), timed side by side in
one process, interleaved in a random order each round, {args.rounds} rounds x {args.steps_per_round} steps.
Workloads: a forward of {args.batch_size} x {args.seq_len} tokens (no KV cache) and greedy decoding of
{args.new_tokens} tokens after a {args.prompt_len}-token prompt (batch 1). {args.model}, fp32.

Result: {summary}. The merged model has the base's architecture and shapes, so any ratio away from 1.00 is noise; the
unmerged model pays for 2 extra small matmuls per adapted projection.

```
{command_line()}
```

Machine: {machine()}; {today()}.

{result}

Noise: {notes}."""
        update_doc_section(SECTION, body)


if __name__ == "__main__":
    main()
