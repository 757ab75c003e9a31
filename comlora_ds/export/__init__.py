"""Pieces of offline consolidation (ZeRO checkpoint -> winner -> PEFT adapter + merged model + report).

The pipeline that uses them, top to bottom, is :func:`comlora_ds.export.consolidate.consolidate`. A component's weight
update is its adapter layer's (``ComLoRALinear.factors_of``); nothing here is method-specific.
"""

from .errors import ConsolidationError
from .factors import ComponentExporter

__all__ = ["ComponentExporter", "ConsolidationError"]
