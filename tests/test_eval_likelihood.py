"""response_logprobs against transformers' own loss on each pair alone, and the ConvAI2 NLL built on it."""

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from assets import convai2_files, tiny_model_dir
from comlora_ds.data.prompts import build_prompt
from comlora_ds.data.tokenize import tokenize_example
from comlora_ds.evaluation.convai2 import convai2_examples, parse_convai2
from comlora_ds.evaluation.likelihood import response_logprobs


@pytest.fixture(scope="module")
def model_and_tokenizer(one_thread):
    folder = tiny_model_dir()
    return LlamaForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _reference(model, tokenizer, prompt: str, response: str) -> tuple[float, int]:
    """transformers' mean cross-entropy over the response labels of one unpadded sequence, times their count."""
    example = tokenize_example(tokenizer, prompt, response, 2048)
    labels = torch.tensor([example["labels"]])
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).loss.item()
    count = int((labels[:, 1:] != -100).sum())
    return -loss * count, count


def test_batched_sums_equal_one_sequence_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = [("Question: is the sky blue?\n", "yes it is"), ("Hi", "hello there , how are you today ?"),
             ("A much longer prompt with many more words in it than the others have.", "no")]
    sums, counts = response_logprobs(model, tokenizer, pairs, batch_size=3)     # padded to the longest
    for (prompt, response), got, n in zip(pairs, sums, counts):
        want, want_n = _reference(model, tokenizer, prompt, response)
        assert n == want_n == len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1   # + EOS
        assert got == pytest.approx(want, rel=1e-5)
    assert model.training is False


def test_convai2_nll_is_the_pooled_response_nll(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    from comlora_ds.evaluation.convai2 import evaluate_convai2

    path = convai2_files()[0]
    try:
        result = evaluate_convai2(model, tokenizer, path, limit=5, batch_size=2, max_new_tokens=3, max_history=1,
                                  progress=False)
    except Exception as err:            # METEOR's WordNet or BERTScore's model is not installed here
        if type(err).__name__ != "MetricUnavailable":
            raise
        pytest.skip(str(err))
    rows = convai2_examples(parse_convai2(path), max_history=1)[:5]
    reference = [_reference(model, tokenizer, build_prompt(r["instruction"], r["input"]), r["output"]) for r in rows]
    examples = result["examples"]
    for example, (logprob, count) in zip(examples, reference):
        assert example["nll_sum"] == pytest.approx(-logprob, rel=1e-5) and example["response_tokens"] == count
    nll = -sum(lp for lp, _ in reference) / sum(n for _, n in reference)
    metrics = result["metrics"]
    assert metrics["nll"] == pytest.approx(nll, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    for name in ("meteor", "rougeL", "bertscore_f1"):       # the per-example scores are the means' terms
        assert metrics[name] == pytest.approx(sum(e[name] for e in examples) / len(examples), abs=1e-9)
