"""The K-stacked adapter layer and its injection, against PEFT LoRA and a loop over K."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from comlora_ds.comlora.inject import active_component, adapter_layers, inject_adapters, merge_component, unmerge_all
from comlora_ds.comlora.layer import ComLoRALinear

from conftest import make_batch, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_k1_matches_peft_lora_outputs_and_gradients(use_rslora):
    """K = 1 is exactly PEFT LoRA: same logits, same loss, same A/B gradients (fp32, 1e-5)."""
    base = tiny_llama(seed=0)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_rslora=use_rslora))
    ours = copy.deepcopy(base)
    inject_adapters(ours, TARGETS, num_components=1, rank=4, alpha=8, use_rslora=use_rslora)

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            assert math.isclose(peft_layer.scaling["default"], layer.scaling)
            b = torch.randn(layer.lora_B.shape[1:], generator=g) * 0.1
            peft_layer.lora_B["default"].weight.copy_(b)
            layer.lora_B[0].copy_(b)
            layer.lora_A[0].copy_(peft_layer.lora_A["default"].weight)

    batch = make_batch()
    out_peft = peft_model(**batch)
    out_ours = ours(**batch)
    torch.testing.assert_close(out_ours.logits, out_peft.logits, atol=1e-5, rtol=1e-5)
    out_peft.loss.backward()
    out_ours.loss.backward()
    for name, layer in adapter_layers(ours).items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad[0], peft_layer.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad[0], peft_layer.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-5)


def test_init_matches_peft_distribution():
    """A: kaiming-uniform(a=sqrt(5)) per component, bound 1/sqrt(d_in) as PEFT/nn.Linear; B: zeros."""
    torch.manual_seed(0)
    layer = ComLoRALinear(nn.Linear(256, 32), num_components=3, rank=64, alpha=16)
    bound = 1 / math.sqrt(256)
    for k in range(3):
        a = layer.lora_A[k]
        assert a.abs().max() <= bound
        assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert not torch.equal(layer.lora_A[0], layer.lora_A[1])
    assert torch.count_nonzero(layer.lora_B) == 0


def test_other_inits_start_at_the_base_with_the_promised_factors():
    """adapter.init: gaussian N(0, 1/r) as PEFT's; orthogonal rows across all K components at kaiming's row norm;
    shared: one kaiming draw in every component. B = 0 always, so every init starts as the base layer."""
    torch.manual_seed(0)
    base, x = nn.Linear(256, 32), torch.randn(6, 256)       # 2 rows per component
    layers = {init: ComLoRALinear(base, num_components=3, rank=16, alpha=16, init=init)
              for init in ("gaussian", "orthogonal", "shared")}
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_B) == 0
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert abs(layers["gaussian"].lora_A.std().item() - 1 / 16) < 0.02 / 16
    rows = layers["orthogonal"].lora_A.reshape(48, 256)
    torch.testing.assert_close(rows @ rows.T, torch.eye(48) / 3, atol=1e-6, rtol=0)
    shared = layers["shared"].lora_A
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[0], shared[2])
    assert shared.abs().max() <= 1 / math.sqrt(256) and abs(shared.std().item() - 1 / math.sqrt(3 * 256)) < 2e-3
    with pytest.raises(ValueError, match=r"K \* r = 288 <= d_in = 256"):
        ComLoRALinear(base, num_components=3, rank=96, alpha=16, init="orthogonal")
    with pytest.raises(ValueError, match="unknown"):
        ComLoRALinear(base, num_components=2, rank=4, alpha=16, init="xavier")


@pytest.mark.parametrize("num_components", [2, 3])
def test_batched_components_equal_separate_forwards(num_components):
    """One forward over a component-major K*B batch == K forwards with one component each."""
    torch.manual_seed(0)
    layer = ComLoRALinear(nn.Linear(16, 24), num_components, rank=4, alpha=8)
    _randomise_adapters(layer)
    x = torch.randn(num_components * 5, 7, 16)
    batched = layer(x)
    for k in range(num_components):
        layer.active_component = k
        rows = slice(k * 5, (k + 1) * 5)
        torch.testing.assert_close(batched[rows], layer(x[rows]), atol=1e-6, rtol=1e-6)
        expected = layer.base(x[rows]) + layer.scaling * x[rows] @ layer.lora_A[k].T @ layer.lora_B[k].T
        torch.testing.assert_close(batched[rows], expected, atol=1e-6, rtol=1e-6)


def test_batch_not_multiple_of_k_is_refused():
    layer = ComLoRALinear(nn.Linear(8, 8), num_components=3, rank=2, alpha=4)
    with pytest.raises(ValueError, match="not a multiple of the 3 components"):
        layer(torch.randn(4, 8))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_merge_equals_unmerged_and_unmerge_restores(dtype, tol):
    """Merged component k == unmerged active component k; bf16 tolerance covers the one rounding of
    the merged weight to bf16 (8 mantissa bits)."""
    torch.manual_seed(0)
    layer = ComLoRALinear(nn.Linear(32, 48).to(dtype), num_components=2, rank=4, alpha=8)
    _randomise_adapters(layer)
    original = layer.base.weight.detach().clone()
    x = torch.randn(6, 32, dtype=dtype)
    layer.active_component = 1
    unmerged = layer(x)
    layer.merge(1)
    merged = layer(x)
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=tol, rtol=tol)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge(0)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight.float(), original.float(), atol=tol, rtol=0)


def test_merge_refuses_non_finite():
    layer = ComLoRALinear(nn.Linear(4, 4), num_components=1, rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(0)
    assert layer.merged_component is None and torch.isfinite(layer.base.weight).all()


def test_inject_freezes_base_and_wraps_targets():
    model = tiny_llama(tie_word_embeddings=True)
    layers = inject_adapters(model, ["q_proj", "down_proj"], num_components=2, rank=2, alpha=4)
    assert sorted(layers) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                     for m in ("self_attn.q_proj", "mlp.down_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_inject_unknown_target_names_the_linear_layers():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no linear layer.*'q_proj'"):
        inject_adapters(tiny_llama(), ["q_proj", "qkv_proj"], num_components=1, rank=2, alpha=4)


def test_active_component_and_merge_helpers_on_a_model():
    model = tiny_llama()
    inject_adapters(model, TARGETS, num_components=2, rank=2, alpha=4)
    _randomise_adapters(model)
    ids = make_batch()["input_ids"]
    with torch.no_grad(), active_component(model, 1):
        unmerged = model(ids).logits
    assert all(layer.active_component is None for layer in adapter_layers(model).values())
    merge_component(model, 1)
    with torch.no_grad():
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    unmerge_all(model)
    assert all(layer.merged_component is None for layer in adapter_layers(model).values())
