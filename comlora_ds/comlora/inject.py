"""Finding target linear layers in a causal LM, wrapping them in adapter layers, freezing the base.

Kept apart from the layer maths, like PEFT's ``tuners/lora/model.py`` vs ``layer.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from .layer import ComLoRALinear


def inject_adapters(model: nn.Module, target_modules: list[str], num_components: int, rank: int,
                    alpha: float, dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming",
                    layer_cls: type[ComLoRALinear] = ComLoRALinear,
                    on_create: Callable[[nn.Module], object] | None = None) -> dict[str, ComLoRALinear]:
    """Freeze every parameter of ``model`` and replace each ``nn.Linear`` whose last name component is
    in ``target_modules`` by ``layer_cls`` wrapping it. Returns the new layers by module path. ``on_create`` sees
    each new layer as soon as it is built (ZeRO-3 partitions it there, so the K components of all layers never exist
    whole at once).

    Raises ValueError naming a target that matches no linear layer (and listing those that exist),
    before changing anything.
    """
    targets = set(target_modules)
    found = {name: m for name, m in model.named_modules()
             if name.rpartition(".")[2] in targets and type(m) is nn.Linear}
    missing = targets - {name.rpartition(".")[2] for name in found}
    if missing:
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if type(m) is nn.Linear})
        raise ValueError(f"target module(s) {sorted(missing)} match no linear layer of "
                         f"{type(model).__name__}; its linear layers are {linear}")
    for param in model.parameters():
        param.requires_grad_(False)
    matched: dict[str, ComLoRALinear] = {}
    for name, module in found.items():
        parent_name, _, leaf = name.rpartition(".")
        matched[name] = layer_cls(module, num_components, rank, alpha, dropout, use_rslora, init)
        if on_create is not None:
            on_create(matched[name])
        setattr(model.get_submodule(parent_name), leaf, matched[name])
    return matched


def adapter_layers(model: nn.Module) -> dict[str, ComLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ComLoRALinear)}


@contextmanager
def active_component(model: nn.Module, k: int | None) -> Iterator[None]:
    """Within the block, adapter layers run only component k (None: all K, batched)."""
    layers = adapter_layers(model).values()
    previous = [layer.active_component for layer in layers]
    for layer in layers:
        layer.active_component = k
    try:
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer.active_component = prev


def merge_component(model: nn.Module, k: int | str) -> None:
    for layer in adapter_layers(model).values():
        layer.merge(k)


def unmerge_all(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()
