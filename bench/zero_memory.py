"""Model-state memory per GPU for ComLoRA on LLaMA-3-8B under each ZeRO stage, from parameter counts.

    python bench/zero_memory.py [--gpus 8] [--rank 8] [--components 1 2 4]

Counts come from the real modules: LlamaForCausalLM(LLaMA-3-8B config) built on the meta device,
our adapters injected into q,k,v,o,gate,up,down, and the selector at its default size. Bytes follow
the ZeRO paper's mixed-precision accounting: a frozen bf16 base weight costs 2 bytes; a trainable
parameter costs 2 (bf16 weight) + 2 (bf16 gradient) + 12 (fp32 master copy, Adam m and v) = 16.
Stage 2 partitions the gradients and optimizer states of the trainable parameters over the GPUs;
stage 3 also partitions every weight, the frozen base included; offload moves the fp32 optimizer
states (and with offload_param the bf16 weights) to CPU memory. Activations are not included.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from comlora_ds.adapters.inject import inject_adapters
from comlora_ds.config import LLAMA_LINEAR_MODULES
from comlora_ds.selector import Selector

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
GIB = 1024 ** 3


def counts(components: int, rank: int) -> tuple[int, int, int]:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
        base = sum(p.numel() for p in model.parameters())
        inject_adapters(model, list(LLAMA_LINEAR_MODULES), components, rank, alpha=2 * rank)
        adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        selector = 0
        if components > 1:
            selector = sum(p.numel() for p in Selector(components, 4096, model_num_heads=32).parameters())
    return base, adapters, selector


def per_gpu_gib(base: int, trainable: int, gpus: int) -> dict[str, tuple[float, float]]:
    """(GPU GiB, CPU GiB) per GPU for each configuration."""
    return {
        "ZeRO-2": ((2 * base + 4 * trainable + 12 * trainable / gpus) / GIB, 0.0),
        "ZeRO-3": ((2 * base / gpus + 2 * trainable / gpus + 2 * trainable / gpus + 12 * trainable / gpus) / GIB, 0.0),
        "ZeRO-3 + offload": (((2 * base + 4 * trainable) / gpus) / GIB, (12 * trainable / gpus) / GIB),
        "ZeRO-3 + offload params": (0.0, ((2 * base + 16 * trainable) / gpus) / GIB),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--components", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print(f"LLaMA-3-8B, rank {args.rank}, {args.gpus} GPUs; model states only (no activations), GiB per GPU\n")
    print("| K | base params | adapter params | selector params | ZeRO-2 GPU | ZeRO-3 GPU | "
          "ZeRO-3+offload GPU / CPU | ZeRO-3+offload params CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.components:
        base, adapters, selector = counts(k, args.rank)
        mem = per_gpu_gib(base, adapters + selector, args.gpus)
        print(f"| {k} | {base / 1e9:.2f} B | {adapters / 1e6:.1f} M | {selector / 1e6:.1f} M | "
              f"{mem['ZeRO-2'][0]:.2f} | {mem['ZeRO-3'][0]:.2f} | {mem['ZeRO-3 + offload'][0]:.2f} / "
              f"{mem['ZeRO-3 + offload'][1]:.2f} | {mem['ZeRO-3 + offload params'][1]:.2f} |")


if __name__ == "__main__":
    main()
