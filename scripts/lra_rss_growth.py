"""Resident memory of a ListOps training process, step by step (issue 16).

Runs the engine's training step (autocast, forward, cross-entropy, backward, AdamW) on real
ListOps batches (each cut to its longest sequence, so the width changes every step) and prints
the process's peak and current resident set after each step. Under bf16 autocast on this CPU the
process grows at every new width; under fp32 it stays flat.

Usage: PYTHONPATH=src python scripts/lra_rss_growth.py VARIANT STEPS PRECISION
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace

import torch
import torch.nn.functional as F

from primal_dual_attention.training.config import TrainConfig, bundled_config
from primal_dual_attention.training.engine import autocast
from primal_dual_attention.training.tasks import build_task


def resident_mib() -> tuple[int, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmHWM", "VmRSS")):
                values[line.split(":")[0]] = int(line.split()[1]) // 1024
    return values["VmHWM"], values["VmRSS"]


def main() -> None:
    variant, steps, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    base = bundled_config("lra", "listops", TrainConfig(task="lra", dataset="listops"))
    cfg = replace(base, variant=variant, precision=precision, budget=0.01, max_eval_samples=64,
                  out_dir=tempfile.mkdtemp()).validate()
    task = build_task(cfg)
    model = task.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = task.train.batches(cfg.batch_size, torch.Generator().manual_seed(0))
    print(f"{variant} {precision}: step, batch width, peak MiB, resident MiB; start {resident_mib()}")
    for step in range(steps):
        x, mask, y = next(batches)
        with autocast(torch.device("cpu"), precision):
            logits = model(x, mask)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(step, x.shape[1], *resident_mib(), flush=True)


if __name__ == "__main__":
    main()
