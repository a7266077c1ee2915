"""``pda bench model``: what a whole task model costs per variant, on the task's real batches.

For each variant the task's model is built (``build_task``), one real training batch is taken
and the model is timed on it: training steps (forward, backward, AdamW) and inference, median
over ``repeats`` after warm-up, reported as samples per second. FLOPs per sample come from
:class:`torch.utils.flop_counter.FlopCounterMode`, forward only and forward+backward: softmax
layers on their explicit math path (the counter does not see the fused CPU kernels; the math
path performs the same matrix products), linear layers on the primal O(N) form they run.
Peak memory of one training step: ``torch.cuda.max_memory_allocated`` on
a GPU; on the CPU the rise of the process's peak resident set (``VmHWM``, reset after warm-up
through ``/proc/self/clear_refs``) over the resident set before the step.
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from primal_dual_attention.analysis.bench import peak_memory_pool, peak_rss_rise_mib
from primal_dual_attention.attention import fused_paths
from primal_dual_attention.training.config import TrainConfig
from primal_dual_attention.training.distributed import resolve_device
from primal_dual_attention.training.engine import autocast
from primal_dual_attention.utils import machine_description, synchronise


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


def _median_seconds(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    synchronise(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flops(model: nn.Module, x, mask, y, backward: bool) -> int:
    """FLOPs of one step; softmax-kernel layers on their math path (the counter does not see the
    fused kernels), layers with an exact primal form on it (what they compute)."""
    with fused_paths(model, False), FlopCounterMode(display=False) as counter:
        logits = model(x, mask)
        if backward:
            F.cross_entropy(logits, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _prepared(cfg: TrainConfig, batch: int, device: str):
    """The model on its device, one real training batch, and a training-step closure."""
    from primal_dual_attention.training.tasks import build_task

    task = build_task(replace(cfg, batch_size=batch))
    x, mask, y = next(task.train.batches(batch, torch.Generator().manual_seed(0)))
    target = resolve_device(device)
    model = task.model.to(target)
    x, y = x.to(target), y.to(target)
    mask = None if mask is None else mask.to(target)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        with autocast(target, cfg.precision):
            loss = F.cross_entropy(model(x, mask).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, (x, mask, y), target, train_step


def measure_model_cost(cfg: TrainConfig, *, batch: int, warmup: int = 3, repeats: int = 10,
                       device: str = "auto", memory: bool = True) -> ModelCost:
    """Cost of ``cfg``'s model on one real training batch of ``batch`` samples."""
    model, (x, mask, y), target, train_step = _prepared(cfg, batch, device)
    params = sum(p.numel() for p in model.parameters())
    cpu = [None if t is None else t.cpu() for t in (x, mask, y)]
    flops_fwd = _flops(model.cpu(), *cpu, backward=False) / len(y)
    flops_train = _flops(model, *cpu, backward=True) / len(y)
    model.to(target)

    def infer_step() -> None:
        with torch.inference_mode(), autocast(target, cfg.precision):
            model(x, mask)

    model.train()
    train_s = _median_seconds(train_step, target, warmup, repeats)
    peak = None
    if memory and target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
        before = torch.cuda.memory_allocated(target)
        train_step()
        torch.cuda.synchronize(target)
        peak = (torch.cuda.max_memory_allocated(target) - before) / 2**20
    elif memory:
        peak = _cpu_peak_in_subprocess(cfg, batch)
    model.eval()
    infer_s = _median_seconds(infer_step, target, warmup, repeats)
    return ModelCost(cfg.task, cfg.dataset, cfg.variant, len(y), "x".join(map(str, x.shape[1:])),
                     params, flops_fwd / 1e9, flops_train / 1e9, len(y) / train_s, len(y) / infer_s,
                     peak, str(target), cfg.precision)


def _cpu_peak_worker(cfg: TrainConfig, batch: int, threads: int) -> float:
    """In a fresh process: rise of the peak RSS (MiB) during one training step after warm-up."""
    torch.set_num_threads(threads)
    *_, train_step = _prepared(cfg, batch, "cpu")
    train_step()
    return peak_rss_rise_mib(train_step)


def _cpu_peak_in_subprocess(cfg: TrainConfig, batch: int) -> float | None:
    """The training step's peak in a fresh process (see :func:`bench.peak_memory_pool`)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    with peak_memory_pool() as pool:
        return pool.submit(_cpu_peak_worker, cfg, batch, torch.get_num_threads()).result()


COST_COLUMNS = [f for f in ModelCost.__dataclass_fields__]


def write_costs(costs: Sequence[ModelCost], out_dir: Path, command: str) -> Path:
    """Append to ``out_dir/cost.csv`` (rows of one dataset/variant/device replace older ones)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cost.csv"
    fresh = {(c.dataset, c.variant, c.device, c.precision) for c in costs}
    kept = []
    if path.is_file():
        with open(path, newline="") as handle:
            kept = [r for r in csv.DictReader(handle)
                    if (r["dataset"], r["variant"], r["device"], r["precision"]) not in fresh]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COST_COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        for cost in costs:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in asdict(cost).items()})
    with open(out_dir / "cost_commands.txt", "a") as handle:
        handle.write(f"{command}    # {machine_description()}\n")
    return path
