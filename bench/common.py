"""Shared pieces of the bench/ scripts: device, models, batches, the compared training steps,
interleaved timing, peak memory in fresh processes, and the docs/benchmarks.md writer.

Everything is device-agnostic: CUDA when available (timings synchronised, peak memory from
``torch.cuda.max_memory_allocated``), else CPU (peak resident set size, VmHWM, of the process).

The variants share one copy of the frozen base weights (``BaseModel.fresh``), so a benchmark can keep
every variant alive and interleave them: on a shared CPU the load drifts over minutes, and only
measurements taken side by side, round after round, give ratios that mean something.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"
DOC = REPO / "docs" / "benchmarks.md"
DOC_HEADER = ("# Benchmarks\n\nMeasured numbers of comlora_ds. Each section names its script, the exact command, "
              "the machine and the date; rerun the command to refresh it.\n")

from comlora_ds.config import LLAMA_LINEAR_MODULES, RunConfig  # noqa: E402
from comlora_ds.comlora.losses import ComLoRAObjective, response_nll_full_logits  # noqa: E402
from comlora_ds.comlora.model import ComLoRAModel, build_model, build_objective  # noqa: E402
from comlora_ds.training.step import forward_backward  # noqa: E402

MODELS = {
    "smollm2-135m": "smollm2-135m",                                     # built in, converted once
    "stories260k": str(SHARED_DATA / "models" / "stories260K"),         # tiny pretrained LLaMA
}


# ---------------------------------------------------------------------------------------- device
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible), torch {torch.__version__}"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB, no GPU, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def today() -> str:
    return datetime.date.today().isoformat()


# ---------------------------------------------------------------------------------------- models
def resolve(name: str) -> str:
    from comlora_ds.models.builtin_models import resolve_model_path

    return resolve_model_path(MODELS.get(name, name))


def default_dtype(requested: str = "auto") -> torch.dtype:
    """auto: bf16 on a GPU that supports it, else fp32 (bf16 is ~26x slower on this CPU)."""
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


class BaseModel:
    """The frozen base loaded once; ``fresh()`` gives a new model object sharing its weight tensors."""

    def __init__(self, name: str, dtype: str = "auto", attn: str = "auto"):
        from transformers import AutoModelForCausalLM

        from comlora_ds.models.base_model import choose_attn_implementation

        self.name, self.path = name, resolve(name)
        self.dtype = default_dtype(dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=self.dtype, attn_implementation=choose_attn_implementation(attn)).to(device())
        self.model.requires_grad_(False)
        self.config = self.model.config

    def fresh(self):
        params = {id(p): p for p in self.model.parameters()}
        llm = copy.deepcopy(self.model, memo=params)     # new modules, same frozen weight tensors
        llm.train()
        return llm

    @property
    def vocab(self) -> int:
        return self.config.vocab_size


def make_batch(vocab: int, batch_size: int, seq_len: int, response_frac: float = 0.5, seed: int = 0,
               dev: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Random tokens, no padding; the first (1 - response_frac) of each row is prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    labels = input_ids.clone()
    prompt = min(seq_len - 2, int(round(seq_len * (1.0 - response_frac))))
    labels[:, :prompt] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(dev or device()) for k, v in batch.items()}


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


# --------------------------------------------------------------------------- the compared steps
@dataclass
class Spec:
    """One training-step variant. ``kind``:

    * ``ours``     - build_model + forward_backward (batched or sequential execution) + AdamW;
                     ``loss`` = chunked (the library's response_nll), full (naive full-logits CE,
                     NaiveCEModel) or hf (K=1 only: the HF model's own token-mean loss on our layers).
    * ``authors``  - K forwards with one component active each, all graphs kept, the ComLoRA objective
                     on the stacked losses, one backward (the paper authors' approach).
    * ``peft``     - PEFT get_peft_model(LoraConfig) with HF's loss (labels=...).
    """

    kind: str = "ours"
    k: int = 1
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    execution: str = "batched"
    loss: str = "chunked"
    selector: bool = True
    ce_chunk_size: int = 1024
    targets: tuple[str, ...] = LLAMA_LINEAR_MODULES
    label: str = ""

    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind == "peft":
            return f"PEFT LoRA r={self.rank}"
        if self.kind == "authors":
            return f"K={self.k} K-sequential, graphs kept (authors)"
        mode = "" if self.k == 1 else f" {self.execution}"
        sel = "" if self.selector or self.k == 1 else " no-selector"
        return f"ours K={self.k}{mode}{sel} ({self.loss} CE)"

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "targets": list(self.targets)})

    @staticmethod
    def from_json(text: str) -> "Spec":
        d = json.loads(text)
        d["targets"] = tuple(d["targets"])
        return Spec(**d)


class NaiveCEModel(ComLoRAModel):
    """The naive baseline of the CE: fp32 logits for the whole replicated batch [K*B, L, V], then the
    per-sample masked mean (``losses.response_nll_full_logits``). Everything else is ComLoRAModel's."""

    def row_losses(self, hidden, labels):
        return response_nll_full_logits(self.llm.get_output_embeddings()(hidden).float(), labels)


def run_config(spec: Spec) -> RunConfig:
    cfg = RunConfig()
    cfg.adapter.num_components, cfg.adapter.rank, cfg.adapter.alpha = spec.k, spec.rank, spec.alpha
    cfg.adapter.dropout, cfg.adapter.target_modules = spec.dropout, list(spec.targets)
    cfg.comlora.execution, cfg.comlora.no_selector = spec.execution, not spec.selector
    cfg.train.ce_chunk_size = spec.ce_chunk_size
    return cfg.validate()


def authors_forward_backward(model: ComLoRAModel, batch, objective: ComLoRAObjective, eta: float) -> torch.Tensor:
    """The ComLoRA authors' approach: K full forward passes, one component active in each, every graph
    kept alive; the objective on the stacked [K, B] losses; one backward through all K graphs."""
    losses, sims = [], None
    for k in range(model.num_components):
        out = model(**batch, component=k, use_selector=k == 0)
        losses.append(out.losses[0])
        sims = out.sims if k == 0 else sims
    total = objective(torch.stack(losses), sims, eta, out.num_tokens).total
    total.backward()
    return total.detach()


@dataclass
class Variant:
    spec: Spec
    step: Callable[[], None]
    params: list = field(default_factory=list)
    model: object = None


def build_variant(spec: Spec, base: BaseModel, batch: dict[str, torch.Tensor], eta: float = 0.5,
                  seed: int = 0) -> Variant:
    """A ready-to-run training step (zero_grad, forward, backward, AdamW step) for ``spec``."""
    torch.manual_seed(seed)
    llm = base.fresh()
    fused = torch.cuda.is_available()
    if spec.kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(llm, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                               target_modules=list(spec.targets)))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)

        def step():
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()
        return Variant(spec, step, params, model)

    cfg = run_config(spec)
    model = build_model(cfg, llm)
    if spec.loss == "full":
        model = NaiveCEModel(model.llm, model.num_components, model.selector, model.ce_chunk_size)
    model.to(device())
    objective = build_objective(cfg)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)

    if spec.kind == "authors":
        def step():
            opt.zero_grad(set_to_none=True)
            authors_forward_backward(model, batch, objective, eta)
            opt.step()
    elif spec.loss == "hf":
        if spec.k != 1:
            raise ValueError("the HF loss variant is K = 1 only")

        def step():
            opt.zero_grad(set_to_none=True)
            model.llm(**batch, use_cache=False).loss.backward()
            opt.step()
    else:
        def step():
            opt.zero_grad(set_to_none=True)
            forward_backward(model, batch, objective, eta, lambda loss: loss.backward(), spec.execution)
            opt.step()
    return Variant(spec, step, params, model)


# ------------------------------------------------------------------------------ interleaved timing
@dataclass
class Timings:
    names: list[str]
    times: dict[str, list[float]]            # every timed step, seconds
    rounds: dict[str, list[float]]           # per round: median step time of that round
    cpu_share: dict[str, list[float]]        # per timed step: CPU time / (wall * threads), relative to warm-up
    waited: float = 0.0                      # seconds spent waiting for other processes to go quiet
    redone: int = 0                          # steps re-run because another process interrupted them
    clock: str = "wall"

    def min(self, name: str) -> float:
        return min(self.times[name])

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def paired_ratio(self, name: str, ref: str, scale: float = 1.0) -> float:
        """Median over rounds of (this round's time / (scale * the reference's time in the same round))."""
        return statistics.median(a / (scale * b) for a, b in zip(self.rounds[name], self.rounds[ref]))

    def ratios(self, name: str, ref: str, scale: float = 1.0) -> tuple[float, float, float]:
        """(ratio of minima, ratio of medians, median of per-round ratios) against scale * ref."""
        return (self.min(name) / (scale * self.min(ref)), self.median(name) / (scale * self.median(ref)),
                self.paired_ratio(name, ref, scale))

    def contended(self) -> float:
        """Fraction of timed CPU steps that got < 85% of the CPU share of an undisturbed warm-up step."""
        shares = [s for v in self.cpu_share.values() for s in v]
        return sum(s < 0.85 for s in shares) / len(shares) if shares else 0.0

    def noise_note(self) -> str:
        spread = max((max(t) - min(t)) / statistics.median(t) for t in self.times.values())
        note = f"largest (max - min) / median spread of one variant: {spread:.0%}"
        if not torch.cuda.is_available() and self.clock == "wall":
            note += (f"; {self.contended():.0%} of the kept steps got < 85% of the CPU share of an undisturbed "
                     f"step; {self.redone} interrupted steps were redone and {self.waited:.0f} s spent "
                     f"waiting for other processes to leave the cores idle")
        return note


def _cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]                      # idle + iowait
    return sum(v[:8]) - idle, sum(v[:8])


def other_load(window: float = 0.3) -> float:
    """Cores kept busy by other processes over ``window`` seconds while this one sleeps (CPU only)."""
    time.sleep(0.05)                        # let this process's OpenMP workers stop spinning
    b0, t0 = _cpu_ticks()
    time.sleep(window)
    b1, t1 = _cpu_ticks()
    return (b1 - b0) / max(t1 - t0, 1) * os.cpu_count()


def wait_quiet(threshold: float = 0.3, max_wait: float = 60.0) -> float:
    """On a shared CPU, wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores.
    Returns the seconds waited. No-op on GPU."""
    if torch.cuda.is_available():
        return 0.0
    start = time.perf_counter()
    while other_load() >= threshold and time.perf_counter() - start < max_wait:
        time.sleep(1.0)
    return time.perf_counter() - start


def add_timing_args(p) -> None:
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: all cores)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: wall-clock step time (GPU: always). cpu: the process's CPU time, with --threads 1 "
                        "immune to other processes time-slicing the cores (a cost measure, not a latency)")


def timing_setup(args) -> str:
    """Applies --threads/--clock; returns a sentence describing the clock for the report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        args.clock = "wall"
        return "wall-clock, CUDA synchronised"
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            raise SystemExit("--clock cpu needs --threads 1 (with more threads, OpenMP spin-waits count as CPU time)")
        return ("process CPU time with 1 thread (--clock cpu --threads 1): the cost of the step, unaffected by other "
                "processes time-slicing the shared cores")
    return f"wall-clock, {torch.get_num_threads()} threads"


def interleaved(steps: dict[str, Callable[[], None]], rounds: int = 3, steps_per_round: int = 1,
                warmup: int = 1, log: Callable[[str], None] = print, seed: int = 0, quiet: bool = True,
                retries: int = 2, clock: str = "wall") -> Timings:
    """Warm every variant up, then ``rounds`` rounds; each round runs every variant ``steps_per_round``
    times, in a fresh random order (so no variant always follows the same neighbour).

    CPU only, with ``quiet``: before each variant's turn wait until other processes leave the cores
    idle (``wait_quiet``), and redo a step (at most ``retries`` times) that got < 85% of its threads'
    CPU time, i.e. that another process interrupted. The same rule applies to every variant.
    ``clock="cpu"`` (CPU, 1 thread) records the process CPU time instead, and needs neither."""
    if clock == "cpu":
        quiet = False
    names = list(steps)
    threads = torch.get_num_threads()
    cpu = not torch.cuda.is_available()
    expected = {}                           # CPU share of an undisturbed step (small ops use < all threads)
    for name in names:
        for i in range(warmup):
            if quiet and cpu and i == warmup - 1:
                wait_quiet()
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            expected[name] = (time.process_time() - c0) / ((time.perf_counter() - t0) * threads)
    sync()
    times = {n: [] for n in names}
    per_round = {n: [] for n in names}
    shares = {n: [] for n in names}
    rng = random.Random(seed)
    waited, redone = 0.0, 0
    for r in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if quiet and cpu:
                waited += wait_quiet()
            this = []
            for _ in range(steps_per_round):
                for attempt in range(retries + 1):
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    steps[name]()
                    sync()
                    wall, used = time.perf_counter() - t0, time.process_time() - c0
                    share = used / (wall * threads) / expected.get(name, 1.0)
                    if clock == "cpu":
                        wall = used
                    if not (quiet and cpu and share < 0.85 and attempt < retries):
                        break
                    redone += 1
                this.append(wall)
                if cpu:
                    shares[name].append(share)
            times[name] += this
            per_round[name].append(statistics.median(this))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {per_round[n][-1]:.3f}s" for n in names))
    return Timings(names, times, per_round, shares, waited, redone, clock)


# ------------------------------------------------------------------------------------ peak memory
def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """The kB fields of ``/proc/<pid>/status`` (VmRSS, VmHWM, RssAnon, RssFile, ...) in bytes."""
    fields = (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(value.split()[0]) * 1024 for name, value in fields if value.strip().endswith("kB")}


def _vm(field_name: str) -> int:
    return proc_memory().get(field_name, 0)


def reset_peak() -> int:
    """Reset the peak counter; returns the current footprint (bytes) the peak is measured against."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:      # 5: reset VmHWM to the current RSS
            f.write("5")
    except OSError:
        pass
    return _vm("VmRSS")


def peak() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _vm("VmHWM")


def memory_kind() -> str:
    return "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM)"


def run_worker(script: Path, payload: dict, timeout: int = 1800) -> dict:
    """Run ``script --worker JSON`` in a fresh Python process (its peak memory is its own); the worker
    prints one line ``RESULT {json}``."""
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(payload)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {payload} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def worker_result(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------- reports
def verdict(ratios: tuple[float, ...], target: float, tolerance: float = 0.01) -> str:
    """'met' when every estimate (e.g. ratio of minima and paired ratio) is <= target; 'met within noise'
    when they exceed it by at most ``tolerance`` (relative); else 'NOT met'."""
    worst = max(ratios)
    if worst <= target:
        return "met"
    return "met within noise (+1%)" if worst <= target * (1 + tolerance) else "NOT met"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_training_env() -> dict:
    """The environment of a training subprocess on this CPU machine: one thread per rank, offline, this checkout."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def run_training(cmd: list[str], env: dict, output_dir: Path, timeout: float = 3600,
                 quiet: bool = True) -> tuple[list[dict], float]:
    """A training command run to the end (with ``quiet``, once the cores are quiet): (its metrics.jsonl records,
    its wall seconds)."""
    if quiet:
        wait_quiet()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nfailed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()], wall


def table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO))] + sys.argv[1:])


def provenance() -> str:
    """The opening of a docs/benchmarks.md section: machine, date and the command that rewrites it."""
    return f"{machine()}, {today()}. `{command_line().replace(' --doc', '')} --doc`."


def update_doc_section(title: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the ``## title`` section of docs/benchmarks.md, leaving every other section
    as it is in the file right now (another script may own them)."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else DOC_HEADER
    heading = f"## {title}"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    new = [heading, "", *body.strip().splitlines(), ""]
    if start is None:
        lines = lines + ([""] if lines and lines[-1].strip() else []) + new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + new + lines[end:]
    doc.write_text("\n".join(lines).rstrip() + "\n")


def publish(section: str, intro: str, sub: str, body: str, write: bool) -> None:
    """Print a result block; with ``write`` (the scripts' --doc) also put it into docs/benchmarks.md."""
    print(f"\n### {sub}\n\n{body}")
    if write:
        update_doc_subsection(section, intro, sub, body)


def update_doc_subsection(section: str, intro: str, sub: str, body: str, doc: Path = DOC) -> None:
    """Replace (or add) the ``### sub`` block inside the ``## section`` section (created with ``intro``
    if absent); other ### blocks of the section, e.g. other models' runs, stay."""
    text = doc.read_text() if doc.exists() else DOC_HEADER
    lines = text.splitlines()
    heading = f"## {section}"
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        current = intro.strip().splitlines()
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        current = lines[start + 2:end]
    sub_heading = f"### {sub}"
    i = next((j for j, line in enumerate(current) if line.strip() == sub_heading), None)
    block = [sub_heading, "", *body.strip().splitlines(), ""]
    if i is None:
        current = [*current, *([""] if current and current[-1].strip() else []), *block]
    else:
        end = next((j for j in range(i + 1, len(current)) if current[j].startswith("### ")), len(current))
        current = current[:i] + block + current[end:]
    update_doc_section(section, "\n".join(current), doc)


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def mib(n: float) -> float:
    return n / 2 ** 20
