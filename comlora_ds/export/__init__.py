"""Pieces of offline consolidation (ZeRO checkpoint -> winner -> PEFT adapter + merged model + report).

The pipeline that uses them, top to bottom, is :func:`comlora_ds.consolidate.consolidate`.
Extension point for new methods: :func:`register_factors` (see ``factors``).
"""

from .errors import ConsolidationError
from .factors import ComponentExporter, LoRAFactors, adapter_scaling, component_factors, register_factors

__all__ = ["ComponentExporter", "ConsolidationError", "LoRAFactors", "adapter_scaling", "component_factors",
           "register_factors"]
