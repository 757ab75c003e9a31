"""Does a PEFT LoRA adapter fit a base model? Checked from file headers, before any weight is loaded.

The adapter's ``lora_A`` (``[r, in]``) and ``lora_B`` (``[out, r]``) shapes and layer numbers are read from the
safetensors header and compared with the linear layers a LLaMA-family base of that ``config.json`` has (q/k/v/o and
gate/up/down projections). A mismatch names the first offending tensor, both sizes and what to pass: otherwise
the mistake would surface only as a size-mismatch traceback after the base is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import EvaluationError

_LORA = re.compile(r"layers\.(\d+)\..*?(\w+_proj)\.lora_([AB])(?:\.\w+)?\.weight$")


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of a LLaMA-family decoder layer."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_out = heads * head_dim
    kv_out = getattr(config, "num_key_value_heads", heads) * head_dim
    inter = config.intermediate_size
    return {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def _adapter_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        return {}
    with safe_open(str(file), framework="pt") as handle:
        return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}


def check_adapter_fits_base(adapter_dir: Path, base: str) -> None:
    """Raise :class:`EvaluationError` naming the tensor when the adapter in ``adapter_dir`` cannot sit on ``base``."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise EvaluationError(f"cannot read the config of the adapter's base {base!r}: {str(err).splitlines()[0]}; "
                              "pass --base FOLDER (the model the adapter was trained on)") from None
    expected = linear_shapes(config) if hasattr(config, "intermediate_size") else {}
    named = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    hint = f"pass --base with the model it was trained on (adapter_config.json names {named!r})"
    for name, shape in _adapter_shapes(adapter_dir).items():
        match = _LORA.search(name)
        if not match or match.group(2) not in expected:
            continue
        layer, module, side = int(match.group(1)), match.group(2), match.group(3)
        if layer >= config.num_hidden_layers:
            raise EvaluationError(f"adapter {adapter_dir} does not fit base {base}: {name} is for layer {layer}, the "
                                  f"base has {config.num_hidden_layers} layers; {hint}")
        size_in, size_out = expected[module]
        got, want = (shape[1], size_in) if side == "A" else (shape[0], size_out)
        if got != want:
            what = "in" if side == "A" else "out"
            raise EvaluationError(f"adapter {adapter_dir} does not fit base {base}: {name} has {got} {what}-features, "
                                  f"the base's {module} {want}; {hint}")
