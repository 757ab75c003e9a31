"""Adapter methods over the K-stacked layer: plain LoRA, LoRA-Pro, LoRA-Dash (K = 1 or ComLoRA's K)."""

from __future__ import annotations

from .base import AdapterMethod, LoRAMethod

_METHODS: dict[str, type[AdapterMethod]] = {"lora": LoRAMethod}


def register_method(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    _METHODS[cls.name] = cls
    return cls


# torch-only modules (no DeepSpeed import at module level)
from .lora_dash import LoRADashMethod  # noqa: E402
from .lora_pro import LoRAProMethod  # noqa: E402

register_method(LoRAProMethod)
register_method(LoRADashMethod)


def get_method(cfg) -> AdapterMethod:
    """The method object for ``cfg.adapter.method`` (importing a method's module registers it)."""
    name = cfg.adapter.method
    if name not in _METHODS:
        raise ValueError(f"adapter.method = {name!r} is not available; known: {sorted(_METHODS)}")
    return _METHODS[name](cfg)


__all__ = ["AdapterMethod", "LoRADashMethod", "LoRAMethod", "LoRAProMethod", "get_method", "register_method"]
