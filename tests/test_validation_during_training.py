"""Validation during training (train.eval_steps), the best checkpoint (train.save_best), early stopping, TensorBoard.

One 2-rank ZeRO-2 run (gloo) of the tiny LLaMA whose validation loss is made to rise: from step 2 on, a callback
(``TrainerCallback.on_gradients``, the public hook) negates the reduced gradients, so the optimizer climbs the LM loss
instead of descending it. With eval_steps 1 and patience 2 the run validates after steps 1, 2, 3, keeps step 1 as the
best checkpoint (save_total_limit 1 deletes step 2, never the best) and stops at step 3 of 6. The references are
independent of the training loop: consolidation scores the best checkpoint in one process with validation.py (the
2-rank gathered scores must equal it), and tensorboard's own event reader reads the scalars back (they must equal
metrics.jsonl).

Run as a script (under torchrun) this file is that training driver.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PATIENCE = 2
ASCENT_FROM_STEP = 2


def train_with_gradient_ascent(argv: list[str]) -> None:
    """torchrun entry: train like launch/train.py, the gradients of steps >= ASCENT_FROM_STEP negated."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

    from comlora_ds.config import load_config
    from comlora_ds.training.engine import Trainer, TrainerCallback, exit_process

    class GradientAscent(TrainerCallback):
        def on_gradients(self, trainer, step):
            if step >= ASCENT_FROM_STEP:
                for param in trainer.engine.module.parameters():
                    if param.requires_grad:
                        safe_set_full_grad(param, -safe_get_full_grad(param))

    trainer = Trainer(load_config(overrides=argv[1:]), argv[0], callbacks=[GradientAscent()])
    trainer.train()
    trainer.close()
    exit_process(0)


if __name__ == "__main__":
    train_with_gradient_ascent(sys.argv[1:])

# ------------------------------------------------------------------------------------------ pytest from here
import pytest  # noqa: E402

from comlora_ds.config import load_config  # noqa: E402
from comlora_ds.training.validation_schedule import ValidationSchedule  # noqa: E402
from helpers import (FP32_TOL, base_overrides, ds_config, free_port, run_in_group, subprocess_env,  # noqa: E402
                     tensorboard_scalars)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _validations(run) -> dict[int, dict]:
    return {r["step"]: r["validation"] for r in _records(run) if "validation" in r}


@pytest.fixture(scope="module")
def rising(tmp_path_factory):
    root = tmp_path_factory.mktemp("rising")
    run = root / "run"
    overrides = base_overrides(run, **{"train.micro_batch_size": 2, "train.eval_steps": 1, "train.save_best": "true",
                                       "train.early_stopping_patience": PATIENCE, "train.save_steps": 1,
                                       "train.save_total_limit": 1, "logging.report_to": "[tensorboard]",
                                       "logging.winner_window": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           __file__, str(ds_config(root, 2)), *overrides]
    proc = run_in_group(cmd, 300, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def best_export(rising, tmp_path_factory):
    from comlora_ds.export.consolidate import consolidate

    out = tmp_path_factory.mktemp("export") / "best"
    return out, consolidate(rising, out, pointer="best", adapter=False, merged=False)


@pytest.mark.distributed
def test_rising_validation_loss_keeps_the_first_checkpoint_and_stops_early(rising):
    validations = _validations(rising)
    winner_losses = [validations[s]["winner_loss"] for s in sorted(validations)]
    assert sorted(validations) == [1, 2, 3], "validated after every step until patience ran out"
    assert all(a < b for a, b in zip(winner_losses, winner_losses[1:])), winner_losses   # the loss did rise
    assert [r["step"] for r in _records(rising) if "loss" in r] == [1, 2, 3]               # 3 of max_steps 6
    checkpoints = rising / "checkpoints"
    assert (checkpoints / "best").read_text() == "step_00000001"
    assert (checkpoints / "latest").read_text() == "step_00000003"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000001", "step_00000003"]
    state = json.loads((checkpoints / "step_00000003" / "trainer_state.json").read_text())
    assert (state["best_validation_step"], state["validations_since_best"]) == (1, PATIENCE)
    assert state["best_validation_loss"] == winner_losses[0]
    final = json.loads((rising / "validation.json").read_text())
    assert final == validations[3]


@pytest.mark.distributed
def test_gathered_validation_equals_one_process_scoring_of_that_checkpoint(rising, best_export):
    """The 2-rank validation logged at step 1 is what validation.py computes, in one process, on the step-1
    checkpoint (consolidation's scoring of --checkpoint best)."""
    _, report = best_export
    logged, offline = _validations(rising)[1], report["validation"]
    assert report["checkpoint"]["step"] == 1 and offline["num_samples"] == logged["num_samples"] == 8
    for key in ("mean_loss", "sim_sum"):
        assert offline[key] == pytest.approx(logged[key], rel=FP32_TOL), key
    for key in ("winner", "selector_argmax_counts", "loss_argmin_counts", "selector_agreement_rate"):
        assert offline[key] == logged[key], key
    assert offline["winner_loss"] == pytest.approx(logged["winner_loss"], rel=FP32_TOL)


@pytest.mark.distributed
def test_report_plots_the_validation_curves(best_export):
    out, report = best_export
    assert "plots/validation_curves.png" in report["plots"]
    assert (out / "plots" / "validation_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert [v["step"] for v in report["training"]["validations"]] == [1, 2, 3]
    table = (out / "report.md").read_text().split("Validation during training")[1]
    best_loss = report["training"]["validations"][0]["winner_loss"]
    assert f"**{best_loss:.4f}**" in table and table.count("**") == 2       # the first one is the best


@pytest.mark.distributed
def test_tensorboard_scalars_equal_metrics_jsonl(rising):
    from comlora_ds.training.tracking import _flatten

    got = tensorboard_scalars(rising)
    want = {(tag, r["step"]): float(value) for r in _records(rising) for tag, value in _flatten(r).items()
            if tag != "step" and isinstance(value, (int, float))}
    assert ("validation/mean_loss/1", 3) in want and ("component_loss/0", 1) in want
    assert got.keys() == want.keys()
    for key, value in want.items():            # TensorBoard keeps float32
        assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-30), (key, got[key], value)


def test_schedule_validates_every_n_steps_and_counts_patience():
    schedule = ValidationSchedule(load_config(overrides=["train.eval_steps=3", "train.early_stopping_patience=2"]).train)
    assert [s for s in range(1, 11) if schedule.due(s, last=s == 10)] == [3, 6, 9, 10]
    verdicts = [schedule.observe(step, loss) for step, loss in ((3, 2.0), (6, 1.5), (9, 1.5), (10, 1.7))]
    assert [(v.improved, v.stop) for v in verdicts] == [(True, False), (True, False), (False, False), (False, True)]
    resumed = ValidationSchedule(load_config(overrides=["train.eval_steps=3"]).train)
    resumed.load_state(schedule.state())
    assert (resumed.best_loss, resumed.best_step, resumed.since_best) == (1.5, 6, 2)
    assert not ValidationSchedule(load_config().train).due(10, last=True)          # eval_steps 0: never during


def test_checkpoint_best_is_refused_where_no_best_exists(tmp_path, capsys):
    from comlora_ds.cli.consolidate import main

    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_00000004").mkdir(parents=True)
    (checkpoints / "latest").write_text("step_00000004")
    assert main([str(tmp_path / "run"), "--checkpoint", "best", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no best checkpoint (no 'best' file)" in err and "train.save_best" in err
    assert main([str(checkpoints / "step_00000004"), "--checkpoint", "best", "--out", str(tmp_path / "out")]) == 2
    assert "is one step folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_divergence_is_logged_at_every_validation_and_the_per_row_file_recomputes_it(rising):
    """Issue 27: are the components different? Each validation records their weight-space distance (overall and per
    module type) and their per-row loss difference with a verdict; validation_scores.jsonl (rows in the split's
    order, gathered from both ranks) recomputes every aggregate of validation.json."""
    import torch

    from comlora_ds.config import LLAMA_LINEAR_MODULES
    from comlora_ds.comlora.divergence import loss_difference

    for step, record in _validations(rising).items():
        pair = record["update_divergence"]["0-1"]
        assert pair["relative_distance"] > 0 and -1 <= pair["cosine"] <= 1, step
        assert set(pair["by_module"]) == set(LLAMA_LINEAR_MODULES)
        assert record["loss_difference"]["0-1"]["num_rows"] == 8 and "on validation" in record["distinguishability"]
    final = json.loads((rising / "validation.json").read_text())
    rows = [json.loads(line) for line in (rising / "validation_scores.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(8))
    losses, sims = torch.tensor([r["loss"] for r in rows]), torch.tensor([r["sim"] for r in rows])
    assert final["mean_loss"] == pytest.approx(losses.mean(0).tolist(), rel=1e-5)
    assert final["sim_sum"] == pytest.approx(sims.sum(0).tolist(), rel=1e-5, abs=1e-5)
    assert final["selector_argmax_counts"] == torch.bincount(sims.argmax(1), minlength=2).tolist()
    (name, recomputed), = loss_difference(losses).items()
    logged = final["loss_difference"][name]
    assert logged["distinguishable"] == recomputed["distinguishable"] and logged["wins"] == recomputed["wins"]
    assert (logged["mean"], logged["paired_se"]) == pytest.approx((recomputed["mean"], recomputed["paired_se"]),
                                                                  rel=1e-4)
