"""The user's DeepSpeed JSON, with its ``"auto"`` values filled from the run config.

Same rules as the transformers DeepSpeed integration (``HfTrainerDeepSpeedConfig.fill_match``):
an ``"auto"`` value is filled from the run config; an explicit value that contradicts the run config
is an error naming both, raised before any model is loaded; an ``"auto"`` we cannot fill is an error.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import hjson

from ..config import RunConfig
from ..data.formats import repeated_keys
from ..errors import InputError
from ..fileio import read_config_text

AUTO = "auto"


class DeepSpeedConfigError(InputError, ValueError):
    pass


def load_ds_config(source: str | Path | dict) -> dict:
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    text = read_config_text(path, "DeepSpeed config", DeepSpeedConfigError)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        repeated = repeated_keys(pairs)
        if repeated:
            raise DeepSpeedConfigError(f"DeepSpeed config {path}: key(s) {', '.join(map(repr, repeated))} given twice "
                                       f"in one object (DeepSpeed refuses duplicate keys)")
        return dict(pairs)

    try:   # as DeepSpeed reads it: hjson (JSON plus comments), duplicate keys refused
        ds = hjson.loads(text, object_pairs_hook=no_duplicates)
    except hjson.HjsonDecodeError as err:
        raise DeepSpeedConfigError(f"DeepSpeed config {path}: invalid JSON at line {err.lineno} "
                                   f"column {err.colno}: {err.msg}") from None
    if not isinstance(ds, dict):
        raise DeepSpeedConfigError(f"DeepSpeed config {path}: the top level must be a JSON object, "
                                   f"not {type(ds).__name__}")
    if not ds:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} holds no settings; give them (e.g. zero_optimization), "
                                   f"or leave --deepspeed out for the shipped zero2")
    return ds


def _get(ds: dict, dotted: str) -> Any:
    node = ds
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(ds: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = ds
    for key in parents:
        node = node[key]
    node[leaf] = value


def _fill_match(ds: dict, dotted: str, value: Any, source: str, required: bool = False) -> None:
    """``"auto"`` (or absent, when required) -> value; an explicit different value is an error."""
    parent = dotted.rpartition(".")[0]
    if parent and _get(ds, parent) is None:
        return
    current = _get(ds, dotted)
    if current == AUTO or (current is None and required):
        _set(ds, dotted, value)
    elif current is not None and current != value:
        raise DeepSpeedConfigError(f"DeepSpeed config {dotted} = {current!r} contradicts the run config "
                                   f"{source} = {value!r}; set it to \"auto\" or make them agree")


def _fill_only(ds: dict, dotted: str, value: Any) -> None:
    """Model-derived sizes: fill ``"auto"``, keep whatever the user chose."""
    if _get(ds, dotted) == AUTO:
        _set(ds, dotted, value)


def resolve_bf16(cfg: RunConfig, ds: dict) -> bool:
    """bf16 on or off: the run config decides unless it says auto and the DS config is explicit."""
    import torch

    from ..models.base_model import fast_bf16_available

    requested = str(cfg.train.bf16).lower()
    ds_value = _get(ds, "bf16.enabled")
    if requested == "auto":
        enabled = ds_value if isinstance(ds_value, bool) else fast_bf16_available()
    else:
        enabled = requested == "true"
    if enabled and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise DeepSpeedConfigError(f"bf16 requested (train.bf16 = {cfg.train.bf16!r}, DeepSpeed bf16.enabled = "
                                   f"{ds_value!r}) but {torch.cuda.get_device_name()} does not support bf16")
    return enabled


def fill_ds_config(source: str | Path | dict, cfg: RunConfig, world_size: int, hidden_size: int,
                   total_steps: int, warmup_steps: int) -> dict:
    from .step import backward_passes

    ds = load_ds_config(source)
    t = cfg.train
    gas = t.gradient_accumulation_steps * backward_passes(cfg.adapter.num_components, cfg.comlora.execution)
    if _get(ds, "fp16.enabled") is True:
        raise DeepSpeedConfigError("DeepSpeed config fp16.enabled = true is not supported (dynamic loss "
                                   "scaling with K components is untested); use bf16")
    _fill_match(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", True)
    _fill_match(ds, "gradient_accumulation_steps", gas,
                "train.gradient_accumulation_steps (x K in sequential mode)", True)
    _fill_match(ds, "train_batch_size", t.micro_batch_size * gas * world_size,
                f"train.micro_batch_size x gradient_accumulation_steps (x K in sequential mode) x {world_size} "
                f"ranks", True)
    if cfg.clip_scope == "per_group":    # the trainer clips each group itself (comlora_ds/training/clipping.py)
        scope = "per_group" if cfg.train.clip_scope == "per_group" else "auto (per_group for K > 1)"
        _fill_match(ds, "gradient_clipping", 0.0, f"train.clip_scope = {scope} (the trainer clips each group itself; "
                    f"train.clip_scope=global lets DeepSpeed clip), which needs DeepSpeed's gradient_clipping", True)
    else:
        _fill_match(ds, "gradient_clipping", t.max_grad_norm, "train.max_grad_norm", True)
    bf16 = resolve_bf16(cfg, ds)
    ds.setdefault("bf16", {})["enabled"] = bf16

    _fill_match(ds, "optimizer.params.lr", t.learning_rate, "train.learning_rate")
    _fill_match(ds, "optimizer.params.betas", [t.adam_beta1, t.adam_beta2], "train.adam_beta1/2")
    _fill_match(ds, "optimizer.params.eps", t.adam_epsilon, "train.adam_epsilon")
    _fill_match(ds, "optimizer.params.weight_decay", t.weight_decay, "train.weight_decay")
    _fill_match(ds, "scheduler.params.warmup_min_lr", 0, "0")
    _fill_match(ds, "scheduler.params.warmup_max_lr", t.learning_rate, "train.learning_rate")
    _fill_match(ds, "scheduler.params.warmup_num_steps", warmup_steps, "train.warmup_ratio x steps")
    _fill_match(ds, "scheduler.params.total_num_steps", total_steps, "total optimizer steps")

    _fill_only(ds, "zero_optimization.reduce_bucket_size", hidden_size * hidden_size)
    _fill_only(ds, "zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    _fill_only(ds, "zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size)

    leftover = [key for key in _auto_keys(ds)]
    if leftover:
        raise DeepSpeedConfigError(f"DeepSpeed config keys {leftover} are \"auto\" but comlora_ds has no value "
                                   f"for them; set them explicitly")
    return ds


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _auto_keys(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == AUTO else []


def zero_stage(ds: dict) -> int:
    return int(_get(ds, "zero_optimization.stage") or 0)
