"""Where does a UEA training run spend its time? cProfile over `fit`, grouped by phase.

Usage: .venv/bin/python scripts/profile_training.py [Dataset] [variant] [epochs]
Prints the cumulative seconds of each phase of the engine (profiling overhead included).
"""

from __future__ import annotations

import cProfile
import pstats
import re
import sys
import tempfile
from dataclasses import replace

from primal_dual_attention.training.config import TrainConfig, dataset_config_path, load_yaml_config
from primal_dual_attention.training.engine import fit, seed_everything
from primal_dual_attention.training.tasks import build_task

PHASES = {
    "whole run (fit)": "engine.py:.*\\(fit\\)",
    "training epochs": "_train_epoch",
    "  model forward (train + eval)": "module.py:.*\\(_call_impl\\)",
    "  backward": "\\(backward\\)",
    "  optimizer step": "radam.py:.*\\(step\\)|adamw.py:.*\\(step\\)",
    "  batching (index, cut, mask)": "uea.py:.*\\(batches\\)",
    "evaluation": "engine.py:.*\\(evaluate\\)",
    "checkpoint writes": "atomic_save",
}


def main() -> None:
    dataset = sys.argv[1] if len(sys.argv) > 1 else "JapaneseVowels"
    variant = sys.argv[2] if len(sys.argv) > 2 else "softmax"
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    cfg = load_yaml_config(dataset_config_path("uea", dataset), TrainConfig())
    cfg = replace(cfg, variant=variant, epochs=epochs, progress=False, out_dir=tempfile.mkdtemp())
    seed_everything(0)
    task = build_task(cfg)
    profiler = cProfile.Profile()
    profiler.runcall(fit, cfg, task)
    stats = pstats.Stats(profiler)
    print(f"{dataset}, {variant}, {epochs} epochs, protocol {cfg.protocol}, batch {cfg.batch_size}")
    print("| phase | seconds (cumulative) |\n|---|---|")
    for label, pattern in PHASES.items():
        total = sum(row[3] for func, row in stats.stats.items()
                    if re.search(pattern, f"{func[0]}:{func[1]}({func[2]})") and not
                    any(re.search(pattern, f"{c[0]}:{c[1]}({c[2]})") for c in row[4]))
        print(f"| {label} | {total:.2f} |")


if __name__ == "__main__":
    main()
