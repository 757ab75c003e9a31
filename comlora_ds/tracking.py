"""Run logging on rank 0: a tqdm progress bar, wandb (offline unless configured), and metrics.jsonl.

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

from .config import RunConfig
from .step import StepOutput


class StepAccumulator:
    """Sums one optimizer step's micro-batch statistics; ``reduce`` all-reduces them across ranks.

    Layout: [total, lm, align, pairwise, stop_flag, samples, tokens, loss[K], sims[K], argmax[K]].
    """

    HEAD = 7

    def __init__(self, num_components: int, device: torch.device):
        self.k, self.device = num_components, device
        self.reset()

    def reset(self) -> None:
        self.values = torch.zeros(self.HEAD + 3 * self.k, dtype=torch.float64, device=self.device)
        self.micro_batches = 0

    def add(self, out: StepOutput, batch: dict[str, torch.Tensor]) -> None:
        k, v = self.k, self.values
        v[:4] += torch.stack(list(out.terms)).double().to(self.device)
        v[5] += out.losses.shape[1]
        v[6] += batch["attention_mask"].sum().double().to(self.device)
        v[self.HEAD:self.HEAD + k] += out.losses.double().mean(1).to(self.device)
        if out.sims is not None:
            v[self.HEAD + k:self.HEAD + 2 * k] += out.sims.double().mean(0).to(self.device)
            v[self.HEAD + 2 * k:] += torch.bincount(out.sims.argmax(1), minlength=k).double().to(self.device)
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
            "selector_argmax": v[h + 2 * k:].long().tolist(),
        }


class RunLogger:
    """Writes only on rank 0 (``enabled``); every method is a no-op elsewhere."""

    def __init__(self, cfg: RunConfig, output_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled, self.cfg, self.total_steps = enabled, cfg, total_steps
        self.window: list[int] = [0] * cfg.adapter.num_components
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self.wandb = None
        if cfg.logging.wandb_mode != "disabled":
            import wandb

            id_file = output_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.run_name or output_dir.name,
                                    id=run_id, resume="allow", mode=cfg.logging.wandb_mode, dir=str(output_dir),
                                    config=asdict(cfg))
        self._last = time.perf_counter()

    def log_step(self, step: int, metrics: dict, lr: float, eta: float) -> None:
        """``metrics`` from StepAccumulator.reduce (identical on all ranks); step is 1-based."""
        for k, count in enumerate(metrics["selector_argmax"]):
            self.window[k] += count
        window_done = step % self.cfg.logging.winner_window == 0
        if not self.enabled:
            if window_done:
                self.window = [0] * len(self.window)
            return
        now = time.perf_counter()
        step_time, self._last = now - self._last, now
        record = {"step": step, "lr": lr, "eta": eta, "step_time": step_time,
                  "tokens_per_s": metrics["tokens"] / step_time,
                  **{key: value for key, value in metrics.items() if key != "stop_requested"}}
        if window_done:
            record["winner_counts"] = list(self.window)
            self.window = [0] * len(self.window)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", s_per_step=f"{step_time:.2f}",
                             tok_s=f"{record['tokens_per_s']:.0f}")
        if step % self.cfg.logging.log_steps == 0 or window_done or step == self.total_steps:
            self.write(record)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(_flatten(record), step=record.get("step"))

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


def _flatten(record: dict) -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, list):
            flat.update({f"{key}/{i}": v for i, v in enumerate(value)})
        elif isinstance(value, dict):
            flat.update({f"{key}/{name}": v for name, v in value.items()})
        else:
            flat[key] = value
    return flat
