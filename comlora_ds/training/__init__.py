"""The training loop under DeepSpeed: the Trainer (``engine``), its staged set-up (``setup``) and what it is built
from: the DeepSpeed config (``ds_config``), one optimizer step (``step``), clipping, the validation schedule, metrics
logging (``tracking``), and the op-build guards (``op_builds``)."""
