"""Loading the frozen base model: attention implementation, dtype, tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import ModelConfig
from .errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_attn_implementation(requested: str = "auto") -> str:
    """auto -> flash_attention_2 when flash-attn imports and CUDA is present, else sdpa.

    Decided before the model is built: a failed flash-attn load leaves the config object set to it.
    """
    flash_ok = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise ValueError("model.attn_implementation = 'flash_attention_2' needs CUDA and the flash-attn "
                         "package (pip install 'comlora_ds[flash-attn]'); use 'auto' or 'sdpa'")
    return requested


def fast_bf16_available() -> bool:
    """bf16 where the hardware runs it fast: CUDA with bf16 support. CPUs without AMX/avx512_bf16 run
    bf16 ~26x slower than fp32 (measured, see docs), so CPU counts as no."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(requested: str, bf16: bool | None = None) -> torch.dtype:
    """model.dtype; "auto" follows the training precision (bf16 when it is on), else the hardware."""
    if requested == "auto":
        use_bf16 = fast_bf16_available() if bf16 is None else bf16
        return torch.bfloat16 if use_bf16 else torch.float32
    return DTYPES[requested]


def _looks_like_a_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local folder (checked: config.json present, every safetensors file complete), a built-in
    name (converted once), or a hub id. Fails in milliseconds, before any data or weights are read."""
    from .builtin_models import resolve_model_path as resolve_builtin

    path = resolve_builtin(cfg.name_or_path, cfg.cache_dir)
    folder = Path(path).expanduser()
    if not folder.exists():
        if _looks_like_a_path(cfg.name_or_path):
            raise ModelError(f"model.name_or_path = {cfg.name_or_path!r}: no such folder")
        return path
    if not (folder / "config.json").is_file():
        raise ModelError(f"model.name_or_path = {cfg.name_or_path!r}: {folder} has no config.json")
    check_safetensors(folder)
    return str(folder)


class ModelError(InputError, ValueError):
    """The base model named by the run config cannot be used."""


def check_safetensors(folder: Path) -> None:
    """Open every weight file's header: a truncated or corrupt file is named here, not deep inside
    transformers after the data set was built."""
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelError(f"{file} is not a complete safetensors file ({err}); re-download or re-save "
                             f"the model") from None


def load_tokenizer(path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)


def load_base_model(path: str, cfg: ModelConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The frozen base causal LM, with the attention implementation chosen before it is built."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=choose_attn_implementation(cfg.attn_implementation),
        trust_remote_code=cfg.trust_remote_code,
    )
