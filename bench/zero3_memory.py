"""Peak host memory per rank of a ZeRO-3 run: the base built partitioned (``model.zero3_init``, the default) against
every rank loading the whole base (``model.zero3_init=false``).

Each rank (under ``torchrun --nproc_per_node N``, the shipped ``ds_configs/zero3.json``) builds the trainer, which
is everything ``launch/train.py`` does before the first step, then trains two optimizer steps of ComLoRA K=2 (selector
on) on a few generated rows and writes a checkpoint. Each rank reads its own /proc status: VmHWM (the kernel's peak
resident set, anonymous and file-backed pages together) after the start-up and after the run, and the largest RssAnon
and RssFile seen by a 5 ms sampler. What the base costs is the difference to the same run with a tiny model
that has the same tokenizer and code path (2 layers, hidden 64: 13 MB), so torch, DeepSpeed, transformers, the
tokenizer and the data pipeline cancel out; it is reported against the size of the base's safetensors file.

    python bench/zero3_memory.py                 # SmolLM2-135M, 2 ranks
    python bench/zero3_memory.py --doc           # also write the docs/benchmarks.md section
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import REPO  # noqa: E402
from launching import cpu_training_env, free_port  # noqa: E402
from peak_memory import proc_memory  # noqa: E402
from reports import provenance, publish, table  # noqa: E402
from variants import resolve  # noqa: E402

SECTION = "ZeRO-3 start-up: peak host memory per rank"
INTRO = """\
Script: `bench/zero3_memory.py`. The trainer (what `launch/train.py` runs) on every rank under torchrun, with the
shipped `ds_configs/zero3.json`, ComLoRA K=2 with the selector, 2 optimizer steps and a checkpoint. "partitioned" is
the default `model.zero3_init=true` (the base built under `deepspeed.zero.Init`, each rank reading only its own
partitions from the safetensors file); "whole base per rank" is `model.zero3_init=false` (every rank runs
`from_pretrained`, DeepSpeed partitions inside `deepspeed.initialize`). Start-up is the trainer's construction:
base, adapters, selector, `deepspeed.initialize`. "Once the base is loaded" is the peak when the loader returns,
before the adapters, the selector and their optimizer state exist (`from_pretrained` maps the file lazily, so for
the whole-base path the cost shows only later, when `deepspeed.initialize` partitions the mapped tensors). The
trainable state grows with the base too (K=2, r=8 on every linear layer plus the selector; fp32 weight, gradient,
master copy and Adam moments, ~20 bytes per parameter, split over the ranks) and is part of the start-up figure.
Peak RSS is each rank process's VmHWM (anonymous + file-backed pages, what the kernel and a cgroup count); "due to
the base" subtracts the same run with a 13 MB model of the same tokenizer, and "/ base" divides that by the size of
the base's safetensors file. Target (issue 20): at most 0.6 x the base per rank at 2 ranks, at start-up. The whole
run's peak adds ZeRO-3's gathered working set of the training steps, which on a GPU is GPU memory; the shipped
`stage3_max_live_parameters` / `stage3_max_reuse_distance` (1e9) keep every gathered layer of a model this small
until the backward."""
STATUS_FIELDS = ("VmHWM", "RssAnon", "RssFile")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--doc", action="store_true", help="write the docs/benchmarks.md section")
    return p.parse_args(argv)


def tiny_twin(model_dir: Path, folder: Path) -> Path:
    """A 2-layer, hidden-64 LLaMA with ``model_dir``'s tokenizer and vocabulary (the baseline run's model)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    tiny = LlamaConfig(vocab_size=config.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


def training_rows(path: Path, count: int = 32) -> Path:
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The sum is {2 * i + 1}."}
            for i in range(count)]
    path.write_text(json.dumps(rows))
    return path


def _status() -> dict[str, int]:
    memory = proc_memory()
    return {name: memory[name] for name in STATUS_FIELDS}


class PeakMemory(threading.Thread):
    """This process's VmHWM and the largest RssAnon / RssFile seen (sampled every 5 ms) so far."""

    def __init__(self):
        super().__init__(daemon=True)
        self.largest = _status()

    def run(self) -> None:
        while True:
            now = _status()
            self.largest = {name: max(self.largest[name], now[name]) for name in STATUS_FIELDS}
            time.sleep(0.005)

    def read(self) -> dict[str, int]:
        return {**self.largest, "VmHWM": _status()["VmHWM"]}


def worker(out: Path, ds_config: str, overrides: list[str]) -> None:
    """One rank (under torchrun): the trainer's start-up (base, adapters, selector, deepspeed.initialize), then the
    2 training steps; the peaks after each go to ``out/rank<r>.json``."""
    memory = PeakMemory()
    memory.start()
    import torch.distributed as dist

    from comlora_ds.training import engine
    from comlora_ds.config import load_config

    peaks = {}

    def measured(load):                  # the peak right after the base model is loaded, before the adapters
        def wrapper(*args, **kwargs):
            model = load(*args, **kwargs)
            peaks["base loaded"] = memory.read()
            return model
        return wrapper

    engine.load_base_model = measured(engine.load_base_model)
    engine.zero3_init.load_partitioned_base = measured(engine.zero3_init.load_partitioned_base)
    started = time.perf_counter()
    trainer = engine.Trainer(load_config(overrides=overrides), ds_config)
    peaks.update({"start-up": memory.read(), "start-up seconds": time.perf_counter() - started,
                  "trainable": sum(p.ds_numel for p in trainer.model.trainable_parameters())})
    trainer.train()
    peaks["run"] = memory.read()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(peaks))
    trainer.close()
    engine.exit_process(0)


def one_run(args, work: Path, model: str, zero3_init: bool, data: Path) -> list[dict]:
    """Per rank: the peaks of start-up and of the whole run."""
    out = work / f"run_{Path(model).name}_{zero3_init}"
    out.mkdir()
    overrides = [f"model.name_or_path={model}", f"model.zero3_init={str(zero3_init).lower()}",
                 f"data.train_files=[{data}]", "data.max_length=64", "data.val_size=0", "data.cache=false",
                 "train.max_steps=2", "train.save_steps=0", "train.micro_batch_size=1", "adapter.num_components=2",
                 "logging.report_to=[none]", f"train.output_dir={out / 'train'}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nprocs}",
                           f"--master_port={free_port()}", __file__, "--worker", str(out),
                           str(REPO / "ds_configs" / "zero3.json"), *overrides], env=cpu_training_env(),
                          capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{model}, zero3_init={zero3_init}: rc {proc.returncode}\n{proc.stderr[-3000:]}")
    peaks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.nprocs)]
    shutil.rmtree(out, ignore_errors=True)
    return peaks


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(Path(argv[1]), argv[2], argv[3:])
    args = parse_args(argv)
    model_dir = Path(resolve(args.model))
    base_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = tiny_twin(model_dir, work / "tiny")
        data = training_rows(work / "rows.json")
        for zero3_init in (True, False):
            for model in (model_dir, tiny):
                results[model, zero3_init] = one_run(args, work, str(model), zero3_init, data)
                print(f"{model.name}, zero3_init={zero3_init}: start-up VmHWM per rank "
                      f"{[round(r['start-up']['VmHWM'] / 2**20) for r in results[model, zero3_init]]} MiB", flush=True)

    def due(zero3_init: bool, rank: int, phase: str, field: str) -> float:
        full, twin = results[model_dir, zero3_init][rank], results[tiny, zero3_init][rank]
        return (full[phase][field] - twin[phase][field]) / 2**20

    rows = []
    for zero3_init, name in ((True, "partitioned (default)"), (False, "whole base per rank")):
        for rank in range(args.nprocs):
            loaded = due(zero3_init, rank, "base loaded", "VmHWM")
            startup = due(zero3_init, rank, "start-up", "VmHWM")
            rows.append([name, rank, round(loaded), f"{loaded * 2**20 / base_bytes:.2f}",
                         round(results[model_dir, zero3_init][rank]["start-up"]["VmHWM"] / 2**20),
                         round(startup), f"{startup * 2**20 / base_bytes:.2f}",
                         round(due(zero3_init, rank, "start-up", "RssAnon")),
                         round(due(zero3_init, rank, "start-up", "RssFile")),
                         f"{results[model_dir, zero3_init][rank]['start-up seconds']:.1f}",
                         round(due(zero3_init, rank, "run", "VmHWM"))])

    def worst(zero3_init: bool, phase: str) -> float:
        return max(due(zero3_init, r, phase, "VmHWM") for r in range(args.nprocs)) * 2**20 / base_bytes

    trainable = results[model_dir, True][0]["trainable"]
    state = trainable * 20 / args.nprocs
    reading = (f"Reading: partitioned, at most {worst(True, 'base loaded'):.2f} x the base per rank once the base is "
               f"loaded and {worst(True, 'start-up'):.2f} x at the end of the start-up, which includes the trainable "
               f"state ({trainable / 1e6:.1f} M parameters x ~20 bytes / {args.nprocs} ranks = "
               f"{state / 2**20:.0f} MiB, "
               f"{state / base_bytes:.2f} x the base); whole base per rank, {worst(False, 'start-up'):.2f} x.")
    body = (provenance() + f" {args.model}: {base_bytes / 2**20:.0f} MiB of safetensors (fp32), {args.nprocs} ranks. "
            + reading + "\n\n"
            + table(["base", "rank", "peak RSS once the base is loaded, due to the base (MiB)", "/ base",
                     "start-up peak RSS (MiB)", "due to the base (MiB)", "/ base",
                     "largest RssAnon due to the base", "largest RssFile due to the base", "start-up (s)",
                     "peak RSS of the whole run, due to the base (MiB)"], rows))
    publish(SECTION, INTRO, f"{args.nprocs} ranks, {args.model}", body, args.doc)


if __name__ == "__main__":
    main()
