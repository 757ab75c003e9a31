"""comlora_ds: ComLoRA, LoRA, LoRA-Pro and LoRA-Dash on LLaMA-family models with DeepSpeed."""

__version__ = "0.1.0"
