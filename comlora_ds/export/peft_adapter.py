"""One component as a standard PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` [rank, d_in] and ``.lora_B.weight``
[d_out, rank], fp32, so ``peft.PeftModel.from_pretrained(base, folder)`` loads them onto the original base with
no comlora_ds import. The config keeps the run's r, lora_alpha, target_modules, lora_dropout and use_rslora.
A rule that returns another rank for some layers (see ``factors``) gets a ``rank_pattern``; where PEFT's
scaling for a layer differs from the rule's, the ratio is folded into B so the adapter computes the same delta.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..comlora.layer import lora_scaling
from ..config import AdapterConfig
from .factors import ComponentExporter

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_peft_adapter(exporter: ComponentExporter, k: int, adapter: AdapterConfig, base_name_or_path: str,
                       out_dir: Path, tokenizer_dir: Path | None = None) -> dict:
    """Writes component k of every adapted layer into ``out_dir``; returns a summary for the report."""
    from peft import LoraConfig

    factors = {module: exporter.factors(module, k) for module in sorted(exporter.layers)}
    ranks = {module: f.rank for module, f in factors.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {module: r for module, r in ranks.items() if r != rank}
    weights: dict[str, torch.Tensor] = {}
    for module, f in factors.items():
        ratio = f.scaling / lora_scaling(adapter.alpha, f.rank, adapter.use_rslora)
        B = f.B if ratio == 1.0 else f.B * ratio
        weights[f"base_model.model.{module}.lora_A.weight"] = f.A.float().contiguous()
        weights[f"base_model.model.{module}.lora_B.weight"] = B.float().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = LoraConfig(r=rank, lora_alpha=adapter.alpha, target_modules=list(adapter.target_modules),
                        lora_dropout=adapter.dropout, use_rslora=adapter.use_rslora, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name_or_path, rank_pattern=rank_pattern)
    config.save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)
    return {"component": k, "rank": rank, "rank_pattern": rank_pattern, "tensors": len(weights),
            "parameters": sum(t.numel() for t in weights.values())}


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    """The checkpoint's tokenizer files (pad token as trained), copied unchanged."""
    for path in sorted(Path(tokenizer_dir).iterdir()):
        if path.is_file():
            shutil.copy2(path, out_dir / path.name)
