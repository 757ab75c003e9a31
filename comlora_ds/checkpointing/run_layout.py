"""The run folder, in one place: what training writes where, and how a path a user gives leads to a checkpoint.

    <output_dir>/
        metrics.jsonl                one line per logged step (training) and per validation, read by consolidation's
                                     report
        tensorboard/                 TensorBoard event files of the same records (logging.report_to)
        wandb/, wandb_run_id         wandb's files (logging.report_to) and the id a resumed run continues
        validation.json              the final validation scores and winner
        checkpoints/
            latest                   the tag of the newest *complete* checkpoint (written last, atomically)
            best                     the tag of the best validated one (train.save_best; never rotated away)
            step_00000200/           DeepSpeed's files plus run_config.yaml, trainer_state.json, ds_config.json,
                                     data_report.json, validation_rows.jsonl, tokenizer/, manifest.json
            tmp-step_00000250/       a checkpoint being written (never read)

Training (``engine``, ``checkpoint``, ``tracking``), resume, consolidation (``export``) and evaluation
(``evaluation.load``) all use these names and :func:`find_checkpoint`, which refuses a ``latest`` that does not name
an existing step folder beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
POINTERS = (LATEST, BEST)
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
WANDB_RUN_ID = "wandb_run_id"
VALIDATION = "validation.json"
RUN_CONFIG = "run_config.yaml"
TRAINER_STATE = "trainer_state.json"
DS_CONFIG = "ds_config.json"
DATA_REPORT = "data_report.json"
VALIDATION_ROWS = "validation_rows.jsonl"
VALIDATION_SCORES = "validation_scores.jsonl"   # beside validation.json: each row's loss and score per component
TOKENIZER = "tokenizer"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = "tmp-"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointError(InputError, ValueError):
    """A path that does not lead to a usable checkpoint: no such folder, an unpublished one, or a ``latest`` that
    names a missing folder or one outside its checkpoints folder."""


# the trainer state's fields that resume and resharding read, and their types
TRAINER_STATE_FIELDS = {"global_step": int, "total_steps": int, "world_size": int, "epoch": int,
                        "batches_in_epoch": int}


def read_trainer_state(folder: str | Path) -> dict:
    """A checkpoint's ``trainer_state.json``, its structure checked: a damaged one is refused naming the file and the
    field, before anything is resumed from it."""
    from ..fileio import read_json

    path = Path(folder) / TRAINER_STATE
    state = read_json(path, CheckpointError)
    for name, kind in TRAINER_STATE_FIELDS.items():
        value = state.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{path} is damaged: field {name!r} = {value!r} (expected a non-negative "
                                  f"{kind.__name__})")
    return state


def read_latest(save_dir: str | Path, pointer: str = LATEST) -> str | None:
    """The tag ``latest`` (or ``best``) names; None when there is no such file (no checkpoint was completed, or none
    was validated as best). One that names anything but an existing ``step_NNNNNNNN`` folder beside it
    (``../elsewhere``, a deleted step) is refused: resuming or consolidating would otherwise start over or read
    another run."""
    latest = Path(save_dir) / pointer
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not TAG_PATTERN.match(tag):
        raise CheckpointError(f"{latest} names {tag!r}, not a step_NNNNNNNN checkpoint folder beside it; nothing was "
                              f"changed")
    if not (Path(save_dir) / tag).is_dir():
        raise CheckpointError(f"{latest} names {tag}, which does not exist in {save_dir} (deleted or moved?): restore "
                              f"it or name an existing step folder; nothing was changed")
    return tag


def find_checkpoint(path: str | Path, pointer: str = LATEST) -> Path:
    """The checkpoint folder a user means by ``path``: a ``step_NNNNNNNN`` folder, a checkpoints folder (its
    ``latest``, or its ``best`` with ``pointer="best"``) or a run folder (its ``checkpoints/latest`` or ``best``).
    The one place that reads a path this way (training's resume, consolidation, evaluation)."""
    if pointer not in POINTERS:
        raise CheckpointError(f"--checkpoint {pointer}: must be one of {', '.join(POINTERS)}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: no such file or folder")
    if path.name.startswith(TMP_PREFIX):
        raise CheckpointError(f"{path} is an unpublished checkpoint (DeepSpeed was still writing it when the run "
                              f"stopped); use the checkpoints folder, whose 'latest' names the last complete one")
    if path.is_dir() and TAG_PATTERN.match(path.name):
        if pointer == BEST:
            raise CheckpointError(f"--checkpoint best: {path} is one step folder; name the run folder or its "
                                  f"checkpoints folder, whose 'best' file names the best checkpoint")
        return path
    for save_dir in (path, path / CHECKPOINTS):
        if read_latest(save_dir) is None:
            continue
        tag = read_latest(save_dir, pointer)
        if tag is None:
            raise CheckpointError(f"--checkpoint best: {save_dir} has no best checkpoint (no 'best' file): the run "
                                  f"was trained without train.save_best, or stopped before its first validation")
        return save_dir / tag
    raise CheckpointError(f"{path} is not a checkpoint: expected a checkpoints folder with a 'latest' file, a run "
                          f"folder holding one, or a step_NNNNNNNN folder")


def looks_like_training_output(path: str | Path) -> bool:
    """A run folder, a checkpoints folder or a step folder (what evaluation refuses to load as a model)."""
    path = Path(path)
    return (path / LATEST).is_file() or (path / CHECKPOINTS / LATEST).is_file() or bool(TAG_PATTERN.match(path.name))
