"""The one module handed to ``deepspeed.initialize``: the patched causal LM plus the selector.

``ComLoRAModel.forward`` computes L[k, b] (mean response-token NLL of sample b under component k, with
the response token counts that turn it into the summed NLL)
for all K components in one replicated batch, or for one component, plus the selector's scores.
Combining them into the training loss is ``losses.ComLoRAObjective``'s job, so the same forward
serves the batched and the component-sequential execution modes, validation and consolidation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel

from ..config import RunConfig
from ..data.packing import check_packed_attention, flash_varlen_kwargs, unpack_rows
from .inject import adapter_layers, inject_adapters
from .losses import ComLoRAObjective, response_nll, response_token_counts
from .selector import Selector


class ComponentForward(NamedTuple):
    losses: torch.Tensor               # [k, B] fp32: k = K (batched) or 1 (one component)
    sims: torch.Tensor | None          # [B, K] fp32, or None without a selector
    num_tokens: torch.Tensor           # [B] response tokens per sample (losses * num_tokens = summed NLL)


class ComLoRAModel(nn.Module):
    def __init__(self, llm: PreTrainedModel, num_components: int, selector: Selector | None = None,
                 ce_chunk_size: int = 1024):
        super().__init__()
        self.llm = llm
        self.selector = selector
        self.num_components = num_components
        self.ce_chunk_size = ce_chunk_size
        self._adapter_layers = list(adapter_layers(llm).values())

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                component: int | None = None, use_selector: bool = True, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> ComponentForward:
        """component=None: all K components on the batch replicated K times (component-major);
        component=k: only component k. use_selector=False skips the selector (sims=None). A padded batch has
        ``attention_mask``; a packed one (data/packing.py) ``position_ids`` and ``segment_ids`` instead, and its
        losses are per row as well.

        The adapter layers are left in the mode this forward set, on purpose: activation checkpointing
        re-runs the decoder layers during the backward, which must see the same mode."""
        packed = segment_ids is not None
        if packed:
            check_packed_attention(self.llm.config._attn_implementation)
        token_embeddings = self.llm.get_input_embeddings()(input_ids)
        sims = None
        if self.selector is not None and use_selector:
            # Packed: the selector scores each row alone, on the row's own tokens, exactly as on a padded batch.
            sims = self.selector(*unpack_rows(token_embeddings, segment_ids)) if packed \
                else self.selector(token_embeddings, attention_mask)
        n = self.num_components if component is None else 1
        for layer in self._adapter_layers:
            layer.active_component = component
        if packed:
            attention_inputs = {"position_ids": _replicate(position_ids, n)}
            if self.llm.config._attn_implementation == "flash_attention_2":
                attention_inputs.update(flash_varlen_kwargs(segment_ids, n))
        else:
            attention_inputs = {"attention_mask": _replicate(attention_mask, n)}
        hidden = self.llm.get_decoder()(inputs_embeds=_replicate(token_embeddings, n), use_cache=False,
                                        **attention_inputs).last_hidden_state
        segments = _replicate(segment_ids, n) if packed else None
        losses = self.row_losses(hidden, _replicate(labels, n), segments)
        num_tokens = response_token_counts(labels, segment_ids)
        return ComponentForward(losses.view(n, num_tokens.shape[0]), sims, num_tokens)

    def row_losses(self, hidden: torch.Tensor, labels: torch.Tensor,
                   segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean response-token NLL per row of the (replicated) batch, [R] (packed: [R * B]), from final hidden
        states."""
        return response_nll(hidden, labels, self.llm.get_output_embeddings(), self.ce_chunk_size, segment_ids)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_layers(self) -> dict:
        return adapter_layers(self.llm)


def _replicate(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if n == 1 else t.repeat(n, *([1] * (t.dim() - 1)))


def build_model(cfg: RunConfig, llm: PreTrainedModel, method=None, on_create=None) -> ComLoRAModel:
    """Freeze ``llm``, inject the K-component adapters of ``method`` (the run's AdapterMethod; default: a new one for
    ``cfg.adapter.method``), add the selector (ComLoRA only), and turn on non-reentrant gradient checkpointing if
    asked (it needs no input grads with a frozen base). ``on_create`` sees each adapter layer and the selector as
    soon as it exists (``zero3_init.Partitioner``)."""
    from ..methods import get_method

    a, c = cfg.adapter, cfg.comlora
    method = method or get_method(cfg)
    inject_adapters(llm, a.target_modules, a.num_components, a.rank, a.alpha, a.dropout, a.use_rslora, a.init,
                    layer_cls=method.layer_cls, on_create=on_create)
    if cfg.model.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    selector = None
    if cfg.is_comlora and not c.no_selector:
        selector = Selector(a.num_components, llm.config.hidden_size, c.selector_hidden_size,
                            c.selector_num_heads, c.selector_ffn_size, c.selector_dropout,
                            model_num_heads=llm.config.num_attention_heads)
        selector.to(device=llm.device)
        if on_create is not None:
            on_create(selector)
    return ComLoRAModel(llm, a.num_components, selector, cfg.train.ce_chunk_size)


def build_objective(cfg: RunConfig) -> ComLoRAObjective:
    c = cfg.comlora
    return ComLoRAObjective(cfg.adapter.num_components, cfg.top_n, c.noise,
                            use_lm=not c.no_lm, use_align=not c.no_align, use_pairwise=not c.no_pairwise,
                            loss_reduction=c.loss_reduction, lm_reduction=c.lm_reduction)
