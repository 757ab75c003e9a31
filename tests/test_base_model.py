"""Inference placement: device, dtype and attention implementation chosen together (consolidation, evaluation)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from comlora_ds.models import base_model
from comlora_ds.models.base_model import DeviceError, Placement, choose_placement

REPO = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"comlora_launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gpu_machine(monkeypatch):
    """Pretend to be a machine with 2 bf16 GPUs and flash-attn installed (nothing is moved to a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: True)


@NO_GPU
def test_cpu_machine_runs_fp32_with_sdpa_and_refuses_cuda():
    assert choose_placement() == Placement("cpu", torch.float32, "sdpa")
    assert choose_placement("cpu", "bfloat16") == Placement("cpu", torch.bfloat16, "sdpa")
    with pytest.raises(DeviceError, match="--device cuda: torch .* sees no CUDA GPU here; use --device cpu"):
        choose_placement("cuda")


def test_gpu_machine_defaults_to_bf16_flash_attention_on_this_ranks_gpu(gpu_machine, monkeypatch):
    assert choose_placement() == Placement("cuda:0", torch.bfloat16, "flash_attention_2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert choose_placement().device == "cuda:1"
    assert choose_placement("cuda").device == "cuda:1"
    assert choose_placement("cuda:0").device == "cuda:0"       # an explicit device wins


def test_flash_attention_only_for_a_half_precision_model_on_a_gpu(gpu_machine, monkeypatch):
    assert choose_placement("cpu") == Placement("cpu", torch.float32, "sdpa")       # the model stays on the CPU
    assert choose_placement("cpu", "bfloat16").attn_implementation == "sdpa"
    assert choose_placement("cuda", "float32").attn_implementation == "sdpa"        # flash-attn has no fp32 kernels
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)
    assert choose_placement() == Placement("cuda:0", torch.bfloat16, "sdpa")


def test_bad_devices_and_dtypes_are_named(gpu_machine):
    with pytest.raises(DeviceError, match="--device cuda:2: this machine has 2 CUDA device"):
        choose_placement("cuda:2")
    with pytest.raises(DeviceError, match="--device 'gpu0': not a device name"):
        choose_placement("gpu0")
    with pytest.raises(DeviceError, match="--device meta: choose cpu or cuda"):
        choose_placement("meta")
    with pytest.raises(DeviceError, match="dtype 'int8'"):
        choose_placement("cpu", "int8")


def test_load_base_model_takes_the_placements_attention(tmp_path):
    from assets import tiny_model_dir
    from comlora_ds.config import load_config

    cfg = load_config(overrides=["model.attn_implementation=eager"]).model
    assert base_model.load_base_model(str(tiny_model_dir()), cfg, torch.float32).config._attn_implementation == "eager"
    model = base_model.load_base_model(str(tiny_model_dir()), cfg, torch.float32, "sdpa")
    assert model.config._attn_implementation == "sdpa"


@NO_GPU
@pytest.mark.parametrize("script", ["evaluate", "consolidate"])
def test_clis_refuse_cuda_without_a_gpu_before_any_work(script, tmp_path, capsys):
    args = {"evaluate": ["no-such-model", "--task", "commonsense", "--out", str(tmp_path / "o")],
            "consolidate": [str(tmp_path / "no-such-run"), "--out", str(tmp_path / "o")]}[script]
    assert load_script(script).main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda: torch") and "sees no CUDA GPU" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_llama2_sentencepiece_tokenizer_loads(shared_data):
    """LLaMA-2 folders ship only tokenizer.model: it needs sentencepiece (a dependency), else transformers misreads it
    as a tiktoken file."""
    from comlora_ds.config import ModelConfig

    tokenizer = base_model.load_tokenizer(str(shared_data / "models" / "llama2-tokenizer"), ModelConfig())
    assert len(tokenizer) == 32000
    ids = tokenizer("Hello world", add_special_tokens=False).input_ids
    assert ids == [15043, 3186] and tokenizer.convert_ids_to_tokens(ids) == ["\u2581Hello", "\u2581world"]


def test_without_sentencepiece_the_error_names_the_package(monkeypatch):
    from comlora_ds.config import ModelConfig
    from comlora_ds.errors import MissingPackage

    def misread(*args, **kwargs):        # what transformers 5 raises for a tokenizer.model without sentencepiece
        raise ValueError("`tiktoken` is required to read a `tiktoken` file. Install it with `pip install tiktoken`.")

    monkeypatch.setattr(base_model.AutoTokenizer, "from_pretrained", misread)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else
                        real_find_spec(name, *a))
    with pytest.raises(MissingPackage, match="llama2: .*SentencePiece tokenizer.model.*pip install sentencepiece"):
        base_model.load_tokenizer("/models/llama2", ModelConfig())
