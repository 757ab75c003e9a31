"""Consolidation of real ZeRO-2 / ZeRO-3 checkpoints written by 2-rank CPU runs (and a 1-rank run of the same
training) on the tiny LLaMA of tests/assets.py (shaped like stories260K).

References are independent of the code under test: the live engine's parameters (gathered with
``GatheredParameters`` at the end of training, in the training processes), the validation scores the trainer
computed through the DeepSpeed engine, the unmerged K-component model's logits (the training forward), stock
transformers/peft loading the outputs in a process that never imports comlora_ds, and the 1-rank run.

Run as a script (under torchrun) this file is the training driver that also dumps the live parameters.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Logits are compared relative to their scale: max |got - want| <= TOL * max |want|. Rounding errors of a sum
# in another order scale with the operands, not with each (possibly near-zero) result.
FP32_TOL = 1e-5     # fp32: the same maths in another order ((W0 + s B A) x vs W0 x + s B (A x))
ADAM_TOL = 5e-4     # A and B of a 2-rank vs a 1-rank run: gradients differ by reduction order (~1e-7 relative);
#                     Adam divides by sqrt(v), which magnifies that where gradients are tiny (measured: 1.5e-4 of
#                     the tensor's scale under ZeRO-3). A merged weight W0 + s B A inherits it through B A
#                     (merged_weight_tolerance), on top of FP32_TOL for the sum itself.
BF16_MERGE_TOL = 1e-2   # merged bf16 weights evaluated in fp32 vs the fp32 computation: one rounding of each merged
#                         weight to bf16 (2^-9 relative) compounded through 5 layers (measured 4.3e-3)
BF16_TOL = 5e-2     # bf16 forward passes vs the fp32 computation: 8 mantissa bits in every activation; the base model
#                     alone in bf16 is 1.7e-2 away from itself in fp32 (measured: merged 1.7e-2, PEFT 2.3e-2,
#                     unmerged 2.4e-2; they differ from each other by up to 3.2e-2 as their roundings differ)
STEP = "step_00000006"
RUN_SETTINGS = {"train.save_steps": 0, "logging.winner_window": 2}   # on top of test_engine.base_overrides


def train_and_dump(argv: list[str]) -> None:
    """torchrun entry: train like launch/train.py, then gather the live trainable parameters of the engine
    (ZeRO-3: GatheredParameters) and save them, with the persistent buffers, on rank 0 as
    ``<output_dir>/live_parameters.pt``."""
    sys.path.insert(0, str(REPO))
    import deepspeed
    import torch.distributed as dist

    from comlora_ds.config import load_config
    from comlora_ds.training.engine import Trainer, exit_process

    ds_config, overrides = argv[0], argv[1:]
    cfg = load_config(REPO / "launch" / "configs" / "demo.yaml", overrides)
    trainer = Trainer(cfg, ds_config)
    trainer.train()
    params = [(name, p) for name, p in trainer.engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        live = {name: p.detach().clone().float() for name, p in params}
    persistent = set(trainer.engine.module.state_dict())
    live.update({name: b.detach().clone() for name, b in trainer.engine.module.named_buffers() if name in persistent})
    if dist.get_rank() == 0:
        torch.save(live, Path(cfg.train.output_dir) / "live_parameters.pt")
    trainer.close()
    exit_process(0)


if __name__ == "__main__":
    train_and_dump(sys.argv[1:])

# ------------------------------------------------------------------------------------------ pytest from here
from comlora_ds.comlora.inject import active_component, adapter_layers  # noqa: E402
from comlora_ds.models.base_model import Placement  # noqa: E402
from comlora_ds.export.consolidate import ConsolidationError, consolidate  # noqa: E402
from comlora_ds.data import ResponseCollator  # noqa: E402
from comlora_ds.export.recover import locate_checkpoint, recover_tensors  # noqa: E402
from comlora_ds.export.scoring import build_live_model, load_validation_rows  # noqa: E402

from assets import tiny_model_dir  # noqa: E402
from comlora_ds.checkpointing import manifest  # noqa: E402
from helpers import base_overrides, ds_config, free_port, run_in_group, subprocess_env  # noqa: E402


def _env() -> dict:
    return {**subprocess_env(), "WANDB_MODE": "disabled"}

pytestmark = pytest.mark.distributed

# name: (ZeRO stage, ranks, overrides); global batch 4 in all. "one" is the 1-rank twin of z2/z3; "lora" is plain
# LoRA (K = 1, no selector); "nosel" is ComLoRA without a selector (winner by validation loss); "dash" is ComLoRA x
# LoRA-Dash on ZeRO-3 (directions chosen after step 2, scales trained at step 3: exported as rank r + s_d).
RUNS = {"z2": (2, 2, {}), "z3": (3, 2, {}), "one": (2, 1, {}),
        "lora": (2, 1, {"adapter.num_components": 1, "train.max_steps": 3}),
        "nosel": (2, 1, {"comlora.no_selector": "true", "train.max_steps": 3}),
        "dash": (3, 2, {"adapter.method": "lora_dash", "lora_dash.t_steps": 2, "lora_dash.num_directions": 2,
                        "train.max_steps": 3})}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (stage, nproc, extra) in RUNS.items():
        run = root / name
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}",
               __file__, str(ds_config(root, stage)),
               *base_overrides(run, **{**RUN_SETTINGS, "train.micro_batch_size": 4 // nproc, **extra})]
        proc = run_in_group(cmd, 300, env=_env())
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = run
    return out


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    """The tiny base saved in bf16 in many small shards (a bf16, sharded base for the same checkpoints)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("base") / "tiny-bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200KB")
    return path


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "consolidate.py"), *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exports(runs, bf16_base, tmp_path_factory) -> dict[str, Path]:
    """z3 through the CLI (with every component), the others through the library."""
    root = tmp_path_factory.mktemp("exports")
    proc = run_cli(runs["z3"] / "checkpoints", "--out", root / "z3", "--all-components")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "winner: component" in proc.stdout
    consolidate(runs["z2"] / "checkpoints", root / "z2")
    consolidate(runs["one"] / "checkpoints" / STEP, root / "one")
    consolidate(runs["z2"], root / "z2_bf16", base=str(bf16_base))
    for name in ("lora", "nosel"):
        consolidate(runs[name] / "checkpoints", root / name)
    consolidate(runs["dash"] / "checkpoints", root / "dash")
    return {name: root / name for name in ("z2", "z3", "one", "z2_bf16", "lora", "nosel", "dash")}


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    diff, scale = (got.float() - want.float()).abs().max().item(), want.float().abs().max().item()
    assert diff <= tol * scale, f"max |difference| {diff:.3g} > {tol:g} x max |logit| {scale:.3g}"


def validation_batch(run: Path) -> dict[str, torch.Tensor]:
    rows = load_validation_rows(step_dir(run))
    batch = ResponseCollator(0)(rows)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


STOCK_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
jobs, batches = json.loads(sys.argv[1]), torch.load(sys.argv[2])
out = {}
for name, job in jobs.items():
    dtype = getattr(torch, job["dtype"])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(job["merged"], dtype=dtype).eval()
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(job["base"], dtype=dtype),
                                         job["adapter"]).eval()
        out[name] = {"merged": merged(**batches[name]).logits, "peft": peft(**batches[name]).logits,
                     "merged_dtype": str(merged.dtype)}
assert not [m for m in sys.modules if m.split(".")[0] == "comlora_ds"], "comlora_ds was imported"
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def stock_logits(runs, exports, bf16_base, tmp_path_factory) -> dict:
    """Logits of every merged model and PEFT adapter, loaded by stock transformers/peft in a fresh process that
    never imports comlora_ds (run from a folder outside the repo, without PYTHONPATH)."""
    root = tmp_path_factory.mktemp("stock")
    base = str(tiny_model_dir())
    jobs = {name: {"merged": str(exports[name] / "merged"), "adapter": str(exports[name] / "adapter"),
                   "base": str(bf16_base) if name == "z2_bf16" else base,
                   "dtype": "bfloat16" if name == "z2_bf16" else "float32"} for name in exports}
    torch.save({name: validation_batch(runs[name.split("_")[0]]) for name in jobs}, root / "batches.pt")
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, json.dumps(jobs), str(root / "batches.pt"),
                           str(root / "logits.pt")], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "logits.pt")


def step_dir(run: Path) -> Path:
    return locate_checkpoint(run / "checkpoints").step_dir


def unmerged_logits(run: Path, export: Path, dtype=torch.float32, base: Path | None = None) -> torch.Tensor:
    """The training-time forward: base + all K adapters, only the winner active (no merge, no PEFT)."""
    ref = locate_checkpoint(run / "checkpoints")
    report = json.loads((export / "report.json").read_text())
    model = build_live_model(ref.cfg, str(base or ref.cfg.model.name_or_path), recover_tensors(ref),
                             Placement("cpu", dtype, "sdpa"))
    with torch.no_grad(), active_component(model.llm, report["winner"]):
        return model.llm(**validation_batch(run)).logits


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(RUNS))
def test_recovered_tensors_equal_the_live_engine_parameters(runs, name):
    ref = locate_checkpoint(runs[name] / "checkpoints")
    assert (ref.zero_stage, ref.world_size) == RUNS[name][:2]
    recovered = recover_tensors(ref)
    live = torch.load(runs[name] / "live_parameters.pt")
    selector = 13 if ref.cfg.is_comlora and not ref.cfg.comlora.no_selector else 0
    dash = 6 if ref.cfg.adapter.method == "lora_dash" else 0                           # dash_d + 5 buffers
    assert recovered.keys() == live.keys() and len(live) == 5 * 7 * (2 + dash) + selector
    for tensor_name, value in live.items():
        assert recovered[tensor_name].dtype == (torch.float32 if value.is_floating_point() else value.dtype)
        assert torch.equal(recovered[tensor_name], value), tensor_name


@pytest.mark.parametrize("name", ["z2", "z3"])
def test_offline_scores_match_the_trainers_validation(runs, exports, name):
    """The engine scored the same rows at the end of training; the offline model gives the same numbers."""
    report = json.loads((exports[name] / "report.json").read_text())
    trained = json.loads((runs[name] / "validation.json").read_text())
    v = report["validation"]
    assert report["winner"] == trained["winner"] == v["winner"] and report["winner_by"] == "selector"
    assert v["mean_loss"] == pytest.approx(trained["mean_loss"], rel=FP32_TOL)
    assert v["sim_sum"] == pytest.approx(trained["sim_sum"], rel=FP32_TOL, abs=FP32_TOL)
    assert v["selector_argmax_counts"] == trained["selector_argmax_counts"] and v["num_samples"] == 8
    assert report["selector_winner_is_lowest_loss"] == (v["winner"] == v["lowest_loss_component"])
    assert report["scoring"] == {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"}   # no GPU here
    # issue 27: the trainer's divergence (ZeRO-3: factors gathered on the ranks) equals the one from recovered tensors
    ours, theirs = v["update_divergence"]["0-1"], trained["update_divergence"]["0-1"]
    for scope_ours, scope_theirs in [(ours, theirs), *((ours["by_module"][m], theirs["by_module"][m])
                                                       for m in theirs["by_module"])]:
        assert (scope_ours["relative_distance"], scope_ours["cosine"]) == pytest.approx(
            (scope_theirs["relative_distance"], scope_theirs["cosine"]), rel=1e-4, abs=1e-6)
    assert v["loss_difference"]["0-1"]["mean"] == pytest.approx(trained["loss_difference"]["0-1"]["mean"],
                                                                rel=1e-3, abs=1e-6)
    assert v["distinguishability"].startswith("components 0 and 1 ")
    assert v["distinguishability"].split(" on validation")[0] in (exports[name] / "report.md").read_text()


@pytest.mark.parametrize("name", ["z2", "z3", "lora", "nosel", "dash"])
def test_merged_model_and_peft_adapter_give_the_unmerged_winners_logits(runs, exports, stock_logits, name):
    want = unmerged_logits(runs[name], exports[name])
    got = stock_logits[name]
    assert got["merged_dtype"] == "torch.float32"
    assert_logits_close(got["merged"], want, FP32_TOL)
    assert_logits_close(got["peft"], want, FP32_TOL)


@pytest.mark.parametrize("name", ["z3", "dash"])
def test_evaluating_a_component_straight_from_the_checkpoint(runs, exports, stock_logits, name):
    """``launch/evaluate.py CKPT --component k`` (load_for_eval): component k merged in memory gives the unmerged
    forward with k active; for the winner, the exported merged model's logits."""
    from comlora_ds.evaluation.load import load_for_eval

    ref = locate_checkpoint(runs[name] / "checkpoints")
    live = build_live_model(ref.cfg, ref.cfg.model.name_or_path, recover_tensors(ref))
    winner = json.loads((exports[name] / "report.json").read_text())["winner"]
    batch = validation_batch(runs[name])
    for k in range(ref.cfg.adapter.num_components):
        model, tokenizer, target = load_for_eval(str(runs[name]), component=k, dtype="float32", device="cpu")
        assert (target.kind, target.component) == ("checkpoint", k) and tokenizer is not None
        with torch.no_grad(), active_component(live.llm, k):
            want = live.llm(**batch).logits
            got = model(**batch).logits
        assert_logits_close(got, want, FP32_TOL)
        if k == winner:
            assert_logits_close(got, stock_logits[name]["merged"], FP32_TOL)


def test_lora_dash_exports_rank_r_plus_s(runs, exports):
    """ComLoRA x LoRA-Dash on ZeRO-3: the directions were chosen (buffers in the checkpoint), the winner's adapter is a
    rank-(r + s_d) PEFT LoRA (its logits are checked with the others above)."""
    report = json.loads((exports["dash"] / "report.json").read_text())
    tensors = recover_tensors(locate_checkpoint(runs["dash"] / "checkpoints"))
    assert bool(tensors["llm.model.layers.2.mlp.up_proj.dash_active"]) and \
        tensors["llm.model.layers.2.mlp.up_proj.dash_d"].abs().sum() > 0
    config = json.loads((exports["dash"] / "adapter" / "adapter_config.json").read_text())
    assert report["method"] == "lora_dash" and config["r"] == report["adapter"]["rank"] == 4 + 2


@pytest.mark.parametrize("name,winner_by", [("lora", "single component"), ("nosel", "validation_loss")])
def test_runs_without_a_selector(runs, exports, name, winner_by):
    """K = 1: the winner is component 0. No selector: the lowest validation loss (as the trainer found it)."""
    report = json.loads((exports[name] / "report.json").read_text())
    trained = json.loads((runs[name] / "validation.json").read_text())
    assert report["winner_by"] == winner_by and not report["selector"]
    assert report["winner"] == trained["winner"] == report["validation"]["lowest_loss_component"]
    assert report["validation"]["sim_sum"] is None and report["validation"]["winner_by"] == "validation_loss"
    assert report["validation"]["mean_loss"] == pytest.approx(trained["mean_loss"], rel=FP32_TOL)
    assert len(report["validation"]["mean_loss"]) == report["num_components"] == (1 if name == "lora" else 2)


def test_bf16_sharded_base(runs, exports, stock_logits, bf16_base):
    """A bf16 base in many shards: the same shard names and index, bf16 weights merged in fp32 then cast once.
    Reference: the fp32 computation (the bf16 base weights upcast, fp32 adapters, only the winner active)."""
    from transformers import AutoModelForCausalLM

    export = exports["z2_bf16"]
    report = json.loads((export / "report.json").read_text())
    index = json.loads((bf16_base / "model.safetensors.index.json").read_text())
    shards = list(dict.fromkeys(index["weight_map"].values()))
    assert len(shards) > 1 and report["merge"]["shards"] == shards and report["merge"]["dtypes"] == ["BF16"]
    assert (export / "merged" / "model.safetensors.index.json").read_bytes() == \
        (bf16_base / "model.safetensors.index.json").read_bytes()
    want = unmerged_logits(runs["z2"], export, torch.float32, bf16_base)
    with torch.no_grad():
        merged_fp32 = AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32)
        assert_logits_close(merged_fp32(**validation_batch(runs["z2"])).logits, want, BF16_MERGE_TOL)
    got = stock_logits["z2_bf16"]
    assert got["merged_dtype"] == "torch.bfloat16"
    assert_logits_close(got["merged"], want, BF16_TOL)
    assert_logits_close(got["peft"], want, BF16_TOL)
    assert_logits_close(unmerged_logits(runs["z2"], export, torch.bfloat16, bf16_base), want, BF16_TOL)


def merged_weight_tolerance(key: str, merged_scale: float, adapter: dict, scaling: float) -> float:
    """How far two merged weights W0 + s B A may differ when their A and B each differ by up to ADAM_TOL of their
    scale: |d(B A)_ij| <= sum_r |dB_ir| |A_rj| + |B_ir| |dA_rj| <= 2 r ADAM_TOL max|B| max|A|, plus FP32_TOL of the
    merged weight for the fp32 sum. Weights without an adapter get FP32_TOL alone."""
    prefix = "base_model.model." + key.removesuffix(".weight")
    a, b = adapter.get(f"{prefix}.lora_A.weight"), adapter.get(f"{prefix}.lora_B.weight")
    bound = FP32_TOL * merged_scale
    if a is not None:
        bound += scaling * 2 * a.shape[0] * ADAM_TOL * a.abs().max().item() * b.abs().max().item()
    return bound


@pytest.mark.parametrize("name", ["z2", "z3"])
def test_two_rank_consolidation_equals_one_rank(exports, name):
    """Same training on 1 rank: same winner, scores and written weights (fp32, reduction order through Adam)."""
    from safetensors.torch import load_file

    two, one = (json.loads((exports[n] / "report.json").read_text()) for n in (name, "one"))
    assert two["winner"] == one["winner"] and two["tensors"] == one["tensors"]
    assert two["validation"]["mean_loss"] == pytest.approx(one["validation"]["mean_loss"], rel=FP32_TOL)
    assert two["validation"]["sim_sum"] == pytest.approx(one["validation"]["sim_sum"], rel=ADAM_TOL, abs=ADAM_TOL)
    adapter = {p: load_file(exports[n] / "adapter" / "adapter_model.safetensors") for n, p in ((name, 0), ("one", 1))}
    assert adapter[0].keys() == adapter[1].keys()
    for key in adapter[1]:
        diff, scale = (adapter[0][key] - adapter[1][key]).abs().max().item(), adapter[1][key].abs().max().item()
        assert diff <= ADAM_TOL * scale, f"adapter {key}: {diff:.3g} > {ADAM_TOL} x {scale:.3g}"
    config = json.loads((exports["one"] / "adapter" / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    a, b = load_file(exports[name] / "merged" / "model.safetensors"), load_file(exports["one"] / "merged" /
                                                                               "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        diff = (a[key] - b[key]).abs().max().item()
        allowed = merged_weight_tolerance(key, b[key].abs().max().item(), adapter[1], scaling)
        assert diff <= allowed, f"merged {key}: {diff:.3g} > {allowed:.3g}"


def test_cli_writes_every_output_and_the_report(runs, exports):
    from safetensors.torch import load_file

    export, ref = exports["z3"], locate_checkpoint(runs["z3"] / "checkpoints")
    report = json.loads((export / "report.json").read_text())
    assert report["checkpoint"]["zero_stage"] == 3 and report["checkpoint"]["world_size"] == 2
    assert report["outputs"] == {"adapter": "adapter", "merged": "merged",
                                 "components": ["components/component_0", "components/component_1"]}
    assert sorted(report["plots"]) == ["plots/selector_diagnostics.png", "plots/training_loss.png",
                                       "plots/validation.png", "plots/winner_counts.png"]
    assert [w["step"] for w in report["training"]["winner_windows"]] == [2, 4, 6]
    md = (export / "report.md").read_text()
    assert f"| {report['winner']} **(winner)** |" in md and "![validation](plots/validation.png)" in md
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"], config["task_type"]) == \
        (4, 16.0, 0.0, False, "CAUSAL_LM")
    assert sorted(config["target_modules"]) == sorted(ref.cfg.adapter.target_modules)
    assert config["base_model_name_or_path"] == str(tiny_model_dir())
    tensors = recover_tensors(ref)
    for k in range(2):
        adapter = load_file(export / "components" / f"component_{k}" / "adapter_model.safetensors")
        assert len(adapter) == 2 * 5 * 7
        key = "base_model.model.model.layers.3.mlp.down_proj"
        assert torch.equal(adapter[f"{key}.lora_A.weight"], tensors["llm.model.layers.3.mlp.down_proj.lora_A"][k])
        assert torch.equal(adapter[f"{key}.lora_B.weight"], tensors["llm.model.layers.3.mlp.down_proj.lora_B"][k])
    winner_dir = export / "components" / f"component_{report['winner']}"
    assert (winner_dir / "adapter_model.safetensors").read_bytes() == \
        (export / "adapter" / "adapter_model.safetensors").read_bytes()
    for folder in ("adapter", "merged"):
        assert (export / folder / "tokenizer.json").is_file()
    assert not list(export.parent.glob(".z3.*"))


def test_winner_override_and_an_existing_output(runs, tmp_path):
    """Same consolidation again: fine (idempotent). Another winner into the same OUT: refused, OUT untouched;
    with overwrite: replaced, and the report says who chose."""
    out = tmp_path / "export"
    first = consolidate(runs["z2"] / "checkpoints", out)
    consolidate(runs["z2"] / "checkpoints", out)
    other = 1 - first["winner"]
    before = (out / "merged" / "model.safetensors").read_bytes()
    with pytest.raises(ConsolidationError, match=rf"already holds a different model \(consolidated from .*{STEP}, "
                                                 rf"winner {first['winner']}\); pass --overwrite"):
        consolidate(runs["z2"] / "checkpoints", out, winner=other)
    assert (out / "merged" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    report = consolidate(runs["z2"] / "checkpoints", out, winner=other, overwrite=True)
    assert report["winner"] == other and report["winner_by"] == "user (--winner)"
    assert report["validation"]["winner"] == first["winner"]                 # still scored and reported
    assert (out / "merged" / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def _mean_response_nll(model, rows: list[dict]) -> float:
    """The validation loss as docs/method.md defines it, by hand: each row's mean NLL over its response tokens,
    averaged over the rows."""
    batch = ResponseCollator(0)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
    mask = labels != -100
    return ((nll * mask).sum(1) / mask.sum(1)).mean().item()


@pytest.mark.parametrize("name", ["z2", "dash"])
def test_winner_rules_export_the_selectors_choice_the_lowest_loss_component_or_the_soup(runs, exports, tmp_path,
                                                                                       name):
    """--winner-rule (issue 27): val_loss exports the lowest-validation-loss component; soup exports the base plus
    the mean of the K updates (checked weight by weight against the live layers), as a stock PEFT adapter of rank
    K*r (K*(r+s) for LoRA-Dash) with the merged model's logits; every report gives each rule's validation loss, the
    soup's equal to the merged soup model's loss computed by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, selector = runs[name], json.loads((exports[name] / "report.json").read_text())
    v = selector["validation"]
    assert selector["winner_rule"] == "selector" and selector["winner"] == v["winner"]
    assert v["rule_loss"]["selector"] == v["mean_loss"][v["winner"]]
    assert v["rule_loss"]["val_loss"] == min(v["mean_loss"])
    assert "each winner rule (`--winner-rule`) exports: selector " in (exports[name] / "report.md").read_text()

    by_loss = consolidate(run / "checkpoints", tmp_path / "val_loss", winner_rule="val_loss", merged=False)
    assert (by_loss["winner"], by_loss["winner_by"]) == (v["lowest_loss_component"], "validation_loss")
    component = tmp_path / "val_loss" / "adapter" / "adapter_model.safetensors"
    soup = consolidate(run / "checkpoints", tmp_path / "soup", winner_rule="soup")
    assert soup["winner"] == "soup" and soup["winner_by"].startswith("soup")
    assert soup["validation"]["rule_loss"] == pytest.approx(v["rule_loss"], rel=FP32_TOL)
    assert "exported: **the soup (uniform average) of the components**" in (tmp_path / "soup" / "report.md").read_text()

    ref = locate_checkpoint(run / "checkpoints")
    live = build_live_model(ref.cfg, ref.cfg.model.name_or_path, recover_tensors(ref))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "soup" / "merged").eval()
    k_total = ref.cfg.adapter.num_components
    for path, layer in adapter_layers(live.llm).items():
        mean = sum(layer.delta_weight(k).double() for k in range(k_total)) / k_total
        torch.testing.assert_close(merged.get_submodule(path).weight.double(), layer.base.weight.double() + mean,
                                   rtol=0, atol=1e-6)
    config = json.loads((tmp_path / "soup" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == k_total * by_loss["adapter"]["rank"] and config["rank_pattern"] == {}
    assert component.is_file()
    batch = validation_batch(run)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir()),
                                     tmp_path / "soup" / "adapter").eval()
    with torch.no_grad():
        assert_logits_close(peft(**batch).logits, merged(**batch).logits, FP32_TOL)
    rows = load_validation_rows(step_dir(run))
    assert _mean_response_nll(merged, rows) == pytest.approx(v["rule_loss"]["soup"], rel=1e-4)
    assert v["rule_loss"]["soup"] != pytest.approx(min(v["mean_loss"]), rel=1e-6)      # not a component's loss


# ---------------------------------------------------------------------------------------------- refusals
def _copy_checkpoint(run: Path, dest: Path) -> Path:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    step = dest / "checkpoints" / tag
    shutil.copytree(run / "checkpoints" / tag, step)
    (dest / "checkpoints" / "latest").write_text(tag)
    return step


def _edit_run_config(step: Path, **adapter) -> None:
    import yaml

    cfg = yaml.safe_load((step / "run_config.yaml").read_text())
    cfg["adapter"].update(adapter)
    (step / "run_config.yaml").write_text(yaml.safe_dump(cfg))


def _rewrite_zero3_shape(step: Path, name: str, shape: list[int]) -> None:
    """Fabricate a consistent ZeRO-3 checkpoint in which tensor ``name`` has ``shape`` (e.g. [0], the empty-tensor
    trap): its recorded shape on every rank and its slice of every rank's fp32 partition are rewritten."""
    model_files = sorted(step.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    world = len(model_files)
    states = [torch.load(f, weights_only=False) for f in model_files]
    order = [(n, s) for group in states[0]["param_shapes"] for n, s in group.items()]
    offset = 0
    for n, s in order:
        if n == name:
            old_part = math.ceil(s.numel() / world)
            break
        offset += math.ceil(s.numel() / world)
    new_part = math.ceil(math.prod(shape) / world)
    for state, path in zip(states, model_files):
        for group in state["param_shapes"]:
            if name in group:
                group[name] = torch.Size(shape)
        torch.save(state, path)
    for rank in range(world):
        path = step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        optim = torch.load(path, weights_only=False)
        groups = optim["optimizer_state_dict"]["fp32_flat_groups"]
        start = 0
        for i, flat in enumerate(groups):
            if start <= offset < start + flat.numel():
                local = offset - start
                groups[i] = torch.cat([flat[:local], flat[local:local + new_part], flat[local + old_part:]])
                break
            start += flat.numel()
        torch.save(optim, path)


def _truncate_rank1_partition(step: Path) -> None:
    path = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim = torch.load(path, weights_only=False)
    optim["optimizer_state_dict"]["fp32_flat_groups"][0] = optim["optimizer_state_dict"]["fp32_flat_groups"][0][:-100]
    torch.save(optim, path)


Q_A = "llm.model.layers.0.self_attn.q_proj.lora_A"
REFUSALS = {
    "wrong_K": ("z2", lambda s, tmp: _edit_run_config(s, num_components=3), {},
                r"adapters have K = \[2\] components, the run config and the model need K = 3"),
    "wrong_target_modules": ("z2", lambda s, tmp: _edit_run_config(s, target_modules=["q_proj", "v_proj"]), {},
                             r"adapts modules \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', "
                             r"'v_proj'\], the model needs \['q_proj', 'v_proj'\].*not in the model: "
                             r"model.layers.0.mlp.down_proj"),
    "wrong_base_shapes": ("z2", None, {"base": "smaller"},
                          r"does not match the model .*\n  llm.model.layers.0.self_attn.q_proj.lora_A: expected "
                          r"\[2, 4, 48\], found \[2, 4, 64\]"),
    "missing_rank_shard": ("z3", lambda s, tmp: (s / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(), {},
                           r"partial checkpoint .*written by 2 rank\(s\) with ZeRO stage 3, but the shard files of "
                           r"rank\(s\) \[1\] are missing"),
    "truncated_shard": ("z3", lambda s, tmp: _truncate_rank1_partition(s), {},
                        r"cannot recover the trainable tensors of .*ZeRO stage 3, 2 ranks\): the shard files are "
                        r"inconsistent .*RuntimeError: shape"),
    "zero3_empty_tensor": ("z3", lambda s, tmp: _rewrite_zero3_shape(s, Q_A, [0]), {},
                           rf"empty tensors \(a ZeRO-3 partition saved without gathering.*\n  {Q_A}: expected "
                           r"\[2, 4, 64\], found \[0\]"),
    "zero3_partial_tensor": ("z3", lambda s, tmp: _rewrite_zero3_shape(s, Q_A, [1, 4, 64]), {},
                             rf"partial tensors .*\n  {Q_A}: expected \[2, 4, 64\] \(512 elements\), "
                             r"found \[1, 4, 64\]"),
    "no_run_config": ("z2", lambda s, tmp: (s / "run_config.yaml").unlink(), {},
                      r"partial checkpoint .*: run_config.yaml is missing"),
    "missing_checkpoint": ("z2", lambda s, tmp: shutil.rmtree(s), {},
                           rf"latest names {STEP}, which does not exist"),
    "out_is_the_run": ("z2", None, {"out": "run"}, r"--out .* holds a training run or checkpoint"),
    "changed_file": ("z3", lambda s, tmp: _flip_last_byte(s / "zero_pp_rank_1_mp_rank_00_optim_states.pt"), {},
                     r"zero_pp_rank_1_mp_rank_00_optim_states.pt is not the file that was written"),
    "winner_out_of_range": ("z2", None, {"winner": 2}, r"--winner 2: the checkpoint has K = 2 components"),
    "unknown_winner_rule": ("z2", None, {"winner_rule": "best"}, r"--winner-rule 'best' is not one of selector, "
                            r"val_loss, soup"),
    "soup_of_one_component": ("lora", None, {"winner_rule": "soup"},
                              r"--winner-rule soup averages the K components, but .* has K = 1"),
    "val_loss_without_the_validation_rows": ("z2", lambda s, tmp: (s / "validation_rows.jsonl").unlink(),
                                             {"winner_rule": "val_loss"},
                                             r"--winner-rule val_loss needs .*validation_rows.jsonl \(the validation "
                                             r"split the run was trained with\), which is missing"),
    "winner_and_a_rule": ("z2", None, {"winner": 0, "winner_rule": "soup"},
                          r"--winner 0 and --winner-rule soup both choose what is exported: pass one"),
}


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _resign(step: Path) -> None:
    """Rewrite the manifest over the edited files: the checkpoint a buggy writer would have produced, so the checks
    behind the manifest (shapes, shards, run config) are what is tested."""
    saved = json.loads((step / manifest.MANIFEST).read_text())
    manifest.write(step, saved["data"], saved["base_model"], saved["settings"])


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_problem_and_write_nothing(runs, tmp_path, case):
    from transformers import AutoModelForCausalLM

    name, edit, options, message = REFUSALS[case]
    run = tmp_path / "run"
    step = _copy_checkpoint(runs[name], run)
    if edit is not None:
        edit(step, tmp_path)
        if step.is_dir() and case != "changed_file":
            _resign(step)
    out = tmp_path / "exports" / "out"
    kwargs = {}
    if options.get("base") == "smaller":   # the tiny base with hidden 48 instead of 64
        config = AutoModelForCausalLM.from_pretrained(tiny_model_dir()).config
        config.hidden_size, config.head_dim = 48, 6
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "smaller")
        kwargs["base"] = str(tmp_path / "smaller")
    if options.get("out") == "run":
        out = run
    kwargs.update({key: options[key] for key in ("winner", "winner_rule") if key in options})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ConsolidationError, match="(?s)" + message):
        consolidate(run / "checkpoints", out, **kwargs)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before      # nothing written


def test_cli_refusal_exit_code_and_message(tmp_path):
    proc = run_cli(tmp_path / "nothing", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert f"error: no checkpoint at {tmp_path / 'nothing'}: no such file or folder" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_unknown_winner_rule_in_one_line(tmp_path):
    proc = run_cli(tmp_path / "nothing", "--out", tmp_path / "out", "--winner-rule", "best")
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: comlora-consolidate: argument --winner-rule: invalid choice: 'best' (choose from ")
    assert "val_loss" in line and line.endswith("(see comlora-consolidate --help)")
    assert not (tmp_path / "out").exists()
