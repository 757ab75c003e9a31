"""Offline consolidation: ZeRO checkpoint -> fp32 tensors -> winner -> PEFT adapter + streamed merge + report.

Runs on a CPU with no launcher and no GPU (``launch/consolidate.py`` is its CLI). Read :func:`consolidate` top
to bottom; the pieces live beside it in ``comlora_ds/export/``:

1. ``recover``: find the checkpoint, recover every trainable tensor in fp32 (DeepSpeed's zero_to_fp32) and check
   each against the shapes the run config + base model imply (refusing empty/partial ZeRO-3 tensors).
2. ``scoring``: rebuild the trained model and score the stored validation split: accumulated selector score
   per component (the winner, docs/method.md "Winner"), per-component validation LM loss, per-sample argmax counts,
   and with K > 1 the soup's validation loss (one more pass); the winner rule (``WINNER_RULES``) picks what is
   exported: the selector's winner, the lowest-validation-loss component, or the soup of all K.
3. ``factors``: component k of each layer as LoRA factors (A', B', scaling), from its adapter layer's ``factors_of``.
4. ``peft_adapter``: the winner (and optionally every component) as a standard PEFT LoRA adapter.
5. ``merge``: the winner merged into the base, shard by shard, tensor by tensor, in fp32, cast to the base dtype.
6. ``report``: report.json, report.md, plots.
``outdir`` makes it all-or-nothing: built beside OUT, renamed into place at the end.
"""

from __future__ import annotations

import gc
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ..checkpointing.manifest import base_model_fingerprint
from ..checkpointing.run_layout import TOKENIZER, VALIDATION_ROWS
from ..comlora.divergence import update_divergence
from ..comlora.layer import SOUP
from ..comlora.validation import ValidationScores
from ..data.templates import write_template_file
from ..models.base_model import choose_placement
from .errors import ConsolidationError
from .factors import ComponentExporter
from .merge import stream_merge
from .outdir import check_output, fingerprint, publish, refuse_training_output, staging
from .peft_adapter import copy_tokenizer, write_peft_adapter
from .recover import check_tensors, expected_shapes, locate_checkpoint, recover_tensors
from .report import read_training_metrics, write_plots, write_report
from .scoring import build_live_model, load_validation_rows, score_checkpoint, score_soup

__all__ = ["ConsolidationError", "consolidate", "choose_winner", "recover_checked", "resolve_base", "WINNER_RULES"]

WINNER_RULES = ("selector", "val_loss", "soup")
"""``selector``: the paper's eq. 12 (argmax of the accumulated selector scores; the lowest validation loss without a
selector); ``val_loss``: the lowest-validation-loss component; ``soup``: the uniform average of the K updates."""


def resolve_base(base: str | None, ref) -> tuple[str, Path]:
    """(name recorded in adapter_config.json, local folder with config + safetensors). Default: the run's
    ``model.name_or_path`` (built-in names resolve to their converted folder; hub ids to the local HF cache)."""
    from ..models.base_model import resolve_model_path

    if base is None:
        try:
            base = resolve_model_path(ref.cfg.model)
        except (FileNotFoundError, ImportError) as err:
            raise ConsolidationError(f"base model of the run ({ref.cfg.model.name_or_path!r}): {err}; pass --base "
                                     f"PATH if it moved") from None
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConsolidationError(f"base model {path} has no config.json")
        return str(path.resolve()), path.resolve()
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(base, allow_patterns=["*.json", "*.safetensors"])
    except Exception as err:
        raise ConsolidationError(f"base model {base!r} is neither a folder nor an available hub model: {err}") from None
    return base, Path(local)


def recover_checked(ref, base: str | None = None, log: Callable[[str], None] = lambda msg: None
                    ) -> tuple[str, Path, dict[str, torch.Tensor]]:
    """(base name, base folder, every trainable tensor in fp32), the shapes checked against the base model
    before DeepSpeed reads the shards and again after."""
    cfg = ref.cfg
    base_name, base_dir = resolve_base(base, ref)
    from transformers import AutoConfig

    base_config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=cfg.model.trust_remote_code)
    log(f"checkpoint {ref.step_dir} (ZeRO stage {ref.zero_stage}, {ref.world_size} rank(s)); base {base_dir}")
    expected = expected_shapes(cfg, base_config)
    check_tensors(ref.recorded_shapes, expected, cfg, base_name)
    check_base_is_the_trained_one(ref, base_dir)          # same shapes: are they the same weights?
    tensors = recover_tensors(ref)
    check_tensors(tensors, expected, cfg, base_name)
    log(f"recovered {len(tensors)} tensors ({sum(t.numel() for t in tensors.values())} elements), all full-shape")
    return base_name, base_dir, tensors


def check_base_is_the_trained_one(ref, base_dir: Path) -> None:
    """Same shapes are not enough: the base's weight files must be the ones the adapters were trained on (the
    checkpoint's manifest has their sha256), else the merged model is silently wrong."""
    trained = (ref.manifest or {}).get("base_model")
    if not trained or "name" in trained:
        return
    found = base_model_fingerprint(str(base_dir))
    if found != trained:
        differ = sorted(name for name in set(trained) | set(found) if trained.get(name) != found.get(name))
        raise ConsolidationError(f"base model {base_dir} is not the one {ref.step_dir} was trained on: "
                                 f"{', '.join(differ)} differ(s) from the training run's (sha256 in manifest.json); "
                                 f"pass the original base with --base")


def check_winner_rule(rule: str, winner: int | None, ref, score: bool) -> None:
    """Refuses, before any tensor is read or anything written, a rule this checkpoint cannot serve."""
    k_total = ref.cfg.adapter.num_components
    if rule not in WINNER_RULES:
        raise ConsolidationError(f"--winner-rule {rule!r} is not one of {', '.join(WINNER_RULES)}")
    if winner is not None and rule != "selector":
        raise ConsolidationError(f"--winner {winner} and --winner-rule {rule} both choose what is exported: pass one")
    if rule == "soup" and k_total == 1:
        raise ConsolidationError(f"--winner-rule soup averages the K components, but {ref.step_dir} has K = 1: "
                                 f"use --winner-rule selector")
    if winner is None and rule != "soup" and k_total > 1:
        if not score:
            raise ConsolidationError(f"--winner-rule {rule} with K = {k_total} needs the validation split scored: "
                                     f"drop --skip-validation, or pass --winner k or --winner-rule soup")
        if not (ref.step_dir / VALIDATION_ROWS).is_file():
            raise ConsolidationError(f"--winner-rule {rule} needs {ref.step_dir / VALIDATION_ROWS} (the validation "
                                     f"split the run was trained with), which is missing: pass --winner k or "
                                     f"--winner-rule soup")


def choose_winner(requested: int | None, scores: ValidationScores | None, num_components: int,
                  rule: str = "selector") -> tuple[int | str, str]:
    if requested is not None:
        return requested, "user (--winner)"
    if rule == "soup":
        return SOUP, f"soup (uniform average of the {num_components} components' updates)"
    if num_components == 1:
        return 0, "single component"
    if scores is not None:
        if rule == "val_loss":
            return scores.lowest_loss_component, "validation_loss"
        return scores.winner, "selector" if scores.sim_sum is not None else "validation_loss"
    raise ConsolidationError(f"K = {num_components} and no validation split was scored (the checkpoint has no "
                             f"validation_rows.jsonl, or scoring was skipped): pass --winner k")


def rule_losses(scores: ValidationScores, soup_loss: float | None) -> dict[str, float | None]:
    """The validation loss of what each winner rule exports, side by side (``None``: the rule does not apply)."""
    return {"selector": float(scores.mean_loss[scores.winner]),
            "val_loss": float(scores.mean_loss[scores.lowest_loss_component]), "soup": soup_loss}


def consolidate(checkpoint: str | Path, out: str | Path, *, pointer: str = "latest", winner: int | None = None,
                winner_rule: str = "selector", base: str | None = None, all_components: bool = False,
                adapter: bool = True, merged: bool = True, score: bool = True, overwrite: bool = False,
                batch_size: int | None = None, device: str | None = None, score_dtype: str = "auto",
                log: Callable[[str], None] = lambda msg: None) -> dict:
    """Consolidates ``checkpoint`` (a run or checkpoints folder: the checkpoint its ``pointer``, latest or best,
    names; or one step folder) into ``out``; returns the report (also written as report.json).

    Raises :class:`ConsolidationError` (with nothing written) for a missing/partial checkpoint, one that does
    not match the base model, or an ``out`` that holds a different model (unless ``overwrite``)."""
    clock = _Clock()
    placement = choose_placement(device, score_dtype) if score else None       # a bad --device fails here, at once
    # 1. the checkpoint, its base model, every trainable tensor in fp32, checked twice against the model
    ref = locate_checkpoint(checkpoint, pointer)
    cfg, k_total = ref.cfg, ref.cfg.adapter.num_components
    if winner is not None and not 0 <= winner < k_total:
        raise ConsolidationError(f"--winner {winner}: the checkpoint has K = {k_total} components (0 .. {k_total - 1})")
    check_winner_rule(winner_rule, winner, ref, score)
    out = Path(out).expanduser().resolve()
    refuse_training_output(out)
    base_name, base_dir, tensors = recover_checked(ref, base, log)
    clock.lap("recover")

    # 2. may we write OUT? (refuse before the expensive part)
    options = {"winner": winner, "winner_rule": winner_rule, "all_components": all_components, "adapter": adapter,
               "merged": merged, "score": score}
    fp = fingerprint(tensors, ref.step_dir, base_name, options)
    check_output(out, fp, overwrite, protected=[ref.step_dir, base_dir])

    # 3. score the validation split, choose the winner
    scores, soup_loss = None, None
    rows = load_validation_rows(ref.step_dir) if score else None
    if rows:
        model = build_live_model(cfg, str(base_dir), tensors, placement)
        log("scoring on {device}, {dtype}, {attn_implementation} attention".format(**_placement_summary(placement)))
        scoring = (rows, ref.step_dir / TOKENIZER, k_total, batch_size or cfg.train.micro_batch_size, placement.device)
        scores = score_checkpoint(model, *scoring)
        log(f"validation ({scores.num_samples} rows): mean loss "
            f"{[round(x, 4) for x in scores.mean_loss.tolist()]}, winner {scores.winner}")
        if k_total > 1:
            soup_loss = score_soup(model, *scoring)
            log(f"validation loss of the soup of the {k_total} components: {soup_loss:.4f}")
        del model
        gc.collect()
        clock.lap("score")
    chosen, chosen_by = choose_winner(winner, scores, k_total, winner_rule)

    # 4. write everything beside OUT, then publish it in one rename
    exporter = ComponentExporter(tensors, cfg.adapter)
    if scores is not None:
        scores.update_divergence = update_divergence(exporter.components())
    tokenizer_dir = ref.step_dir / TOKENIZER
    outputs, written = {}, {}
    with staging(out) as tmp:
        if adapter:
            written["adapter"] = write_peft_adapter(exporter, chosen, cfg.adapter, base_name, tmp / "adapter",
                                                    tokenizer_dir)
            outputs["adapter"] = "adapter"
        if all_components:
            outputs["components"] = [f"components/component_{k}" for k in range(k_total)]
            for k, folder in enumerate(outputs["components"]):
                write_peft_adapter(exporter, k, cfg.adapter, base_name, tmp / folder, tokenizer_dir)
        clock.lap("adapters")
        if merged:
            shapes = {f"{m}.weight": (t["lora_B"].shape[1], t["lora_A"].shape[2]) for m, t in exporter.layers.items()}
            written["merge"] = stream_merge(base_dir, tmp / "merged", exporter.weight_deltas(chosen), shapes)
            copy_tokenizer(tokenizer_dir, tmp / "merged")
            outputs["merged"] = "merged"
            what = "the soup" if chosen == SOUP else f"component {chosen}"
            log(f"merged {what} into {len(written['merge']['shards'])} shard(s)")
            clock.lap("merge")
        for folder in [outputs.get("adapter"), outputs.get("merged"), *outputs.get("components", [])]:
            if folder:
                write_template_file(tmp / folder, cfg.data)
        curves = read_training_metrics(ref.run_dir)
        validation = scores.as_dict() if scores is not None else None
        if validation is not None and k_total > 1:
            validation["rule_loss"] = rule_losses(scores, soup_loss)
        report = {**_summary(ref, base_name, base_dir, tensors, exporter), **written,
                  "winner": chosen, "winner_by": chosen_by, "winner_rule": winner_rule, "validation": validation,
                  "scoring": _placement_summary(placement) if scores is not None else None,
                  "selector_winner_is_lowest_loss": validation and validation["selector_winner_is_lowest_loss"],
                  "training": _training_summary(curves), "outputs": outputs, "fingerprint": fp}
        report["plots"] = write_plots(tmp, curves, validation, chosen)
        clock.lap("report")
        report["seconds"] = clock.seconds
        write_report(tmp, report)
        publish(tmp, out)
    log(f"wrote {out}")
    return report


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self._last = round(now - self._last, 3), now


def _summary(ref, base_name: str, base_dir: Path, tensors: dict, exporter: ComponentExporter) -> dict:
    a = ref.cfg.adapter
    return {"checkpoint": ref.describe(), "base_model": {"path": base_name, "folder": str(base_dir)},
            "method": a.method, "num_components": a.num_components, "rank": a.rank, "alpha": a.alpha,
            "use_rslora": a.use_rslora, "target_modules": list(a.target_modules),
            "selector": any(name.startswith("selector.") for name in tensors),
            "tensors": {"count": len(tensors), "elements": sum(t.numel() for t in tensors.values()),
                        "adapted_layers": len(exporter.layers)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": _versions(),
            "machine": platform.platform()}


def _placement_summary(placement) -> dict:
    return {"device": placement.device, "dtype": str(placement.dtype).removeprefix("torch."),
            "attn_implementation": placement.attn_implementation}


def _training_summary(curves: dict | None) -> dict | None:
    if curves is None:
        return None
    return {"steps": len(curves["steps"]), "last_step": curves["steps"][-1],
            "final_component_loss": [losses[-1] for losses in curves["component_loss"]],
            "winner_windows": curves["winner_windows"], "selector_windows": curves["selector_windows"],
            "validations": curves["validations"]}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("comlora_ds", "torch", "transformers", "peft", "deepspeed", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
