"""The small interface a method implements; plain LoRA is the default that changes nothing.

A method may (1) use its own adapter layer class (extra parameters/buffers created before
``deepspeed.initialize``, an extra forward term, its merged delta), (2) bring its own optimizer,
(3) act before and after every optimizer step, and (4) refuse DeepSpeed settings it does not support.
Its extra state lives in module buffers or optimizer state, so DeepSpeed's checkpoints carry it. The layer class
owns the method's weight update (``factors_of``), which training's merge, the streamed merge and the PEFT adapter
writer all use; a new method is one layer class (if its weights differ) plus one method class, registered with
``comlora_ds.methods.register_method`` (docs/architecture.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ..comlora.layer import ComLoRALinear
from ..config import RunConfig


class AdapterMethod:
    name = "base"
    layer_type: type[ComLoRALinear] = ComLoRALinear     # whose factors_of export uses

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @property
    def layer_cls(self):
        """What injection calls as ``layer_cls(base, K, r, alpha, dropout, use_rslora, init)``: ``layer_type`` with the
        method's own settings bound."""
        return self.layer_type

    def check_plan(self, total_steps: int) -> None:
        """Raise ConfigError when the method cannot do its job in a run of ``total_steps`` optimizer steps (known
        once the data is read, e.g. from train.num_epochs)."""

    def check_ds_config(self, ds_config: dict) -> None:
        """Raise ValueError for DeepSpeed settings the method cannot train correctly under. May also edit
        ``ds_config`` in place to take over a setting the method implements itself (LoRA-Pro sets
        ``gradient_clipping`` to 0 and clips inside its optimizer); the engine initialises with the result."""

    def build_optimizer(self, model: nn.Module, param_groups: list[dict]) -> torch.optim.Optimizer | None:
        """The method's optimizer, or None for the default (AdamW, or the DeepSpeed config's)."""
        return None

    def before_optimizer_step(self, engine, step: int) -> None:
        """Called on every rank once per optimizer step, after the step's last backward and before
        ``engine.step()``: the gradients are accumulated and reduced. Read and write them with DeepSpeed's
        ``deepspeed.utils.safe_get_full_grad`` / ``safe_set_full_grad`` (any ZeRO stage; collectives, so every
        rank must make the same calls in the same order). ``step`` is the 1-based step about to be taken."""

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called on every rank after optimizer step ``step`` (1-based) was applied."""


class LoRAMethod(AdapterMethod):
    name = "lora"
