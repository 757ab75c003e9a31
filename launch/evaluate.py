"""Evaluate a model from a checkout: ``python launch/evaluate.py MODEL_OR_ADAPTER --task commonsense ...``.

A thin wrapper over :mod:`comlora_ds.cli.evaluate` (installed as the console script ``comlora-evaluate``); ``--help``
lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comlora_ds.cli.evaluate import main, parse_args, run  # noqa: E402

__all__ = ["main", "parse_args", "run"]   # tests call main() and parse_args() of this file

if __name__ == "__main__":
    run()
