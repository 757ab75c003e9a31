"""Loading the frozen base model: attention implementation, dtype, tokenizer."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..config import ModelConfig
from ..errors import InputError, MissingPackage

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


class DeviceError(InputError, ValueError):
    """A ``--device`` / ``--dtype`` this machine cannot run."""


@dataclass(frozen=True)
class Placement:
    """Where a model runs for inference (consolidation's scoring, evaluation): device, dtype and attention chosen
    together, so flash-attention is never asked for a model that stays on the CPU."""

    device: str
    dtype: torch.dtype
    attn_implementation: str


def choose_placement(device: str | None = None, dtype: str | None = None) -> Placement:
    """``device`` None or "auto": ``cuda:$LOCAL_RANK`` when CUDA is available, else cpu (``cuda`` alone also means
    ``cuda:$LOCAL_RANK``); an explicit device wins and is checked here (a CUDA device on a machine without one is
    refused before anything is loaded). ``dtype`` None or "auto": bf16 on a CUDA device that has it (fp16 on older
    ones), fp32 on the CPU (bf16 is ~26x slower there). Attention: flash_attention_2 on a CUDA device in bf16/fp16
    when transformers finds flash-attn (``is_flash_attn_2_available``), else sdpa."""
    from transformers.utils import is_flash_attn_2_available

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu "
                              f"or leave --device out")
        if parsed.index is None:      # under torchrun each rank takes its own GPU
            parsed = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if parsed.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        raise DeviceError(f"--device {device}: choose cpu or cuda[:N]")
    if dtype in (None, "auto"):
        torch_dtype = torch.float32
        if parsed.type == "cuda":
            torch_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise DeviceError(f"dtype {dtype!r}: choose from auto, {', '.join(DTYPES)}")
    flash = parsed.type == "cuda" and torch_dtype != torch.float32 and is_flash_attn_2_available()
    return Placement(str(parsed), torch_dtype, "flash_attention_2" if flash else "sdpa")


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


def read_rows(file: Path, name: str, first: int, last: int) -> torch.Tensor:
    """Rows ``[first, last)`` (along dim 0) of tensor ``name`` of a safetensors file, the file opened for this one
    read: only those rows' pages are ever mapped into the process, and none stay mapped afterwards (reading a whole
    file through one open handle leaves the whole file in the process's resident set)."""
    with safe_open(str(file), framework="pt") as f:
        stored = f.get_slice(name)
        if not stored.get_shape():
            return f.get_tensor(name).reshape(1)
        return stored[first:last]


def tensor_shape(file: Path, name: str) -> list[int]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.get_slice(name).get_shape())


def load_tokenizer(path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except ValueError as err:
        # Without sentencepiece, transformers reads a lone SentencePiece tokenizer.model as a tiktoken file and
        # says "tiktoken is required", which sends the user to the wrong package.
        if "tiktoken" in str(err) and importlib.util.find_spec("sentencepiece") is None:
            raise MissingPackage(f"{path}: its tokenizer is a SentencePiece tokenizer.model, which needs the "
                                 f"sentencepiece package: pip install sentencepiece") from None
        raise


def load_base_model(path: str, cfg: ModelConfig, dtype: torch.dtype,
                    attn_implementation: str | None = None) -> PreTrainedModel:
    """The frozen base causal LM, with the attention implementation chosen before it is built (``attn_implementation``:
    an inference :class:`Placement`'s, instead of the run config's training choice)."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=attn_implementation or choose_attn_implementation(cfg.attn_implementation),
    )
