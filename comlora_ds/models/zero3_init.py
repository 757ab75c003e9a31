"""ZeRO-3 start-up that never holds the whole base on a rank.

Without it every rank runs ``from_pretrained`` (the whole base in host memory, N times on a node) and DeepSpeed
partitions the model only inside ``deepspeed.initialize``. With ``model.zero3_init`` (the default under stage 3):

1. The model is built from its config under ``deepspeed.zero.Init`` (transformers' own recipe: its init functions
   off, RoPE's ``arange`` kept in fp32), so each module's tensors are partitioned as soon as the module exists; the
   tensors are allocated but never written, so their pages are never touched.
2. Each rank reads its own flat partition of every tensor straight from the safetensors files
   (``get_slice`` of the rows that hold it), so no rank ever reads, gathers or receives a whole tensor.
3. Adapter layers and the selector are partitioned as soon as each is created (``Partitioner``), with the values a
   non-ZeRO-3 run would have: built in fp32, cast to the training dtype the way DeepSpeed casts a model, then
   converted (DeepSpeed broadcasts rank 0's values).

What we do by hand and why: transformers' ZeRO-3 ``from_pretrained`` (5.24) reads the whole checkpoint on rank 0 and
gathers every module on every rank to copy it in, and DeepSpeed's ``zero.Init`` broadcasts every new tensor from
rank 0; both are whole tensors on every rank and, on rank 0, the whole base. Reading partitions ourselves needs the
ZeRO-3 partition layout (rank r holds flat elements ``[r * n, (r + 1) * n)`` of the flattened tensor, zero padded),
which ``tests/test_zero3_init.py`` checks against DeepSpeed's own partitioning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import deepspeed.comm as ds_comm
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..config import ConfigError, ModelConfig
from .base_model import ModelError, choose_attn_implementation, read_rows, tensor_shape

INDEX_FILE = "model.safetensors.index.json"
READ_BLOCK = 1 << 20          # elements read at once while a partition is filled (4 MiB in fp32)


def check_model_dtype(cfg: ModelConfig, bf16: bool) -> None:
    """A ZeRO-3-built base is in the training precision (zero.Init's dtype): refuse a model.dtype that asks for
    another one, which only the whole-model load gives (a bf16 base under fp32 training)."""
    if not bf16 and cfg.dtype in ("bfloat16", "float16"):
        raise ConfigError(f"model.dtype = {cfg.dtype} with fp32 training under ZeRO stage 3: model.zero3_init builds "
                          f"the base in the training precision; set model.dtype=auto, train.bf16=true, or "
                          f"model.zero3_init=false")


class _PartitionWithoutBroadcast(deepspeed.zero.Init):
    """``zero.Init`` that skips the broadcast of each new tensor from rank 0 while the base is built: the tensors are
    uninitialised and every rank overwrites its own partition from the checkpoint, so the broadcast would only write
    a whole copy of every tensor on every other rank. Tensors converted later (adapters, the selector, through
    ``convert_to_zero_parameters`` of a base parameter) are broadcast as usual."""

    building = False

    def _zero_init_param(self, param):
        if not _PartitionWithoutBroadcast.building:
            return super()._zero_init_param(param)
        self._convert_to_deepspeed_param(param)
        param.partition()


def weight_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or the shards of ``model.safetensors.index.json``)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no *.safetensors file: model.zero3_init reads each rank's partition from "
                         f"safetensors; convert the checkpoint (save_pretrained(safe_serialization=True)) or set "
                         f"model.zero3_init=false")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def weights_folder(path: str) -> Path:
    """A local model folder, or the hub snapshot of ``path`` with its config and safetensors files (the hub cache;
    offline it must already be there)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))


def fill_partition(param: nn.Parameter, file: Path, name: str) -> None:
    """Copies this rank's ZeRO-3 partition of ``param`` (flat elements ``[r * n, (r + 1) * n)`` of the flattened
    tensor, zero padded past its end) from tensor ``name`` of ``file``, reading only the rows that hold it."""
    part = param.ds_tensor
    if getattr(part, "final_location", None) is not None:
        raise ModelError("model.zero3_init cannot fill parameters offloaded to NVMe; use offload_param.device=cpu "
                         "or set model.zero3_init=false")
    shape = list(param.ds_shape)
    size = part.ds_numel
    start = size * ds_comm.get_rank(group=param.ds_process_group)
    stop = min(start + size, param.ds_numel)
    part.zero_()
    row = max(1, math.prod(shape[1:]))
    block = max(1, READ_BLOCK // row)                # rows per read: the transient copy stays small
    for first in range(start // row, -(-stop // row), block):
        rows = read_rows(file, name, first, first + block).reshape(-1)
        lo, hi = max(start, first * row), min(stop, first * row + rows.numel())
        part[lo - start:hi - start].copy_(rows[lo - first * row:hi - first * row])


def fill_partitions(model: nn.Module, folder: Path) -> None:
    """Every parameter's own ZeRO-3 partition and every persistent buffer, from the checkpoint in ``folder``; a
    parameter the files lack, or one whose shape differs, is named before any tensor is read."""
    index = weight_index(folder)
    missing = [name for name, _ in model.named_parameters() if name not in index]
    if missing:
        raise ModelError(f"{folder}: the safetensors files have no tensor {missing[0]!r} ({len(missing)} "
                         f"parameter(s) missing, e.g. {missing[:3]}; the files have e.g. {sorted(index)[:3]}); "
                         f"model.zero3_init reads tensors by parameter name: set model.zero3_init=false to load "
                         f"this checkpoint through transformers")
    for name, param in model.named_parameters():
        shape = tensor_shape(index[name], name)
        if shape != list(param.ds_shape):
            raise ModelError(f"{index[name]}: tensor {name!r} has shape {shape}, the model built from config.json "
                             f"expects {list(param.ds_shape)}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            fill_partition(param, index[name], name)
        persistent = set(model.state_dict()) - {name for name, _ in model.named_parameters(remove_duplicate=False)}
        for name, buffer in model.named_buffers():
            if name in index and name in persistent:
                buffer.copy_(read_rows(index[name], name, 0, buffer.shape[0] if buffer.dim() else 1).view_as(buffer))


@contextmanager
def _building_partitioned(ds_config: dict) -> Iterator[None]:
    """transformers' recipe for building a model under ``zero.Init`` (``PreTrainedModel._from_config``), with our
    broadcast-free ``zero.Init``."""
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    _PartitionWithoutBroadcast.building = True
    try:
        with no_init_weights(), prevent_arange_dtype_change(), \
                _PartitionWithoutBroadcast(config_dict_or_path=ds_config):
            yield
    finally:
        _PartitionWithoutBroadcast.building = False


def causal_lm_class(config, trust_remote_code: bool) -> type[PreTrainedModel]:
    """The class ``AutoModelForCausalLM`` builds for ``config``, its modeling module imported now.

    A modeling module first imported inside ``deepspeed.zero.Init`` is broken for the rest of the process:
    zero.Init wraps the ``__init__`` of every module class defined while it is active and puts back, on exit, the
    ``__init__`` it saw; the hub-kernel decorators (``transformers.integrations.hub_kernels``, on ``LlamaAttention``)
    replace ``__init__`` and ``forward`` when the class is defined, and only ``forward`` survives that exit, so every
    attention layer built afterwards, by any later ``from_pretrained`` in the process, fails on its first forward
    (``'LlamaAttention' object has no attribute '_kernel_funcs'``). Imported before zero.Init starts, the classes are only patched and
    restored like every other existing class."""
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], config._name_or_path)
    return AutoModelForCausalLM._model_mapping[type(config)]


def load_partitioned_base(path: str, cfg: ModelConfig, ds_config: dict) -> PreTrainedModel:
    """The frozen base, built partitioned and filled from its safetensors files (each rank its own partitions)."""
    folder = weights_folder(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    attn = choose_attn_implementation(cfg.attn_implementation)
    causal_lm_class(config, cfg.trust_remote_code)         # imported here, outside zero.Init: see its docstring
    with _building_partitioned(ds_config):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code,
                                                 attn_implementation=attn)
    model.tie_weights()
    fill_partitions(model, folder)
    return model


class Partitioner:
    """Partitions modules added to a ZeRO-3-built model (adapter layers, the selector) as soon as they exist."""

    def __init__(self, model: nn.Module, bf16: bool):
        self.anchor = next(p for p in model.parameters() if hasattr(p, "ds_id"))
        self.bf16 = bf16

    def __call__(self, module: nn.Module) -> nn.Module:
        fresh = [p for p in module.parameters() if not hasattr(p, "ds_id")]
        if self.bf16:           # what deepspeed.initialize does to a model that is not ZeRO-3-built
            for p in fresh:
                if p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        if fresh:
            self.anchor.convert_to_zero_parameters(fresh)
        return module
