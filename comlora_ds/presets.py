"""The DeepSpeed and run configs that ship inside the package, and how a command-line value names one.

``comlora_ds/ds_configs/*.json`` and ``comlora_ds/run_configs/*.yaml`` are package data, so an installed
``comlora-train --deepspeed zero2 --config demo`` finds them; the repository's ``ds_configs/`` and
``launch/configs/`` are links to these folders, so ``--deepspeed ds_configs/zero2.json`` keeps working in a checkout.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError

PACKAGE = Path(__file__).resolve().parent
DS_CONFIGS = PACKAGE / "ds_configs"
RUN_CONFIGS = PACKAGE / "run_configs"


def shipped(folder: Path, suffix: str) -> dict[str, Path]:
    """The shipped files of ``folder`` by name without ``suffix`` (``zero2`` -> .../ds_configs/zero2.json)."""
    return {path.name.removesuffix(suffix): path for path in sorted(folder.glob(f"*{suffix}"))}


def resolve(value: str | Path, folder: Path, suffix: str, option: str) -> Path:
    """An existing path as given; else a shipped file named ``value`` (with or without ``suffix``)."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    names = shipped(folder, suffix)
    name = str(value).removesuffix(suffix)
    if name in names:
        return names[name]
    raise ConfigError(f"{option} {value}: does not exist, and is not the name of a shipped config "
                      f"({', '.join(names)})")


def ds_config_path(value: str | Path) -> Path:
    return resolve(value, DS_CONFIGS, ".json", "--deepspeed")


def run_config_path(value: str | Path) -> Path:
    return resolve(value, RUN_CONFIGS, ".yaml", "--config")
