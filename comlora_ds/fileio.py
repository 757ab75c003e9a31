"""Small files: writing one so that readers see the old or the new content, never a part; reading a config or JSON
file back with one line naming what is wrong with it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a hidden temporary sibling, then rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_config_text(path: str | Path, what: str, error: type[Exception]) -> str:
    """The text of the config file ``path``; ``error`` names a missing, non-regular, unreadable or empty file (an
    empty file is never read as "all defaults": a truncated or wrongly named file must not start a default run)."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise error(f"{what} {path} is {kind}; name a config file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{what} {path} cannot be read: {err}") from None
    if not text.strip():
        raise error(f"{what} {path} is empty; give the settings, or leave the option out for the default")
    return text


def read_json(path: str | Path, error: type[Exception], expect: type = dict) -> Any:
    """A JSON file we wrote (a trainer state, a manifest, a report), read back: a missing, unreadable, truncated or
    malformed file, or one whose top level is not ``expect``, raises ``error`` naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path} cannot be read: {err}") from None
    except (ValueError, RecursionError) as err:
        raise error(f"{path} is damaged (not valid JSON: {str(err).splitlines()[0] if str(err) else 'too deeply nested'})"
                    f"; it was truncated or changed after it was written") from None
    if not isinstance(value, expect):
        raise error(f"{path} is damaged: its top level is a {type(value).__name__}, not a {expect.__name__}")
    return value
