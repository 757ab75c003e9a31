"""Adapter methods over the K-stacked layer: plain LoRA, LoRA-Pro, LoRA-Dash (K = 1 or ComLoRA's K)."""

from __future__ import annotations

from ..config import ConfigError
from .base import AdapterMethod, LoRAMethod

_METHODS: dict[str, type[AdapterMethod]] = {"lora": LoRAMethod}


def register_method(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    """Make ``cls`` available as ``adapter.method = cls.name`` (training, consolidation and evaluation)."""
    _METHODS[cls.name] = cls
    return cls


# torch-only modules (no DeepSpeed import at module level)
from .lora_dash import LoRADashMethod  # noqa: E402
from .lora_pro import LoRAProMethod  # noqa: E402

register_method(LoRAProMethod)
register_method(LoRADashMethod)


def method_class(name: str) -> type[AdapterMethod]:
    """The registered method class called ``name`` (ConfigError naming the known ones)."""
    if name not in _METHODS:
        raise ConfigError(f"adapter.method = {name!r} is not available; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def get_method(cfg) -> AdapterMethod:
    """The method object for ``cfg.adapter.method``: create it once per run and hand it to whatever needs it."""
    return method_class(cfg.adapter.method)(cfg)


__all__ = ["AdapterMethod", "LoRADashMethod", "LoRAMethod", "LoRAProMethod", "get_method", "method_class",
           "register_method"]
