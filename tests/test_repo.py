"""The repository keeps its promises: CI runs README's test command, docs match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from comlora_ds.config import load_config, markdown_reference

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_configuration_doc_lists_every_field_as_the_code_defines_it():
    assert markdown_reference() in (REPO / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize("path", sorted((REPO / "launch" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_are_valid(path):
    load_config(path)
