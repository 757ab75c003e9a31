"""Model-state memory per GPU for ComLoRA on LLaMA-3-8B and LLaMA-3-70B under ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload.

    python bench/zero_memory.py [--models 8b 70b] [--gpus 8 64] [--components 2] [--rank 8] [--tokens 4096]

Counts come from the real modules: ``LlamaForCausalLM`` built from each model's ``LlamaConfig`` on the meta device
(no weights, no download), our adapters injected into q,k,v,o,gate,up,down, and the selector at its default size
(one encoder layer at the model's hidden size, FFN 1.5 x hidden). Bytes follow the ZeRO paper's mixed-precision
accounting (Rajbhandari et al. 2020, section 3.1), with the frozen base kept out of the optimizer:

* frozen base weight: 2 bytes (bf16), no gradient, no optimizer state;
* trainable parameter (adapters + selector): 2 (bf16 weight) + 2 (bf16 gradient) + 12 (fp32 master copy, Adam m, v).

ZeRO-2 partitions the trainable gradients and optimizer states over the N GPUs and replicates every weight;
ZeRO-3 partitions the weights too (the frozen base included); ``ds_configs/zero3_offload.json`` keeps the bf16
weight partitions and the optimizer states in CPU memory (plus DeepSpeed's fp32 copy of the gradient partition that
CPU Adam reads), leaving the GPU with the gathered working set and the gradient partition.

Counted besides the model states: ZeRO-3's gather working set, taken as the largest module gathered at once (a
decoder layer, the embedding or the LM head, in bf16); DeepSpeed prefetches up to ``stage3_prefetch_bucket_size``
more. Activations are given per token, for activation checkpointing (``model.gradient_checkpointing: true``): the
saved input of every decoder layer, ``layers x hidden x 2`` bytes per token, times K in the batched mode (the
micro-batch runs K times); the one layer recomputed during backward, the logits chunks and the selector's
activations come on top and are not counted. Not counted either: communication buckets (``reduce_bucket_size``,
``allgather_bucket_size``), the CUDA context and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comlora_ds.comlora.inject import inject_adapters  # noqa: E402
from comlora_ds.config import LLAMA_LINEAR_MODULES  # noqa: E402
from comlora_ds.comlora.selector import Selector  # noqa: E402

# The LlamaConfig values of meta-llama/Meta-Llama-3-8B and Meta-Llama-3-70B (their config.json files).
LLAMA3 = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}
GIB = 1024 ** 3
BASE_BYTES = 2             # bf16 frozen weight
TRAINABLE_GPU_BYTES = 4    # bf16 weight + bf16 gradient
OPTIMIZER_BYTES = 12       # fp32 master copy + Adam m + Adam v
FP32_GRAD_BYTES = 4        # the fp32 gradient partition CPU Adam reads (offload)
CONFIGS = ("ZeRO-2", "ZeRO-3", "ZeRO-3 + offload")


@dataclass(frozen=True)
class ParameterCounts:
    base: int               # every parameter of the frozen LlamaForCausalLM
    adapters: int           # the K adapters of every targeted linear layer
    selector: int
    largest_module: int     # the most parameters ZeRO-3 gathers at once: a decoder layer, the embedding or the LM head
    layers: int
    hidden: int

    @property
    def trainable(self) -> int:
        return self.adapters + self.selector


def parameter_counts(model: str, components: int, rank: int) -> ParameterCounts:
    config = LlamaConfig(**LLAMA3[model])
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
        base = sum(p.numel() for p in llm.parameters())
        largest = max(sum(p.numel() for p in module.parameters())
                      for module in (*llm.model.layers, llm.model.embed_tokens, llm.lm_head))
        inject_adapters(llm, list(LLAMA_LINEAR_MODULES), components, rank, alpha=2 * rank)
        adapters = sum(p.numel() for p in llm.parameters() if p.requires_grad)
        selector = 0
        if components > 1:
            selector = sum(p.numel() for p in Selector(components, config.hidden_size,
                                                       model_num_heads=config.num_attention_heads).parameters())
    return ParameterCounts(base, adapters, selector, largest, config.num_hidden_layers, config.hidden_size)


def per_gpu_bytes(counts: ParameterCounts, gpus: int) -> dict[str, dict[str, float]]:
    """For each configuration, the bytes one GPU's rank holds, by part, on the GPU and in CPU memory."""
    base, trainable = counts.base, counts.trainable
    optimizer = OPTIMIZER_BYTES * trainable / gpus
    gradients = 2 * trainable / gpus
    gather = BASE_BYTES * counts.largest_module
    return {
        "ZeRO-2": {"base": BASE_BYTES * base, "adapters": 2 * trainable, "gradients": gradients,
                   "optimizer": optimizer, "gather": 0.0, "cpu": 0.0},
        "ZeRO-3": {"base": BASE_BYTES * base / gpus, "adapters": 2 * trainable / gpus, "gradients": gradients,
                   "optimizer": optimizer, "gather": gather, "cpu": 0.0},
        "ZeRO-3 + offload": {"base": 0.0, "adapters": 0.0, "gradients": gradients, "optimizer": 0.0,
                             "gather": gather,
                             "cpu": (BASE_BYTES * base + 2 * trainable) / gpus + optimizer
                             + FP32_GRAD_BYTES * trainable / gpus},
    }


def gpu_total(parts: dict[str, float]) -> float:
    return sum(value for key, value in parts.items() if key != "cpu")


def checkpointed_activation_bytes_per_token(counts: ParameterCounts, components: int) -> int:
    """What activation checkpointing keeps per token: every decoder layer's bf16 input, K times in batched mode."""
    return counts.layers * counts.hidden * 2 * components


def table(models: list[str], gpus: list[int], components: int, rank: int, tokens: int) -> str:
    lines = [f"K = {components}, r = {rank}, targets q,k,v,o,gate,up,down; GiB per GPU.\n",
             "| model | base params | adapter params | selector params | GPUs | config | base | adapters + selector "
             "| gradients | optimizer (fp32 master + Adam) | ZeRO-3 gather | GPU total | CPU per GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    activations = []
    for model in models:
        counts = parameter_counts(model, components, rank)
        for n in gpus:
            for name, parts in per_gpu_bytes(counts, n).items():
                lines.append(
                    f"| LLaMA-3-{model.upper()} | {counts.base / 1e9:.2f} B | {counts.adapters / 1e6:.1f} M | "
                    f"{counts.selector / 1e6:.1f} M | {n} | {name} | {parts['base'] / GIB:.2f} | "
                    f"{parts['adapters'] / GIB:.3f} | {parts['gradients'] / GIB:.4f} | {parts['optimizer'] / GIB:.3f} | "
                    f"{parts['gather'] / GIB:.2f} | {gpu_total(parts) / GIB:.2f} | {parts['cpu'] / GIB:.2f} |")
        per_token = checkpointed_activation_bytes_per_token(counts, components)
        activations.append(f"- LLaMA-3-{model.upper()}: {counts.layers} x {counts.hidden} x 2 bytes x K={components} "
                           f"= {per_token / 2**10:.0f} KiB per token; {tokens} tokens per GPU (micro-batch x "
                           f"sequence) = {per_token * tokens / GIB:.2f} GiB")
    return "\n".join(lines + ["", "Checkpointed activations (every ZeRO stage, per GPU):", *activations])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(LLAMA3), default=["8b", "70b"])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--components", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per GPU per micro-batch, for activations")
    args = parser.parse_args(argv)
    print(table(args.models, args.gpus, args.components, args.rank, args.tokens))


if __name__ == "__main__":
    main()
