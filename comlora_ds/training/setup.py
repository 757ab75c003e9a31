"""The trainer's set-up in stages, each run once and in this order, each a function of the stages before it:

    plan_run        the run config, the DeepSpeed JSON, the output folder, what to resume; torch.distributed
    build_data      tokenizer, tokenised rows (the tokenise-once cache), the loader and the step plan
    build_method    the method (ComLoRA, LoRA-Pro, LoRA-Dash) checked against the step plan
    plan_resume     the checkpoint to resume checked against this run (before any model is loaded)
    build_ds_config the user's DeepSpeed JSON with "auto" filled in
    build_model     the base model (or its ZeRO-3 partitions) with the adapters injected, and the objective
    build_engine    the optimizer, the scheduler and the DeepSpeed engine

Restoring a checkpoint into the engine is the last stage, ``Trainer.resume`` (the first thing ``Trainer.train``
does). The order refuses bad input before the expensive work: a bad DeepSpeed file, another run's folder or an
incompatible checkpoint are found before any data is tokenised or any model weight is read.
"""

from __future__ import annotations

import functools
import math
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoConfig, get_scheduler

from ..checkpointing import checkpoint as ckpt
from ..checkpointing import manifest, reshard
from ..comlora.model import build_model as inject_adapters
from ..comlora.model import build_objective
from ..config import ConfigError, RunConfig
from ..data import ResponseCollator, prepare_tokenizer
from ..data.cache import tokenised_datasets
from ..data.packing import LengthGroupedSampler, PackedCollator
from ..distributed import on_rank0, release_shm_names
from ..methods import get_method
from ..models import zero3_init
from ..models.base_model import load_base_model, load_tokenizer, resolve_dtype, resolve_model_path
from .ds_config import fill_ds_config, load_ds_config, resolve_bf16, zero_stage
from .op_builds import check_build_locks, use_own_extensions_dir

STAGES = ("plan_run", "build_data", "build_method", "plan_resume", "build_ds_config", "build_model", "build_engine")


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


@dataclass(frozen=True)
class RunPlan:
    """Stage 1: where and how this process trains."""
    output_dir: Path
    raw_ds_config: dict            # the user's DeepSpeed JSON, "auto" not yet filled
    resume_from: tuple[Path, str] | None     # (checkpoints folder, step tag) of train.resume
    rank: int
    world: int
    device: torch.device
    bf16: bool
    zero3_init: bool               # the base is built partitioned (ZeRO-3 and model.zero3_init)
    model_path: str


def plan_run(cfg: RunConfig, ds_config: str | Path | dict) -> RunPlan:
    raw_ds = load_ds_config(ds_config)                     # fail on a bad file before any model work
    resume_from = ckpt.check_start(cfg, int(os.environ.get("WORLD_SIZE", 1)))   # before data or model
    output_dir = Path(cfg.train.output_dir)
    ckpt.check_output_dir(output_dir)
    init_distributed()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    bf16 = resolve_bf16(cfg, raw_ds)
    partitioned = cfg.model.zero3_init and zero_stage(raw_ds) == 3
    if partitioned:
        zero3_init.check_model_dtype(cfg.model, bf16)
    return RunPlan(output_dir, raw_ds, resume_from, dist.get_rank(), dist.get_world_size(), device, bf16, partitioned,
                   resolve_model_path(cfg.model))


@dataclass(frozen=True)
class TrainingData:
    """Stage 2: the tokenised rows, this rank's loader over them and the step plan."""
    tokenizer: Any
    train_rows: Any                # datasets.Dataset of tokenised rows
    val_rows: Any
    report: Any                    # data.dataset.DataReport: what was read, dropped and truncated
    fingerprint: str | None        # of every data file (rank 0 only; the manifest's data entry)
    collate: ResponseCollator      # padded batches of the validation rows
    sampler: DistributedSampler    # this rank's training rows (LengthGroupedSampler with data.group_by_length)
    loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def build_data(cfg: RunConfig, plan: RunPlan) -> TrainingData:
    tokenizer = prepare_tokenizer(load_tokenizer(plan.model_path, cfg.model))
    fingerprint = on_rank0(lambda: manifest.data_fingerprint(cfg.data))     # every data file hashed once
    train_rows, val_rows, report = tokenised_datasets(cfg.data, tokenizer, plan.model_path, fingerprint)
    collate = ResponseCollator(tokenizer.pad_token_id)
    gas = cfg.train.gradient_accumulation_steps
    if cfg.data.group_by_length:
        lengths = [len(ids) for ids in train_rows["input_ids"]]
        sampler = LengthGroupedSampler(lengths, cfg.train.micro_batch_size * gas * plan.world,
                                       num_replicas=plan.world, rank=plan.rank, seed=cfg.data.seed)
    else:
        sampler = DistributedSampler(train_rows, num_replicas=plan.world, rank=plan.rank, shuffle=True,
                                     seed=cfg.data.seed, drop_last=True)
    # Its own generator: creating an iterator draws a seed, which must not come from (and shift) the
    # global stream of dropout and noise that a checkpoint restores.
    loader = DataLoader(train_rows, batch_size=cfg.train.micro_batch_size, sampler=sampler,
                        collate_fn=PackedCollator() if cfg.data.packing == "padding_free" else collate,
                        drop_last=True, generator=torch.Generator().manual_seed(cfg.data.seed))
    steps_per_epoch = len(loader) // gas
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_rows)} training rows give no full optimizer step of "
                          f"{cfg.train.micro_batch_size} x {gas} x {plan.world} ranks; lower train.micro_batch_size "
                          f"or train.gradient_accumulation_steps")
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.num_epochs * steps_per_epoch)
    return TrainingData(tokenizer, train_rows, val_rows, report, fingerprint, collate, sampler, loader,
                        steps_per_epoch, total_steps, int(cfg.train.warmup_ratio * total_steps))


def build_method(cfg: RunConfig, data: TrainingData):
    """Stage 3: the training method, refusing a plan it cannot follow (e.g. LoRA-Dash's warm-up beyond the run)."""
    method = get_method(cfg)
    method.check_plan(data.total_steps)
    return method


@dataclass(frozen=True)
class ResumePlan:
    """Stage 4: the checkpoint to restore (or none), already checked against this run."""
    fingerprints: tuple[str | None, str | None]      # (data, base model): written into every manifest
    layout: reshard.BatchLayout                           # this run's ranks and batch
    saved_layout: reshard.BatchLayout | None              # the checkpoint's
    universal: bool                                  # restored through DeepSpeed's universal checkpoint
    new_learning_rate: float | None                  # train.learning_rate changed since the checkpoint


def plan_resume(cfg: RunConfig, plan: RunPlan, data: TrainingData) -> ResumePlan:
    fingerprints = (data.fingerprint, on_rank0(lambda: manifest.base_model_fingerprint(plan.model_path)))
    if plan.resume_from is None:
        return ResumePlan(fingerprints, reshard.layout_of(cfg, plan.world), None, False, None)
    folder = plan.resume_from[0] / plan.resume_from[1]
    saved_layout = ckpt.check_resume_compatible(folder, cfg, plan.world, data.total_steps)
    universal = reshard.needs_universal(folder, saved_layout, plan.world)
    new_learning_rate = None
    saved = on_rank0(lambda: manifest.verify(folder))
    if saved is not None:
        new_learning_rate = ckpt.check_resume_manifest(folder, saved, *fingerprints, cfg)
    else:               # nothing proves its files whole: read each now, before the model is loaded
        on_rank0(lambda: ckpt.screen_checkpoint(folder))
    return ResumePlan(fingerprints, reshard.layout_of(cfg, plan.world), saved_layout, universal, new_learning_rate)


def build_ds_config(cfg: RunConfig, plan: RunPlan, data: TrainingData, method, resume: ResumePlan) -> dict:
    """Stage 5: the DeepSpeed config this run hands to ``deepspeed.initialize``."""
    hidden_size = AutoConfig.from_pretrained(plan.model_path, trust_remote_code=cfg.model.trust_remote_code).hidden_size
    ds_config = fill_ds_config(plan.raw_ds_config, cfg, plan.world, hidden_size, data.total_steps, data.warmup_steps)
    method.check_ds_config(ds_config)
    if resume.universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return ds_config


def build_model(cfg: RunConfig, plan: RunPlan, method, ds_config: dict):
    """Stage 6: the adapted model (initial adapter weights from train.seed, identical on every rank) and the
    training objective."""
    seed_everything(cfg.train.seed)
    if plan.zero3_init:        # no rank ever holds the whole base
        llm = zero3_init.load_partitioned_base(plan.model_path, cfg.model, ds_config)
        model = inject_adapters(cfg, llm, method, on_create=zero3_init.Partitioner(llm, plan.bf16))
    else:
        llm = load_base_model(plan.model_path, cfg.model, resolve_dtype(cfg.model.dtype, plan.bf16))
        model = inject_adapters(cfg, llm, method)
    return model, build_objective(cfg)


def param_groups(model: torch.nn.Module, weight_decay: float, selector_lr: float | None = None) -> list[dict]:
    """Weight decay on matrices only (not on norms or 1-D tensors). With ``selector_lr`` the selector's parameters
    are groups of their own at that learning rate (``comlora.selector_learning_rate``)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:      # a ZeRO-3 partitioned parameter is an empty 1-D tensor: its shape is ds_shape
            ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
            own_lr = selector_lr is not None and name.startswith("selector.")
            groups.setdefault((own_lr, ndim >= 2 and "norm" not in name), []).append(p)
    return [{"params": groups[key], "weight_decay": weight_decay if key[1] else 0.0,
             **({"lr": selector_lr} if key[0] else {})}
            for key in ((False, True), (False, False), (True, True), (True, False)) if key in groups]


def build_engine(cfg: RunConfig, plan: RunPlan, data: TrainingData, method, model: torch.nn.Module,
                 ds_config: dict):
    """Stage 7: the method's optimizer (or AdamW, unless the DeepSpeed JSON names one), the scheduler (unless the
    JSON names one) and the DeepSpeed engine; then each rank's own random stream for dropout and noise."""
    groups = functools.partial(param_groups, model, cfg.train.weight_decay, cfg.comlora.selector_learning_rate)
    optimizer = method.build_optimizer(model, groups())
    scheduler = None
    if optimizer is None and "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups(), lr=cfg.train.learning_rate,
                                      betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                      eps=cfg.train.adam_epsilon, fused=torch.cuda.is_available())
    if "scheduler" not in ds_config:      # DeepSpeed calls it with the optimizer it wraps
        scheduler = functools.partial(get_scheduler, cfg.train.lr_scheduler, num_warmup_steps=data.warmup_steps,
                                      num_training_steps=data.total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      model_parameters=groups(), config=ds_config)
    seed_everything(rank_stream_seed(cfg.train.seed, plan.rank))     # initial weights identical on every rank
    return engine
