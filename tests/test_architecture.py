"""The package's shape: no import cycles, and a new adapter method is one layer class plus one method class that
training's forward and merge, the streamed merge and the PEFT adapter all pick up (a toy method, end to end)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from comlora_ds.comlora.inject import adapter_layers
from comlora_ds.comlora.layer import ComLoRALinear, LoRAFactors
from comlora_ds.config import load_config
from comlora_ds.export.factors import ComponentExporter
from comlora_ds.export.merge import stream_merge
from comlora_ds.export.peft_adapter import write_peft_adapter
from comlora_ds.methods import AdapterMethod, method_class, register_method
from comlora_ds.methods import _METHODS as REGISTERED
from comlora_ds.comlora.model import build_model
from conftest import make_batch, tiny_llama

PACKAGE = Path(__file__).resolve().parents[1] / "comlora_ds"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its text (module level or inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                root = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                candidates = [f"{root}.{alias.name}" for alias in node.names] + [root]
            else:
                continue
            for target in candidates:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "comlora_ds.methods" in graph["comlora_ds.export.factors"]      # the walk sees function-level imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# Who may import whom, by subpackage (docs/architecture.md, "Layers"): a part imports only the parts listed for it;
# a module at the package root (errors, fileio, distributed, config, presets) is a part of its own name.
ALLOWED_IMPORTS = {
    "errors": set(), "fileio": set(), "distributed": set(),
    "config": {"errors", "fileio", "data"},            # data.olmo_eval's task lists validate data.tasks
    "presets": {"config"},
    "models": {"config", "errors", "fileio"},
    "data": {"config", "errors", "fileio", "distributed", "models", "checkpointing",
             "evaluation"},                            # the convai2 / mmlu parsers give their training rows
    "comlora": {"config", "errors", "data", "methods"},
    "methods": {"config", "errors", "comlora"},
    "checkpointing": {"config", "errors", "fileio", "models"},
    "training": {"config", "errors", "fileio", "distributed", "models", "data", "comlora", "methods",
                 "checkpointing"},
    "export": {"config", "errors", "fileio", "models", "data", "comlora", "methods", "checkpointing"},
    "evaluation": {"config", "errors", "fileio", "models", "data", "comlora", "methods", "checkpointing", "export"},
    "cli": {"config", "errors", "fileio", "presets", "models", "data", "methods", "checkpointing", "training",
            "export", "evaluation"},
}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_imports_follow_the_layers():
    """Lower layers never import the trainer, consolidation, evaluation or the CLIs; every subpackage is listed."""
    graph = import_graph()
    parts = {_part(m) for m in graph if m != "comlora_ds"}
    assert parts == set(ALLOWED_IMPORTS), parts ^ set(ALLOWED_IMPORTS)
    wrong = sorted(f"{m} imports {t}" for m, targets in graph.items() if m != "comlora_ds" for t in targets
                   if _part(t) != _part(m) and _part(t) not in ALLOWED_IMPORTS[_part(m)])
    assert not wrong, "\n".join(wrong)
    for low in ("models", "data", "comlora", "methods", "checkpointing"):
        assert not ALLOWED_IMPORTS[low] & {"training", "export", "cli"}


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# --------------------------------------------------------------------------------- a new method, one class each
class GainLinear(ComLoRALinear):
    """Toy method: component k's output is scaled per output feature by a learnable gain g_k (init 1), so
    delta_k = diag(g_k) s B_k A_k, exported as the LoRA pair (A_k, diag(g_k) B_k)."""

    def __init__(self, base: nn.Linear, num_components: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming"):
        super().__init__(base, num_components, rank, alpha, dropout, use_rslora, init)
        self.lora_gain = nn.Parameter(torch.ones(num_components, self.out_features, device=base.weight.device))

    def adapter_output(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        out = super().adapter_output(x, A, B)
        k = self.active_component
        gain = self.lora_gain if k is None else self.lora_gain[k:k + 1]
        return (out.reshape(A.shape[0], -1, self.out_features) * gain.unsqueeze(1).to(out.dtype)).reshape(out.shape)

    @staticmethod
    def factors_of(tensors, k: int, scaling: float) -> LoRAFactors:
        return LoRAFactors(tensors["lora_A"][k].float(), tensors["lora_gain"][k].float()[:, None]
                           * tensors["lora_B"][k].float(), scaling)


class GainMethod(AdapterMethod):
    name = "toy_gain"
    layer_type = GainLinear


@pytest.fixture
def toy_method():
    register_method(GainMethod)
    yield GainMethod
    REGISTERED.pop(GainMethod.name)


def test_a_toy_method_trains_merges_and_exports_through_its_layer_class(toy_method, tmp_path, one_thread):
    cfg = load_config(overrides=["adapter.method=toy_gain", "adapter.num_components=2", "adapter.rank=4",
                                 "adapter.dropout=0.0"])
    assert method_class("toy_gain") is GainMethod
    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    model = build_model(cfg, copy.deepcopy(base))
    layers = adapter_layers(model.llm)
    assert layers and all(type(layer) is GainLinear for layer in layers.values())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
            layer.lora_gain.copy_(1 + torch.randn(layer.lora_gain.shape, generator=g))
    batch = make_batch()
    k = 1
    for layer in layers.values():
        layer.active_component = k
    unmerged = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    unmerged.float().pow(2).mean().backward()                 # the new parameter trains
    assert all(layer.lora_gain.grad is not None and layer.lora_gain.grad.abs().sum() > 0 for layer in layers.values())

    tensors = {f"llm.{name}.{t}": getattr(layer, t).detach().clone()
               for name, layer in layers.items() for t in ("lora_A", "lora_B", "lora_gain")}
    exporter = ComponentExporter(tensors, cfg.adapter)
    for name, layer in layers.items():
        want = layer.lora_gain[k].detach()[:, None] * layer.scaling * (layer.lora_B[k] @ layer.lora_A[k]).detach()
        torch.testing.assert_close(layer.delta_weight(k), want, rtol=1e-5, atol=1e-7)   # training's merge
        torch.testing.assert_close(exporter.factors(name, k).delta(), want, rtol=1e-5, atol=1e-7)
    write_peft_adapter(exporter, k, cfg.adapter, str(tmp_path / "base"), tmp_path / "adapter")
    shapes = {f"{m}.weight": (t["lora_B"].shape[1], t["lora_A"].shape[2]) for m, t in exporter.layers.items()}
    stream_merge(tmp_path / "base", tmp_path / "merged", exporter.weight_deltas(k), shapes)

    with torch.no_grad():
        for layer in layers.values():
            layer.merge(k)
        merged_in_memory = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(**batch).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter").eval()(**batch).logits
    for logits in (merged_in_memory, merged, peft):
        torch.testing.assert_close(logits, unmerged.detach(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ one error style
def test_every_user_error_is_an_input_error_and_keeps_its_builtin_base():
    from comlora_ds.checkpointing import checkpoint, manifest, run_layout
    from comlora_ds import errors
    from comlora_ds.config import ConfigError
    from comlora_ds.data.formats import DataError
    from comlora_ds.training.ds_config import DeepSpeedConfigError
    from comlora_ds.evaluation.load import TrainingCheckpointError
    from comlora_ds.evaluation.report import ResultsConflict
    from comlora_ds.evaluation.wordnet import MetricUnavailable
    from comlora_ds.export.errors import ConsolidationError
    from comlora_ds.models.base_model import ModelError

    kept = {ConfigError: ValueError, DataError: ValueError, DeepSpeedConfigError: ValueError,
            run_layout.CheckpointError: ValueError, checkpoint.OutputDirError: OSError,
            checkpoint.UnsafeCheckpointError: ValueError, checkpoint.ResumeError: ValueError,
            manifest.ManifestError: ValueError, ModelError: ValueError, ConsolidationError: RuntimeError,
            ResultsConflict: RuntimeError, MetricUnavailable: RuntimeError, TrainingCheckpointError: ValueError,
            errors.EvaluationError: ValueError, errors.MissingPackage: ImportError}
    for cls, builtin in kept.items():
        assert issubclass(cls, errors.InputError) and issubclass(cls, builtin), cls


def test_run_cli_prints_one_line_and_exits_2_and_lets_bugs_through(monkeypatch, capsys):
    from comlora_ds.errors import InputError, run_cli

    def refuse():
        raise InputError("data.train_files[0] = 'x.json': no such file")

    monkeypatch.delenv("COMLORA_DEBUG", raising=False)
    assert run_cli(refuse) == 2
    assert capsys.readouterr().err == "error: data.train_files[0] = 'x.json': no such file\n"
    assert run_cli(lambda: 0) == 0
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 // 0)
    monkeypatch.setenv("COMLORA_DEBUG", "1")
    with pytest.raises(InputError):
        run_cli(refuse)
