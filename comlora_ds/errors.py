"""The one base class of the errors a user can fix, and the one way the command-line tools report them.

Every such error (a config value, a data row, a DeepSpeed setting, a checkpoint, an output folder, a missing
package, an evaluation setting) derives from :class:`InputError` and names the file / row / field / value. Each also
keeps the builtin base it had (``ValueError``, ``OSError``, ``RuntimeError``, ``ImportError``), so library callers
that catch those still do. Programming errors (a shape mismatch inside the maths) stay plain exceptions with a
traceback. :func:`run_cli` turns an InputError into one ``error: ...`` line and exit code 2 in launch/train.py,
launch/consolidate.py and launch/evaluate.py; ``COMLORA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXIT_INPUT_ERROR = 2


class InputError(Exception):
    """A problem the user can fix; the message is one line that names it."""


class MissingPackage(InputError, ImportError):
    """An optional package (a built-in model, data or metric resource) is not installed; the message has the pip
    command."""


def run_cli(main: Callable[[], int]) -> int:
    """``main()``'s exit code; an InputError becomes ``error: <message>`` on stderr and exit code 2."""
    try:
        return main()
    except InputError as err:
        if os.environ.get("COMLORA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown choice, a missing argument) are one ``error: ...`` line and exit code
    2, like :func:`run_cli`'s, instead of the usage text plus the message."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)


class EvaluationError(InputError, ValueError):
    """An evaluation setting or target that cannot be used (a task, subject, prompt, model folder)."""
