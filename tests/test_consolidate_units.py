"""Consolidation pieces without DeepSpeed runs: factors vs the adapter layer, the streamed merge vs
``ComLoRALinear.merge`` on sharded fp32/bf16 tiny LLaMAs, the export extension point through stock PEFT, the
tensor checks, output-folder safety and the report. Milliseconds to a few seconds each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from comlora_ds.comlora.inject import adapter_layers, inject_adapters, merge_component
from comlora_ds.comlora.layer import lora_scaling
from comlora_ds.config import AdapterConfig, RunConfig
from comlora_ds.export import ConsolidationError
from comlora_ds.export.factors import SOUP, ComponentExporter
from comlora_ds.export.merge import SAFE_INDEX, stream_merge
from comlora_ds.export.outdir import check_output, publish, staging
from comlora_ds.export.peft_adapter import write_peft_adapter
from comlora_ds.export.recover import check_tensors, expected_shapes, locate_checkpoint
from comlora_ds.export.report import markdown, read_training_metrics, write_plots

from conftest import make_batch, tiny_llama, tiny_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
K, RANK, ALPHA = 3, 4, 8.0


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP spin-waits when other jobs share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter_cfg(**kw) -> AdapterConfig:
    return AdapterConfig(**{"num_components": K, "rank": RANK, "alpha": ALPHA, "dropout": 0.0,
                            "target_modules": TARGETS, **kw})


def trained_tensors(llm, adapter: AdapterConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inject adapters into ``llm`` and give every B a non-zero value, as training would; returns the tensors
    under the names the checkpoint uses (``llm.<module>.lora_A``)."""
    inject_adapters(llm, adapter.target_modules, adapter.num_components, adapter.rank, adapter.alpha,
                    use_rslora=adapter.use_rslora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(llm).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return {f"llm.{name}.{t}": getattr(layer, t).detach().clone()
            for name, layer in adapter_layers(llm).items() for t in ("lora_A", "lora_B")}


def save_base(path: Path, dtype=torch.float32, shard="30KB", **overrides) -> Path:
    tiny_llama(seed=0, **overrides).to(dtype).save_pretrained(path, max_shard_size=shard)
    return path


def merge_shapes(exporter: ComponentExporter) -> dict:
    return {f"{m}.weight": (t["lora_B"].shape[1], t["lora_A"].shape[2]) for m, t in exporter.layers.items()}


# ------------------------------------------------------------------------------------------------- factors
@pytest.mark.parametrize("use_rslora", [False, True])
def test_factors_delta_is_the_layers_delta_weight(use_rslora):
    adapter = adapter_cfg(use_rslora=use_rslora)
    llm = tiny_llama()
    tensors = trained_tensors(llm, adapter)
    exporter = ComponentExporter(tensors, adapter)
    for name, layer in adapter_layers(llm).items():
        assert exporter.scaling == layer.scaling == lora_scaling(adapter.alpha, adapter.rank, adapter.use_rslora)
        for k in range(K):
            assert torch.equal(exporter.factors(name, k).delta(), layer.delta_weight(k))   # bitwise


def test_unknown_method_and_component_are_refused():
    tensors = trained_tensors(tiny_llama(), adapter_cfg())
    exporter = ComponentExporter(tensors, adapter_cfg())
    module = next(iter(exporter.layers))
    with pytest.raises(ConsolidationError, match="component 3 does not exist: the checkpoint has K = 3"):
        exporter.factors(module, 3)
    with pytest.raises(ConsolidationError, match="the checkpoint's adapter.method = 'no_such_method' is not "
                                                 "available; known: lora, lora_dash, lora_pro"):
        ComponentExporter(tensors, adapter_cfg(method="no_such_method"))


# ---------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("dtype,tied", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_streamed_merge_equals_layer_merge_shard_by_shard(tmp_path, dtype, tied):
    """Every tensor of every shard equals what ComLoRALinear.merge(k) gives (fp32 merge, cast back: exact);
    shard names, index and untouched tensors are kept byte for byte."""
    base = save_base(tmp_path / "base", dtype, tie_word_embeddings=tied)
    index = json.loads((base / SAFE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 3, "the base should be saved in many shards"
    adapter, k = adapter_cfg(), 1
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    tensors = trained_tensors(reference, adapter)
    merge_component(reference, k)
    exporter = ComponentExporter(tensors, adapter)
    stats = stream_merge(base, tmp_path / "merged", exporter.weight_deltas(k), merge_shapes(exporter))

    assert stats["shards"] == list(dict.fromkeys(index["weight_map"].values()))
    assert stats["merged_weights"] == 2 * 7
    assert (tmp_path / "merged" / SAFE_INDEX).read_bytes() == (base / SAFE_INDEX).read_bytes()
    want = {name.replace(".base.", "."): t for name, t in reference.state_dict().items() if "lora_" not in name}
    for shard in stats["shards"]:
        with safe_open(tmp_path / "merged" / shard, "pt") as merged, safe_open(base / shard, "pt") as original:
            for name in merged.keys():
                got = merged.get_tensor(name)
                assert got.dtype == dtype and torch.equal(got, want[name]), name
                if not name.endswith(tuple(f"{t}.weight" for t in TARGETS)):
                    assert torch.equal(got, original.get_tensor(name)), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
    assert loaded.config.tie_word_embeddings == tied
    with torch.no_grad():
        torch.testing.assert_close(loaded(**make_batch()).logits, reference(**make_batch()).logits, rtol=0, atol=0)


def test_merge_refuses_a_base_that_does_not_fit(tmp_path):
    base = save_base(tmp_path / "base")
    exporter = ComponentExporter(trained_tensors(tiny_llama(intermediate_size=80), adapter_cfg()), adapter_cfg())
    with pytest.raises(ConsolidationError,
                       match=r"mlp.gate_proj.weight: the adapter needs \[80, 64\], the base has \[96, 64\]"):
        stream_merge(base, tmp_path / "merged", exporter.weight_deltas(0), merge_shapes(exporter))
    assert not (tmp_path / "merged").exists()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConsolidationError, match="no safetensors weights .* found \\['pytorch_model.bin'\\]"):
        stream_merge(tmp_path / "bin", tmp_path / "merged", exporter.weight_deltas(0), merge_shapes(exporter))


def test_merge_refuses_non_finite_weights(tmp_path):
    base = save_base(tmp_path / "base")
    tensors = trained_tensors(tiny_llama(), adapter_cfg())
    tensors["llm.model.layers.1.mlp.up_proj.lora_B"][0, 0, 0] = float("nan")
    exporter = ComponentExporter(tensors, adapter_cfg())
    with pytest.raises(ConsolidationError, match="model.layers.1.mlp.up_proj.weight gives NaN or Inf"):
        stream_merge(base, tmp_path / "merged", exporter.weight_deltas(0), merge_shapes(exporter))


def add_dash_directions(tensors: dict[str, torch.Tensor], s: int, seed: int) -> None:
    """LoRA-Dash's chosen directions for every adapted layer of ``tensors``, as a trained checkpoint holds them:
    orthonormal ``dash_U [K, d_out, s]``, ``dash_V [K, d_in, s]`` and random scales ``dash_d [K, s]``."""
    g = torch.Generator().manual_seed(seed)
    for module in {n.rpartition(".")[0] for n in tensors}:
        d_out, d_in = tensors[f"{module}.lora_B"].shape[1], tensors[f"{module}.lora_A"].shape[2]
        tensors[f"{module}.dash_U"] = torch.linalg.qr(torch.randn(K, d_out, s, generator=g))[0]
        tensors[f"{module}.dash_V"] = torch.linalg.qr(torch.randn(K, d_in, s, generator=g))[0]
        tensors[f"{module}.dash_d"] = torch.randn(K, s, generator=g)


# ------------------------------------------------------------------------------------- extension point
def test_extension_point_exports_a_higher_rank_component(tmp_path):
    """LoRA-Dash's layer (an extra U diag(d) V^T per component, from extra checkpoint tensors) exports as a
    rank-(r + s) PEFT LoRA: stock PEFT and the merged model agree with the hand-computed weights."""
    s, k = 2, 1
    adapter = adapter_cfg(method="lora_dash")
    base = save_base(tmp_path / "base")
    tensors = trained_tensors(AutoModelForCausalLM.from_pretrained(base), adapter_cfg())
    add_dash_directions(tensors, s, seed=7)

    exporter = ComponentExporter(tensors, adapter)      # lora_dash: DashLinear.factors_of, rank r + s
    for module, t in exporter.layers.items():
        want = lora_scaling(adapter.alpha, adapter.rank) * t["lora_B"][k] @ t["lora_A"][k] \
            + t["dash_U"][k] @ torch.diag(t["dash_d"][k]) @ t["dash_V"][k].t()
        torch.testing.assert_close(exporter.factors(module, k).delta(), want, rtol=1e-5, atol=1e-6)
    summary = write_peft_adapter(exporter, k, adapter, str(base), tmp_path / "adapter")
    stream_merge(base, tmp_path / "merged", exporter.weight_deltas(k), merge_shapes(exporter))
    assert summary["rank"] == RANK + s and summary["rank_pattern"] == {}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK + s and config["lora_alpha"] == ALPHA and config["task_type"] == "CAUSAL_LM"
    batch = make_batch()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                                tmp_path / "adapter").eval()(**batch).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(**batch).logits
    torch.testing.assert_close(peft_logits, merged_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "lora_dash"])
def test_soup_adapter_is_the_average_of_the_updates_through_stock_peft(tmp_path, method):
    """--winner-rule soup: one stock PEFT LoRA of rank K*r (K*(r+s) for LoRA-Dash) whose logits equal the merged
    soup model's and those of the base with the average of the K dense updates added by hand."""
    adapter = adapter_cfg(method=method)
    base = save_base(tmp_path / "base")
    tensors = trained_tensors(AutoModelForCausalLM.from_pretrained(base), adapter_cfg())
    s = 2 if method == "lora_dash" else 0
    if s:
        add_dash_directions(tensors, s, seed=3)
    exporter = ComponentExporter(tensors, adapter)
    summary = write_peft_adapter(exporter, SOUP, adapter, str(base), tmp_path / "adapter")
    stream_merge(base, tmp_path / "merged", exporter.weight_deltas(SOUP), merge_shapes(exporter))
    assert summary["rank"] == K * (RANK + s) and summary["rank_pattern"] == {}
    by_hand = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for module in exporter.layers:
            mean = sum(exporter.factors(module, k).delta().double() for k in range(K)) / K
            weight = by_hand.get_submodule(module).weight
            weight.copy_(weight.double() + mean)
    batch = make_batch()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                                tmp_path / "adapter").eval()(**batch).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(**batch).logits
        hand_logits = by_hand(**batch).logits
    torch.testing.assert_close(peft_logits, merged_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_logits, hand_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hand_logits, AutoModelForCausalLM.from_pretrained(base)(**batch).logits, atol=1e-3)


# ------------------------------------------------------------------------------------------ tensor checks
def _run_cfg(**adapter) -> RunConfig:
    cfg = RunConfig()
    cfg.adapter = adapter_cfg(**adapter)
    return cfg


def test_expected_shapes_come_from_a_meta_skeleton():
    shapes = expected_shapes(_run_cfg(), tiny_llama_config())
    assert shapes["llm.model.layers.0.mlp.down_proj.lora_A"] == (K, RANK, 96)
    assert shapes["llm.model.layers.1.self_attn.k_proj.lora_B"] == (K, 32, RANK)     # GQA: 2 kv heads x 16
    assert shapes["selector.component_embeddings"] == (K, 64)
    assert not any("embed_tokens" in n or n.endswith("base.weight") for n in shapes)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({"llm.model.layers.0.self_attn.q_proj.lora_A": torch.zeros(0)}),
     r"empty tensors .*\n  llm.model.layers.0.self_attn.q_proj.lora_A: expected \[3, 4, 64\], found \[0\]"),
    (lambda t: t.update({"llm.model.layers.1.mlp.up_proj.lora_B": torch.zeros(2, 96, 4)}),
     r"partial tensors .*up_proj.lora_B: expected \[3, 96, 4\] \(1152 elements\), found \[2, 96, 4\]"),
    (lambda t: t.update({n: v[:2] for n, v in t.items() if ".lora_" in n}),
     r"adapters have K = \[2\] components, the run config and the model need K = 3"),
    (lambda t: [t.pop(n) for n in list(t) if ".v_proj." in n],
     r"adapts modules \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj'\], the model needs "
     r"\[.*'v_proj'\].*\n  missing from the checkpoint: model.layers.0.self_attn.v_proj"),
    (lambda t: t.update({"selector.component_embeddings": torch.zeros(K, 32)}),
     r"does not match the model .*\n  selector.component_embeddings: expected \[3, 64\], found \[3, 32\]"),
    (lambda t: t.update({"llm.model.layers.0.mlp.extra": torch.zeros(3)}),
     r"llm.model.layers.0.mlp.extra: in the checkpoint \[3\] but not in the model"),
])
def test_check_tensors_names_tensor_expected_and_found(edit, message):
    cfg = _run_cfg()
    expected = expected_shapes(cfg, tiny_llama_config())
    tensors = {name: torch.zeros(shape) for name, shape in expected.items()}
    check_tensors(dict(tensors), expected, cfg, "base")
    edit(tensors)
    with pytest.raises(ConsolidationError, match="(?s)" + message):
        check_tensors(tensors, expected, cfg, "base")


def test_locate_checkpoint_refuses_missing_and_unpublished(tmp_path):
    with pytest.raises(ConsolidationError, match="no checkpoint at .*nowhere: no such file"):
        locate_checkpoint(tmp_path / "nowhere")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009")
    with pytest.raises(ConsolidationError, match="names step_00000009, which does not exist"):
        locate_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "tmp-step_00000009").mkdir()
    with pytest.raises(ConsolidationError, match="unpublished checkpoint"):
        locate_checkpoint(tmp_path / "checkpoints" / "tmp-step_00000009")
    (tmp_path / "random").mkdir()
    with pytest.raises(ConsolidationError, match="random is not a checkpoint: expected a checkpoints folder"):
        locate_checkpoint(tmp_path / "random")
    (tmp_path / "checkpoints" / "step_00000009").mkdir()
    with pytest.raises(ConsolidationError, match="partial checkpoint .*step_00000009: run_config.yaml is missing"):
        locate_checkpoint(tmp_path / "checkpoints")


# ------------------------------------------------------------------------------------------- output folder
def test_output_folder_rules(tmp_path):
    out = tmp_path / "out"
    check_output(out, "fp", overwrite=False, protected=[])                 # absent: fine
    out.mkdir()
    check_output(out, "fp", overwrite=False, protected=[])                 # empty: fine
    (out / "report.json").write_text(json.dumps({"fingerprint": "fp", "winner": 1, "checkpoint": {"path": "c"}}))
    check_output(out, "fp", overwrite=False, protected=[])                 # the same consolidation: fine
    with pytest.raises(ConsolidationError, match=r"already holds a different model \(consolidated from c, winner 1\)"):
        check_output(out, "other", overwrite=False, protected=[])
    check_output(out, "other", overwrite=True, protected=[])
    (out / "report.json").unlink()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):       # a user's own folder is never replaced: --overwrite deleted notes.txt
        with pytest.raises(ConsolidationError, match=r"holds files that consolidation did not write \(notes.txt; no "
                                                     r"report.json of an export\); --overwrite replaces only an "
                                                     r"earlier export"):
            check_output(out, "fp", overwrite=overwrite, protected=[])
    (out / "report.json").write_text('{"fingerprint": ')           # a damaged report is not proof of an export
    with pytest.raises(ConsolidationError, match="holds files that consolidation did not write"):
        check_output(out, "fp", overwrite=True, protected=[])
    with pytest.raises(ConsolidationError, match="is or contains .*ckpt: replacing it would delete it"):
        check_output(tmp_path, "fp", overwrite=True, protected=[tmp_path / "ckpt"])


def test_staging_is_all_or_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with staging(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()                                    # created parents removed too
    out.parent.mkdir(parents=True)
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staging(out) as tmp:
        (tmp / "new.txt").write_text("new")
        publish(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -------------------------------------------------------------------------------------------------- report
def test_training_metrics_last_record_of_a_step_wins(tmp_path):
    lines = [{"step": 1, "loss": 9.0, "component_loss": [3.0, 4.0]},
             {"step": 2, "loss": 8.0, "component_loss": [2.0, 3.0], "winner_counts": [1, 7]},
             {"step": 2, "loss": 7.0, "component_loss": [1.5, 2.5], "winner_counts": [2, 6]},   # resumed run
             {"validation": {"step": 1, "winner": 1, "mean_loss": [2.0, 2.5]}, "step": 1},
             {"validation": {"step": 2, "winner": 0, "mean_loss": [1.0, 0.9]}, "step": 2},
             {"validation": {"step": 2, "winner": 1, "mean_loss": [1.0, 0.9]}, "step": 2}]   # resumed run
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 3, \"lo")
    curves = read_training_metrics(tmp_path)
    assert curves["steps"] == [1, 2] and curves["component_loss"] == [[3.0, 1.5], [4.0, 2.5]]
    assert curves["winner_windows"] == [{"step": 2, "counts": [2, 6]}]
    assert [(v["step"], v["winner"], v["winner_loss"]) for v in curves["validations"]] == [(1, 1, 2.5), (2, 1, 0.9)]
    validation = {"mean_loss": [1.0, 0.9], "sim_sum": [0.5, 2.0], "selector_argmax_counts": [1, 7],
                  "loss_argmin_counts": [3, 5]}
    plots = write_plots(tmp_path, curves, validation, winner=1)
    assert plots == ["plots/training_loss.png", "plots/winner_counts.png", "plots/validation_curves.png",
                     "plots/validation.png"]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    assert read_training_metrics(tmp_path / "nothing") is None


def test_markdown_table_marks_the_winner():
    report = {"checkpoint": {"path": "ck", "step": 6, "zero_stage": 3, "world_size": 2}, "winner": 1,
              "winner_by": "selector", "method": "lora", "num_components": 2, "rank": 4, "alpha": 8,
              "target_modules": ["q_proj"], "tensors": {"count": 3, "elements": 10}, "base_model": {"path": "b"},
              "validation": {"winner": 1, "winner_by": "selector", "lowest_loss_component": 0,
                             "selector_winner_is_lowest_loss": False, "num_samples": 8, "mean_loss": [1.0, 1.1],
                             "sim_sum": [0.1, 0.9], "selector_argmax_counts": [2, 6], "loss_argmin_counts": [5, 3]},
              "outputs": {"adapter": "adapter"}, "plots": ["plots/validation.png"]}
    text = markdown(report)
    assert "| 1 **(winner)** | 1.1000 | 0.9000 | 6 | 3 |" in text
    assert "selector's winner is the lowest-loss component: **no**" in text
    report["training"] = {"validations": [
        {"step": 2, "mean_loss": [1.2, 1.3], "winner": 0, "winner_loss": 1.2, "selector_agreement_rate": 0.5,
         "selector_rank_correlation": 0.25},
        {"step": 4, "mean_loss": [1.0, 1.1], "winner": 1, "winner_loss": 1.1, "selector_agreement_rate": None,
         "selector_rank_correlation": None}]}
    text = markdown(report)
    assert "| 2 | 1.2000 | 1.3000 | 0 | 1.2000 | 0.500 | 0.250 |" in text
    assert "| 4 | 1.0000 | 1.1000 | 1 | **1.1000** | - | - |" in text     # the lowest winner loss, not lowest loss


def test_a_latest_pointing_into_another_run_is_not_followed(tmp_path):
    """Found by a user: consolidation followed a `latest` that named another run's checkpoint and exported that run."""
    other = tmp_path / "other" / "checkpoints" / "step_00000006"
    other.mkdir(parents=True)
    (other / "run_config.yaml").write_text("{}")
    ours = tmp_path / "ours" / "checkpoints"
    ours.mkdir(parents=True)
    (ours / "latest").write_text("../../other/checkpoints/step_00000006")
    with pytest.raises(ConsolidationError, match="not a step_NNNNNNNN checkpoint folder beside it"):
        locate_checkpoint(ours)


def test_a_damaged_validation_rows_file_is_named_with_its_line(tmp_path):
    from comlora_ds.export.scoring import load_validation_rows
    from comlora_ds.checkpointing.run_layout import VALIDATION_ROWS

    good = json.dumps({"input_ids": [1, 2], "labels": [-100, 2]})
    (tmp_path / VALIDATION_ROWS).write_text(good + "\n" + good[:9] + "\n")
    with pytest.raises(ConsolidationError, match=f"{VALIDATION_ROWS} line 2 is not valid JSON"):
        load_validation_rows(tmp_path)
    (tmp_path / VALIDATION_ROWS).write_text(good + "\n[1, 2]\n")
    with pytest.raises(ConsolidationError, match="line 2 has no input_ids/labels"):
        load_validation_rows(tmp_path)
