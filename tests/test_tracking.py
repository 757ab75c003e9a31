"""Where the run's metrics go (logging.report_to): wandb with its own environment variables, TensorBoard.

The TensorBoard files of a real 2-rank run are read back in tests/test_validation_during_training.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from comlora_ds.config import load_config
from comlora_ds.training.tracking import RunLogger, wandb_settings


@pytest.mark.parametrize("overrides,environ,expected", [
    ([], {}, {"mode": "offline", "project": "comlora_ds", "dir": "RUN"}),
    ([], {"WANDB_MODE": "online", "WANDB_PROJECT": "cluster", "WANDB_DIR": "/scratch"}, {}),
    (["logging.wandb_mode=disabled", "logging.wandb_project=mine", "logging.wandb_dir=/mine"],
     {"WANDB_MODE": "online", "WANDB_PROJECT": "cluster", "WANDB_DIR": "/scratch"},
     {"mode": "disabled", "project": "mine", "dir": "/mine"}),
    (["logging.wandb_project=mine"], {"WANDB_MODE": "online"}, {"project": "mine", "dir": "RUN"}),
], ids=["defaults", "environment", "config-wins", "mixed"])
def test_wandb_gets_only_what_the_config_sets_or_the_environment_leaves_unset(overrides, environ, expected):
    """wandb.init's arguments beat wandb's environment variables, so an argument is passed only where the config sets
    it, or where no variable is set (then our default)."""
    assert wandb_settings(load_config(overrides=overrides).logging, Path("RUN"), environ) == expected


def test_wandb_run_follows_the_environment_where_the_config_is_silent(tmp_path, monkeypatch):
    """A real offline wandb run: WANDB_PROJECT and WANDB_DIR apply (the config leaves them unset), while the config's
    explicit logging.wandb_mode=offline beats WANDB_MODE=disabled."""
    monkeypatch.setenv("WANDB_PROJECT", "from-the-cluster")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "scratch").mkdir()
    cfg = load_config(overrides=["logging.wandb_mode=offline", "logging.report_to=[wandb]"])
    logger = RunLogger(cfg, tmp_path / "run", total_steps=1, start_step=0, enabled=True)
    try:
        assert logger.wandb is not None and logger.wandb.project == "from-the-cluster"
        assert Path(logger.wandb.dir).is_relative_to(tmp_path / "scratch")
        assert logger.tensorboard is None
    finally:
        logger.close()
    assert not (tmp_path / "run" / "wandb").exists()


def test_report_to_none_writes_only_metrics_jsonl(tmp_path):
    logger = RunLogger(load_config(overrides=["logging.report_to=[none]"]), tmp_path, 1, 0, enabled=True)
    logger.write({"step": 1, "loss": 1.0})
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
