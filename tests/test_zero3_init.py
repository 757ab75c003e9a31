"""ZeRO-3 start-up without the whole base on any rank (comlora_ds/models/zero3_init.py, model.zero3_init).

References: DeepSpeed's own partitioning of the ``from_pretrained`` model (the layout each rank must hold, 3 ranks so
that tensors are padded), DeepSpeed's gather (the whole tensor), and a ZeRO-3 run that loads the whole base on every
rank (``model.zero3_init=false``, the old path), which the partitioned run must repeat exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from assets import tiny_model_dir
from helpers import base_overrides, ds_config, free_port, launch, run_in_group, step_losses, subprocess_env

from comlora_ds.config import ConfigError, ModelConfig
from comlora_ds.export.recover import locate_checkpoint, recover_tensors
from comlora_ds.models.zero3_init import check_model_dtype

LAYOUT = r"""
import json, shutil, sys
from pathlib import Path
import deepspeed, torch, torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from comlora_ds.models.base_model import ModelError
from comlora_ds.config import ModelConfig
from comlora_ds.models import zero3_init
from comlora_ds.models.zero3_init import load_partitioned_base

zero3_init.READ_BLOCK = 200       # 3 rows of 64 per read: partitions start and end inside a read
source, work, ds = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
sharded = work / "sharded"                      # several safetensors files + model.safetensors.index.json
if rank == 0:
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(sharded, max_shard_size="60KB")
    for name in ("missing", "reshaped"):        # broken copies of the one-file checkpoint
        shutil.copytree(source, work / name)
    state = load_file(source / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, work / "missing" / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (work / "reshaped" / "config.json").write_text(json.dumps({**config, "intermediate_size": 180}))
dist.barrier()
result = {"files": len(list(sharded.glob("*.safetensors")))}
built = load_partitioned_base(str(sharded), ModelConfig(name_or_path=str(sharded)), ds)
reference = AutoModelForCausalLM.from_pretrained(source)
whole = {n: p.detach().clone() for n, p in reference.named_parameters()}
deepspeed.zero.Init(module=reference, config_dict_or_path=ds)      # DeepSpeed's own partitioning
ours, theirs = dict(built.named_parameters()), dict(reference.named_parameters())
result["names"] = sorted(ours) == sorted(theirs)
result["tied"] = built.lm_head.weight is built.model.embed_tokens.weight
result["padded"], result["layout_differs"] = [], []
for name, p in ours.items():
    q = theirs[name]
    valid = max(0, min(p.ds_tensor.numel(), p.ds_numel - p.ds_tensor.numel() * rank))
    if valid < p.ds_tensor.numel():
        result["padded"].append(name)
        assert not p.ds_tensor[valid:].any()
    if not torch.equal(p.ds_tensor[:valid], q.ds_tensor[:valid]):
        result["layout_differs"].append(name)
with deepspeed.zero.GatheredParameters(list(built.parameters())):
    result["gathered_differs"] = [n for n, p in built.named_parameters() if not torch.equal(p, whole[n])]
buffers = dict(reference.named_buffers())
result["buffers_differ"] = [n for n, b in built.named_buffers() if not torch.equal(b, buffers[n])]
for name in ("missing", "reshaped"):
    try:
        load_partitioned_base(str(work / name), ModelConfig(name_or_path=str(work / name)), ds)
        result[name] = None
    except ModelError as err:
        result[name] = str(err)
(work / f"rank{rank}.json").write_text(json.dumps(result))
"""


def test_each_rank_holds_deepspeeds_partition_of_the_checkpoint(tmp_path):
    """3 ranks (so tensors of 64 elements are padded), a sharded checkpoint with tied embeddings, reads of 3 rows:
    every rank's partitions equal DeepSpeed's partitioning of the from_pretrained model, element for element;
    gathered, they are the checkpoint; a missing tensor and a config that disagrees with the files are named."""
    script = tmp_path / "layout.py"
    script.write_text(LAYOUT)
    ds = json.loads(ds_config(tmp_path, 3).read_text())
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=3)
    done = run_in_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3",
                         f"--master_port={free_port()}", str(script), str(tiny_model_dir()), str(tmp_path),
                         json.dumps(ds)], 300, env=subprocess_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(3):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["files"] > 1 and result["names"] and result["tied"]
        assert result["layout_differs"] == [] and result["gathered_differs"] == [] and result["buffers_differ"] == []
        assert "model.norm.weight" in result["padded"] if rank == 2 else result["padded"] == []
        assert "no tensor 'model.norm.weight'" in result["missing"] and "model.zero3_init=false" in result["missing"]
        assert "has shape [172, 64], the model built from config.json expects [180, 64]" in result["reshaped"]


def test_a_whole_base_checkpoint_resumes_on_the_partitioned_start_exactly(tmp_path):
    """2 ranks, ZeRO-3, ComLoRA K=2 with the selector and weight decay: a run that loads the whole base on every rank
    (model.zero3_init=false, the old path) checkpoints at step 1; the partitioned start (the default) resumes it and
    repeats its step 2, validation and trained adapters and selector bit for bit. So the partitioned base is the same
    base, and the trainable state is laid out the same (weight decay catches a parameter sorted into the no-decay group
    by the shape of its empty partitioned tensor). A fresh partitioned start is compared with one process in
    tests/test_engine.py (ZeRO-3 cases)."""
    short = {"train.max_steps": 2, "train.save_steps": 1, "train.micro_batch_size": 2, "train.weight_decay": 0.5}
    runs = {}
    for name, extra in {"whole": {"model.zero3_init": "false"},
                        "resumed": {"train.resume": tmp_path / "whole" / "checkpoints" / "step_00000001"}}.items():
        out = tmp_path / name
        launch(base_overrides(out, **short, **extra), nproc=2, ds=ds_config(tmp_path, 3))
        runs[name] = (step_losses(out), json.loads((out / "validation.json").read_text())["mean_loss"],
                      recover_tensors(locate_checkpoint(out)))
    (losses, validation, trained), (want_losses, want_validation, want_trained) = runs["resumed"], runs["whole"]
    assert losses == {2: want_losses[2]} and validation == want_validation
    assert trained.keys() == want_trained.keys() and any("selector" in name for name in trained)
    assert [name for name in trained if not torch.equal(trained[name], want_trained[name])] == []


def test_bf16_base_under_fp32_training_is_refused():
    check_model_dtype(ModelConfig(dtype="auto"), bf16=False)
    check_model_dtype(ModelConfig(dtype="float32"), bf16=True)
    with pytest.raises(ConfigError, match="model.dtype = bfloat16 with fp32 training under ZeRO stage 3"):
        check_model_dtype(ModelConfig(dtype="bfloat16"), bf16=False)



HUB_ID = r"""
import json
from comlora_ds.models.zero3_init import weight_index, weights_folder
folder = weights_folder("tiny-org/tiny-llama")
print(json.dumps({"folder": str(folder), "index": {k: str(v) for k, v in weight_index(folder).items()}}))
"""


def test_a_hub_id_is_read_from_its_snapshot_in_the_hub_cache(tmp_path):
    """model.name_or_path as a hub id: the weights are found in the snapshot in the hub cache (offline here)."""

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "0123abc"
    shutil.copytree(tiny_model_dir(), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    done = subprocess.run([sys.executable, "-c", HUB_ID], capture_output=True, text=True, timeout=120,
                          env={**subprocess_env(), "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    with safe_open(str(snapshot / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert found["folder"] == str(snapshot)
    assert found["index"] == dict.fromkeys(names, str(snapshot / "model.safetensors"))


TRAIN_THEN_EVALUATE = r"""
import os, sys
import torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
assert "transformers.models.llama.modeling_llama" not in sys.modules   # first imported by the partitioned build
from transformers import AutoModelForCausalLM
from comlora_ds.config import ModelConfig
from comlora_ds.models.zero3_init import load_partitioned_base
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
load_partitioned_base(sys.argv[1], ModelConfig(name_or_path=sys.argv[1]), ds)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])        # what evaluation does next, in the same process
print("logits", tuple(model(torch.tensor([[1, 2, 3]])).logits.shape))
"""


def test_a_new_llama_runs_after_a_partitioned_build_in_the_same_process():
    """Found in an audit: after one model.zero3_init build, every LLaMA built later in the process failed on its
    first forward ('LlamaAttention' object has no attribute '_kernel_funcs'), so a script or notebook that trains
    and then evaluates broke; the modeling module is now imported before zero.Init starts."""
    done = run_in_group([sys.executable, "-c", TRAIN_THEN_EVALUATE, str(tiny_model_dir()), str(free_port())], 120,
                        env=subprocess_env())
    assert done.returncode == 0 and "logits (1, 3, 512)" in done.stdout, done.stderr[-3000:]
