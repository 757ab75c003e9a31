"""Loading the thing to evaluate: a merged model folder, a PEFT adapter folder, or a built-in model name.

:func:`describe_target` decides what ``MODEL_OR_ADAPTER`` is, without loading weights:

* a folder with ``adapter_config.json``: a PEFT adapter (what consolidation exports for the winner, or any
  PEFT LoRA). Its base is ``base_model_name_or_path`` from that file unless ``base`` overrides it; the base is
  loaded with ``AutoModelForCausalLM.from_pretrained`` and the adapter with ``peft.PeftModel.from_pretrained``
  (kept unmerged: the outputs are the same and no weights are modified). The tokenizer comes from the adapter
  folder when it has one, else from the base.
* a folder with ``config.json``: a merged Hugging Face model (``AutoModelForCausalLM.from_pretrained``).
* a training checkpoint (a folder with ``latest``, a ``checkpoints/`` folder with one, or a ``step_NNNNNNNN``
  folder) with ``component=k``: the ZeRO checkpoint's tensors are recovered in fp32 (the consolidation code,
  with its shape checks), injected into the run's base model and component k is merged in memory; nothing is
  written. Without ``component`` it is refused (:class:`TrainingCheckpointError`): a checkpoint holds K
  components, and choosing the winner is consolidation's job (``launch/consolidate.py``).
* a built-in model name (``smollm2-135m``, :mod:`comlora_ds.models.builtin_models`): converted once, then as a folder.
* anything else: passed to ``from_pretrained`` as a hub id (works offline only when it is in the local cache).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..checkpointing.run_layout import TOKENIZER, looks_like_training_output
from ..errors import EvaluationError, InputError
from ..models.base_model import Placement, choose_placement


class TrainingCheckpointError(InputError, ValueError):
    """A training checkpoint without a chosen component, or a component for something that is not one."""


@dataclass
class Target:
    """What is evaluated: ``kind`` is "merged", "adapter", "checkpoint" or "hub"; ``base`` is set for adapters
    (and for checkpoints when given), ``component`` for checkpoints; ``template`` is the prompt template it was
    trained with (:func:`training_template`)."""

    kind: str
    path: str
    base: Optional[str] = None
    tokenizer: Optional[str] = None
    component: Optional[int] = None
    template: str = "alpaca"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def describe_target(model_or_adapter: str, base: Optional[str] = None, component: Optional[int] = None) -> Target:
    """Classify ``model_or_adapter`` (see module doc); raises for a checkpoint without ``component`` (and
    the reverse) and for unusable folders."""
    from ..models.builtin_models import BUILTIN_MODELS, resolve_model_path

    path = Path(model_or_adapter).expanduser()
    if path.is_dir() and looks_like_training_output(path):
        if component is None:
            raise TrainingCheckpointError(
                f"{path} is a training checkpoint with K components: pass --component k to evaluate component k "
                f"from it, or consolidate first (python launch/consolidate.py {path} --out DIR picks the "
                f"validation winner and writes it as a PEFT adapter and a merged model)")
        return Target("checkpoint", str(path), base, str(path), component)
    if component is not None:
        raise TrainingCheckpointError(f"--component applies to training checkpoints only, and {path} is not one")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            config = json.loads((path / "adapter_config.json").read_text())
            base_id = base or config.get("base_model_name_or_path")
            if not base_id:
                raise EvaluationError(f"{path}/adapter_config.json has no base_model_name_or_path; pass --base")
            base_id = resolve_model_path(base_id) if base_id in BUILTIN_MODELS else base_id
            return Target("adapter", str(path), base=str(base_id),
                          tokenizer=str(path) if _has_tokenizer(path) else str(base_id))
        if (path / "config.json").is_file():
            if base:
                raise EvaluationError(f"--base applies to adapter folders only; {path} is a full model")
            return Target("merged", str(path), tokenizer=str(path))
        raise EvaluationError(f"{path}: neither a model folder (config.json) nor a PEFT adapter folder "
                         "(adapter_config.json) nor a training checkpoint")
    if model_or_adapter in BUILTIN_MODELS:
        folder = resolve_model_path(model_or_adapter)
        return Target("merged", folder, tokenizer=folder)
    if path.exists():
        raise EvaluationError(f"{path}: expected a folder")
    return Target("hub", model_or_adapter, tokenizer=model_or_adapter)


def training_template(target: Target) -> str:
    """How the target's training rendered prompts: a checkpoint's run_config.yaml (``data.template``), an exported
    folder's training_template.json; "alpaca" for anything else (a base model, a PEFT adapter from elsewhere)."""
    from ..data.templates import read_template_file

    if target.kind == "checkpoint":
        from ..export.recover import locate_checkpoint

        return locate_checkpoint(target.path).cfg.data.template
    if target.kind in ("adapter", "merged"):
        return read_template_file(Path(target.path)) or "alpaca"
    return "alpaca"


def load_for_eval(model_or_adapter: str, base: Optional[str] = None, component: Optional[int] = None,
                  dtype: Optional[str] = None, device: Optional[str] = None) -> tuple[Any, Any, Target]:
    """(model in eval mode, tokenizer, :class:`Target`); device, dtype and attention from
    :func:`~comlora_ds.models.base_model.choose_placement` (None: a GPU in bf16 with flash-attn where present, else CPU
    fp32 with sdpa)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = choose_placement(device, dtype)
    target = describe_target(model_or_adapter, base, component)
    target.template = training_template(target)
    if target.kind == "checkpoint":
        return _checkpoint_component(target, placement)
    model_path = target.base if target.kind == "adapter" else target.path
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=placement.dtype,
                                                     attn_implementation=placement.attn_implementation)
        if target.kind == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, target.path, is_trainable=False)
        tokenizer = AutoTokenizer.from_pretrained(target.tokenizer)
    except OSError as err:   # not a folder here and not in the local hub cache (nothing is downloaded offline)
        raise EvaluationError(f"cannot load {model_path!r} ({target.kind}): {str(err).splitlines()[0]}") from None
    model.to(placement.device).eval()
    return model, tokenizer, target


def _checkpoint_component(target: Target, placement: Placement) -> tuple[Any, Any, Target]:
    """Component ``target.component`` of a training checkpoint, merged into the base model in memory."""
    from transformers import AutoTokenizer

    from ..comlora.inject import merge_component
    from ..export.consolidate import recover_checked
    from ..export.recover import locate_checkpoint
    from ..export.scoring import build_live_model

    ref = locate_checkpoint(target.path)
    k_total, k = ref.cfg.adapter.num_components, target.component
    if not 0 <= k < k_total:
        raise TrainingCheckpointError(f"--component {k}: {ref.step_dir} has K = {k_total} components "
                                      f"(0 .. {k_total - 1})")
    _, base_dir, tensors = recover_checked(ref, target.base)
    model = build_live_model(ref.cfg, str(base_dir), tensors, placement)
    merge_component(model.llm, k)
    target = Target("checkpoint", str(ref.step_dir), str(base_dir), str(ref.step_dir / TOKENIZER), k,
                    ref.cfg.data.template)
    return model.llm, AutoTokenizer.from_pretrained(target.tokenizer), target
