"""bench/gpu_check.py: the flash-vs-sdpa comparison on CPU (sdpa against eager: the same function, another attention
implementation) and the CPU smoke run of parts 2-5 end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from assets import tiny_model_dir
from helpers import FP32_TOL, REPO, subprocess_env

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402
from variants import BaseModel  # noqa: E402


@pytest.fixture(scope="module")
def bases(one_thread):
    return {attn: BaseModel(str(tiny_model_dir()), "float32", attn) for attn in ("eager", "sdpa")}


def test_padded_batches_mask_pads_and_the_tokens_they_would_predict():
    for side in ("none", "right", "left"):
        b = gpu_check.padded_batch(vocab=50, batch_size=3, seq_len=8, side=side)
        mask, labels = b["attention_mask"], b["labels"]
        assert mask.sum(1).tolist() == ([8, 8, 8] if side == "none" else [8, 7, 6])
        assert (labels[mask == 0] == -100).all() and (b["input_ids"][mask == 0] == 0).all()
        predictor_is_pad = torch.zeros_like(mask, dtype=torch.bool)
        predictor_is_pad[:, 1:] = mask[:, :-1] == 0
        supervised = mask.bool() & ~predictor_is_pad
        supervised[:, 0] = False
        assert torch.equal(labels != -100, supervised)
    assert (gpu_check.padded_batch(50, 3, 8, "left")["attention_mask"][:, -1] == 1).all()


def test_sdpa_matches_eager_on_padded_batches(bases):
    results = gpu_check.compare_attention(bases["eager"], bases["sdpa"], batch_size=3, seq_len=16)
    assert list(results) == ["none", "right", "left"]
    for side, r in results.items():
        assert r["finite"] and r["tokens"] == 2 * (48 if side == "none" else 41), (side, r)
        assert r["logits_rel"] < FP32_TOL and r["grad_rel"] < FP32_TOL and r["worst_grad_rel"] < 10 * FP32_TOL, r


def test_bf16_sdpa_is_within_bf16_noise_of_eager(bases):
    """The GPU's rule (flash vs sdpa, both against sdpa in fp32) with eager in flash's place."""
    model = str(tiny_model_dir())
    bf16 = {attn: BaseModel(model, "bfloat16", attn) for attn in ("eager", "sdpa")}
    results = gpu_check.compare_attention(bf16["sdpa"], bf16["eager"], 3, 16, exact=bases["sdpa"])
    for r in results.values():
        assert gpu_check.within_noise(r), r
        assert 0 < r["ref_vs_exact"]["logits_rel"] < 5e-2 and 0 < r["other_vs_exact"]["grad_rel"] < 0.5, r
    r = results["left"]
    assert not gpu_check.within_noise({**r, "other_vs_exact": {**r["other_vs_exact"], "grad_rel": 1.0}})


def test_the_comparison_sees_non_pad_differences_only(bases):
    batch = gpu_check.padded_batch(bases["sdpa"].vocab, 3, 16, "left")
    ref = gpu_check.adapter_outputs(bases["sdpa"], batch)
    assert all(g.abs().sum() > 0 for g in ref.grads.values())            # B is random: lora_A gets a gradient too
    same = gpu_check.compare_outputs(dataclasses.replace(ref), ref)
    assert same["logits_rel"] == 0 and same["grad_rel"] == 0

    at_pad = ref.logits.clone()
    at_pad[~ref.mask] = 1e4
    assert gpu_check.compare_outputs(dataclasses.replace(ref, logits=at_pad), ref)["logits_rel"] == 0

    off = ref.logits.clone()
    row, col = ref.mask.nonzero()[0]
    off[row, col] += 1e3
    assert gpu_check.compare_outputs(dataclasses.replace(ref, logits=off), ref)["logits_rel"] > 1e-2

    name = next(iter(ref.grads))
    grads = {**ref.grads, name: ref.grads[name] * 2}
    bad = gpu_check.compare_outputs(dataclasses.replace(ref, grads=grads), ref)
    assert bad["worst_grad"] == name and bad["worst_grad_rel"] == pytest.approx(1.0)

    nan = ref.logits.clone()
    nan[row, col] = float("nan")
    assert not gpu_check.compare_outputs(dataclasses.replace(ref, logits=nan), ref)["finite"]


def test_packed_rows_give_the_padded_per_row_losses_and_a_leak_would_show(bases):
    """Part 6's comparison on the CPU with sdpa (flash-attention 2's place): exact in fp32; rows that see each other
    (one causal sequence: positions not restarting) move the losses far beyond the tolerance."""
    rows = gpu_check.uneven_rows(bases["sdpa"].vocab, 3, 16)
    assert [len(r["input_ids"]) for r in rows] == [16, 12, 8]
    r = gpu_check.packed_vs_padded(bases["sdpa"], rows)
    assert r["finite"] and len(r["packed"]) == 2 and len(r["packed"][0]) == 3 and r["max_rel"] < FP32_TOL, r

    class Leaky(gpu_check.PackedCollator):
        def __call__(self, rows):
            batch = super().__call__(rows)
            return {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
    original = gpu_check.PackedCollator
    gpu_check.PackedCollator = Leaky
    try:
        leak = gpu_check.packed_vs_padded(bases["sdpa"], rows)
    finally:
        gpu_check.PackedCollator = original
    assert leak["max_rel"] > 2 * gpu_check.PACKED_TOL, leak


def test_refuses_a_missing_gpu_and_cpu_numbers_in_the_repository_doc(capsys):
    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA")
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert gpu_check.main(["--device", "cpu", "--tiny", "--doc"]) == 2
    assert "for GPU runs" in capsys.readouterr().err


VARIANTS = {2: ["PEFT LoRA r=8", "ours K=1 (chunked CE)"],
            3: ["B=2 batched", "B=2 K-sequential (authors)", "B=2 ours sequential"]}


def smoke_run(tmp_path, parts: list[int]) -> tuple[dict, str, str]:
    """The CPU smoke run of ``parts``: (its checks by part, its docs section, its stdout)."""
    doc, out = tmp_path / "benchmarks.md", tmp_path / "check.json"
    doc.write_text("# Benchmarks\n\n## GPU check\n\nnot yet run\n\n## Other\n\nkept\n")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--model", str(tiny_model_dir()), "--json", str(out), "--doc", str(doc),
                           "--parts", *map(str, parts)], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {c["part"]: c for c in json.loads(out.read_text())["checks"]}
    assert sorted(checks) == parts
    text = doc.read_text()
    section = text.split("## GPU check\n", 1)[1].split("\n## ", 1)[0]
    assert "not yet run" not in section and text.endswith("## Other\n\nkept\n")
    assert "--device cpu --tiny" in section and "no GPU" in section
    for part, c in checks.items():
        assert f"### {part}. {c['name']}" in section and f"| {part} | {c['name']} |" in section
    assert "every correctness check passed or was skipped" in proc.stdout
    return checks, section, proc.stdout


def test_cpu_smoke_run_times_variants_and_trains_under_zero2_and_zero3(tmp_path):
    checks, section, _ = smoke_run(tmp_path, [1, 2, 3, 5, 6])
    for skipped in (checks[1], checks[6]):
        assert skipped["status"] == "SKIP" and "needs CUDA" in skipped["summary"] and skipped["correctness"]
    for part, names in VARIANTS.items():
        assert checks[part]["status"] in ("met", "NOT met") and list(checks[part]["data"]) == names
        for timing in checks[part]["data"].values():
            assert len(timing["times_s"]) == 2 and 0 < timing["min_s"] <= timing["median_s"]
    runs = checks[5]["data"]
    assert checks[5]["status"] == "PASS" and sorted(runs) == ["zero2", "zero3"]
    for r in runs.values():
        assert r["steps"] == [1, 2] and all(map(math.isfinite, r["loss"])) and all(t > 0 for t in r["tokens_per_s"])
    assert runs["zero2"]["loss"] == pytest.approx(runs["zero3"]["loss"], rel=1e-4)
    assert "| ZeRO-3 |" in section and "| B=2 ours sequential |" in section


@pytest.mark.slow
def test_cpu_smoke_run_of_every_part_measures_peak_memory_in_fresh_processes(tmp_path):
    checks, section, _ = smoke_run(tmp_path, [1, 2, 3, 4, 5])
    memory = checks[4]["data"]
    assert list(memory) == VARIANTS[2] + VARIANTS[3] and checks[4]["status"] in ("met", "NOT met")
    assert all(0 < r["increment"] < r["peak"] for r in memory.values())
    assert checks[5]["status"] == "PASS" and "peak RSS (VmHWM)" in section
