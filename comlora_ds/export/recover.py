"""ZeRO checkpoint -> every trainable tensor in fp32 with its full shape, checked against the model.

:func:`locate_checkpoint` accepts a run folder, its ``checkpoints/`` folder (uses ``latest``) or one
``step_NNNNNNNN`` folder, and refuses a missing or partial checkpoint before anything is read.
:func:`recover_tensors` calls DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` (ZeRO-2 or
ZeRO-3, any world size, no launcher, no GPU). :func:`check_tensors` compares the result with the shapes that
the run config and the base model's config imply (a skeleton built on the meta device): empty or partial
tensors (the ZeRO-3 trap: a parameter saved outside a gather has shape ``[0]``), a different K, other target
modules or another base model are refused with the tensor, the expected and the found shape.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpointing import manifest
from ..checkpointing.checkpoint import UnsafeCheckpointError, safe_load, screen_checkpoint
from ..checkpointing.run_layout import LATEST, RUN_CONFIG, TOKENIZER, CheckpointError, find_checkpoint
from ..config import ConfigError, RunConfig, load_config
from .errors import ConsolidationError

ADAPTER_PATTERN = re.compile(r"^llm\.(?P<module>.+)\.(?P<tensor>[^.]+)$")
MAX_LISTED = 8


@dataclass
class CheckpointRef:
    step_dir: Path          # <output_dir>/checkpoints/step_NNNNNNNN
    cfg: RunConfig          # its run_config.yaml
    zero_stage: int
    world_size: int         # data-parallel ranks that wrote it
    client_state: dict      # what the trainer saved with it (global_step, num_components, ...)
    ds_version: str
    recorded_shapes: dict[str, tuple[int, ...]]   # the full shapes DeepSpeed recorded for every saved tensor
    manifest: dict | None = None                   # manifest.json (verified), None for an older checkpoint

    @property
    def save_dir(self) -> Path:
        return self.step_dir.parent

    @property
    def tag(self) -> str:
        return self.step_dir.name

    @property
    def run_dir(self) -> Path:
        """The run's output_dir (metrics.jsonl, validation.json live there)."""
        return self.step_dir.parent.parent

    def describe(self) -> dict:
        return {"path": str(self.step_dir), "tag": self.tag, "step": self.client_state.get("global_step"),
                "zero_stage": self.zero_stage, "world_size": self.world_size, "deepspeed": self.ds_version}


def _step_folder(path: Path, pointer: str) -> Path:
    try:
        return find_checkpoint(path, pointer)
    except CheckpointError as err:
        raise ConsolidationError(str(err)) from None


def locate_checkpoint(path: str | Path, pointer: str = LATEST) -> CheckpointRef:
    """The checkpoint folder ``path`` points at (``pointer``: its ``latest`` or its ``best``), with its run config;
    refuses missing or partial ones."""
    step_dir = _step_folder(Path(path).expanduser().resolve(), pointer)
    try:
        saved = manifest.verify(step_dir)
    except manifest.ManifestError as err:
        raise ConsolidationError(str(err)) from None
    for required in (RUN_CONFIG, TOKENIZER):
        if not (step_dir / required).exists():
            raise ConsolidationError(f"partial checkpoint {step_dir}: {required} is missing (comlora_ds' trainer "
                                     f"writes it with every checkpoint)")
    try:   # the training files are not needed (the validation split is stored with the checkpoint)
        cfg = load_config(step_dir / RUN_CONFIG)
    except ConfigError as err:
        raise ConsolidationError(f"{step_dir / RUN_CONFIG}: {err}") from None
    model_files = sorted(step_dir.glob("*_model_states.pt"))
    if not model_files:
        raise ConsolidationError(f"partial checkpoint {step_dir}: no DeepSpeed *_model_states.pt file")
    try:
        state = safe_load(model_files[0])
    except UnsafeCheckpointError as err:
        raise ConsolidationError(str(err)) from None
    except Exception as err:   # truncated or corrupt file
        raise ConsolidationError(f"partial checkpoint {step_dir}: cannot read {model_files[0].name}: "
                                 f"{err}") from None
    world = int(state.get("dp_world_size", 1))
    stage = int(state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    missing = [rank for rank in range(world)
               if not any(step_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt"))]
    if stage == 3:      # one model-states file per rank as well
        missing += [rank for rank in range(world)
                    if not (step_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()]
    if missing:
        raise ConsolidationError(f"partial checkpoint {step_dir}: written by {world} rank(s) with ZeRO stage {stage}, "
                                 f"but the shard files of rank(s) {sorted(set(missing))} are missing")
    shapes = _recorded_shapes(state)
    for other in model_files[1:]:      # ZeRO-3: one file per rank, each must record the same tensors
        if _recorded_shapes(safe_load(other)) != shapes:
            raise ConsolidationError(f"partial checkpoint {step_dir}: {other.name} and {model_files[0].name} record "
                                     f"different tensors (files from different saves?)")
    keys = ("global_step", "epoch", "total_steps", "world_size", "num_components")
    return CheckpointRef(step_dir, cfg, stage, world, {k: state[k] for k in keys if k in state},
                         str(state.get("ds_version", "unknown")), shapes, saved)


def _recorded_shapes(state: dict) -> dict[str, tuple[int, ...]]:
    """What zero_to_fp32 will rebuild: ``param_shapes`` (full shapes, per parameter group) plus buffers."""
    shapes = {name: tuple(shape) for group in state.get("param_shapes") or [] for name, shape in group.items()}
    module = state.get("module") or {}
    shapes.update({name: tuple(module[name].shape) for name in state.get("buffer_names", []) if name in module})
    return shapes


def recover_tensors(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint holds (trainable parameters and persistent buffers), fp32,
    contiguous, on the CPU. DeepSpeed's progress output is captured and shown only if it fails."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:   # DeepSpeed unpickles with weights_only=False: first prove the files hold no code
        screen_checkpoint(ref.step_dir)
    except UnsafeCheckpointError as err:
        raise ConsolidationError(str(err)) from None
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ref.save_dir), tag=ref.tag,
                                                             exclude_frozen_parameters=True)
    except Exception as err:
        raise ConsolidationError(f"cannot recover the trainable tensors of {ref.step_dir} (ZeRO stage "
                                 f"{ref.zero_stage}, {ref.world_size} ranks): the shard files are inconsistent "
                                 f"(truncated, or from different saves): {type(err).__name__}: {err}\n"
                                 f"DeepSpeed's output:\n{log.getvalue()[-2000:]}") from None
    return {name: (t.float() if t.is_floating_point() else t).contiguous() for name, t in state.items()}


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def recover_optimizer_state(ref: CheckpointRef, moment: str) -> dict[str, torch.Tensor]:
    """Adam's ``moment`` (``exp_avg`` or ``exp_avg_sq``) of every trainable tensor, fp32, with its full shape. Each
    rank's flat partition of the moment takes the place of its fp32 weights in a copy of the shard files (a
    temporary folder; the checkpoint is only read), so DeepSpeed's own zero_to_fp32 un-partitions it."""
    import tempfile

    if moment not in ADAM_MOMENTS:
        raise ValueError(f"moment = {moment!r}: must be one of {', '.join(ADAM_MOMENTS)}")
    # where each ZeRO stage keeps the flat fp32 partitions, and the wrapped torch optimizer's state of them
    flat_key, inner_key = (("fp32_flat_groups", "optimizer_state_dict") if ref.zero_stage == 3
                           else ("single_partition_of_fp32_groups", "base_optimizer_state"))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / ref.tag
        copy.mkdir()
        for model_file in ref.step_dir.glob("*_model_states.pt"):
            (copy / model_file.name).symlink_to(model_file)
        for optim_file in ref.step_dir.glob("*_optim_states.pt"):
            state = safe_load(optim_file)
            optim = state["optimizer_state_dict"]
            per_group = optim[inner_key]["state"]
            optim[flat_key] = [per_group[i][moment] for i in range(len(optim[flat_key]))]
            torch.save(state, copy / optim_file.name)
        swapped = CheckpointRef(copy, ref.cfg, ref.zero_stage, ref.world_size, ref.client_state, ref.ds_version,
                                ref.recorded_shapes, ref.manifest)
        return recover_tensors(swapped)


def skeleton(cfg: RunConfig, base_config) -> torch.nn.Module:
    """The ComLoRAModel the run config describes, on the meta device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    from ..comlora.model import build_model

    cfg = _without_checkpointing(cfg)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(base_config, trust_remote_code=cfg.model.trust_remote_code)
        return build_model(cfg, llm)


def expected_shapes(cfg: RunConfig, base_config) -> dict[str, torch.Size]:
    """Name -> full shape of every tensor the checkpoint must hold: the trainable parameters, plus every persistent
    buffer (a method's extra state in the adapter layers; DeepSpeed saves the base's buffers too)."""
    model = skeleton(cfg, base_config)
    shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    shapes.update({name: t.shape for name, t in model.state_dict(keep_vars=True).items()
                   if not isinstance(t, torch.nn.Parameter)})
    return shapes


def _adapted(names) -> dict[str, set[str]]:
    """Adapter tensors by module path: {'model.layers.0.self_attn.q_proj': {'lora_A', 'lora_B'}}."""
    out: dict[str, set[str]] = {}
    for name in names:
        m = ADAPTER_PATTERN.match(name)
        if m and m["tensor"] in ("lora_A", "lora_B"):
            out.setdefault(m["module"], set()).add(m["tensor"])
    return out


def _listing(lines: list[str]) -> str:
    shown = "\n  ".join(lines[:MAX_LISTED])
    more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


def check_tensors(tensors: dict[str, torch.Tensor | tuple], expected: dict[str, torch.Size], cfg: RunConfig,
                  base_path: str) -> None:
    """Refuse unless ``tensors`` (tensors, or shapes as recorded in the checkpoint) holds exactly the expected
    names, each with its full expected shape."""
    found = {name: tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t) for name, t in tensors.items()}
    want = {name: tuple(shape) for name, shape in expected.items()}
    source = f"(run_config.yaml: K = {cfg.adapter.num_components}, r = {cfg.adapter.rank}, target_modules = " \
             f"{cfg.adapter.target_modules}; base model {base_path})"

    empty = [f"{n}: expected {list(want[n])}, found {list(found[n])}" for n in want
             if n in found and 0 in found[n] and 0 not in want[n]]
    if empty:
        raise ConsolidationError("the checkpoint holds empty tensors (a ZeRO-3 partition saved without gathering it: "
                                 "the parameter was never reassembled); re-save the checkpoint from the DeepSpeed "
                                 "engine with engine.save_checkpoint:" + _listing(empty))
    partial = [f"{n}: expected {list(want[n])} ({_numel(want[n])} elements), found {list(found[n])} "
               f"({_numel(found[n])} elements)" for n in _partial(found, want)]
    if partial:
        raise ConsolidationError("the checkpoint holds partial tensors (fewer elements than the model needs while "
                                 "tensors of the same kind in other layers are complete: a ZeRO shard is missing or "
                                 "was cut):" + _listing(partial))

    k = cfg.adapter.num_components
    counts = _component_counts(found)
    if counts and set(counts) != {k}:
        raise ConsolidationError(f"the checkpoint's adapters have K = {sorted(counts)} components, the run config "
                                 f"and the model need K = {k} {source}; e.g. {_first_with_k(found, counts, k)}")

    got_modules, want_modules = _adapted(found), _adapted(want)
    if set(got_modules) != set(want_modules):
        def leaves(mods):
            return sorted({m.rpartition(".")[2] for m in mods})
        extra, missing = sorted(set(got_modules) - set(want_modules)), sorted(set(want_modules) - set(got_modules))
        raise ConsolidationError(
            f"the checkpoint adapts modules {leaves(got_modules)}, the model needs {leaves(want_modules)} {source}:"
            + _listing([f"not in the model: {m}" for m in extra]
                       + [f"missing from the checkpoint: {m}" for m in missing]))

    problems = [f"{n}: expected {list(want[n])}, found {list(found[n])}"
                for n in want if n in found and found[n] != want[n]]
    problems += [f"{n}: missing from the checkpoint (expected {list(want[n])})" for n in want if n not in found]
    problems += [f"{n}: in the checkpoint {list(found[n])} but not in the model" for n in found if n not in want]
    if problems:
        raise ConsolidationError(f"the checkpoint does not match the model {source}:" + _listing(problems))


def _numel(shape: tuple) -> int:
    return math.prod(shape)


def _partial(found: dict[str, tuple], want: dict[str, tuple]) -> list[str]:
    """Tensors with fewer elements than expected that a different model cannot explain: flattened, or an
    outlier among the same tensor of the other layers (a different base or K changes them all alike)."""
    def kind(name: str) -> str:
        return re.sub(r"\.\d+\.", ".N.", name)

    complete = {kind(n) for n in want if found.get(n) == want[n]}
    return [n for n in want if n in found and 0 < _numel(found[n]) < _numel(want[n])
            and (len(found[n]) != len(want[n]) or kind(n) in complete)]


def _component_counts(found: dict[str, tuple]) -> Counter:
    """Leading dimension of the stacked adapter tensors ([K, r, d_in] / [K, d_out, r])."""
    return Counter(shape[0] for name, shape in found.items()
                   if ADAPTER_PATTERN.match(name) and len(shape) == 3 and name.endswith((".lora_A", ".lora_B")))


def _first_with_k(found: dict[str, tuple], counts: Counter, k: int) -> str:
    for name, shape in found.items():
        if name.endswith((".lora_A", ".lora_B")) and len(shape) == 3 and shape[0] != k:
            return f"{name} has shape {list(shape)}"
    return ""


def _without_checkpointing(cfg: RunConfig) -> RunConfig:
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.model.gradient_checkpointing = False
    return cfg
