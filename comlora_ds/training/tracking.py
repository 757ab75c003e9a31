"""Run logging on rank 0: a tqdm progress bar, metrics.jsonl, and the ``logging.report_to`` destinations: wandb
(offline unless configured; wandb's own WANDB_MODE / WANDB_PROJECT / WANDB_DIR apply to what the config leaves unset)
and TensorBoard event files under ``<output_dir>/tensorboard``.

Also the per-step metric accumulator, whose one all-reduce per optimizer step gives every rank the
same numbers (so decisions taken on them, like stopping on a non-finite loss, are identical).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..checkpointing.run_layout import METRICS, TENSORBOARD, WANDB_RUN_ID
from ..comlora.losses import PairTarget
from ..config import LoggingConfig, RunConfig
from ..data.packing import real_tokens
from ..fileio import atomic_write_text
from .step import StepOutput

DIAGNOSTICS = ("target_pairs_agreeing", "target_pairs", "top_is_lowest_loss", "sim_spread_sum", "samples")


def selector_diagnostics(target: PairTarget, sims: torch.Tensor) -> torch.Tensor:
    """Counts [DIAGNOSTICS] of one batch: component pairs whose noisy pairwise target orders them as the noise-free
    losses do (and the number of pairs), samples whose top-scored component has the lowest loss, the summed
    per-sample spread max_k sim - min_k sim, and the samples."""
    k = sims.shape[1]
    i, j = torch.triu_indices(k, k, offset=1, device=sims.device)
    clean, noisy = target.clean.to(sims.device), target.noisy.to(sims.device)
    agree = (torch.sign(clean[:, i] - clean[:, j]) == torch.sign(noisy[:, i] - noisy[:, j])).sum()
    top_is_best = (sims.argmax(1) == clean.argmin(1)).sum()
    spread = (sims.max(1).values - sims.min(1).values).sum()
    return torch.stack([agree.double(), torch.tensor(float(i.numel() * sims.shape[0]), device=sims.device).double(),
                        top_is_best.double(), spread.double(), torch.tensor(float(sims.shape[0]), device=sims.device,
                                                                             dtype=torch.float64)])


def diagnostic_rates(counts: list[float]) -> dict:
    """The logged rates of summed ``selector_diagnostics`` counts (None where nothing was counted)."""
    agree, pairs, top, spread, n = counts
    return {"target_order_rate": agree / pairs if pairs else None,
            "top_is_lowest_loss_rate": top / n if n else None,
            "sim_spread": spread / n if n else None}


class StepAccumulator:
    """Sums one optimizer step's micro-batch statistics; ``reduce`` all-reduces them across ranks.

    Layout: [total, lm, align, pairwise, stop_flag, samples, tokens, loss[K], sims[K], argmax[K], DIAGNOSTICS].
    """

    HEAD = 7

    def __init__(self, num_components: int, device: torch.device):
        self.k, self.device = num_components, device
        self.reset()

    def reset(self) -> None:
        self.values = torch.zeros(self.HEAD + 3 * self.k + len(DIAGNOSTICS), dtype=torch.float64, device=self.device)
        self.micro_batches = 0

    def add(self, out: StepOutput, batch: dict[str, torch.Tensor]) -> None:
        k, v = self.k, self.values
        v[:4] += torch.stack(list(out.terms)).double().to(self.device)
        v[5] += out.losses.shape[1]
        v[6] += real_tokens(batch).double().to(self.device)
        v[self.HEAD:self.HEAD + k] += out.losses.double().mean(1).to(self.device)
        if out.sims is not None:
            v[self.HEAD + k:self.HEAD + 2 * k] += out.sims.double().mean(0).to(self.device)
            v[self.HEAD + 2 * k:self.HEAD + 3 * k] += torch.bincount(out.sims.argmax(1),
                                                                     minlength=k).double().to(self.device)
            if out.target is not None:
                v[self.HEAD + 3 * k:] += selector_diagnostics(out.target, out.sims).to(self.device)
        self.micro_batches += 1

    def reduce(self, stop_requested: bool) -> dict:
        """Collective. Means over micro-batches and ranks; counts and tokens summed."""
        v = self.values.clone()
        v[4] = float(stop_requested)
        if dist.is_initialized():
            dist.all_reduce(v)
        world = dist.get_world_size() if dist.is_initialized() else 1
        n, k, h = self.micro_batches * world, self.k, self.HEAD
        v = v.cpu()
        return {
            "loss": v[0].item() / n, "lm_loss": v[1].item() / n, "align_loss": v[2].item() / n,
            "pairwise_loss": v[3].item() / n, "stop_requested": v[4].item() > 0,
            "samples": int(v[5]), "tokens": int(v[6]),
            "component_loss": (v[h:h + k] / n).tolist(), "selector_score": (v[h + k:h + 2 * k] / n).tolist(),
            "selector_argmax": v[h + 2 * k:h + 3 * k].long().tolist(),
            "selector_diagnostics": v[h + 3 * k:].tolist(),
        }


class RunLogger:
    """Writes only on rank 0 (``enabled``); every method is a no-op elsewhere."""

    def __init__(self, cfg: RunConfig, output_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled, self.cfg, self.total_steps = enabled, cfg, total_steps
        self.window: list[int] = [0] * cfg.adapter.num_components           # winner counts of this window
        self.diagnostics_window: list[float] = [0.0] * len(DIAGNOSTICS)     # selector_diagnostics of this window
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        _drop_records_after(output_dir / METRICS, start_step)
        self.jsonl = open(output_dir / METRICS, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self.wandb = _open_wandb(cfg, output_dir) if "wandb" in cfg.logging.report_to else None
        self.tensorboard = None
        if "tensorboard" in cfg.logging.report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run hides the events the stopped run wrote past its checkpoint
            self.tensorboard = SummaryWriter(str(output_dir / TENSORBOARD), purge_step=start_step + 1 if start_step
                                             else None)
        self._last = time.perf_counter()

    def log_step(self, step: int, metrics: dict, lr: float, eta: float) -> None:
        """``metrics`` from StepAccumulator.reduce (identical on all ranks); step is 1-based."""
        for k, count in enumerate(metrics["selector_argmax"]):
            self.window[k] += count
        for i, count in enumerate(metrics["selector_diagnostics"]):
            self.diagnostics_window[i] += count
        window_done = step % self.cfg.logging.winner_window == 0
        if not self.enabled:
            if window_done:
                self._reset_window()
            return
        now = time.perf_counter()
        step_time, self._last = now - self._last, now
        record = {"step": step, "lr": lr, "eta": eta, "step_time": step_time,
                  "tokens_per_s": metrics["tokens"] / step_time,
                  **{key: value for key, value in metrics.items()
                     if key not in ("stop_requested", "selector_diagnostics")}}
        if window_done:
            record["winner_counts"] = list(self.window)
            if self.diagnostics_window[-1]:
                record["selector_diagnostics"] = diagnostic_rates(self.diagnostics_window)
            self._reset_window()
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", s_per_step=f"{step_time:.2f}",
                             tok_s=f"{record['tokens_per_s']:.0f}")
        if step % self.cfg.logging.log_steps == 0 or window_done or step == self.total_steps:
            self.write(record)

    def restart_clock(self) -> None:
        """After work between steps (a validation pass): the next step_time counts training only."""
        self._last = time.perf_counter()

    def _reset_window(self) -> None:
        self.window = [0] * len(self.window)
        self.diagnostics_window = [0.0] * len(DIAGNOSTICS)

    def window_state(self) -> dict:
        """What a checkpoint keeps of the current window, so a resumed run logs the same window records."""
        return {"winner_window": list(self.window), "diagnostics_window": list(self.diagnostics_window)}

    def load_window_state(self, state: dict) -> None:
        self.window = list(state["winner_window"])
        self.diagnostics_window = list(state.get("diagnostics_window", [0.0] * len(DIAGNOSTICS)))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        flat = _flatten(record)
        if self.wandb is not None:
            self.wandb.log(flat, step=record.get("step"))
        if self.tensorboard is not None:
            for tag, value in flat.items():
                if tag != "step" and isinstance(value, (int, float)):   # bools as 0/1; None and text skipped
                    self.tensorboard.add_scalar(tag, value, global_step=record["step"])

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def wandb_settings(log: LoggingConfig, output_dir: Path, environ=os.environ) -> dict:
    """wandb.init's mode, project and dir. A value the config sets is passed; an unset one is left to wandb's own
    environment variable when that is set (wandb gives init's arguments precedence, so passing our default would
    hide the cluster's WANDB_MODE / WANDB_PROJECT / WANDB_DIR), else our default is passed."""
    settings = {}
    for argument, variable, configured, default in (("mode", "WANDB_MODE", log.wandb_mode, "offline"),
                                                    ("project", "WANDB_PROJECT", log.wandb_project, "comlora_ds"),
                                                    ("dir", "WANDB_DIR", log.wandb_dir, str(output_dir))):
        if configured is not None:
            settings[argument] = configured
        elif not environ.get(variable):
            settings[argument] = default
    return settings


def _open_wandb(cfg: RunConfig, output_dir: Path):
    """The wandb run (resumed under the id kept in the run folder), or None when its mode is disabled."""
    settings = wandb_settings(cfg.logging, output_dir)
    if settings.get("mode", os.environ.get("WANDB_MODE")) == "disabled":
        return None
    import wandb

    id_file = output_dir / WANDB_RUN_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(name=cfg.logging.run_name or output_dir.name, id=run_id, resume="allow", config=asdict(cfg),
                      **settings)


def _drop_records_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop what the stopped run logged past ``step`` (and a
    line cut by a kill), so the file holds each step once. Rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _flatten(record: dict, prefix: str = "") -> dict:
    """``{"validation": {"mean_loss": [a, b]}}`` -> ``{"validation/mean_loss/0": a, "validation/mean_loss/1": b}``."""
    flat = {}
    items = record.items() if isinstance(record, dict) else enumerate(record)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (list, dict)):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat
