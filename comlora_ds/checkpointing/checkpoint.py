"""Training checkpoints: complete or invisible. The folder layout and the lookup are
:mod:`comlora_ds.checkpointing.run_layout`'s.

Every rank calls ``save_checkpoint``: DeepSpeed writes into ``tmp-<tag>/``; after a barrier rank 0
renames it to ``<tag>/``, then replaces ``latest``, then deletes checkpoints beyond the last M. A run
killed at any point leaves either the previous ``latest`` or the new one, never a partial checkpoint
behind ``latest``; leftover ``tmp-*`` folders are ignored and cleaned by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import InputError
from ..fileio import atomic_write_text
from . import reshard
from .reshard import BatchLayout
from .run_layout import (BEST, CHECKPOINTS, LATEST, METRICS, RUN_CONFIG, TAG_PATTERN, TMP_PREFIX, CheckpointError,
                         find_checkpoint, read_latest, read_trainer_state, tag_for)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class OutputDirError(InputError, OSError):
    """The output directory cannot take the run: not writable, holds another run, or is full."""


def check_start(cfg, world_size: int) -> tuple[Path, str] | None:
    """What can be refused from the run config and the run folder's small files alone, before anything is imported,
    read or created: another run in ``train.output_dir`` (unless resuming it), and a resume that the checkpoint's run
    config and trainer state rule out. Returns the checkpoint to resume from, as :func:`resolve_resume`."""
    output_dir = Path(cfg.train.output_dir)
    save_dir = output_dir / CHECKPOINTS
    if cfg.train.resume is None and (save_dir.is_dir() and any(save_dir.iterdir()) or (output_dir / METRICS).exists()):
        raise OutputDirError(f"train.output_dir = {str(output_dir)!r} already holds a run; continue it with "
                             f"train.resume=auto, or choose another output_dir (nothing was changed)")
    resume_from = resolve_resume(cfg.train.resume, save_dir)
    if resume_from is not None:
        check_resume_compatible(resume_from[0] / resume_from[1], cfg, world_size, total_steps=None)
    return resume_from


def check_output_dir(output_dir: str | Path) -> None:
    """Before any expensive work: the directory must be creatable and writable (:func:`check_start` has refused
    another run's folder)."""
    output_dir = Path(output_dir)
    if output_dir.exists():    # checked without writing inside: a refused resume leaves even the folder's mtime
        if not output_dir.is_dir():
            raise OutputDirError(f"train.output_dir = {str(output_dir)!r} is a file, not a folder")
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise OutputDirError(f"train.output_dir = {str(output_dir)!r} is not writable: no write permission "
                                 f"(or a read-only filesystem)")
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)   # every rank checks; one of them creates it
    except OSError as err:
        raise OutputDirError(f"train.output_dir = {str(output_dir)!r} is not writable: {err}") from None


def ensure_free_space(save_dir: Path, needed_bytes: int) -> None:
    """Collective: refuse to start a checkpoint that cannot fit, on every rank together, before a
    byte is written (a save that dies half-way inside DeepSpeed can leave ranks waiting on each other)."""
    free = shutil.disk_usage(save_dir).free
    verdict = torch.tensor([1.0 if free >= needed_bytes else 0.0])
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    if verdict.item() == 0.0:
        last = read_latest(save_dir)
        raise OutputDirError(f"not enough free space in {save_dir} for a checkpoint: need ~{needed_bytes / 2**20:.1f} "
                             f"MiB, {free / 2**20:.1f} MiB free on this rank's filesystem; the last complete "
                             f"checkpoint ({last or 'none'}) is untouched")


def save_checkpoint(engine, save_dir: str | Path, step: int, client_state: dict,
                    write_extras: Callable[[Path], None] | None = None, keep_last: int = 2,
                    needed_bytes: int = 0, finalize: Callable[[Path], None] | None = None, best: bool = False) -> Path:
    """Collective: every rank must call it at the same step. Returns the published folder. ``finalize`` runs on
    rank 0 once every rank has written its files, before the folder is published (the manifest). ``best``: ``best``
    names it too (after ``latest``). Rotation keeps the last ``keep_last`` and the one ``best`` names."""
    save_dir, tag = Path(save_dir), tag_for(step)
    tmp_dir, final_dir = save_dir / f"{TMP_PREFIX}{tag}", save_dir / tag
    rank = dist.get_rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    dist.barrier()
    ensure_free_space(save_dir, needed_bytes)
    engine.save_checkpoint(str(save_dir), tag=tmp_dir.name, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(_rng_state(), tmp_dir / f"rng_state_rank{rank}.pt")
    if rank == 0 and write_extras is not None:
        write_extras(tmp_dir)
    dist.barrier()
    if rank == 0:
        if finalize is not None:
            finalize(tmp_dir)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        atomic_write_text(save_dir / LATEST, tag)
        if best:
            atomic_write_text(save_dir / BEST, tag)
        best_file = save_dir / BEST         # read as it is: a stale one must not fail the save
        _rotate(save_dir, keep_last, keep={tag, best_file.read_text().strip() if best_file.is_file() else None})
    dist.barrier()
    return final_dir


def _rotate(save_dir: Path, keep_last: int, keep: set[str | None]) -> None:
    tags = sorted(p.name for p in save_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    for name in tags[:-keep_last]:
        if name not in keep:
            shutil.rmtree(save_dir / name, ignore_errors=True)
    for stale in save_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(resume: str | None, save_dir: str | Path) -> tuple[Path, str] | None:
    """``train.resume``: None -> no resume; 'auto' -> the latest complete checkpoint in save_dir if there is one;
    a path -> the checkpoint ``find_checkpoint`` finds there. Returns (checkpoints folder, tag)."""
    if resume is None:
        return None
    if resume == "auto":
        tag = read_latest(save_dir)
        return (Path(save_dir), tag) if tag else None
    try:
        folder = find_checkpoint(resume)
    except CheckpointError as err:
        raise CheckpointError(f"train.resume = {resume!r}: {err}") from None
    return folder.parent, folder.name


class UnsafeCheckpointError(InputError, ValueError):
    """A checkpoint file would need arbitrary code to unpickle."""


def _deepspeed_safe_globals() -> list:
    """The only non-tensor types DeepSpeed puts in its checkpoint files (found by loading real ZeRO-2/3
    checkpoints with weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def safe_load(path: str | Path) -> dict:
    """torch.load restricted to tensors, plain containers and DeepSpeed's three checkpoint types."""
    import pickle

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            raise UnsafeCheckpointError(f"{path} refers to {found.group(1) if found else 'a disallowed object'}, "
                                        f"which DeepSpeed checkpoints never contain; refusing to unpickle it") from None
        except (RuntimeError, EOFError, OSError) as err:    # PytorchStreamReader: a truncated or damaged zip
            raise CheckpointError(f"{path} is damaged or truncated and cannot be read ({str(err).splitlines()[0]}); "
                                  f"resume or consolidate from another checkpoint") from None


def screen_checkpoint(folder: str | Path) -> None:
    """Before DeepSpeed unpickles a checkpoint (it uses weights_only=False), prove every file holds only
    tensors and DeepSpeed's own types, so a tampered checkpoint cannot run code."""
    for path in sorted(Path(folder).glob("*.pt")):
        safe_load(path)


class ResumeError(InputError, ValueError):
    """The checkpoint does not belong to this run configuration."""


# What must not change between a checkpoint and the run that resumes it.
RESUME_FIELDS = ("model.name_or_path", "adapter.method", "adapter.num_components", "adapter.rank",
                 "adapter.alpha", "adapter.use_rslora", "adapter.target_modules", "comlora.no_selector",
                 "comlora.selector_hidden_size", "comlora.selector_num_heads", "comlora.selector_ffn_size")
# May change when the global batch stays the same (check_resume_compatible checks it, with the world size).
BATCH_SPLIT_SETTINGS = ("train.micro_batch_size", "train.gradient_accumulation_steps")
# resume_allow_changes names that let the number of planned steps change (each enough on its own).
STEP_PLAN_CHANGES = ("train.max_steps", "train.num_epochs")


def check_resume_compatible(folder: Path, cfg, world_size: int, total_steps: int | None) -> BatchLayout:
    """Before the model is loaded: the checkpoint's saved run config and trainer state must match. Another world
    size or split is fine when the global batch is the same (:mod:`comlora_ds.checkpointing.reshard`); another step
    plan only with ``train.resume_allow_changes=[train.max_steps]`` (or ``train.num_epochs``). ``total_steps=None``:
    the checks that need no data (the trainer runs them before it reads any). Returns the saved split."""
    from ..config import load_config

    saved = load_config(folder / RUN_CONFIG)
    state = read_trainer_state(folder)
    for dotted in RESUME_FIELDS:
        group, name = dotted.split(".")
        old, new = getattr(getattr(saved, group), name), getattr(getattr(cfg, group), name)
        if old != new:
            raise ResumeError(f"checkpoint {folder} was trained with {dotted} = {old!r}, this run has {new!r}")
    before, now = reshard.saved_layout(folder), reshard.layout_of(cfg, world_size)
    if before.global_batch != now.global_batch:
        raise ResumeError(f"checkpoint {folder} was trained with a global batch of {before.describe()}, this run has "
                          f"{now.describe()}: choose train.micro_batch_size and train.gradient_accumulation_steps so "
                          f"that the global batch stays {before.global_batch}")
    if total_steps is not None and state["total_steps"] != total_steps:
        if not set(cfg.train.resume_allow_changes) & set(STEP_PLAN_CHANGES):
            raise ResumeError(f"checkpoint {folder} was written for {state['total_steps']} steps, this run plans "
                              f"{total_steps}: keep train.max_steps/num_epochs and the data unchanged, or add "
                              f"train.resume_allow_changes=[train.max_steps] to change the plan on purpose")
        if total_steps <= state["global_step"]:
            raise ResumeError(f"checkpoint {folder} is at step {state['global_step']}, this run plans {total_steps} "
                              f"steps: nothing would be left to train")
    return before


def check_resume_manifest(folder: Path, saved: dict, data: dict, base_model: dict, cfg) -> float | None:
    """Refuses a resume whose data files, base model or settings differ from the checkpoint's, except the changes
    listed in ``train.resume_allow_changes``. Returns the new learning rate when that change is allowed."""
    from ..config import RESUME_ALLOWED_CHANGES
    from .manifest import resume_changes, settings_of

    allowed = set(cfg.train.resume_allow_changes) | set(BATCH_SPLIT_SETTINGS)   # the global batch was checked
    changes = resume_changes(saved, data, base_model, settings_of(cfg))
    refused = [c for c in changes if c[0] not in allowed]
    if refused:
        what = "; ".join(f"{name}: {old!r} in the checkpoint, {new!r} now" for name, old, new in refused)
        hint = [name for name, _, _ in refused if name in RESUME_ALLOWED_CHANGES]
        raise ResumeError(f"checkpoint {folder} was trained on something else: {what}. Nothing was changed"
                          + (f"; to continue with the new value on purpose, add "
                             f"train.resume_allow_changes=[{','.join(hint)}]" if hint else ""))
    changed = {name: new for name, _, new in changes}
    return changed.get("train.learning_rate")


def apply_new_learning_rate(engine, learning_rate: float) -> None:
    """After the optimizer and scheduler state came back from a checkpoint: the remaining steps use the new peak
    learning rate (the schedule's shape and position are kept; the scheduler's base_lrs carry the peak)."""
    scheduler = engine.lr_scheduler
    if scheduler is None or not hasattr(scheduler, "base_lrs"):
        raise ResumeError("train.resume_allow_changes=[train.learning_rate] needs the trainer's own scheduler; this "
                          "run's DeepSpeed config defines its own 'scheduler'")
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        factor = lr / group["initial_lr"] if group.get("initial_lr") else 1.0
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor


def apply_new_step_plan(engine) -> None:
    """After the scheduler state came back from a checkpoint planned for another number of steps: the scheduler was
    rebuilt for the new total, but the optimizer came back with the rate the old plan set for the next step, so that
    rate is recomputed on the new plan at the saved position (later steps follow the new plan by themselves)."""
    scheduler = engine.lr_scheduler
    if scheduler is None or not hasattr(scheduler, "lr_lambdas"):
        raise ResumeError("train.resume_allow_changes=[train.max_steps] needs the trainer's own scheduler; this "
                          "run's DeepSpeed config defines its own 'scheduler'")
    scheduler.last_epoch -= 1
    scheduler.step()


def _untie_step_counters(zero_optimizer) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load gives every parameter group's Adam state the *same* ``step`` tensor;
    torch's AdamW increments it in place once per group, so after one step the count is 3 -> 5 and the bias
    corrections are wrong from then on (measured: the continued losses left the uninterrupted run at the 2nd step).
    Each group gets its own copy (the value is right)."""
    for state in zero_optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load_checkpoint(engine, save_dir: str | Path, tag: str, universal_work_dir: Path | None = None,
                    restore_rng: bool = True) -> dict:
    """Collective. Restores module (trainable tensors), optimizer, scheduler and (``restore_rng``, for the world size
    that wrote it) this rank's RNG; returns the client state saved with it. With ``universal_work_dir`` (ZeRO shards
    of another world size, the engine configured with ``load_universal``) the checkpoint is converted there first."""
    step_dir = Path(save_dir) / tag
    screen_checkpoint(step_dir)
    load_dir = Path(save_dir)
    if universal_work_dir is not None:
        if dist.get_rank() == 0:
            reshard.convert_to_universal(step_dir, universal_work_dir)
        dist.barrier()
        load_dir = universal_work_dir
    load_path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if universal_work_dir is not None:
        _untie_step_counters(engine.optimizer)
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(universal_work_dir, ignore_errors=True)
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load checkpoint {step_dir}")
    if restore_rng:
        _set_rng_state(torch.load(step_dir / f"rng_state_rank{dist.get_rank()}.pt", weights_only=True))
    return client_state


def write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))
