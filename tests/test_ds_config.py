"""Filling DeepSpeed's "auto" values from the run config, and refusing contradictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comlora_ds.config import load_config
from comlora_ds.training.ds_config import DeepSpeedConfigError, fill_ds_config, load_ds_config

REPO = Path(__file__).resolve().parents[1]


def _fill(ds, *overrides, world=2):
    cfg = load_config(overrides=["train.micro_batch_size=4", "train.gradient_accumulation_steps=2", *overrides])
    return fill_ds_config(ds, cfg, world_size=world, hidden_size=64, total_steps=100, warmup_steps=3)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_shipped_configs_fill_completely(name):
    ds = _fill(REPO / "ds_configs" / f"{name}.json")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 0.0          # K = 2: clip_scope auto = per_group, the trainer clips
    assert _fill(REPO / "ds_configs" / f"{name}.json", "adapter.num_components=1")["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is False          # CPU: bf16 auto = off
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    if name == "zero3_offload":
        assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert "auto" not in json.dumps(ds)


def test_sequential_mode_counts_each_pass_as_a_micro_step():
    ds = _fill({"train_batch_size": "auto", "gradient_accumulation_steps": "auto"},
               "comlora.execution=sequential", "adapter.num_components=3")
    assert ds["gradient_accumulation_steps"] == 6 and ds["train_batch_size"] == 4 * 6 * 2


def test_explicit_contradiction_names_both_sides():
    with pytest.raises(DeepSpeedConfigError, match=r"train_micro_batch_size_per_gpu = 8 contradicts the run "
                                                   r"config train.micro_batch_size = 4"):
        _fill({"train_micro_batch_size_per_gpu": 8})
    with pytest.raises(DeepSpeedConfigError, match="train_batch_size = 32 contradicts"):
        _fill({"train_batch_size": 32})


def test_per_group_clipping_turns_deepspeed_clipping_off():
    assert _fill({"gradient_clipping": "auto"}, "train.clip_scope=per_group")["gradient_clipping"] == 0.0
    assert _fill({}, "train.clip_scope=per_group")["gradient_clipping"] == 0.0
    with pytest.raises(DeepSpeedConfigError, match=r"gradient_clipping = 1.0 contradicts the run config "
                                                   r"train.clip_scope = per_group \(the trainer clips each "
                                                   r"group itself; .*\), which needs DeepSpeed's "
                                                   r"gradient_clipping = 0.0"):
        _fill({"gradient_clipping": 1.0}, "train.clip_scope=per_group")
    with pytest.raises(DeepSpeedConfigError, match=r"train.clip_scope = auto \(per_group for K > 1\)"):
        _fill({"gradient_clipping": 1.0})
    assert _fill({"gradient_clipping": 1.0}, "train.clip_scope=global")["gradient_clipping"] == 1.0
    assert _fill({"gradient_clipping": 1.0}, "adapter.num_components=1")["gradient_clipping"] == 1.0


def test_explicit_bf16_and_model_sized_values_are_kept():
    ds = _fill({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert _fill({"bf16": {"enabled": True}}, "train.bf16=false")["bf16"]["enabled"] is False


def test_unfillable_auto_and_fp16_are_refused(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match=r"\['optimizer.params.foo'\] are \"auto\""):
        _fill({"optimizer": {"type": "AdamW", "params": {"foo": "auto"}}})
    with pytest.raises(DeepSpeedConfigError, match="fp16.enabled = true is not supported"):
        _fill({"fp16": {"enabled": True}})
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 4,,}')
    with pytest.raises(DeepSpeedConfigError, match=r"bad.json: invalid JSON at line 1 column 24"):
        load_ds_config(bad)
    with pytest.raises(DeepSpeedConfigError, match="does not exist"):
        load_ds_config(tmp_path / "missing.json")


def test_read_as_deepspeed_reads_it_comments_allowed_duplicate_keys_refused(tmp_path):
    commented = tmp_path / "commented.json"
    commented.write_text('{\n  // ZeRO-2 for this cluster\n  "zero_optimization": {"stage": 2}\n}\n')
    assert load_ds_config(commented) == {"zero_optimization": {"stage": 2}}
    duplicated = tmp_path / "duplicated.json"
    duplicated.write_text('{"bf16": {"enabled": true}, "bf16": {"enabled": false}}')
    with pytest.raises(DeepSpeedConfigError, match=r"duplicated.json: key\(s\) 'bf16' given twice"):
        load_ds_config(duplicated)


@pytest.mark.parametrize("text,message", [
    ("", "is empty; give the settings"),
    ("\n  // a comment is not a config\n", "holds no settings"),
    ("{}", "holds no settings"),
    ("[1, 2]", "the top level must be a JSON object, not list"),
])
def test_an_empty_or_non_object_deepspeed_config_is_refused(tmp_path, text, message):
    """Found in a bad-input trial: a 0-byte DeepSpeed JSON was accepted and the run trained on the defaults."""
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(DeepSpeedConfigError, match=message):
        load_ds_config(path)


def test_dev_null_as_deepspeed_config_is_not_reported_as_missing():
    with pytest.raises(DeepSpeedConfigError, match="/dev/null is not a regular file"):
        load_ds_config("/dev/null")
