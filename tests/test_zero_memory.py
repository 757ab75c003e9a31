"""bench/zero_memory.py: its parameter counts against the meta models and a hand count, its bytes against the ZeRO
accounting written out by hand."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from zero_memory import LLAMA3, parameter_counts, per_gpu_bytes, table  # noqa: E402

K, R = 2, 8


@pytest.fixture(scope="module", params=["8b", "70b"])
def counted(request):
    return request.param, parameter_counts(request.param, K, R)


def hand_adapter_count(c: dict) -> int:
    """r x (d_in + d_out) per component for each of the seven LLaMA linears, every layer, K components."""
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]   # q, k, v, o, gate, up, down
    return c["num_hidden_layers"] * K * sum(R * (d_in + d_out) for d_in, d_out in shapes)


def hand_selector_count(c: dict) -> int:
    """One nn.TransformerEncoderLayer(d, ffn = 1.5 d) with biases and two LayerNorms, plus K component embeddings."""
    d = c["hidden_size"]
    ffn = 3 * d // 2
    attention = 3 * d * d + 3 * d + d * d + d
    return attention + (d * ffn + ffn) + (ffn * d + d) + 2 * 2 * d + K * d


def test_counts_match_the_meta_model_and_a_hand_count(counted):
    name, counts = counted
    c = LLAMA3[name]
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**c))
    assert counts.base == sum(p.numel() for p in llm.parameters())
    assert counts.adapters == hand_adapter_count(c)
    assert counts.selector == hand_selector_count(c)
    assert counts.largest_module == c["vocab_size"] * c["hidden_size"]      # the embedding (= the untied LM head)
    assert round(counts.base / 1e9, 2) == {"8b": 8.03, "70b": 70.55}[name]  # the published sizes


def test_bytes_follow_the_zero_accounting(counted):
    _, counts = counted
    b, t, n = counts.base, counts.adapters + counts.selector, 8
    mem = per_gpu_bytes(counts, n)
    assert sum(v for k, v in mem["ZeRO-2"].items() if k != "cpu") == pytest.approx(2 * b + 2 * t + 14 * t / n)
    assert sum(v for k, v in mem["ZeRO-3"].items() if k != "cpu") == pytest.approx(
        (2 * b + 16 * t) / n + 2 * counts.largest_module)
    assert mem["ZeRO-3 + offload"]["cpu"] == pytest.approx((2 * b + 2 * t + 12 * t + 4 * t) / n)
    assert mem["ZeRO-3 + offload"]["base"] == 0 and mem["ZeRO-3 + offload"]["optimizer"] == 0


def test_table_has_a_row_per_model_gpu_count_and_config():
    text = table(["8b"], [8, 64], K, R, tokens=4096)
    rows = [line for line in text.splitlines() if line.startswith("| LLaMA-3-8B")]
    assert len(rows) == 6
    assert "32 x 4096 x 2 bytes x K=2 = 512 KiB per token" in text
