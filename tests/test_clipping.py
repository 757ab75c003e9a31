"""train.clip_scope = per_group: each component and the selector clipped by its own norm.

By hand on a toy module; in the engine: K=1 per_group equals DeepSpeed's global clipping (one group), 2 ranks
under ZeRO-3 equal one process under ZeRO-2, and the scope changes the trajectory when the selector dominates.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from comlora_ds.comlora.layer import ComLoRALinear
from comlora_ds.training.clipping import clip_per_group, component_tensor_names
from comlora_ds.config import load_config
from comlora_ds.comlora.model import build_model
from conftest import tiny_llama
from helpers import FP32_TOL, assert_trajectories_match, base_overrides, ds_config, launch, step_losses


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = ComLoRALinear(nn.Linear(2, 2, bias=False), num_components=2, rank=1, alpha=1.0)
        self.layer.base.weight.requires_grad_(False)                  # lora_A [K, r, d_in], lora_B [K, d_out, r]
        self.selector = nn.Linear(2, 1, bias=False)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


def test_each_group_is_clipped_by_its_own_norm_by_hand():
    toy = Toy()
    toy.layer.lora_A.grad = torch.tensor([[[3.0, 0.0]], [[0.3, 0.0]]])
    toy.layer.lora_B.grad = torch.tensor([[[0.0], [4.0]], [[0.0], [0.4]]])
    toy.selector.weight.grad = torch.tensor([[12.0, 5.0]])
    norms = clip_per_group(toy, num_components=2, max_norm=1.0)
    assert norms == pytest.approx([5.0, 0.5, 13.0])                   # component 0, component 1, selector
    close = dict(rtol=1e-5, atol=0)
    torch.testing.assert_close(toy.layer.lora_A.grad[0], torch.tensor([[0.6, 0.0]]), **close)       # 3 / 5
    torch.testing.assert_close(toy.layer.lora_B.grad[0], torch.tensor([[0.0], [0.8]]), **close)     # 4 / 5
    torch.testing.assert_close(toy.layer.lora_A.grad[1], torch.tensor([[0.3, 0.0]]))                # under 1: kept
    torch.testing.assert_close(toy.selector.weight.grad, torch.tensor([[12 / 13, 5 / 13]]), **close)
    assert toy.frozen.grad is None


def test_nothing_is_written_when_every_group_is_under_the_norm():
    toy = Toy()
    toy.layer.lora_A.grad = torch.full((2, 1, 2), 0.1)
    toy.layer.lora_B.grad = torch.full((2, 2, 1), 0.1)
    toy.selector.weight.grad = torch.full((1, 2), 0.1)
    before = [p.grad.clone() for p in toy.parameters() if p.grad is not None]
    clip_per_group(toy, num_components=2, max_norm=1.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, [p for p in toy.parameters() if p.grad is not None]))



@pytest.mark.parametrize("method", ["lora", "lora_dash"])
def test_every_per_component_tensor_is_in_its_components_group(method):
    """Fails when a trainable per-component tensor (LoRA factors, Dash scales, anything a method adds) would be
    clipped with the selector: the rest group holds the selector's tensors and nothing else."""
    cfg = load_config(overrides=["adapter.num_components=3", f"adapter.method={method}", "adapter.rank=2",
                                 "lora_dash.num_directions=2", "lora_dash.t_steps=1"])
    model = build_model(cfg, tiny_llama())
    components = component_tensor_names(model)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    rest = set(trainable) - components
    assert rest and all(name.startswith("selector.") for name in rest), sorted(rest)[:5]
    assert all(trainable[name].shape[0] == 3 for name in components)
    kinds = {name.rsplit(".", 1)[-1] for name in components}
    assert kinds == ({"lora_A", "lora_B", "dash_d"} if method == "lora_dash" else {"lora_A", "lora_B"})


def test_a_per_component_tensor_without_k_slices_is_refused():
    toy = Toy()
    toy.layer.extra = nn.Parameter(torch.zeros(3))                     # not stacked as [K, ...]
    toy.layer.extra.grad = torch.ones(3)
    toy.layer.lora_A.grad = torch.zeros(2, 1, 2)
    with pytest.raises(RuntimeError, match=r"layer.extra belongs to an adapter layer but its gradient \(3,\)"):
        clip_per_group(toy, num_components=2, max_norm=1.0)


@pytest.mark.distributed
def test_k1_per_group_equals_deepspeed_global_clipping(tmp_path):
    """One adapter group and no selector: our clipping must give DeepSpeed's trajectory exactly, and the small
    norm must really clip (every step's norm before clipping, as logged, is far above it)."""
    runs = {}
    for name, extra in {"global": {}, "per_group": {"train.clip_scope": "per_group"}}.items():
        out = tmp_path / name
        launch(base_overrides(out, **{"adapter.num_components": 1, "train.max_steps": 4, "train.save_steps": 0,
                                      "train.max_grad_norm": 0.01, **extra}), nproc=1, ds=ds_config(tmp_path, 2))
        runs[name] = step_losses(out)
    assert_trajectories_match(runs["per_group"], runs["global"], FP32_TOL)
    records = [json.loads(line) for line in (tmp_path / "per_group" / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line]
    assert len(records) == 4 and all(r["grad_norm"][0] > 10 * 0.01 for r in records)     # [adapter, selector (0)]


@pytest.mark.distributed
def test_per_group_two_ranks_zero3_match_one_process_and_differ_from_global(tmp_path):
    short = {"train.max_steps": 4, "train.save_steps": 0, "train.clip_scope": "per_group"}
    ref = tmp_path / "ref"
    launch(base_overrides(ref, **short), nproc=1, ds=ds_config(tmp_path, 2))
    out = tmp_path / "run"
    launch(base_overrides(out, **short, **{"train.micro_batch_size": 2}), nproc=2, ds=ds_config(tmp_path, 3))
    assert_trajectories_match(step_losses(out), step_losses(ref), FP32_TOL)
    records = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(len(r["grad_norm"]) == 3 for r in records)             # component 0, component 1, selector
    glob = tmp_path / "global"
    launch(base_overrides(glob, **{**short, "train.clip_scope": "global"}), nproc=1, ds=ds_config(tmp_path, 2))
    assert abs(step_losses(glob)[4] - step_losses(ref)[4]) > 1e-4
