"""Bad input stops the run before expensive work with one line naming the problem, writing nothing;
faults (a killed rank, a kill inside a checkpoint, a full disk, a diverging loss) never cost the run.

Runs through the real CLI: in-process for the input errors (they happen before any engine exists),
under torchrun for the faults. See docs/reliability.md for the catalogue.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from comlora_ds.checkpointing import checkpoint as ckpt
from comlora_ds.checkpointing import run_layout
from comlora_ds.config import load_config
from comlora_ds.training.ds_config import DeepSpeedConfigError, resolve_bf16

from assets import commonsense_file, tiny_model_dir
from helpers import (FP32_TOL, REPO, assert_trajectories_match, base_overrides, ds_config, free_port, launch,
                     run_in_group, step_losses, subprocess_env)

TRAIN_JSON = commonsense_file("ARC-Challenge")


def _train_cli():
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def run_cli():
    """launch/train.py's main() in this process; restores the environment and the process group."""
    saved = dict(os.environ)
    main = _train_cli()
    yield main
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Names, sizes, mtimes and contents of every file, and every folder's own mtime (the folder itself included:
    a file created and removed inside it changes that)."""
    if not folder.exists():
        return {}
    snap = {}
    for p in [folder, *sorted(folder.rglob("*"))]:
        st = p.stat()
        snap[str(p.relative_to(folder))] = ((st.st_mtime_ns,) if p.is_dir() else
                                            (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()))
    return snap


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _bad_json(tmp):
    path = _write(tmp / "train.json", '[{"instruction": "q", "output": "a"},')
    return {"data.train_files": f"[{path}]"}


def _empty_json(tmp):
    return {"data.train_files": f"[{_write(tmp / 'train.json', '[]')}]"}


def _missing_field(tmp):
    rows = [{"instruction": "q", "output": "a"}] * 3 + [{"instruction": "q"}]
    return {"data.train_files": f"[{_write(tmp / 'train.json', json.dumps(rows))}]"}


def _val_too_big(tmp):
    return {"data.max_train_samples": "null", "data.val_size": 5000}


def _all_overlong(tmp):
    return {"data.overlong": "drop", "data.max_length": 8}


def _missing_model(tmp):
    return {"model.name_or_path": tmp / "no-such-model"}


def _truncated_weights(tmp):
    model = tmp / "model"
    shutil.copytree(tiny_model_dir(), model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return {"model.name_or_path": model}


def _unwritable_output(tmp):
    return {"train.output_dir": "/proc/comlora-ds-test/run"}


def _tiny_max_length(tmp):
    return {"data.max_length": 2}


def _nan_learning_rate(tmp):
    return {"train.learning_rate": "nan"}


def _duplicate_key_row(tmp):
    text = '[{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "a", "output": "b"}]'
    return {"data.train_files": f"[{_write(tmp / 'train.json', text)}]"}


def _missing_data_file(tmp):
    return {"data.train_files": f"[{tmp / 'nowhere.json'}]"}


def _unknown_method(tmp):
    return {"adapter.method": "lora_plus"}


def _dash_switch_after_the_last_epoch(tmp):
    return {"adapter.method": "lora_dash", "train.max_steps": "null", "train.num_epochs": 1, "lora_dash.t_steps": 500}


def _sharegpt_wrong_role(tmp):
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    return {"data.train_files": "[]", "data.sources": f"[{{path: {_write(tmp / 'chat.json', json.dumps([row]))}, "
                                                      "format: sharegpt}]"}


def _chat_template_missing(tmp):
    return {"data.template": "chat"}


BAD_INPUTS = {
    "malformed JSON": (_bad_json, "train.json: malformed JSON at line 1 column 38"),
    "empty data set": (_empty_json, "train.json"),
    "missing field": (_missing_field, "row 3: field 'output'"),
    "validation split larger than the data": (_val_too_big, "val_size"),
    "every row longer than max_length": (_all_overlong, "max_length"),
    "missing model folder": (_missing_model, "no-such-model': no such folder"),
    "truncated safetensors": (_truncated_weights, "model.safetensors is not a complete safetensors file"),
    "output directory not writable": (_unwritable_output, "is not writable"),
    "max_length too small for any example": (_tiny_max_length, "data.max_length = 2 leaves no room for a prompt"),
    "non-finite config value": (_nan_learning_rate, "train.learning_rate = nan: must be a finite number"),
    "duplicate key in a data row": (_duplicate_key_row, "train.json: row 2 (counting from 1) has the key 'output' twice"),
    "missing data file": (_missing_data_file, "nowhere.json': no such file"),
    "unknown adapter method": (_unknown_method, "adapter.method = 'lora_plus' is not available; known: lora, "
                                                "lora_dash, lora_pro"),
    "ShareGPT turn with an unknown role": (_sharegpt_wrong_role, "chat.json row 0: conversations[1].from = 'bot': "
                                                                 "must be one of human, gpt, system"),
    "chat template asked of a tokenizer without one": (_chat_template_missing, "data.template = 'chat': the tokenizer "
                                                                               "of "),
    "LoRA-Dash switch after the last step (num_epochs)": (
        _dash_switch_after_the_last_epoch, "lora_dash.t_steps = 500: the switch would never happen: the run has "),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_fast_naming_the_problem_and_writes_nothing(run_cli, tmp_path, capsys, case):
    make, expected = BAD_INPUTS[case]
    out = tmp_path / "run"
    overrides = {"train.output_dir": out, **make(tmp_path)}
    start = time.process_time()       # CPU time: "fast" must not depend on how busy the machine is
    rc = run_cli(["--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out, **overrides)])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert err.count("\n") == 1, "one line, no traceback"
    assert time.process_time() - start < 30
    assert _snapshot(out) == {} and not out.exists(), "a refused run leaves nothing behind, not even its folder"


def test_ds_config_contradiction_is_refused(run_cli, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    rc = run_cli(["--deepspeed", str(ds), *base_overrides(tmp_path / "run")])
    assert rc == 2 and "contradicts the run config train.micro_batch_size = 4" in capsys.readouterr().err
    assert _snapshot(tmp_path / "run") == {}


def test_an_existing_run_is_never_overwritten(reference, run_cli, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = _snapshot(out)
    rc = run_cli(["--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out)])
    assert rc == 2 and "already holds a run; continue it with train.resume=auto" in capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.parametrize("override,message", [
    ("adapter.num_components=3", "adapter.num_components = 2, this run has 3"),
    ("adapter.rank=8", "adapter.rank = 4, this run has 8"),
    ("train.max_steps=9", "written for 6 steps, this run plans 9"),
    ("train.max_steps=5 train.resume_allow_changes=[train.max_steps]", "is at step 6, this run plans 5 steps"),
])
def test_resume_from_an_incompatible_checkpoint_is_refused(reference, run_cli, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = _snapshot(out)
    rc = run_cli(["--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out), "train.resume=auto",
                  *override.split()])
    assert rc == 2 and message in capsys.readouterr().err
    assert _snapshot(out) == before


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(DeepSpeedConfigError, match="Tesla V100 does not support bf16"):
        resolve_bf16(load_config(overrides=["train.bf16=true"]), {})
    assert resolve_bf16(load_config(), {}) is False           # auto -> off there


def test_latest_naming_a_folder_outside_is_refused(tmp_path):
    (tmp_path / "latest").write_text("../../elsewhere")
    with pytest.raises(run_layout.CheckpointError, match="not a step_NNNNNNNN checkpoint folder"):
        run_layout.read_latest(tmp_path)


def test_ds_config_with_a_duplicate_key_is_refused(run_cli, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2, "stage": 3}}')
    rc = run_cli(["--deepspeed", str(ds), *base_overrides(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "key(s) 'stage' given twice" in err and err.count("\n") == 1
    assert _snapshot(tmp_path / "run") == {}


def test_latest_naming_a_missing_step_stops_resume_and_consolidation(reference, run_cli, tmp_path, capsys):
    """Found by a user: with the step folder that `latest` names gone, resume=auto started again at step 0 and
    overwrote the other checkpoint. Now both training and consolidation stop, and nothing changes."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")              # latest names it; step_00000003 stays
    before = _snapshot(out)
    rc = run_cli(["--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out), "train.resume=auto"])
    err = capsys.readouterr().err
    assert rc == 2 and "names step_00000006, which does not exist" in err and err.count("\n") == 1
    assert _snapshot(out) == before
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "consolidate.py"), str(out / "checkpoints"), "--out",
                           str(tmp_path / "export")], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "names step_00000006, which does not exist" in proc.stderr, proc.stderr
    assert _snapshot(out) == before and not (tmp_path / "export").exists()


@pytest.mark.parametrize("target", ["older checkpoint", "other run", "checkpoints folder", "inside a checkpoint"])
def test_consolidation_never_writes_into_a_run_or_checkpoint(reference, tmp_path, target):
    """Found by a user: --out naming an older checkpoint of the same run (or another run) with --overwrite deleted it."""
    run, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(reference, run)
    shutil.copytree(reference, other)
    out = {"older checkpoint": run / "checkpoints" / "step_00000003", "other run": other,
           "checkpoints folder": other / "checkpoints",
           "inside a checkpoint": run / "checkpoints" / "step_00000003" / "export"}[target]
    before = {name: _snapshot(folder) for name, folder in (("run", run), ("other", other))}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "consolidate.py"), str(run / "checkpoints" /
                           "step_00000006"), "--out", str(out), "--overwrite"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "a training run or checkpoint" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert {name: _snapshot(folder) for name, folder in (("run", run), ("other", other))} == before


def test_no_shell_and_no_pickle_in_our_code():
    """Static guard: no shell strings, every torch.load of ours is weights_only=True."""
    sources = [p for d in ("comlora_ds", "launch") for p in (REPO / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "shell=True" not in text and "os.system(" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


# ------------------------------------------------------------------------------------------- faults
def _child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()] if children.exists() else []


def _rank_pid(agent_pid: int, rank: int) -> int | None:
    for child in _child_pids(agent_pid):
        env = Path(f"/proc/{child}/environ")
        try:
            if f"RANK={rank}".encode() in env.read_bytes().split(b"\0"):
                return child
        except OSError:
            continue
    return None


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return predicate()


@pytest.mark.distributed
def test_one_rank_killed_mid_step_resumes_from_last_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    overrides = base_overrides(out, **{"train.micro_batch_size": 2, "train.save_steps": 2})
    proc = launch(overrides, nproc=2, ds=ds_config(tmp_path, 2), wait=False)
    metrics = out / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)              # only rank 1; torchrun tears the rest down
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert run_layout.read_latest(out / "checkpoints") in {"step_00000002", "step_00000004"}
    launch(overrides + ["train.resume=auto"], nproc=2, ds=ds_config(tmp_path, 2))
    assert_trajectories_match(step_losses(out), step_losses(reference), FP32_TOL)


@pytest.mark.distributed
def test_rank_killed_inside_a_checkpoint_leaves_the_previous_one(reference, tmp_path):
    """A fault injected (tests/faults/sitecustomize.py) right after rank 1 wrote its part of the step-4
    checkpoint, before it is published: `latest` still names step 2, and resuming matches."""
    out = tmp_path / "run"
    overrides = base_overrides(out, **{"train.micro_batch_size": 2, "train.save_steps": 2})
    proc = _launch_with_fault(overrides, 2, ds_config(tmp_path, 2), COMLORA_TEST_KILL_IN_CHECKPOINT="4:1")
    assert proc.returncode != 0 and "fault injected" in proc.stdout + proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert (out / "checkpoints" / "tmp-step_00000004").is_dir()          # the partial one, never published
    launch(overrides + ["train.resume=auto"], nproc=2, ds=ds_config(tmp_path, 2))
    assert_trajectories_match(step_losses(out), step_losses(reference), FP32_TOL)
    assert not (out / "checkpoints" / "tmp-step_00000004").exists()


@pytest.mark.distributed
def test_non_finite_loss_stops_naming_step_and_component(tmp_path):
    """Component 1's loss turns NaN in the 3rd forward (optimizer step 3): the run stops before that
    step is applied, naming it; the step-2 checkpoint holds only finite tensors."""
    out = tmp_path / "run"
    proc = _launch_with_fault(base_overrides(out, **{"train.save_steps": 2}), 1, ds_config(tmp_path, 2),
                              COMLORA_TEST_NAN_AT_FORWARD="3:1")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "non-finite loss at optimizer step 3" in output and "component(s) [1]" in output, output[-3000:]
    assert "the optimizer step was not applied" in output
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"))
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert all(torch.isfinite(t).all() for t in state.values())


def _launch_with_fault(overrides: list[str], nproc: int, ds: Path, **fault_env) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "PYTHONPATH": f"{REPO / 'tests' / 'faults'}:{REPO}", **fault_env}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(REPO / "launch" / "train.py"), "--deepspeed", str(ds), *overrides]
    return run_in_group(cmd, 300, env=env)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.distributed
def test_full_disk_refuses_the_checkpoint_and_keeps_the_previous(reference, tmp_path):
    """The checkpoint filesystem fills up after step 2 (another job, say): the step-4 save is refused
    on every rank before a byte is written, step 2 stays `latest`, and once there is room the run
    resumes and matches the uninterrupted one."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "48m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        overrides = base_overrides(out, **{"train.save_steps": 2})
        proc = _launch_with_fault(overrides, 1, ds_config(tmp_path, 2), COMLORA_TEST_FILL_DISK_AFTER="2")
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "not enough free space" in output, output[-2000:]
        assert "the last complete checkpoint (step_00000002) is untouched" in output
        assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
        assert not list((out / "checkpoints").glob("tmp-*"))
        (disk / "ballast").unlink()
        launch(overrides + ["train.resume=auto"], nproc=1, ds=ds_config(tmp_path, 2))
        assert_trajectories_match(step_losses(out), step_losses(reference), FP32_TOL)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _soak(overrides: list[str], tmp_path: Path, stop_after_step: int | None) -> list[tuple[int, int]]:
    """Runs 2 ranks, sampling (step, summed rank RSS) twice a second; SIGTERM once stop_after_step passed."""
    proc = launch(overrides, nproc=2, ds=ds_config(tmp_path, 2), wait=False)
    metrics = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir="))) / "metrics.jsonl"
    samples, stopped = [], False
    while proc.poll() is None:
        time.sleep(0.5)
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        step = json.loads(lines[-1]).get("step", 0) if lines else 0
        ranks = [p for p in (_rank_pid(proc.pid, r) for r in (0, 1)) if p]
        try:
            samples.append((step, sum(_rss_kib(p) for p in ranks)))
        except OSError:
            pass
        if stop_after_step and step >= stop_after_step and not stopped:
            os.killpg(proc.pid, signal.SIGTERM)
            stopped = True
    proc.communicate()
    return samples


@pytest.mark.slow
@pytest.mark.distributed
def test_soak_two_ranks_hundreds_of_steps_with_resume(tmp_path):
    """2 ranks, 400 steps, a checkpoint every 10, SIGTERM at ~200 and resume=auto: every step is
    logged once, the run ends at 400, and resident memory stays flat (last quarter vs second quarter)."""
    out = tmp_path / "run"
    overrides = base_overrides(out, **{"train.max_steps": 400, "train.save_steps": 10, "train.save_total_limit": 2,
                                       "train.micro_batch_size": 2, "data.max_train_samples": 200})
    first = _soak(overrides, tmp_path, stop_after_step=200)
    second = _soak(overrides + ["train.resume=auto"], tmp_path, stop_after_step=None)
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 401)) and all(map(lambda v: v == v, losses.values()))
    assert (out / "checkpoints" / "latest").read_text() == "step_00000400"
    assert len([p for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")]) == 2
    for samples in (first, second):
        steady = [rss for step, rss in samples if rss > 0]
        quarter = len(steady) // 4
        mid = sorted(steady[quarter:2 * quarter])[quarter // 2]
        end = sorted(steady[-quarter:])[quarter // 2]
        print(f"RSS median KiB: second quarter {mid}, last quarter {end}, ratio {end / mid:.3f}")
        assert end <= 1.10 * mid, (mid, end)


class _Payload:
    """What a tampered checkpoint could carry: unpickling it would call os.system."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/comlora-pwned",))


def test_tampered_checkpoint_is_refused_before_unpickling(reference, tmp_path):
    step = tmp_path / "step_00000006"
    shutil.copytree(reference / "checkpoints" / "step_00000006", step)
    for path in step.glob("*.pt"):
        ckpt.safe_load(path)                             # real DeepSpeed files pass the screen
    torch.save({"module": {}, "payload": _Payload()}, step / "mp_rank_00_model_states.pt")
    Path("/tmp/comlora-pwned").unlink(missing_ok=True)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="posix.system|os.system"):
        ckpt.screen_checkpoint(step)
    assert not Path("/tmp/comlora-pwned").exists()


# ------------------------------------------------------------------------- the checkpoint manifest (found by a user)
def _copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def test_every_checkpoint_lists_its_files_data_base_and_settings(reference):
    from comlora_ds.checkpointing import manifest

    step = reference / "checkpoints" / "step_00000006"
    saved = json.loads((step / manifest.MANIFEST).read_text())
    written = {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file() and p.name != manifest.MANIFEST}
    assert set(saved["files"]) == written and "rng_state_rank0.pt" in written
    assert saved["files"]["run_config.yaml"] == manifest.sha256_file(step / "run_config.yaml")
    assert saved["data"] == {"data.train_files[0]": manifest.sha256_file(commonsense_file("ARC-Challenge"))}
    assert saved["base_model"] == manifest.base_model_fingerprint(str(tiny_model_dir()))
    assert set(saved["base_model"]) == {"config", "weights"}
    assert saved["settings"]["data.seed"] == 42 and saved["settings"]["train.learning_rate"] == 5e-3
    assert manifest.verify(step) == saved


@pytest.mark.parametrize("override,message", [
    ("data.seed=7", "data.seed: 42 in the checkpoint, 7 now"),
    ("train.learning_rate=0.001", "train.learning_rate: 0.005 in the checkpoint, 0.001 now. Nothing was changed; to "
                                  "continue with the new value on purpose, add "
                                  "train.resume_allow_changes=[train.learning_rate]"),
    ("train.micro_batch_size=2", "global batch of 1 rank(s) x micro-batch 4 x 1 accumulation step(s) = 4, this run "
                                 "has 1 rank(s) x micro-batch 2 x 1 accumulation step(s) = 2"),   # another split: fine
])
def test_resume_with_other_settings_is_refused_naming_them(reference, run_cli, tmp_path, capsys, override, message):
    """Found by a user: a new data.seed moved validation rows into training, a new lr was silently ignored."""
    out = _copy_run(reference, tmp_path)
    before = _snapshot(out)
    rc = run_cli(["--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out), "train.resume=auto", override])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert _snapshot(out) == before


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,message", [
    (lambda step: (step / "trainer_state.json").write_text('{"global_step": 6, "total'),
     "trainer_state.json is damaged (not valid JSON"),                            # was a JSONDecodeError traceback
    (lambda step: (step / "trainer_state.json").write_text('{"global_step": "six"}'),
     "trainer_state.json is damaged: field 'global_step' = 'six'"),
    (lambda step: _truncate(next(step.glob("*optim_states.pt"))),
     "optim_states.pt is damaged or truncated and cannot be read (PytorchStreamReader"),   # was a RuntimeError
])
def test_a_damaged_checkpoint_without_a_manifest_is_refused_in_one_line(reference, run_cli, tmp_path, capsys,
                                                                        damage, message):
    """A checkpoint written before manifests existed is used unchecked (with a warning): its files' own structure
    is still checked before anything is resumed from them."""
    out = _copy_run(reference, tmp_path)
    step = out / "checkpoints" / "step_00000006"
    (step / "manifest.json").unlink()
    damage(step)
    before = _snapshot(out)
    rc = run_cli(["--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out), "train.resume=auto"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert _snapshot(out) == before


@pytest.mark.distributed
def test_two_ranks_refuse_another_global_batch_before_any_work(reference, tmp_path):
    """Both ranks refuse with the one line and exit 2 before the data or the model is read (it used to come after
    tokenisation and the base's fingerprint). torchrun itself then reports the failed ranks (exit code 1, its own
    traceback); the deepspeed launcher passes the ranks' exit code 2 on (docs/reliability.md)."""
    out = _copy_run(reference, tmp_path)
    before = _snapshot(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "launch" / "train.py"), "--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out),
           "train.resume=auto", "train.micro_batch_size=4"]
    proc = run_in_group(cmd, 120, env=subprocess_env())
    message = ("global batch of 1 rank(s) x micro-batch 4 x 1 accumulation step(s) = 4, this run has 2 rank(s) x "
               "micro-batch 4 x 1 accumulation step(s) = 8")
    assert proc.stderr.count(f"error: checkpoint {out / 'checkpoints' / 'step_00000006'} was trained with a {message}") \
        == 2, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr and "Traceback" not in proc.stderr.split("error: ")[0]
    assert _snapshot(out) == before


def test_resume_with_changed_data_is_refused_and_moved_data_is_not(reference, run_cli, tmp_path, capsys):
    out = _copy_run(reference, tmp_path)
    rows = json.loads(commonsense_file("ARC-Challenge").read_text())
    moved = _write(tmp_path / "moved" / "train.json", commonsense_file("ARC-Challenge").read_text())
    edited = _write(tmp_path / "edited.json", json.dumps(rows[:-1]))
    before = _snapshot(out)
    rc = run_cli(["--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out), "train.resume=auto",
                  f"data.train_files=[{edited}]"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.train_files[0]: 'sha256 " in err and err.count("\n") == 1, err
    assert _snapshot(out) == before
    # the same bytes elsewhere are the same data: the resume goes through (nothing left to train: 6 of 6 steps)
    rc = run_cli(["--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out), "train.resume=auto",
                  f"data.train_files=[{moved}]"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.distributed
def test_resume_may_change_the_learning_rate_on_purpose_and_it_applies(reference, tmp_path):
    """train.resume_allow_changes=[train.learning_rate]: steps 4-6 run at the new peak rate on the same schedule."""
    out = tmp_path / "run"
    launch(base_overrides(out, **{"train.resume": reference / "checkpoints" / "step_00000003",
                                  "train.learning_rate": 1e-3,
                                  "train.resume_allow_changes": "[train.learning_rate]"}), nproc=1,
           ds=ds_config(tmp_path, 2))
    lr = step_losses(out, "lr")
    want = {step: value / 5 for step, value in step_losses(reference, "lr").items() if step > 3}
    assert lr.keys() == want.keys() and all(lr[s] == pytest.approx(want[s], rel=1e-9) for s in want)


def test_a_changed_checkpoint_file_is_refused_by_resume_and_consolidation(reference, run_cli, tmp_path, capsys):
    """Found by a user: a checkpoint whose fp32 master bytes were overwritten was used without a word."""
    out = _copy_run(reference, tmp_path)
    shard = next((out / "checkpoints" / "step_00000006").glob("*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF                                                  # one flipped byte in the tensor payload
    shard.write_bytes(bytes(data))
    rc = run_cli(["--deepspeed", str(ds_config(tmp_path, 2)), *base_overrides(out), "train.resume=auto"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{shard.name} is not the file that was written" in err and err.count("\n") == 1, err
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "consolidate.py"), str(out / "checkpoints"), "--out",
                           str(tmp_path / "export")], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{shard.name} is not the file that was written" in proc.stderr, proc.stderr


def test_consolidation_refuses_a_base_with_the_same_shapes_but_other_weights(reference, tmp_path):
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    model.save_pretrained(other)
    shutil.copy(tiny_model_dir() / "tokenizer.json", other)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "consolidate.py"), str(reference / "checkpoints"),
                           "--out", str(tmp_path / "export"), "--base", str(other)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and f"base model {other} is not the one" in proc.stderr, proc.stderr
    assert "weights differ(s)" in proc.stderr and not (tmp_path / "export").exists()
