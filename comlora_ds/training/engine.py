"""The one object that owns the DeepSpeed engine: set-up, the training loop, checkpoints.

Read ``Trainer.train`` top to bottom: each optimizer step runs ``gradient_accumulation_steps``
micro-batches of ``forward_backward`` (all K components, the ComLoRA objective with eta(t)), then
one all-reduce of the step's statistics (so every rank takes the same decisions), then the optimizer
step, logging, every ``eval_steps`` a validation pass (``validation_schedule``: the best checkpoint, early stopping)
and, every ``save_steps``, a checkpoint written collectively by all ranks.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoConfig, get_scheduler

from ..checkpointing import checkpoint as ckpt
from ..checkpointing import manifest, reshard
from ..checkpointing import run_layout as layout
from ..comlora.divergence import adapter_layers, update_divergence
from ..comlora.losses import annealing_eta
from ..comlora.model import build_model, build_objective
from ..comlora.validation import score_validation
from ..config import ConfigError, RunConfig
from ..data import ResponseCollator, prepare_tokenizer
from ..data.cache import tokenised_datasets
from ..distributed import on_rank0, release_shm_names
from ..errors import InputError
from ..fileio import atomic_write_text
from ..methods import get_method
from ..models import zero3_init
from ..models.base_model import load_base_model, load_tokenizer, resolve_dtype, resolve_model_path
from .clipping import clip_per_group
from .ds_config import fill_ds_config, load_ds_config, resolve_bf16, zero_stage
from .op_builds import check_build_locks, use_own_extensions_dir
from .step import DeepSpeedStepper
from .tracking import RunLogger, StepAccumulator
from .validation_schedule import ValidationSchedule

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPU). A plain
    ``python launch/train.py`` without a launcher becomes a world of one."""
    if dist.is_initialized():
        return
    use_own_extensions_dir()       # DeepSpeed builds its shm op here on CPU: never wait on a killed build's lock
    check_build_locks()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_init_required=True)
    release_shm_names()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rank_stream_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own stream for adapter dropout and the pairwise noise: derived from
    (seed, rank) by numpy's SeedSequence, so ranks draw independent masks and noise on their different
    batches, and no (seed, rank) pair reuses another run's stream (seed + rank would)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


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
        """Every build step, in the order that refuses bad input before the expensive work."""
        self.cfg = cfg
        self.output_dir = Path(cfg.train.output_dir)
        self.save_dir = self.output_dir / layout.CHECKPOINTS
        raw_ds = load_ds_config(ds_config)                     # fail on a bad file before any model work
        self.resume_from = ckpt.check_start(cfg, int(os.environ.get("WORLD_SIZE", 1)))   # before data or model
        ckpt.check_output_dir(self.output_dir)
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.bf16 = resolve_bf16(cfg, raw_ds)
        self.zero3_init = cfg.model.zero3_init and zero_stage(raw_ds) == 3
        if self.zero3_init:
            zero3_init.check_model_dtype(cfg.model, self.bf16)

        model_path = resolve_model_path(cfg.model)
        self.tokenizer = prepare_tokenizer(load_tokenizer(model_path, cfg.model))
        data_fingerprint = on_rank0(lambda: manifest.data_fingerprint(cfg.data))     # every data file hashed once
        self.train_rows, self.val_rows, self.data_report = tokenised_datasets(cfg.data, self.tokenizer, model_path,
                                                                              data_fingerprint)
        self.collate = ResponseCollator(self.tokenizer.pad_token_id)
        self.sampler = DistributedSampler(self.train_rows, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=cfg.data.seed, drop_last=True)
        # Its own generator: creating an iterator draws a seed, which must not come from (and shift) the
        # global stream of dropout and noise that a checkpoint restores.
        self.loader = DataLoader(self.train_rows, batch_size=cfg.train.micro_batch_size, sampler=self.sampler,
                                 collate_fn=self.collate, drop_last=True,
                                 generator=torch.Generator().manual_seed(cfg.data.seed))
        gas = cfg.train.gradient_accumulation_steps
        self.steps_per_epoch = len(self.loader) // gas
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.train_rows)} training rows give no full optimizer step of "
                             f"{cfg.train.micro_batch_size} x {gas} x {self.world} ranks; lower train.micro_batch_size "
                             f"or train.gradient_accumulation_steps")
        self.total_steps = cfg.train.max_steps or math.ceil(cfg.train.num_epochs * self.steps_per_epoch)
        warmup = int(cfg.train.warmup_ratio * self.total_steps)
        self.method = get_method(cfg)
        self.method.check_plan(self.total_steps)

        self.fingerprints = (data_fingerprint, on_rank0(lambda: manifest.base_model_fingerprint(model_path)))
        self.new_learning_rate = None
        self.layout, self.saved_layout, self.universal_resume = reshard.layout_of(cfg, self.world), None, False
        if self.resume_from is not None:
            folder = self.resume_from[0] / self.resume_from[1]
            self.saved_layout = ckpt.check_resume_compatible(folder, cfg, self.world, self.total_steps)
            self.universal_resume = reshard.needs_universal(folder, self.saved_layout, self.world)
            saved = on_rank0(lambda: manifest.verify(folder))
            if saved is not None:
                self.new_learning_rate = ckpt.check_resume_manifest(folder, saved, *self.fingerprints, cfg)
            else:               # nothing proves its files whole: read each now, before the model is loaded
                on_rank0(lambda: ckpt.screen_checkpoint(folder))

        hidden_size = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code).hidden_size
        self.ds_config = fill_ds_config(raw_ds, cfg, self.world, hidden_size, self.total_steps, warmup)
        self.method.check_ds_config(self.ds_config)
        if self.universal_resume:
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}

        seed_everything(cfg.train.seed)
        if self.zero3_init:        # no rank ever holds the whole base
            llm = zero3_init.load_partitioned_base(model_path, cfg.model, self.ds_config)
            self.model = build_model(cfg, llm, self.method, on_create=zero3_init.Partitioner(llm, self.bf16))
        else:
            llm = load_base_model(model_path, cfg.model, resolve_dtype(cfg.model.dtype, self.bf16))
            self.model = build_model(cfg, llm, self.method)
        self.objective = build_objective(cfg)
        optimizer = self.method.build_optimizer(self.model, self._param_groups())
        scheduler = None
        if optimizer is None and "optimizer" not in self.ds_config:
            optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.train.learning_rate,
                                          betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                          eps=cfg.train.adam_epsilon, fused=torch.cuda.is_available())
        if "scheduler" not in self.ds_config:      # DeepSpeed calls it with the optimizer it wraps
            scheduler = functools.partial(get_scheduler, cfg.train.lr_scheduler, num_warmup_steps=warmup,
                                          num_training_steps=self.total_steps)
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
                                               model_parameters=self._param_groups(), config=self.ds_config)
        seed_everything(rank_stream_seed(cfg.train.seed, self.rank))     # initial weights identical on every rank
        self.stepper = DeepSpeedStepper(self.engine, self.objective, cfg.comlora.execution)
        self.gradient_transforms = self._gradient_transforms()
        self.state = TrainState()
        self.schedule = ValidationSchedule(cfg.train)
        self._stop_requested = False

    def _param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:      # a ZeRO-3 partitioned parameter is an empty 1-D tensor: its shape is ds_shape
                ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
                (no_decay if ndim < 2 or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.train.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # ----------------------------------------------------------------------------------- checkpoints
    def client_state(self, logger: RunLogger) -> dict:
        return {"global_step": self.state.global_step, "epoch": self.state.epoch,
                "batches_in_epoch": self.state.batches_in_epoch, "total_steps": self.total_steps,
                "world_size": self.world, **logger.window_state(), **self.schedule.state(),
                "num_components": self.cfg.adapter.num_components}

    def _write_manifest(self, folder: Path) -> None:
        manifest.write(folder, *self.fingerprints, manifest.settings_of(self.cfg))

    def _write_extras(self, folder: Path, logger: RunLogger) -> None:
        self.cfg.save(folder / layout.RUN_CONFIG)
        ckpt.write_json(folder / layout.TRAINER_STATE, self.client_state(logger))
        ckpt.write_json(folder / layout.DS_CONFIG, self.ds_config)
        ckpt.write_json(folder / layout.DATA_REPORT, self.data_report.to_dict())
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
        if self.resume_from is None:
            return None
        save_dir, tag = self.resume_from
        work_dir = reshard.universal_work_dir(self.save_dir, tag) if self.universal_resume else None
        same_ranks = self.saved_layout.world_size == self.world
        state = ckpt.load_checkpoint(self.engine, save_dir, tag, universal_work_dir=work_dir, restore_rng=same_ranks)
        self.state = TrainState(state["global_step"], state["epoch"],
                                reshard.batches_in_epoch(state["batches_in_epoch"], self.saved_layout, self.layout))
        self.schedule.load_state(state)
        if not same_ranks:
            seed_everything(reshard.fresh_stream_seed(self.cfg.train.seed, self.rank, self.state.global_step))
        if state["total_steps"] != self.total_steps:
            ckpt.apply_new_step_plan(self.engine)
        if self.new_learning_rate is not None:
            ckpt.apply_new_learning_rate(self.engine, self.new_learning_rate)
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
        self.sampler.set_epoch(self.state.epoch)
        usable = self.steps_per_epoch * self.cfg.train.gradient_accumulation_steps
        return itertools.islice(iter(self.loader), self.state.batches_in_epoch, usable)

    def train(self) -> TrainResult:
        cfg, engine = self.cfg, self.engine
        resumed = self.resume()
        logger = RunLogger(cfg, self.output_dir, self.total_steps, self.state.global_step, enabled=self.rank == 0)
        if resumed is not None:
            logger.load_window_state(resumed)
        if self.rank == 0:
            logger.message(f"{self.data_report.summary()}; {self.total_steps} optimizer steps, "
                           f"{self.world} rank(s), ZeRO stage {zero_stage(self.ds_config)}"
                           f"{' (base built partitioned)' if self.zero3_init else ''}, "
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
        scores = score_validation(self.engine, self.val_rows, self.collate, self.cfg.adapter.num_components,
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
