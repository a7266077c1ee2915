"""``pda bench model``: what a whole task model costs per variant, on the task's real batches.

Every variant's model is built (``build_task``), one real training batch is taken, and the
models are timed *in one process, round-robin* (one step of each variant in turn, ``repeats``
rounds, median per variant), so that a slow phase of a shared machine hits every variant alike:
training steps (forward, backward, AdamW) and inference, eager and/or through ``torch.compile``,
reported as samples per second, milliseconds per step and the ratio to softmax's step in the
same mode. FLOPs per sample come from :class:`torch.utils.flop_counter.FlopCounterMode`,
forward only and forward+backward: softmax layers on their explicit math path (the counter does
not see the fused CPU kernels; the math path performs the same matrix products), linear layers
on the primal O(N) form they run. ``sparse`` is therefore counted as its dense band-masked
product, while its blocked path computes about (block + 2·window)/N of it; the tables say so.
Peak memory of one eager training step: ``torch.cuda.max_memory_allocated`` on a GPU; on the
CPU the rise of the process's peak resident set (``VmHWM``, reset after warm-up through
``/proc/self/clear_refs``) over the resident set before the step, in a fresh process.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from primal_dual_attention.analysis.bench import in_fresh_process, peak_rss_rise_mib
from primal_dual_attention.attention import fused_paths
from primal_dual_attention.training.compilation import check_compile
from primal_dual_attention.training.config import TrainConfig
from primal_dual_attention.training.distributed import resolve_device
from primal_dual_attention.training.engine import autocast
from primal_dual_attention.utils import exclusive, machine_description, synchronise


@dataclass
class ModelCost:
    task: str
    dataset: str
    variant: str
    batch: int
    input_shape: str  # one sample's input, e.g. 3x32x32 or 2000
    params: int
    gflops_fwd_per_sample: float
    gflops_train_per_sample: float
    train_samples_per_s: float
    infer_samples_per_s: float
    peak_train_mb: float | None
    device: str
    precision: str
    mode: str = "eager"  # eager, compile or cudagraphs
    train_ms: float | None = None  # median training step
    train_ratio: float | None = None  # train_ms / softmax's train_ms in the same mode
    flop_ratio: float | None = None  # training FLOPs / softmax's


def _round_robin_seconds(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                         repeats: int) -> dict[str, float]:
    """Median seconds of each step, timed in turn (one of each per round) after ``warmup`` calls."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronise(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            synchronise(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _flops(model: nn.Module, x, mask, y, backward: bool) -> int:
    """FLOPs of one step; softmax-kernel layers on their math path (the counter does not see the
    fused kernels), layers with an exact primal form on it (what they compute)."""
    with fused_paths(model, False), FlopCounterMode(display=False) as counter:
        logits = model(x, mask)
        if backward:
            F.cross_entropy(logits, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


SPARSE_FLOPS_NOTE = ("`sparse` FLOPs are those of its dense band-masked math path (what the counter "
                     "sees); its blocked path computes about (block + 2·window)/N of the attention part.")

COMPILE_MODES = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead"}


@dataclass
class PreparedModel:
    """One variant's model on its device, one real training batch, and its step closures."""

    cfg: TrainConfig
    model: nn.Module
    batch: tuple[Tensor, Tensor | None, Tensor]
    device: torch.device

    def steps(self, mode: str) -> tuple[Callable[[], None], Callable[[], None]]:
        """``(train_step, infer_step)`` of the model, eager or through ``torch.compile``."""
        x, mask, y = self.batch
        compile_mode, backend = COMPILE_MODES[mode], self.cfg.compile_backend
        model = self.model if compile_mode is None else torch.compile(
            self.model, mode=compile_mode if backend == "inductor" else None, backend=backend)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        precision = self.cfg.precision

        def train_step() -> None:
            self.model.train()
            with autocast(self.device, precision):
                loss = F.cross_entropy(model(x, mask).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def infer_step() -> None:
            self.model.eval()
            with torch.inference_mode(), autocast(self.device, precision):
                model(x, mask)

        return train_step, infer_step


def prepare_model(cfg: TrainConfig, batch: int, device: str | torch.device) -> PreparedModel:
    """``cfg``'s model on ``device`` with its first real training batch of ``batch`` samples."""
    from primal_dual_attention.training.tasks import build_task

    target = resolve_device(str(device))
    task = build_task(replace(cfg, batch_size=batch))
    x, mask, y = next(task.train.batches(batch, torch.Generator().manual_seed(0)))
    placed = tuple(None if t is None else t.to(target) for t in (x, mask, y))
    return PreparedModel(cfg, task.model.to(target), placed, target)


def variant_configs(base: TrainConfig, variants: Sequence[str]) -> list[TrainConfig]:
    """``base`` for each variant, checked: ``base.window`` is the sparse variants' window (a
    sparse one needs it); the other variants run without one (said in a warning), so the softmax
    baseline stays dense and SH, which takes no window, can be measured beside sparse."""
    from primal_dual_attention.attention import get_variant

    dense = [v for v in variants if not get_variant(v).sparse and not get_variant(v).multi_scale]
    if base.window is not None and dense:
        warnings.warn(f"window={base.window} is the sparse variants' own: {dense} run without one",
                      stacklevel=2)
    cfgs = []
    for variant in variants:
        sparse = get_variant(variant).sparse
        if sparse and base.window is None:
            raise ValueError(f"variant {variant!r} needs its window: --set window=w (query i sees "
                             "|i - j| <= w; the other variants run without one)")
        cfgs.append(replace(base, variant=variant, window=base.window if sparse else None).validate())
    return cfgs


def measure_model_costs(cfgs: Sequence[TrainConfig], *, batch: int, warmup: int = 3, repeats: int = 10,
                        device: str = "auto", modes: Sequence[str] = ("eager",),
                        memory: bool = True, timing_lock: str | Path | None = None) -> list[ModelCost]:
    """Cost of each config's model (one per variant) on one real training batch of ``batch``
    samples, the variants timed round-robin in every mode of ``modes``. Each mode is warmed up
    (compiled) first; its timed rounds then run while holding ``timing_lock`` (a file), so that
    processes started together compile at the same time and take the device one at a time."""
    unknown = [m for m in modes if m not in COMPILE_MODES]
    if unknown:
        raise ValueError(f"modes must be among {list(COMPILE_MODES)}, got {unknown}")
    target = resolve_device(device)
    if "cudagraphs" in modes and target.type != "cuda":
        raise ValueError(f"modes: cudagraphs needs a CUDA device, got device {str(target)!r} "
                         "(elsewhere it would time plain compile under the cudagraphs label)")
    backends = {cfg.compile_backend for cfg in cfgs}
    if len(backends) > 1:
        raise ValueError(f"compile_backend must be one for every variant, got {sorted(backends)}")
    (backend,) = backends
    if any(mode != "eager" for mode in modes):
        check_compile("on", backend, target)  # a known backend, before any data loads
    if "cudagraphs" in modes and backend != "inductor":
        raise ValueError(f"modes: cudagraphs is a mode of the inductor backend, got compile_backend="
                         f"{backend!r} (it would time code without CUDA graphs under the cudagraphs label)")
    prepared = {cfg.variant: prepare_model(cfg, batch, target) for cfg in cfgs}
    flops = {variant: (_flops(item.model, *item.batch, backward=False),
                       _flops(item.model, *item.batch, backward=True)) for variant, item in prepared.items()}
    peaks = {variant: _peak_memory(item) if memory else None for variant, item in prepared.items()}
    costs = []
    for mode in modes:
        if mode != "eager":
            torch._dynamo.reset()
        with _every_variant_compiled(len(prepared)):
            closures = {variant: item.steps(mode) for variant, item in prepared.items()}
            for train_step, infer_step in closures.values():  # compilation happens here, unlocked
                for _ in range(warmup):
                    train_step()
                    infer_step()
            with exclusive(timing_lock):  # one warm-up round again: caches after waiting
                train_s = _round_robin_seconds({v: c[0] for v, c in closures.items()}, target, 1, repeats)
                infer_s = _round_robin_seconds({v: c[1] for v, c in closures.items()}, target, 1, repeats)
        for variant, item in prepared.items():
            x, _, y = item.batch
            fwd, train = flops[variant]
            ratio_base = "softmax" if "softmax" in prepared else None
            costs.append(ModelCost(
                item.cfg.task, item.cfg.dataset, variant, len(y), "x".join(map(str, x.shape[1:])),
                sum(p.numel() for p in item.model.parameters()), fwd / len(y) / 1e9, train / len(y) / 1e9,
                len(y) / train_s[variant], len(y) / infer_s[variant], peaks[variant],
                str(item.device), item.cfg.precision, _mode_label(mode, backend), 1e3 * train_s[variant],
                None if ratio_base is None else train_s[variant] / train_s[ratio_base],
                None if ratio_base is None else train / flops[ratio_base][1]))
    return costs


def _mode_label(mode: str, backend: str) -> str:
    """The mode as rows and tables name it: ``compile[aot_eager]`` for another backend than
    inductor, so such rows neither replace nor pass for inductor's."""
    return mode if mode == "eager" or backend == "inductor" else f"{mode}[{backend}]"


def _every_variant_compiled(variants: int) -> contextlib.AbstractContextManager:
    """Dynamo settings under which every variant's model stays compiled: the models share one
    ``forward`` code object and each needs a graph per mode (training, inference), more than
    Dynamo's default of 8 versions per function from the fifth variant on; past its limit Dynamo
    falls back to eager with a log line, which would be timed under the compile label, so hitting
    the limit is made an error (on torch versions that can)."""
    names = torch._dynamo.config
    limit = "recompile_limit" if hasattr(names, "recompile_limit") else "cache_size_limit"
    settings: dict[str, object] = {limit: max(getattr(names, limit), 2 * variants + 2)}
    for fail in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(names, fail):
            settings[fail] = True
            break
    return torch._dynamo.config.patch(**settings)


def _peak_memory(item: PreparedModel) -> float | None:
    """Peak memory (MiB) of one eager training step above what was allocated before it."""
    if item.device.type == "cuda":
        train_step, _ = item.steps("eager")
        train_step()
        torch.cuda.synchronize(item.device)
        torch.cuda.reset_peak_memory_stats(item.device)
        before = torch.cuda.memory_allocated(item.device)
        train_step()
        torch.cuda.synchronize(item.device)
        return (torch.cuda.max_memory_allocated(item.device) - before) / 2**20
    return _cpu_peak_in_subprocess(item.cfg, len(item.batch[2]))


def _cpu_peak_worker(cfg: TrainConfig, batch: int, threads: int) -> float:
    """In a fresh process: rise of the peak RSS (MiB) during one training step after warm-up."""
    torch.set_num_threads(threads)
    train_step, _ = prepare_model(cfg, batch, "cpu").steps("eager")
    train_step()
    return peak_rss_rise_mib(train_step)


def _cpu_peak_in_subprocess(cfg: TrainConfig, batch: int) -> float | None:
    """The training step's peak in a fresh process (see :func:`bench.in_fresh_process`)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    return in_fresh_process(_cpu_peak_worker, cfg, batch, torch.get_num_threads())


COST_COLUMNS = [f for f in ModelCost.__dataclass_fields__]
COMMAND_NOTE = "    # "  # between a command and the machine it ran on, in cost_commands.txt


def _cost_key(row: dict) -> tuple:
    """A new row replaces an older one of the same table of ``speed.md`` (task, dataset, input
    shape, batch, device, precision), variant and mode (files written before modes existed count
    as eager). Other model options (``dim``, ``attention_options``, ...) replace the row too:
    measure them into another folder to keep both."""
    return (row["task"], row["dataset"], row["input_shape"], str(row["batch"]), row["device"],
            row["precision"], row["variant"], row.get("mode") or "eager")


def check_cost_folder(out_dir: Path) -> Path:
    """``out_dir/cost.csv`` after checking that ``out_dir`` can be made and that an existing
    ``cost.csv`` has no column this version does not write (called before measuring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cost.csv"
    if path.is_file():
        with open(path, newline="") as handle:
            if unknown := sorted(set(csv.DictReader(handle).fieldnames or ()) - set(COST_COLUMNS)):
                raise ValueError(f"{path} has columns this version does not write ({unknown}): "
                                 "move it aside or use another --out")
    return path


def write_costs(costs: Sequence[ModelCost], out_dir: Path, command: str, load: float | None = None) -> Path:
    """Add ``costs`` to ``out_dir/cost.csv`` and the command to ``cost_commands.txt`` with the
    machine and, when given, the ``load`` average before the measurement (other work on the CPU
    slows every timing). A row of the same key as an older one (:func:`_cost_key`) replaces it
    where it stood (one row per key), and a command run again
    replaces its older line, so tables keep their order. Both files are written whole once they
    are complete."""
    path = check_cost_folder(out_dir)
    fresh = {_cost_key(row): row for row in (
        {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in asdict(c).items()} for c in costs)}
    rows = []
    if path.is_file():
        with open(path, newline="") as handle:
            rows = [fresh.pop(_cost_key(r), r) for r in csv.DictReader(handle)]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows + list(fresh.values()))
    path.write_text(table.getvalue(), newline="")
    commands_path = out_dir / "cost_commands.txt"
    line = f"{command}{COMMAND_NOTE}{machine_description()}"
    if load is not None:
        line += f"; load average {load:.1f} before it"
    lines = commands_path.read_text().splitlines() if commands_path.is_file() else []
    same = [i for i, old in enumerate(lines) if old.rpartition(COMMAND_NOTE)[0] == command]
    if same:
        lines[same[0]] = line
    else:
        lines.append(line)
    commands_path.write_text("".join(f"{text}\n" for text in lines))
    return path


def cpu_load() -> float | None:
    """The 1-minute load average (None where the system does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def write_speed_table(out_dir: Path) -> Path:
    """``out_dir/speed.md``: per model, batch, device and precision, each variant's training step
    in every measured mode as milliseconds and as the ratio to softmax's step measured in the same
    process (``train_ratio``; none where softmax was not measured beside it: rows of other
    commands are never compared), beside its training-FLOP ratio; made from ``cost.csv`` and
    ``cost_commands.txt`` alone."""
    with open(out_dir / "cost.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["task"], row["dataset"], row["input_shape"], row["batch"], row["device"], row["precision"])
        groups.setdefault(key, []).append(row)
    commands = (out_dir / "cost_commands.txt").read_text().splitlines()
    lines = ["# Training-step cost per variant", "",
             "Made by the `pda bench model` commands below (all variants of a table in one process, "
             "timed round-robin; median step). Each cell: milliseconds per training step (forward, "
             "backward, AdamW) and, in brackets, the ratio to softmax in the same model and mode, "
             "timed in the same process. `FLOPs` is the ratio of training matrix-product FLOPs to "
             "softmax's (FlopCounterMode; BN's statistics and SH's pooling are elementwise work it "
             "does not count).", ""]
    for (task, dataset, shape, batch, device, precision), group in groups.items():
        modes = list(dict.fromkeys(r.get("mode") or "eager" for r in group))
        step = {((r.get("mode") or "eager"), r["variant"]):
                float(r["train_ms"]) if r.get("train_ms") else
                1e3 * int(r["batch"]) / float(r["train_samples_per_s"]) for r in group}
        same_process = {((r.get("mode") or "eager"), r["variant"]): r.get("train_ratio") for r in group}
        flops = {r["variant"]: float(r["gflops_train_per_sample"]) for r in group}
        lines += [f"## {task} {dataset} ({shape}), batch {batch}, {device} {precision}", "",
                  "| variant | " + " | ".join(modes) + " | FLOPs |",
                  "|---|" + "---|" * (len(modes) + 1)]
        for variant in dict.fromkeys(r["variant"] for r in group):
            cells = []
            for mode in modes:
                ms, ratio = step.get((mode, variant)), same_process.get((mode, variant))
                ratio = f" ({float(ratio):.2f})" if ratio else ""
                cells.append("–" if ms is None else f"{ms:.2f}{ratio}")
            flop = "" if "softmax" not in flops else f"{flops[variant] / flops['softmax']:.2f}"
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {flop} |")
        lines.append("")
    if any(r["variant"] == "sparse" for r in rows):
        lines += [SPARSE_FLOPS_NOTE, ""]
    lines += ["## Commands", "",
              *[f"- `{c.rpartition(COMMAND_NOTE)[0]}` ({c.rpartition(COMMAND_NOTE)[2]})" for c in commands]]
    path = out_dir / "speed.md"
    path.write_text("\n".join(lines) + "\n")
    return path
