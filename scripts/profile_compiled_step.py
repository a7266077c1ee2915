"""Where a training step's time goes, per variant, down to the kernels Inductor generates.

The companion of ``pda bench model`` (issue 13): the same model and real training batch
(``analysis.model_cost``), one process, each variant compiled (or eager) and warmed up, then
``--steps`` training steps under ``torch.profiler`` with Inductor's per-kernel CPU profiling on.
Writes, per variant, the profiled milliseconds per step and the operations and generated
kernels that take the most self time, so two variants' steps can be compared line by line.
Profiling adds overhead: the totals are not step times (``pda bench model`` measures those).
Run it on a quiet machine, e.g.

    python scripts/profile_compiled_step.py --task uea --dataset JapaneseVowels --batch 16 \
        --set data_dir=.bench_data/uea --out results/speed/cpu/profile_jv_compiled.md
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from primal_dual_attention.analysis.model_cost import prepare_model
from primal_dual_attention.cli import parse_override
from primal_dual_attention.training.config import TrainConfig, bundled_config, config_from_mapping
from primal_dual_attention.utils import machine_description

GRAPH_PREFIX = re.compile(r"^graph_\d+_")  # Inductor numbers graphs per process, not per model
GROUPS = {  # name pattern -> what it is, in the order of the summary table
    r"^aten::(mm|addmm|bmm|baddbmm)$": "matrix products (`aten::mm`, `addmm`, `bmm`)",
    r"^aten::_scaled_dot_product": "SDPA kernels",
    r"^cpp_fused_": "kernels Inductor generated (`cpp_fused_*`)",
    r"^## Call CompiledFxGraph": "compiled graphs' Python wrappers (allocate, launch each kernel)",
    r".": "everything else (optimizer, autograd, Dynamo guards, ...)",
}


@dataclass
class Line:
    """One operation or kernel: self milliseconds and calls per profiled step."""

    ms: float = 0.0
    calls: float = 0.0


def profile_step(cfg: TrainConfig, batch: int, mode: str, steps: int) -> dict[str, Line]:
    """Self CPU time and calls per training step of each operation and generated kernel."""
    train_step, _ = prepare_model(cfg, batch, "cpu").steps(mode)
    for _ in range(5):  # compile and warm up
        train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step()
    lines: dict[str, Line] = defaultdict(Line)
    for event in prof.key_averages():
        line = lines[GRAPH_PREFIX.sub("", event.key)]
        line.ms += event.self_cpu_time_total / 1e3 / steps
        line.calls += event.count / steps
    return dict(lines)


def group_of(name: str) -> str:
    return next(label for pattern, label in GROUPS.items() if re.search(pattern, name))


def summary(profiles: dict[str, dict[str, Line]]) -> list[str]:
    """Per variant and group: milliseconds and calls per step."""
    variants = list(profiles)
    lines = ["| | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for label in [*GROUPS.values(), "total"]:
        cells = []
        for per_step in profiles.values():
            chosen = [line for name, line in per_step.items() if label in ("total", group_of(name))]
            ms, calls = sum(line.ms for line in chosen), sum(line.calls for line in chosen)
            cells.append(f"{ms:.2f} ms ({calls:.0f} calls)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def top_lines(per_step: dict[str, Line], rows: int) -> list[str]:
    lines = ["| operation or kernel | ms per step | calls per step |", "|---|---|---|"]
    for name, line in sorted(per_step.items(), key=lambda item: -item[1].ms)[:rows]:
        lines.append(f"| `{name[:100]}` | {line.ms:.3f} | {line.calls:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="uea")
    parser.add_argument("--dataset", default="JapaneseVowels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--variants", default="softmax,sh")
    parser.add_argument("--mode", default="compile", choices=("eager", "compile"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", type=parse_override, action="append", default=[], metavar="OPTION=VALUE",
                        help="any pda train option, as for pda bench model")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inductor_config.cpp.enable_kernel_profile = True  # name each generated kernel in the profile
    base = bundled_config(args.task, args.dataset, TrainConfig(task=args.task, dataset=args.dataset))
    base = config_from_mapping(dict(args.set), "--set", base)  # the model pda bench model builds
    mode = "compiled" if args.mode == "compile" else "eager"
    title = f"# Profile of one {mode} training step: {args.task} {args.dataset}, batch {args.batch}"
    lines = [title, "",
             f"Made by `python {shlex.join(['scripts/profile_compiled_step.py', *sys.argv[1:]])}` on "
             f"{machine_description()}; {args.steps} profiled steps after five warm-up steps. Self CPU "
             "time per training step, summed by kind, then the operations and the kernels Inductor "
             "generated (`cpp_fused_*`, graph numbers removed) that take the most. Profiling adds "
             "overhead: compare the variants with each other; `pda bench model` gives step times.", ""]
    profiles = {}
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        cfg = config_from_mapping({"variant": variant}, "--variants", base).validate()
        profiles[variant] = profile_step(cfg, args.batch, args.mode, args.steps)
        print(f"{variant}: {sum(line.ms for line in profiles[variant].values()):.2f} ms per profiled step",
              flush=True)
    lines += summary(profiles) + [""]
    for variant, per_step in profiles.items():
        lines += [f"## {variant}", "", *top_lines(per_step, args.rows), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
