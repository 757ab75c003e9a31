"""Consolidate a training checkpoint from a checkout: ``python launch/consolidate.py RUN/checkpoints --out EXPORT``.

A thin wrapper over :mod:`comlora_ds.cli.consolidate` (installed as the console script ``comlora-consolidate``); ``--help``
lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comlora_ds.cli.consolidate import main, parse_args, run  # noqa: E402

__all__ = ["main", "parse_args", "run"]   # tests call main() and parse_args() of this file

if __name__ == "__main__":
    run()
