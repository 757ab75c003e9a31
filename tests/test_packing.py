"""Padding-free packing (data/packing.py): rows kept apart by the attention, per-row ComLoRA losses, the same objective
and gradients as the padded batch, the samplers, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comlora_ds.comlora.model import build_objective
from comlora_ds.config import ConfigError, load_config
from comlora_ds.data.packing import LENGTH_GROUP_BATCHES, LengthGroupedSampler, PackedCollator
from comlora_ds.data.tokenize import IGNORE_INDEX, ResponseCollator
from comlora_ds.methods.lora_dash import switch_to_dash
from comlora_ds.training.step import forward_backward

from conftest import tiny_llama
from helpers import assert_trajectories_match, base_overrides, comlora_model, ds_config, launch, step_losses

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = (9, 5, 13, 7)
FP32_TOL = dict(atol=2e-6, rtol=1e-5)


def _rows(lengths=LENGTHS, prompt_len=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1, 128, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt_len] = IGNORE_INDEX
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def test_collator_restarts_positions_masks_first_labels_and_marks_segments():
    rows = _rows((4, 2, 3), prompt_len=1)
    batch = PackedCollator()(rows)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (1, 9) for k in
                                                             ("input_ids", "labels", "position_ids", "segment_ids")}
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert batch["segment_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert batch["input_ids"][0].tolist() == sum((r["input_ids"] for r in rows), [])
    starts = [0, 4, 6]
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)
    want = sum((r["labels"] for r in rows), [])
    assert [t for i, t in enumerate(batch["labels"][0].tolist()) if i not in starts] == \
        [t for i, t in enumerate(want) if i not in starts]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_rows_own_forward(attn):
    """Attention never crosses a row: the packed forward's logits of row b are row b's forward alone (no padding).
    Only without a KV cache: transformers looks for packed positions when there is none (ComLoRAModel passes
    use_cache=False; with the cache of an eval-mode forward the rows would see each other)."""
    llm = tiny_llama(attn_implementation=attn)
    rows = _rows()
    batch = PackedCollator()(rows)
    with torch.no_grad():
        packed = llm(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        leaking = llm(input_ids=batch["input_ids"], use_cache=False).logits[0]   # one sequence: rows see each other
        alone = [llm(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows]
    torch.testing.assert_close(packed, torch.cat(alone), **FP32_TOL)
    assert (leaking - torch.cat(alone)).abs().max() > 1e-2            # the comparison would see a leak


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, cfg, batch, execution):
    model.zero_grad()
    torch.manual_seed(5)                    # the pairwise noise: the same draw for both batches
    out = forward_backward(model, batch, build_objective(cfg), eta=0.6, backward=torch.Tensor.backward,
                           execution=execution)
    return out, _grads(model)


def _assert_packed_equals_padded(model, cfg, execution, rows=None):
    rows = rows or _rows()
    padded, g_padded = _step(model, cfg, ResponseCollator(pad_token_id=0)(rows), execution)
    packed, g_packed = _step(model, cfg, PackedCollator()(rows), execution)
    torch.testing.assert_close(packed.losses, padded.losses, **FP32_TOL)
    assert packed.losses.shape == (cfg.adapter.num_components, len(rows))
    for name in padded.terms._fields:
        torch.testing.assert_close(getattr(packed.terms, name), getattr(padded.terms, name), **FP32_TOL, msg=name)
    if padded.sims is not None:
        torch.testing.assert_close(packed.sims, padded.sims, **FP32_TOL)
    assert g_packed.keys() == g_padded.keys() and len(g_padded) > 0
    for name in g_padded:
        torch.testing.assert_close(g_packed[name], g_padded[name], **FP32_TOL, msg=name)
    return g_padded


@pytest.mark.parametrize("execution", ["batched", "sequential"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("reductions", [(), ("comlora.loss_reduction=mean", "comlora.lm_reduction=sum")])
def test_packed_objective_and_gradients_equal_padded(k, execution, reductions):
    model, cfg = comlora_model(num_components=k, overrides=reductions)
    grads = _assert_packed_equals_padded(model, cfg, execution)
    assert any(name.startswith("selector.") for name in grads) == (k > 1)


@pytest.mark.parametrize("method", ["lora_dash", "lora_pro"])
def test_packed_method_gradients_equal_padded(method):
    """LoRA-Dash after its switch (the dash_d directions train); LoRA-Pro rewrites these same gradients."""
    model, cfg = comlora_model(num_components=2, overrides=(f"adapter.method={method}",))
    if method == "lora_dash":
        switch_to_dash(model.llm, step=1)
    grads = _assert_packed_equals_padded(model, cfg, "batched")
    assert any("dash" in name for name in grads) == (method == "lora_dash")


def test_a_label_across_a_row_boundary_is_refused():
    model, _ = comlora_model(num_components=2)
    batch = PackedCollator()(_rows())
    batch["labels"][0, LENGTHS[0]] = batch["input_ids"][0, LENGTHS[0]]       # row 1's first token as a target
    with pytest.raises(ValueError, match="predicts a row's first token from the row before"):
        model(**batch)


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_optimizer_steps_packed_end_at_the_padded_parameters(execution):
    """Six AdamW steps (two micro-batches each, as gradient accumulation sums them) on the same rows."""
    rows = _rows((9, 5, 13, 7, 11, 4, 8, 6), seed=2)
    micro_batches = [rows[:4], rows[4:]]

    def train(collate):
        model, cfg = comlora_model(num_components=2)
        objective, params = build_objective(cfg), model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=5e-3)
        torch.manual_seed(5)
        for _ in range(6):
            optimizer.zero_grad()
            for part in micro_batches:
                forward_backward(model, collate(part), objective, eta=0.6, execution=execution,
                                 backward=lambda loss: (loss / len(micro_batches)).backward())
            optimizer.step()
        return dict(model.named_parameters())

    padded, packed = train(ResponseCollator(pad_token_id=0)), train(PackedCollator())
    moved = 0
    for name, p in padded.items():
        if p.requires_grad:
            torch.testing.assert_close(packed[name], p, atol=2e-6, rtol=1e-5, msg=name)   # measured: 5e-7
            moved += 1
    assert moved > 0


def test_packed_forward_refuses_an_attention_that_cannot_isolate_rows():
    model, _ = comlora_model(num_components=2)
    model.llm.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="model.attn_implementation = 'flex_attention'") as err:
        model(**PackedCollator()(_rows()))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,field", [
    (["data.packing=padding_free", "model.trust_remote_code=true"], "data.packing = 'padding_free': with model."),
    (["data.packing=padding_free", "data.group_by_length=true"], "data.group_by_length = True"),
    (["data.packing=ragged"], "data.packing = 'ragged': must be one of none, padding_free"),
])
def test_config_refuses_what_packing_cannot_honour(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_config_accepts_packing():
    cfg = load_config(overrides=["data.packing=padding_free"])
    assert (cfg.data.packing, cfg.data.group_by_length) == ("padding_free", False)


LENGTHS_100 = [int(n) for n in torch.randint(3, 40, (100,), generator=torch.Generator().manual_seed(0))]


def test_length_grouping_keeps_every_steps_rows_across_splits_and_cuts_padding():
    """Global batch 8 as 1 rank x 8 rows or 2 ranks x 4 rows: every optimizer step gets the same rows; a padded
    micro-batch is shorter than with the plain shuffled order."""
    lengths = LENGTHS_100 * 9                           # more than one group of 50 global batches
    one = list(LengthGroupedSampler(lengths, global_batch=8, seed=3))
    two = [list(LengthGroupedSampler(lengths, global_batch=8, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    steps = len(one) // 8
    for s in range(steps):
        split = two[0][4 * s:4 * s + 4] + two[1][4 * s:4 * s + 4]
        assert sorted(one[8 * s:8 * s + 8]) == sorted(split)
    assert one == list(LengthGroupedSampler(lengths, global_batch=8, seed=3))
    assert sorted(one[:8 * LENGTH_GROUP_BATCHES]) == sorted(torch.randperm(
        len(lengths), generator=torch.Generator().manual_seed(3)).tolist()[:8 * LENGTH_GROUP_BATCHES])

    def padded_tokens(order):
        return sum(8 * max(lengths[i] for i in order[j:j + 8]) for j in range(0, len(order) - 7, 8))
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3)).tolist()
    assert padded_tokens(one) < 0.8 * padded_tokens(shuffled)


# ------------------------------------------------------------------------------- through launch/train.py
def _trainable_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step_{step:08d}")


@pytest.mark.distributed
def test_trainer_packed_run_is_the_padded_run_and_resumes_bit_exactly(reference, tmp_path):
    """launch/train.py with data.packing=padding_free (ZeRO-2, 6 steps, K=2): the padded reference's step losses and
    final adapters and selector within fp32 rounding; resumed from its step-3 checkpoint, bit for bit itself."""
    ds = ds_config(tmp_path, 2)
    packed = tmp_path / "packed"
    launch(base_overrides(packed, **{"data.packing": "padding_free"}), nproc=1, ds=ds)
    assert_trajectories_match(step_losses(packed), step_losses(reference), 1e-5)
    want, got = _trainable_state(reference, 6), _trainable_state(packed, 6)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).norm() <= 1e-5 * want[name].norm() + 1e-7, name
    resumed = tmp_path / "resumed"
    launch(base_overrides(resumed, **{"data.packing": "padding_free",
                                      "train.resume": packed / "checkpoints" / "step_00000003"}), nproc=1, ds=ds)
    assert {s: v for s, v in step_losses(resumed).items() if s > 3} == {s: v for s, v in step_losses(packed).items()
                                                                          if s > 3}
    final = _trainable_state(resumed, 6)
    assert all(torch.equal(final[name], got[name]) for name in got)


@pytest.mark.distributed
def test_trainer_groups_rows_by_length(tmp_path):
    """data.group_by_length: the 40 training rows are one group (< 50 global batches), sorted longest first, so the
    real tokens per step never grow over the epoch (shuffled, six steps of distinct lengths come out in that order
    with a chance of 1 in 720). data.max_length 256 keeps these rows whole (at 64 every row is cut to 64)."""
    grouped = tmp_path / "grouped"
    launch(base_overrides(grouped, **{"data.group_by_length": "true", "data.max_length": 256}), nproc=1,
           ds=ds_config(tmp_path, 2))
    tokens = step_losses(grouped, "tokens")
    assert sorted(tokens) == list(range(1, 7))
    assert all(tokens[s] >= tokens[s + 1] for s in range(1, 6)) and tokens[1] > tokens[6]
