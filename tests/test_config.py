"""Typed configuration: YAML + overrides, and a field-named error for every invalid value."""

from __future__ import annotations

import time

import pytest

from comlora_ds.config import ConfigError, RunConfig, load_config


def test_defaults_are_valid_and_paper_like():
    cfg = load_config()
    assert cfg.adapter.num_components == 2 and cfg.adapter.rank == 8 and cfg.is_comlora
    assert cfg.top_n == 2 and cfg.comlora.annealing == "exponential" and cfg.comlora.noise == 0.1
    assert cfg.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_yaml_then_overrides_in_all_forms(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("adapter:\n  rank: 4\n  num_components: 4\ntrain:\n  learning_rate: 1.0e-3\n")
    cfg = load_config(path, ["adapter.rank=16", "--comlora.top_n", "2", "--train.max_steps=7",
                             "adapter.target_modules=[q_proj,v_proj]"])
    assert (cfg.adapter.rank, cfg.adapter.num_components, cfg.top_n) == (16, 4, 2)
    assert cfg.train.learning_rate == 1e-3 and cfg.train.max_steps == 7
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["adapter.rank=4", "comlora.annealing=cosine"])
    cfg.save(tmp_path / "run_config.yaml")
    assert load_config(tmp_path / "run_config.yaml") == cfg


@pytest.mark.parametrize("override,message", [
    ("adapter.num_components=0", "adapter.num_components = 0: K must be >= 1"),
    ("comlora.top_n=3", "comlora.top_n = 3: must be between 1 and K = 2"),
    ("adapter.rank=0", "adapter.rank = 0: must be > 0"),
    ("adapter.alpha=0", "adapter.alpha = 0.0: must be > 0"),
    ("adapter.dropout=1.5", "adapter.dropout = 1.5: must be in [0, 1)"),
    ("adapter.target_modules=[q_proj,qkv]", "adapter.target_modules = 'qkv': unknown target module"),
    ("adapter.init=xavier", "adapter.init = 'xavier': must be one of kaiming, gaussian, orthogonal, shared"),
    ("comlora.annealing=sigmoid", "comlora.annealing = 'sigmoid': must be one of"),
    ("comlora.selector_learning_rate=0", "comlora.selector_learning_rate = 0.0: must be > 0"),
    ("comlora.noise=-0.1", "comlora.noise = -0.1: must be >= 0"),
    ("comlora.execution=parallel", "comlora.execution = 'parallel'"),
    ("train.learning_rate=0", "train.learning_rate = 0.0: must be > 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size = 0"),
    ("train.warmup_ratio=1.0", "train.warmup_ratio = 1.0"),
    ("train.bf16=maybe", "train.bf16 = 'maybe'"),
    ("data.max_length=0", "data.max_length = 0"),
    ("logging.wandb_mode=cloud", "logging.wandb_mode = 'cloud'"),
    ("model.attn_implementation=flash", "model.attn_implementation = 'flash'"),
    ("train.clip_scope=layer", "train.clip_scope = 'layer': must be one of auto, global, per_group"),
    ("comlora.loss_reduction=median", "comlora.loss_reduction = 'median': must be one of sum, mean"),
    ("comlora.lm_reduction=max", "comlora.lm_reduction = 'max': must be one of sum, mean"),
    ("train.eval_steps=-1", "train.eval_steps = -1: must be >= 0"),
    ("train.save_best=true", "train.save_best = True: needs train.eval_steps > 0"),
    ("train.early_stopping_patience=3", "train.early_stopping_patience = 3: needs train.eval_steps > 0"),
    ("train.early_stopping_patience=0", "train.early_stopping_patience = 0: must be > 0"),
    ("logging.report_to=[wandb,mlflow]", "logging.report_to = 'mlflow': must be one of wandb, tensorboard, none"),
    ("logging.report_to=[none,wandb]", "'none' cannot be combined with other destinations"),
    ("logging.report_to=[wandb,wandb]", "lists a destination twice"),
])
def test_invalid_values_name_field_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_contradictory_ablations_are_refused():
    with pytest.raises(ConfigError, match="nothing would train the LoRA components"):
        load_config(overrides=["comlora.no_lm=true", "comlora.no_align=true"])


@pytest.mark.parametrize("override,message", [
    ("adapter.rnk=3", "adapter.rnk"),
    ("adapter.rank=abc", "could not be converted to Integer"),
    ("rank", "expected key=value"),
])
def test_unknown_keys_and_bad_types(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_the_method_name_is_checked_by_the_method_registry():
    """Registered methods (tests/test_architecture.py adds one) are valid names; launch/train.py asks the registry
    right after the config, so an unknown one still fails in about a second (test_reliability)."""
    from comlora_ds.methods import method_class

    cfg = load_config(overrides=["adapter.method=dora"])
    with pytest.raises(ConfigError, match="adapter.method = 'dora' is not available; known: lora, lora_dash, lora_pro"):
        method_class(cfg.adapter.method)


def test_builtin_tasks_are_checked():
    assert load_config(overrides=["data.builtin_tasks=[sst2]"]).data.builtin_tasks == ["sst2"]
    with pytest.raises(ConfigError, match=r"data.builtin_tasks = 'sst3': must be one of boolq, .*sst2"):
        load_config(overrides=["data.builtin_tasks=[sst3]"])
    with pytest.raises(ConfigError, match="data.builtin_tasks = \\[\\]: is empty and no data.train_files"):
        load_config(overrides=["data.builtin_tasks=[]"])


def test_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("adapter:\n  rank: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_validation_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ConfigError):
        load_config(overrides=["adapter.rank=-1"])
    assert time.perf_counter() - start < 1.0


def test_per_group_clipping_needs_a_norm_and_no_lora_pro():
    with pytest.raises(ConfigError, match=r"train.clip_scope = 'per_group': needs train.max_grad_norm > 0"):
        load_config(overrides=["train.clip_scope=per_group", "train.max_grad_norm=0"])
    with pytest.raises(ConfigError, match=r"train.clip_scope = 'per_group': is not available with adapter.method"):
        load_config(overrides=["train.clip_scope=per_group", "adapter.method=lora_pro"])


def test_k1_is_not_comlora():
    cfg = RunConfig()
    cfg.adapter.num_components = 1
    assert not cfg.validate().is_comlora


@pytest.mark.parametrize("overrides,scope", [
    ([], "per_group"),                                                  # K = 2 by default
    (["adapter.num_components=1"], "global"),
    (["adapter.method=lora_pro"], "global"),                             # its optimizer clips
    (["train.max_grad_norm=0"], "global"),                               # clipping off
    (["train.clip_scope=global"], "global"),
    (["adapter.num_components=1", "train.clip_scope=per_group"], "per_group"),
])
def test_clip_scope_auto_resolves_per_group_for_comlora(overrides, scope):
    cfg = load_config(overrides=overrides)
    assert cfg.train.clip_scope == ("auto" if not any("clip_scope" in o for o in overrides) else cfg.train.clip_scope)
    assert cfg.clip_scope == scope


def test_reductions_default_to_the_papers_summed_target_and_per_token_lm():
    cfg = load_config()
    assert (cfg.comlora.loss_reduction, cfg.comlora.lm_reduction) == ("sum", "mean")


@pytest.mark.parametrize("override", ["train.learning_rate=nan", "comlora.noise=nan", "train.max_grad_norm=inf",
                                      "adapter.alpha=-inf"])
def test_non_finite_values_are_refused(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]} = .*: must be a finite number"):
        load_config(overrides=[override])


def test_a_yaml_file_whose_top_level_is_a_list_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match=r"run.yaml: the top level must be a mapping of config groups .* not a list"):
        load_config(path)


def test_validation_during_training_needs_a_validation_split():
    with pytest.raises(ConfigError, match=r"train.eval_steps = 5: needs a validation split: data.val_size = 0"):
        load_config(overrides=["train.eval_steps=5", "data.val_size=0"])
    assert load_config(overrides=["train.eval_steps=5", "data.val_size=0", "data.val_files=[v.json]"]).train.eval_steps


@pytest.mark.parametrize("text,message", [
    ("", "is empty; give the settings, or leave the option out"),
    ("  \n\t\n", "is empty; give the settings, or leave the option out"),
    ("# only a comment\n", "holds no settings (only comments or an empty mapping)"),
    ("{}\n", "holds no settings (only comments or an empty mapping)"),
])
def test_an_empty_yaml_file_is_refused_not_read_as_the_default_run(tmp_path, text, message):
    """Found in a bad-input trial: an empty (or truncated to nothing) run config silently started the default run."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}.*{message.replace('(', '.').replace(')', '.')}"):
        load_config(path)


@pytest.mark.parametrize("special,kind", [("/dev/null", "not a regular file"), (".", "a folder")])
def test_a_config_that_is_not_a_regular_file_is_named_as_such(special, kind):
    """/dev/null used to be reported as 'does not exist'."""
    with pytest.raises(ConfigError, match=f"config file {special} is {kind}"):
        load_config(special)
