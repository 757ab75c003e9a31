"""The installed package: console scripts run from a fresh venv outside the source tree, the shipped configs are
package data, and every declared dependency is used.

The fresh venv gets the package itself by a real (non-editable) ``pip install`` of a copy of the package sources;
its dependencies come from this test's environment through a ``.pth`` line (no registry is asked), which adds
that environment's site-packages as a plain path, so this checkout's own editable install there is not active. The
commands run with no PYTHONPATH, in an empty folder: they can only import the installed copy.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from assets import commonsense_dir
from helpers import REPO, base_overrides, free_port, subprocess_env

SCRIPTS = ("comlora-train", "comlora-consolidate", "comlora-evaluate")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    shutil.copytree(REPO / "comlora_ds", source / "comlora_ds", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    prefix = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    python = prefix / "bin" / "python"
    venv_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    Path(venv_site, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-build-isolation", "--no-index", "-q", str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return prefix


def _run(venv: Path, cwd: Path, *cmd, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {name: value for name, value in subprocess_env().items() if name != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["WANDB_MODE"] = "disabled"
    return subprocess.run([str(part) for part in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_installed_scripts_train_consolidate_and_evaluate_outside_the_source_tree(venv, tmp_path):
    """``deepspeed $(which comlora-train) --deepspeed zero2`` (a shipped name; the default --config is the shipped
    demo preset, the overrides make it the tiny run), then comlora-consolidate and comlora-evaluate."""
    where = _run(venv, tmp_path, venv / "bin" / "python", "-c", "import comlora_ds; print(comlora_ds.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    assert all((venv / "bin" / script).is_file() for script in SCRIPTS)

    run = tmp_path / "run"
    train = _run(venv, tmp_path, venv / "bin" / "python", "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                 "--master_port", free_port(), venv / "bin" / "comlora-train", "--deepspeed", "zero2",
                 *base_overrides(run, **{"train.max_steps": 2, "train.save_steps": 0}))
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    saved = json.loads((run / "checkpoints" / "step_00000002" / "ds_config.json").read_text())
    assert saved["zero_optimization"]["stage"] == 2

    export = tmp_path / "export"
    consolidate = _run(venv, tmp_path, "comlora-consolidate", run, "--out", export, "--no-merged")
    assert consolidate.returncode == 0, consolidate.stdout[-3000:] + consolidate.stderr[-3000:]
    assert (export / "adapter" / "adapter_config.json").is_file()

    evaluate = _run(venv, tmp_path, "comlora-evaluate", export / "adapter", "--task", "commonsense", "--data",
                    commonsense_dir() / "ARC-Challenge.json", "--limit", 2, "--max-new-tokens", 4, "--out",
                    tmp_path / "eval", "--no-progress")
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["setting"]["task"] == "commonsense"


def test_installed_train_refuses_an_unknown_shipped_name(venv, tmp_path):
    done = _run(venv, tmp_path, "comlora-train", "--deepspeed", "zero9")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--deepspeed zero9: does not exist, and is not the name of a shipped config (zero2, zero3, " \
           "zero3_offload)" in done.stderr


@pytest.mark.slow
def test_installed_train_under_torchrun(venv, tmp_path):
    """torchrun runs the console script itself (--no-python) on 2 ranks."""
    run = tmp_path / "run"
    done = _run(venv, tmp_path, venv / "bin" / "python", "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}", "--no-python", "comlora-train", "--deepspeed", "zero3",
                *base_overrides(run, **{"train.max_steps": 2, "train.save_steps": 0, "train.micro_batch_size": 2}))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((run / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())["world_size"] == 2


def test_the_repository_links_are_the_package_data():
    """``deepspeed launch/train.py --deepspeed ds_configs/zero2.json`` reads the very files the package ships."""
    assert (REPO / "ds_configs").resolve() == REPO / "comlora_ds" / "ds_configs"
    assert (REPO / "launch" / "configs").resolve() == REPO / "comlora_ds" / "run_configs"
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert package_data == {"comlora_ds": ["ds_configs/*.json", "run_configs/*.yaml", "evaluation/harness_tasks/*.yaml"]}


def test_a_shipped_name_or_a_path(tmp_path, monkeypatch):
    from comlora_ds.presets import DS_CONFIGS, RUN_CONFIGS, ds_config_path, run_config_path

    assert ds_config_path("zero3") == ds_config_path("zero3.json") == DS_CONFIGS / "zero3.json"
    assert run_config_path("demo") == RUN_CONFIGS / "demo.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero3").write_text("{}")          # an existing path wins over a shipped name
    assert ds_config_path("zero3") == Path("zero3")
    assert ds_config_path(tmp_path / "zero3") == tmp_path / "zero3"


# Declared dependencies that no file imports, each used through the library named here.
USED_THROUGH = {"gguf": "transformers (reads the built-in model's GGUF file)",
                "tensorboard": "torch.utils.tensorboard (comlora_ds.training.tracking)",
                "flash-attn": "transformers (model.attn_implementation=flash_attention_2)",
                "sentencepiece": "transformers (a LLaMA-2 folder with only tokenizer.model)"}


def _imported_distributions(folders: tuple[str, ...]) -> set[str]:
    modules = set()
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    owners = md.packages_distributions()
    return {_normalise(dist) for module in modules for dist in owners.get(module, ())}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_declared_dependency_is_imported_or_used_through_a_named_library():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    groups = {"dependencies": (project["dependencies"], ("comlora_ds",)),
              "eval": (extras["eval"], ("comlora_ds",)), "test": (extras["test"], ("tests",)),
              "flash-attn": (extras["flash-attn"], ("comlora_ds",)), "harness": (extras["harness"], ("comlora_ds",))}
    assert set(extras) == {"eval", "test", "flash-attn", "harness", "dev"}
    for group, (requirements, folders) in groups.items():
        used = _imported_distributions(folders)
        for requirement in requirements:
            name = _normalise(re.split(r"[<>=!~\[ ;]", requirement)[0])
            assert name in used or name in USED_THROUGH, f"{group}: {requirement} is never imported"
