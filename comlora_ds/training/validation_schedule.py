"""Validation during training: when it runs (``train.eval_steps``), the best validation loss of the winner so far
(``train.save_best``) and when patience runs out (``train.early_stopping_patience``).

Every rank holds one and feeds it the same all-reduced scores, so all ranks take the same decisions (a checkpoint is
collective). The watched number is the validation LM loss of the component that would be exported at that step (the
selector's accumulated-score winner; without a selector the lowest loss), as HF Trainer's ``metric_for_best_model``
watches ``eval_loss``. Its state travels in the checkpoint's client state, so a resumed run keeps its best and its
patience count.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig


@dataclass
class Verdict:
    improved: bool      # a new best winner loss: the checkpoint of this step becomes the best one
    stop: bool          # the last ``early_stopping_patience`` validations brought no new best


class ValidationSchedule:
    def __init__(self, train: TrainConfig):
        self.every, self.patience = train.eval_steps, train.early_stopping_patience
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.since_best = 0

    def due(self, step: int, last: bool) -> bool:
        """Validate after optimizer step ``step``? Every ``eval_steps``, and after the last step (the final
        validation is then one of the series)."""
        return bool(self.every) and (step % self.every == 0 or last)

    def observe(self, step: int, winner_loss: float) -> Verdict:
        improved = self.best_loss is None or winner_loss < self.best_loss
        if improved:
            self.best_loss, self.best_step, self.since_best = winner_loss, step, 0
        else:
            self.since_best += 1
        return Verdict(improved, self.patience is not None and self.since_best >= self.patience)

    def state(self) -> dict:
        return {"best_validation_loss": self.best_loss, "best_validation_step": self.best_step,
                "validations_since_best": self.since_best}

    def load_state(self, state: dict) -> None:
        self.best_loss = state.get("best_validation_loss")
        self.best_step = state.get("best_validation_step")
        self.since_best = state.get("validations_since_best", 0)
