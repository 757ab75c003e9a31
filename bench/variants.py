"""The compared models and steps: base models by name, one shared copy of the frozen base weights
(``BaseModel.fresh``), synthetic batches, and each variant's forward-backward (ours, PEFT, the authors' loop).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from environment import SHARED_DATA, device

from comlora_ds.config import LLAMA_LINEAR_MODULES, RunConfig  # noqa: E402
from comlora_ds.comlora.losses import ComLoRAObjective, response_nll_full_logits  # noqa: E402
from comlora_ds.comlora.model import ComLoRAModel, build_model, build_objective  # noqa: E402
from comlora_ds.training.step import forward_backward  # noqa: E402

MODELS = {
    "smollm2-135m": "smollm2-135m",                                     # built in, converted once
    "stories260k": str(SHARED_DATA / "models" / "stories260K"),         # tiny pretrained LLaMA
}


# ---------------------------------------------------------------------------------------- models
def resolve(name: str) -> str:
    from comlora_ds.models.builtin_models import resolve_model_path

    return resolve_model_path(MODELS.get(name, name))


def default_dtype(requested: str = "auto") -> torch.dtype:
    """auto: bf16 on a GPU that supports it, else fp32 (bf16 is ~26x slower on this CPU)."""
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


class BaseModel:
    """The frozen base loaded once; ``fresh()`` gives a new model object sharing its weight tensors."""

    def __init__(self, name: str, dtype: str = "auto", attn: str = "auto"):
        from comlora_ds.models.base_model import choose_attn_implementation
        from transformers import AutoModelForCausalLM

        self.name, self.path = name, resolve(name)
        self.dtype = default_dtype(dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=self.dtype, attn_implementation=choose_attn_implementation(attn)).to(device())
        self.model.requires_grad_(False)
        self.config = self.model.config

    def fresh(self):
        params = {id(p): p for p in self.model.parameters()}
        llm = copy.deepcopy(self.model, memo=params)     # new modules, same frozen weight tensors
        llm.train()
        return llm

    @property
    def vocab(self) -> int:
        return self.config.vocab_size


def make_batch(vocab: int, batch_size: int, seq_len: int, response_frac: float = 0.5, seed: int = 0,
               dev: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Random tokens, no padding; the first (1 - response_frac) of each row is prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    labels = input_ids.clone()
    prompt = min(seq_len - 2, int(round(seq_len * (1.0 - response_frac))))
    labels[:, :prompt] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(dev or device()) for k, v in batch.items()}


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


# --------------------------------------------------------------------------- the compared steps
@dataclass
class Spec:
    """One training-step variant. ``kind``:

    * ``ours``     - build_model + forward_backward (batched or sequential execution) + AdamW;
                     ``loss`` = chunked (the library's response_nll), full (naive full-logits CE,
                     NaiveCEModel) or hf (K=1 only: the HF model's own token-mean loss on our layers).
    * ``authors``  - K forwards with one component active each, all graphs kept, the ComLoRA objective
                     on the stacked losses, one backward (the paper authors' approach).
    * ``peft``     - PEFT get_peft_model(LoraConfig) with HF's loss (labels=...).
    """

    kind: str = "ours"
    k: int = 1
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    execution: str = "batched"
    loss: str = "chunked"
    selector: bool = True
    ce_chunk_size: int = 1024
    targets: tuple[str, ...] = LLAMA_LINEAR_MODULES
    label: str = ""

    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind == "peft":
            return f"PEFT LoRA r={self.rank}"
        if self.kind == "authors":
            return f"K={self.k} K-sequential, graphs kept (authors)"
        mode = "" if self.k == 1 else f" {self.execution}"
        sel = "" if self.selector or self.k == 1 else " no-selector"
        return f"ours K={self.k}{mode}{sel} ({self.loss} CE)"

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "targets": list(self.targets)})

    @staticmethod
    def from_json(text: str) -> "Spec":
        d = json.loads(text)
        d["targets"] = tuple(d["targets"])
        return Spec(**d)


class NaiveCEModel(ComLoRAModel):
    """The naive baseline of the CE: fp32 logits for the whole replicated batch [K*B, L, V], then the
    per-sample masked mean (``losses.response_nll_full_logits``). Everything else is ComLoRAModel's."""

    def row_losses(self, hidden, labels):
        return response_nll_full_logits(self.llm.get_output_embeddings()(hidden).float(), labels)


def run_config(spec: Spec) -> RunConfig:
    cfg = RunConfig()
    cfg.adapter.num_components, cfg.adapter.rank, cfg.adapter.alpha = spec.k, spec.rank, spec.alpha
    cfg.adapter.dropout, cfg.adapter.target_modules = spec.dropout, list(spec.targets)
    cfg.comlora.execution, cfg.comlora.no_selector = spec.execution, not spec.selector
    cfg.train.ce_chunk_size = spec.ce_chunk_size
    return cfg.validate()


def authors_forward_backward(model: ComLoRAModel, batch, objective: ComLoRAObjective, eta: float) -> torch.Tensor:
    """The ComLoRA authors' approach: K full forward passes, one component active in each, every graph
    kept alive; the objective on the stacked [K, B] losses; one backward through all K graphs."""
    losses, sims = [], None
    for k in range(model.num_components):
        out = model(**batch, component=k, use_selector=k == 0)
        losses.append(out.losses[0])
        sims = out.sims if k == 0 else sims
    total = objective(torch.stack(losses), sims, eta, out.num_tokens).total
    total.backward()
    return total.detach()


@dataclass
class Variant:
    spec: Spec
    step: Callable[[], None]
    params: list = field(default_factory=list)
    model: object = None


def build_variant(spec: Spec, base: BaseModel, batch: dict[str, torch.Tensor], eta: float = 0.5,
                  seed: int = 0) -> Variant:
    """A ready-to-run training step (zero_grad, forward, backward, AdamW step) for ``spec``."""
    torch.manual_seed(seed)
    llm = base.fresh()
    fused = torch.cuda.is_available()
    if spec.kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(llm, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                               target_modules=list(spec.targets)))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)

        def step():
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()
        return Variant(spec, step, params, model)

    cfg = run_config(spec)
    model = build_model(cfg, llm)
    if spec.loss == "full":
        model = NaiveCEModel(model.llm, model.num_components, model.selector, model.ce_chunk_size)
    model.to(device())
    objective = build_objective(cfg)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)

    if spec.kind == "authors":
        def step():
            opt.zero_grad(set_to_none=True)
            authors_forward_backward(model, batch, objective, eta)
            opt.step()
    elif spec.loss == "hf":
        if spec.k != 1:
            raise ValueError("the HF loss variant is K = 1 only")

        def step():
            opt.zero_grad(set_to_none=True)
            model.llm(**batch, use_cache=False).loss.backward()
            opt.step()
    else:
        def step():
            opt.zero_grad(set_to_none=True)
            forward_backward(model, batch, objective, eta, lambda loss: loss.backward(), spec.execution)
            opt.step()
    return Variant(spec, step, params, model)
