"""The patched LLaMA + selector module, both execution modes, merging, and a short training run."""

from __future__ import annotations

import pytest
import torch

from comlora_ds.comlora.inject import active_component, merge_component
from comlora_ds.config import load_config
from comlora_ds.comlora.model import build_model, build_objective
from comlora_ds.comlora.selector import Selector
from comlora_ds.training.step import forward_backward

from conftest import make_batch
from helpers import comlora_model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("llama", [dict(), dict(tie_word_embeddings=True), dict(num_key_value_heads=4)])
def test_batched_forward_equals_one_component_at_a_time(llama):
    model, _ = comlora_model(num_components=3, **llama)
    batch = make_batch(pad_tail=(0, 3, 5))
    with torch.no_grad():
        batched = model(**batch)
        for k in range(3):
            one = model(**batch, component=k)
            torch.testing.assert_close(one.losses[0], batched.losses[k], atol=1e-5, rtol=1e-5)
    assert batched.losses.shape == (3, 3) and batched.sims.shape == (3, 3)


def test_component_losses_equal_hf_loss_per_sample():
    """L[k, b] == the transformers model's own loss on sample b with component k active."""
    model, _ = comlora_model(num_components=2)
    batch = make_batch(batch_size=2, pad_tail=(0, 4))
    with torch.no_grad():
        losses = model(**batch).losses
        for k in range(2):
            for b in range(2):
                with active_component(model.llm, k):
                    ref = model.llm(**{key: v[b:b + 1] for key, v in batch.items()}).loss
                assert losses[k, b].item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("overrides", [(), ("comlora.top_n=1",), ("comlora.no_align=true",),
                                       ("comlora.no_lm=true",), ("comlora.no_selector=true",),
                                       ("comlora.lm_reduction=sum",), ("comlora.loss_reduction=mean",)])
def test_sequential_mode_gradients_equal_batched(overrides):
    model, cfg = comlora_model(num_components=3, overrides=overrides)
    objective = build_objective(cfg)
    batch = make_batch(pad_tail=(0, 2, 0))
    torch.manual_seed(5)
    batched = forward_backward(model, batch, objective, eta=0.6, backward=torch.Tensor.backward)
    g_batched = _grads(model)
    model.zero_grad()
    torch.manual_seed(5)
    seq = forward_backward(model, batch, objective, eta=0.6, backward=torch.Tensor.backward,
                           execution="sequential")
    g_seq = _grads(model)
    assert g_batched.keys() == g_seq.keys() and len(g_batched) > 0
    for name in g_batched:
        torch.testing.assert_close(g_seq[name], g_batched[name], atol=1e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(seq.losses, batched.losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seq.terms.total, batched.terms.total, atol=1e-5, rtol=1e-5)


def test_only_adapters_and_selector_receive_gradients():
    model, cfg = comlora_model(num_components=2)
    forward_backward(model, make_batch(), build_objective(cfg), eta=0.5, backward=torch.Tensor.backward)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(".lora_" in n or n.startswith("selector.") for n in trainable)
    assert any(n.startswith("selector.") for n in with_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_gradient_checkpointing_gives_same_gradients(execution):
    """The checkpointed layers are recomputed in the backward: they must run the same component(s)."""
    plain, cfg = comlora_model(num_components=2)
    ckpt, _ = comlora_model(num_components=2, overrides=("model.gradient_checkpointing=true",))
    ckpt.train(), plain.train()
    assert ckpt.llm.model.gradient_checkpointing
    objective = build_objective(cfg)
    batch = make_batch()
    for m in (plain, ckpt):
        torch.manual_seed(0)
        forward_backward(m, batch, objective, eta=0.5, backward=torch.Tensor.backward, execution=execution)
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-5)


def test_padding_does_not_change_selector_scores():
    torch.manual_seed(0)
    selector = Selector(num_components=3, embed_dim=16, num_heads=4).eval()
    emb = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.long)
    padded_emb = torch.cat([emb, torch.randn(2, 5, 16)], 1)           # garbage in the pad slots
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(selector(padded_emb, padded_mask), selector(emb, mask), atol=1e-5, rtol=1e-5)
    selector.train()  # also without the inference fast path
    torch.testing.assert_close(selector(padded_emb, padded_mask), selector(emb, mask), atol=1e-5, rtol=1e-5)


def test_selector_scores_are_pooled_dot_products():
    torch.manual_seed(0)
    selector = Selector(num_components=2, embed_dim=8, num_heads=2).eval()
    emb, mask = torch.randn(1, 4, 8), torch.tensor([[1, 1, 1, 0]])
    with torch.no_grad():
        hidden = selector.encoder(emb, src_key_padding_mask=mask == 0)
        expected = hidden[0, :3].mean(0) @ selector.component_embeddings.t()
        torch.testing.assert_close(selector(emb, mask)[0], expected, atol=1e-6, rtol=1e-6)


def test_selector_default_size_matches_paper_share_of_llama3_8b():
    """One layer at hidden 4096 with FFN 1.5 x hidden is ~1.45% of LLaMA-3-8B's 8.03B parameters."""
    with torch.device("meta"):
        selector = Selector(num_components=2, embed_dim=4096, model_num_heads=32)
    share = sum(p.numel() for p in selector.parameters()) / 8.03e9
    assert share == pytest.approx(0.0145, abs=0.0005)


@pytest.mark.parametrize("winner", [0, 1])
def test_merged_winner_logits_equal_unmerged(winner):
    model, _ = comlora_model(num_components=2)
    ids = make_batch()["input_ids"]
    with torch.no_grad(), active_component(model.llm, winner):
        unmerged = model.llm(ids).logits
    merge_component(model.llm, winner)
    with torch.no_grad():
        merged = model.llm(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def _fit(model, batch, objective, steps: int, lr: float) -> list[float]:
    """AdamW on one fixed batch with eta(t) = t / steps; the L_LM value of every step."""
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    history = []
    for step in range(steps):
        opt.zero_grad()
        out = forward_backward(model, batch, objective, eta=step / steps, backward=torch.Tensor.backward)
        opt.step()
        history.append(out.terms.lm.item())
    return history


def test_short_training_run_lowers_the_loss():
    """Tiny random LLaMA on a fixed generated data set: ComLoRA K=2 must fit it. (With the default
    initializer_range 0.02 the random base's signals are too weak for rank-4 adapters, PEFT's too.)"""
    model, cfg = comlora_model(num_components=2, initializer_range=0.1)
    model.train()
    objective = build_objective(cfg)
    g = torch.Generator().manual_seed(0)
    # A learnable pattern: one of 4 fixed responses, chosen by the prompt's first token.
    prompts = torch.randint(1, 128, (8, 6), generator=g)
    responses = torch.randint(1, 128, (4, 6), generator=g)[prompts[:, 0] % 4]
    ids = torch.cat([prompts, responses], 1)
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    history = _fit(model, batch, objective, steps=60, lr=1e-2)
    assert history[-1] < 0.3 * history[0], history[::10]
    assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in model.adapter_layers().values())


@pytest.mark.slow
def test_smollm2_short_training_run_lowers_the_loss():
    """SmolLM2-135M (the built-in model, real weights) on 8 real ARC-Challenge training rows through the real data
    pipeline: 12 optimizer steps of ComLoRA K=2 r=8 lower the mean response loss of those rows."""
    from comlora_ds.data import ResponseCollator, build_datasets
    from comlora_ds.models.base_model import load_base_model, load_tokenizer, resolve_model_path

    from assets import commonsense_file

    train_file = commonsense_file("ARC-Challenge")
    cfg = load_config(overrides=["model.name_or_path=smollm2-135m", "adapter.num_components=2", "adapter.rank=8",
                                 f"data.train_files=[{train_file}]", "data.max_train_samples=8", "data.val_size=0",
                                 "data.max_length=128"])
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    train, _, _ = build_datasets(cfg.data, tokenizer)
    batch = ResponseCollator(tokenizer.pad_token_id)([train[i] for i in range(len(train))])
    torch.manual_seed(0)
    model = build_model(cfg, load_base_model(path, cfg.model, torch.float32)).train()
    objective = build_objective(cfg)
    history = _fit(model, batch, objective, steps=12, lr=2e-3)
    assert history[-1] < 0.7 * history[0], history


def test_selector_math_is_fp32_when_its_weights_are_stored_in_bf16():
    """Under DeepSpeed bf16 the selector's parameters are stored in bf16; its scores must still be the fp32
    computation on those stored weights (they used to run the encoder in bf16: 1e-3 off at init)."""
    import copy

    torch.manual_seed(0)
    stored = Selector(num_components=2, embed_dim=64, num_heads=4).to(torch.bfloat16).train()
    reference = copy.deepcopy(stored).float()          # the same stored values, in fp32
    emb = torch.randn(3, 12, 64)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    scores, expected = stored(emb, mask), reference(emb, mask)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=2e-6, rtol=1e-5)
    with torch.no_grad():                              # what bf16 math gives: far outside that tolerance
        bf16_hidden = stored.encoder(emb.to(torch.bfloat16), src_key_padding_mask=mask == 0).float()
        keep = mask.unsqueeze(-1).bool()
        bf16_scores = (bf16_hidden.masked_fill(~keep, 0).sum(1) / keep.sum(1)) @ stored.component_embeddings.float().t()
    assert (bf16_scores - expected).abs().max() > 1e-4
    scores.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(stored.named_parameters(), reference.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        torch.testing.assert_close(p.grad.float(), q.grad.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)
