"""The one object that owns the DeepSpeed engine: its staged set-up (:mod:`.setup`), the training loop, checkpoints.

Read ``Trainer.train`` top to bottom: each optimizer step runs ``gradient_accumulation_steps``
micro-batches of ``forward_backward`` (all K components, the ComLoRA objective with eta(t)), then
one all-reduce of the step's statistics (so every rank takes the same decisions), then the optimizer
step, logging, every ``eval_steps`` a validation pass (``validation_schedule``: the best checkpoint, early stopping)
and, every ``save_steps``, a checkpoint written collectively by all ranks.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

from ..checkpointing import checkpoint as ckpt
from ..checkpointing import manifest, reshard
from ..checkpointing import run_layout as layout
from ..comlora.divergence import adapter_layers, update_divergence
from ..comlora.losses import annealing_eta
from ..comlora.validation import score_validation
from ..config import RunConfig
from ..errors import InputError
from ..fileio import atomic_write_text
from . import setup
from .clipping import clip_per_group
from .ds_config import zero_stage
from .setup import seed_everything
from .step import DeepSpeedStepper
from .tracking import RunLogger, StepAccumulator
from .validation_schedule import ValidationSchedule

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass
class TrainState:
    global_step: int = 0          # optimizer steps done (the step being taken is global_step + 1)
    epoch: int = 0
    batches_in_epoch: int = 0     # micro-batches of this epoch already consumed


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    checkpoint: Path | None
    stop_requested: bool            # SIGTERM, Ctrl-C or request_stop: no final validation
    early_stopped: bool             # train.early_stopping_patience ran out
    validation: dict | None


def exit_process(code: int) -> NoReturn:
    """Ends a training process once everything is written (and ``Trainer.close`` has run), skipping interpreter
    finalization as multiprocessing's workers do: DeepSpeed and gloo objects that are still referenced from
    reference cycles are otherwise destroyed during teardown, which now and then aborts a finished rank
    ("terminate called without an active exception", SIGABRT) and turns a complete run into a failed launch."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class TrainerCallback:
    """What code outside the trainer (a benchmark, a monitor) can attach to, without patching it. Every rank calls
    both hooks; reading gradients (``deepspeed.utils.safe_get_full_grad``) is collective, so do it on every rank."""

    def on_gradients(self, trainer: "Trainer", step: int) -> None:
        """Step ``step``'s gradients are reduced and rewritten by the method; clipping and the optimizer come next."""

    def on_step_end(self, trainer: "Trainer", step: int, metrics: dict) -> None:
        """Optimizer step ``step`` was applied; ``metrics`` is what gets logged for it."""


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: str | Path | dict, callbacks: list[TrainerCallback] = ()):
        self.callbacks = list(callbacks)
        output_dir = Path(cfg.train.output_dir).absolute()
        created = [p for p in (output_dir, *output_dir.parents) if not p.exists()]
        try:
            self._setup(cfg, ds_config)
        except InputError:
            for folder in created:         # a refused run leaves no empty output folder behind
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise

    def _setup(self, cfg: RunConfig, ds_config: str | Path | dict) -> None:
        """The stages of :mod:`comlora_ds.training.setup`, once each and in order (bad input is refused before the
        expensive work); restoring a checkpoint is the first thing ``train`` does."""
        self.cfg = cfg
        self.plan = setup.plan_run(cfg, ds_config)
        self.data = setup.build_data(cfg, self.plan)
        self.method = setup.build_method(cfg, self.data)
        self.resume_plan = setup.plan_resume(cfg, self.plan, self.data)
        self.ds_config = setup.build_ds_config(cfg, self.plan, self.data, self.method, self.resume_plan)
        self.model, self.objective = setup.build_model(cfg, self.plan, self.method, self.ds_config)
        self.engine = setup.build_engine(cfg, self.plan, self.data, self.method, self.model, self.ds_config)
        self.stepper = DeepSpeedStepper(self.engine, self.objective, cfg.comlora.execution)
        self.gradient_transforms = self._gradient_transforms()
        self.state = TrainState()
        self.schedule = ValidationSchedule(cfg.train)
        self._stop_requested = False

    # what callers and callbacks read most, by their old names
    rank = property(lambda self: self.plan.rank)
    world = property(lambda self: self.plan.world)
    device = property(lambda self: self.plan.device)
    bf16 = property(lambda self: self.plan.bf16)
    output_dir = property(lambda self: self.plan.output_dir)
    save_dir = property(lambda self: self.plan.output_dir / layout.CHECKPOINTS)
    tokenizer = property(lambda self: self.data.tokenizer)
    train_rows = property(lambda self: self.data.train_rows)
    val_rows = property(lambda self: self.data.val_rows)
    total_steps = property(lambda self: self.data.total_steps)

    # ----------------------------------------------------------------------------------- checkpoints
    def client_state(self, logger: RunLogger) -> dict:
        return {"global_step": self.state.global_step, "epoch": self.state.epoch,
                "batches_in_epoch": self.state.batches_in_epoch, "total_steps": self.total_steps,
                "world_size": self.world, **logger.window_state(), **self.schedule.state(),
                "num_components": self.cfg.adapter.num_components}

    def _write_manifest(self, folder: Path) -> None:
        manifest.write(folder, *self.resume_plan.fingerprints, manifest.settings_of(self.cfg))

    def _write_extras(self, folder: Path, logger: RunLogger) -> None:
        self.cfg.save(folder / layout.RUN_CONFIG)
        ckpt.write_json(folder / layout.TRAINER_STATE, self.client_state(logger))
        ckpt.write_json(folder / layout.DS_CONFIG, self.ds_config)
        ckpt.write_json(folder / layout.DATA_REPORT, self.data.report.to_dict())
        if len(self.val_rows):   # consolidation scores exactly these rows, even if the data files move
            self.val_rows.to_json(folder / layout.VALIDATION_ROWS, lines=True)
        self.tokenizer.save_pretrained(folder / layout.TOKENIZER)

    def _checkpoint_bytes(self) -> int:
        """A generous estimate of one checkpoint: fp32 weight + master + Adam m, v of every trainable
        tensor (all ranks together), the tokenizer and a margin."""
        trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.model.trainable_parameters())
        return 16 * trainable + 32 * 2**20

    def save(self, logger: RunLogger, best: bool = False) -> Path:
        folder = ckpt.save_checkpoint(self.engine, self.save_dir, self.state.global_step, self.client_state(logger),
                                      lambda folder: self._write_extras(folder, logger),
                                      keep_last=self.cfg.train.save_total_limit, needed_bytes=self._checkpoint_bytes(),
                                      finalize=self._write_manifest, best=best)
        logger.message(f"checkpoint: {folder}" + (" (best so far)" if best else ""))
        return folder

    def resume(self) -> dict | None:
        """Restores the engine and the loop state from train.resume; returns the checkpoint's client state."""
        plan = self.resume_plan
        if self.plan.resume_from is None:
            return None
        save_dir, tag = self.plan.resume_from
        work_dir = reshard.universal_work_dir(self.save_dir, tag) if plan.universal else None
        same_ranks = plan.saved_layout.world_size == self.world
        state = ckpt.load_checkpoint(self.engine, save_dir, tag, universal_work_dir=work_dir, restore_rng=same_ranks)
        self.state = TrainState(state["global_step"], state["epoch"],
                                reshard.batches_in_epoch(state["batches_in_epoch"], plan.saved_layout, plan.layout))
        self.schedule.load_state(state)
        if not same_ranks:
            seed_everything(reshard.fresh_stream_seed(self.cfg.train.seed, self.rank, self.state.global_step))
        if state["total_steps"] != self.total_steps:
            ckpt.apply_new_step_plan(self.engine)
        if plan.new_learning_rate is not None:
            ckpt.apply_new_learning_rate(self.engine, plan.new_learning_rate)
        if self.rank == 0:
            print(f"resumed from {save_dir / tag} at step {self.state.global_step}", flush=True)
        return state

    # ------------------------------------------------------------------------------------ training
    def _gradient_transforms(self) -> list:
        """What happens to a step's reduced gradients before the optimizer, in order: the method's rewrite (LoRA-Pro's
        equivalent gradients), the callbacks' look at them, per-group clipping (ComLoRA). Each is called as
        ``transform(engine, step)`` and may return metrics to log."""
        transforms = [self.method.before_optimizer_step, self._show_gradients]
        if self.cfg.clip_scope == "per_group":
            transforms.append(self._clip_per_group)
        return transforms

    def _show_gradients(self, engine, step: int) -> None:
        for callback in self.callbacks:
            callback.on_gradients(self, step)

    def _clip_per_group(self, engine, step: int) -> dict:
        return {"grad_norm": clip_per_group(engine.module, self.cfg.adapter.num_components,
                                            self.cfg.train.max_grad_norm)}

    def request_stop(self) -> None:
        """Checkpoint at the end of the current step, then stop (what SIGTERM and SIGUSR1 do). Ranks agree: the flag
        travels with the step's statistics (one all-reduce), so every rank stops after the same step."""
        self._stop_requested = True

    def _request_stop(self, signum, frame) -> None:
        """SIGTERM / SIGUSR1 (preemption, Slurm's --signal, launch/preemptible.py) or a first Ctrl-C: checkpoint at the
        next step boundary, then stop. A second Ctrl-C stops at once (the last complete checkpoint stays as it was)."""
        if signum == signal.SIGINT and self._stop_requested:
            raise KeyboardInterrupt
        self.request_stop()
        if signum == signal.SIGINT and self.rank == 0:
            print("\nCtrl-C: writing a checkpoint at the end of this step, then stopping (Ctrl-C again: stop now)",
                  file=sys.stderr, flush=True)

    def _micro_batches(self):
        """This epoch's remaining micro-batches, cut to whole optimizer steps."""
        self.data.sampler.set_epoch(self.state.epoch)
        usable = self.data.steps_per_epoch * self.cfg.train.gradient_accumulation_steps
        return itertools.islice(iter(self.data.loader), self.state.batches_in_epoch, usable)

    def train(self) -> TrainResult:
        cfg, engine = self.cfg, self.engine
        resumed = self.resume()
        logger = RunLogger(cfg, self.output_dir, self.total_steps, self.state.global_step, enabled=self.rank == 0)
        if resumed is not None:
            logger.load_window_state(resumed)
        if self.rank == 0:
            logger.message(f"{self.data.report.summary()}; {self.total_steps} optimizer steps, "
                           f"{self.world} rank(s), ZeRO stage {zero_stage(self.ds_config)}"
                           f"{' (base built partitioned)' if self.plan.zero3_init else ''}, "
                           f"{'bf16' if self.bf16 else 'fp32'}, output in {self.output_dir}")
        previous = {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}
        accumulator = StepAccumulator(cfg.adapter.num_components, self.device)
        last_checkpoint, stopped, early_stopped, validation = None, False, False, None
        engine.train()
        try:
            while self.state.global_step < self.total_steps and not (stopped or early_stopped):
                for batch in self._micro_batches():
                    batch = {name: t.to(self.device) for name, t in batch.items()}
                    eta = annealing_eta(cfg.comlora.annealing, self.state.global_step + 1, self.total_steps,
                                        cfg.comlora.annealing_rate)      # t = the step being taken, 1..T
                    out = self.stepper.forward_backward(batch, eta)
                    accumulator.add(out, batch)
                    self.state.batches_in_epoch += 1
                    boundary = engine.is_gradient_accumulation_boundary()
                    if boundary:       # the step's gradients are accumulated and reduced
                        step = self.state.global_step + 1
                        metrics = accumulator.reduce(self._stop_requested)
                        accumulator.reset()
                        _check_finite(metrics, step)
                        lr = engine.get_lr()[0]
                        for transform in self.gradient_transforms:
                            metrics.update(transform(engine, step) or {})
                    engine.step()      # every micro-step: DeepSpeed applies the optimizer at the boundary only
                    if not boundary:
                        continue
                    self.state.global_step += 1
                    self.method.on_optimizer_step(engine.module, self.state.global_step)
                    for callback in self.callbacks:
                        callback.on_step_end(self, self.state.global_step, metrics)
                    logger.log_step(self.state.global_step, metrics, lr, eta)
                    stopped = metrics["stop_requested"]
                    done = self.state.global_step >= self.total_steps
                    best = False
                    if not stopped and self.schedule.due(self.state.global_step, done):
                        validation = self.validate(logger)
                        verdict = self.schedule.observe(self.state.global_step, validation["winner_loss"])
                        best, early_stopped = verdict.improved and cfg.train.save_best, verdict.stop
                    finish = stopped or done or early_stopped
                    if finish or best or (cfg.train.save_steps and self.state.global_step % cfg.train.save_steps == 0):
                        last_checkpoint = self.save(logger, best=best)
                    if finish:
                        break
                else:
                    self.state.epoch += 1
                    self.state.batches_in_epoch = 0
            if stopped:
                logger.message(f"stop requested (SIGTERM, SIGUSR1 or Ctrl-C): stopped at step {self.state.global_step} "
                               f"after writing {last_checkpoint}; resume with train.resume=auto")
                return TrainResult(self.output_dir, self.state.global_step, last_checkpoint, True, False, None)
            if early_stopped:
                logger.message(f"early stopping: {cfg.train.early_stopping_patience} validation(s) without a better "
                               f"winner loss than {self.schedule.best_loss:.4f} (step {self.schedule.best_step}); "
                               f"stopped at step {self.state.global_step}")
            if validation is None:       # no validation during training: the final one
                validation = self.validate(logger)
            if validation is not None and self.rank == 0:
                ckpt.write_json(self.output_dir / layout.VALIDATION, validation)
                atomic_write_text(self.output_dir / layout.VALIDATION_SCORES,
                                  "".join(json.dumps(row) + "\n" for row in self.last_scores.per_row()))
            return TrainResult(self.output_dir, self.state.global_step, last_checkpoint, False, early_stopped,
                               validation)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            logger.close()

    def close(self) -> None:
        """Collective: leave the process group cleanly (gloo aborts the process at exit otherwise)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def validate(self, logger: RunLogger) -> dict | None:
        """Scores the validation split with every component and the selector (collective: each rank its shard, the
        sums all-reduced), logs it as the step's ``validation`` record."""
        if len(self.val_rows) == 0:
            return None
        start = time.perf_counter()
        self.engine.eval()
        scores = score_validation(self.engine, self.val_rows, self.data.collate, self.cfg.adapter.num_components,
                                  self.cfg.train.micro_batch_size, self.device)
        scores.update_divergence = update_divergence(adapter_layers(self.model))
        self.last_scores = scores
        self.engine.train()
        result = {"step": self.state.global_step, **scores.as_dict(), "seconds": time.perf_counter() - start}
        logger.write({"validation": result, "step": self.state.global_step})
        logger.message(f"validation at step {self.state.global_step}: component losses "
                       f"{[round(x, 4) for x in result['mean_loss']]}, winner {result['winner']} "
                       f"(by {result['winner_by']})")
        logger.restart_clock()
        return result


def _check_finite(metrics: dict, step: int) -> None:
    losses = metrics["component_loss"]
    bad = [k for k, value in enumerate(losses) if not math.isfinite(value)]
    if bad or not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite loss at optimizer step {step}: total {metrics['loss']}, "
                                 f"component(s) {bad} have losses {[losses[k] for k in bad]}; the optimizer step "
                                 f"was not applied and the last checkpoint is intact")
