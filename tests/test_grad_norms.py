"""bench/grad_norms.py: the per-group gradient norms it reads through DeepSpeed (ZeRO-2) against the same
first step computed in plain torch, without DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from assets import commonsense_file, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    f"model.name_or_path={tiny_model_dir()}",
    f"data.train_files=[{commonsense_file('ARC-Challenge')}]",
    "data.max_train_samples=32", "data.val_size=8", "data.max_length=64", "adapter.num_components=2",
    "adapter.rank=4", "adapter.dropout=0.0", "comlora.noise=0.0", "train.max_steps=10", "train.micro_batch_size=4",
    "train.learning_rate=5e-3", "train.max_grad_norm=1.0", "train.clip_scope=global", "logging.wandb_mode=disabled",
]


def _reference_first_step(cfg) -> dict:
    """Step 1 in plain torch: same seed, same first batch, the objective at eta(1), one backward."""
    from comlora_ds.data import ResponseCollator, build_datasets, prepare_tokenizer
    from comlora_ds.training.setup import seed_everything
    from comlora_ds.comlora.losses import annealing_eta
    from comlora_ds.comlora.model import build_model, build_objective
    from comlora_ds.models.base_model import load_base_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model)
    tokenizer = prepare_tokenizer(load_tokenizer(path, cfg.model))
    rows, _, _ = build_datasets(cfg.data, tokenizer)
    sampler = DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=cfg.data.seed, drop_last=True)
    batch = next(iter(DataLoader(rows, batch_size=4, sampler=sampler, drop_last=True,
                                 collate_fn=ResponseCollator(tokenizer.pad_token_id))))
    seed_everything(cfg.train.seed)
    model = build_model(cfg, load_base_model(path, cfg.model, torch.float32))
    out = model(**batch)
    eta = annealing_eta(cfg.comlora.annealing, 1, cfg.train.max_steps, cfg.comlora.annealing_rate)
    build_objective(cfg)(out.losses, out.sims, eta, out.num_tokens).total.backward()
    components, selector = [0.0, 0.0], 0.0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name.endswith(("lora_A", "lora_B")):
            components = [c + float(p.grad[k].pow(2).sum()) for k, c in enumerate(components)]
        else:
            selector += float(p.grad.pow(2).sum())
    return {"component_norm": [c ** 0.5 for c in components], "selector_norm": selector ** 0.5}


def test_norms_read_through_deepspeed_equal_a_plain_torch_step(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "grad_norms.py"), "--out", str(out), "--steps", "3",
                           "--", *OVERRIDES], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "grad_norms.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "| 1-10 |" in proc.stdout                                      # the summary table
    for r in records:
        assert r["norm"] ** 2 == pytest.approx(sum(c ** 2 for c in r["component_norm"]) + r["selector_norm"] ** 2)
        factor = min(1.0, 1.0 / r["norm"])                                  # global clipping at 1.0
        assert r["component_norm_clipped"] == pytest.approx([n * factor for n in r["component_norm"]])

    from comlora_ds.config import load_config
    cfg = load_config(REPO / "launch" / "configs" / "demo_commonsense.yaml", OVERRIDES)
    reference = _reference_first_step(cfg)
    assert records[0]["component_norm"] == pytest.approx(reference["component_norm"], rel=1e-4)
    assert records[0]["selector_norm"] == pytest.approx(reference["selector_norm"], rel=1e-4)
    assert reference["selector_norm"] > 0 and min(reference["component_norm"]) > 0
