"""Each install builds DeepSpeed's JIT ops in its own folder, and a killed build's lock is refused by name instead of
hanging every later multi-rank run (comlora_ds/training/op_builds.py)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from comlora_ds.training import op_builds
from comlora_ds.errors import InputError


def test_a_virtualenv_gets_its_own_extensions_folder_unless_the_user_chose_one(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    (tmp_path / "venv").mkdir()
    op_builds.use_own_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv" / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/mine")
    op_builds.use_own_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/mine"


def test_outside_a_virtualenv_the_default_folder_stays(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    op_builds.use_own_extensions_dir()
    assert "TORCH_EXTENSIONS_DIR" not in os.environ


def test_a_stale_build_lock_is_named_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    op_builds.check_build_locks()          # a build in progress: left alone
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(InputError, match=f"{lock} is a stale DeepSpeed op-build lock \\(60 min old.*safe to delete: "
                                         f"rm {lock}"):
        op_builds.check_build_locks()


def test_the_default_folder_is_searched_for_every_python_and_device(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.get_default_build_root", lambda: str(tmp_path))
    lock = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    assert op_builds.build_locks() == [lock]
