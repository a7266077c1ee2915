"""``pda bench scaling``: cost of one attention layer per variant as the sequence grows.

For each variant and N (doubling from 256), a whole ``MultiHeadAttention`` layer (projections
included) is timed forward+backward and forward-only (median, round-robin over the variants of
one N), its FLOPs counted and its peak memory measured in a fresh subprocess (see
:mod:`primal_dual_attention.analysis.bench`). A variant stops growing once one forward+backward
call takes longer than ``time_limit_s``. The growth exponent is the least-squares slope of
log(time) against log(N) over the points with N >= 1024.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from primal_dual_attention.analysis.bench import (
    PARTIAL_NOTE,
    SPARSE_WINDOW,
    Case,
    count_gflops,
    measure_peak_memory,
    time_cases,
)
from primal_dual_attention.attention import STUDIED_VARIANTS
from primal_dual_attention.functional import default_head_scales
from primal_dual_attention.utils import machine_description


@dataclass
class Point:
    variant: str
    num_tokens: int
    fwd_bwd_ms: float
    fwd_ms: float
    gflops: float
    peak_mem_mb: float | None


def run_scaling(sizes=(256, 512, 1024, 2048, 4096, 8192), variants=STUDIED_VARIANTS, *, batch: int = 2,
                heads: int = 8, head_dim: int = 32, repeats: int = 3, time_limit_s: float = 4.0,
                memory: bool = True, progress: Callable[[str], None] = print,
                on_size: Callable[[list[Point]], None] | None = None) -> list[Point]:
    """The points measured; ``on_size`` gets the points so far after each N (so that a crash at
    a large N, e.g. out of memory, keeps the smaller ones written)."""
    points: list[Point] = []
    active = list(variants)
    for n in sizes:
        if not active:
            break
        cases = [Case(v, n, batch=batch, heads=heads, head_dim=head_dim, layer=True) for v in active]
        backward = time_cases(cases, repeats)
        forward = time_cases(cases, repeats, backward=False)
        peaks = measure_peak_memory(cases) if memory else dict.fromkeys(cases)
        for case in cases:
            point = Point(case.name, n, backward[case], forward[case], count_gflops(case), peaks[case])
            points.append(point)
            progress(f"N={n:5d} {case.name:10} fwd+bwd {point.fwd_bwd_ms:9.1f} ms, "
                     f"fwd {point.fwd_ms:8.1f} ms")
        active = [c.name for c in cases if backward[c] / 1e3 <= time_limit_s]
        if on_size is not None:
            on_size(points)
    return points


def growth_exponent(points: list[Point], variant: str, key: str = "fwd_bwd_ms") -> float | None:
    mine = [p for p in points if p.variant == variant and p.num_tokens >= 1024]
    if len(mine) < 2:
        return None
    return float(np.polyfit(np.log([p.num_tokens for p in mine]),
                            np.log([getattr(p, key) for p in mine]), 1)[0])


def write_scaling(points: list[Point], out_dir: Path, command: str, batch: int, heads: int,
                  head_dim: int, partial: bool = False) -> Path:
    """``scaling.csv``, ``scaling.png`` and ``scaling.md``; a ``partial`` table says so first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "scaling.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(Point.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(p.__dict__ for p in points)
    variants = list(dict.fromkeys(p.variant for p in points))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for variant in variants:
        mine = [p for p in points if p.variant == variant]
        n = [p.num_tokens for p in mine]
        exponent = growth_exponent(points, variant)
        label = variant + (f" (slope {exponent:.2f})" if exponent is not None else "")
        line, = axes[0].loglog(n, [p.fwd_bwd_ms for p in mine], "o-", label=label)
        axes[1].loglog(n, [p.gflops for p in mine], "o--", color=line.get_color(), label=variant)
        if all(p.peak_mem_mb for p in mine):
            axes[2].loglog(n, [p.peak_mem_mb for p in mine], "o-", color=line.get_color(), label=variant)
    axes[0].set_title("forward+backward time (ms)")
    axes[1].set_title("FLOPs (G), FlopCounterMode")
    axes[2].set_title("peak memory increase (MiB)")
    for axis in axes:
        axis.set_xlabel("sequence length N")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"One attention layer, B={batch}, H={heads}, D={head_dim} (dim {heads * head_dim}), fp32, "
                 "CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "scaling.png", dpi=110)
    plt.close(fig)

    sizes = sorted({p.num_tokens for p in points})
    by_key = {(p.variant, p.num_tokens): p for p in points}
    lines = ["# Attention layer scaling", "", *([PARTIAL_NOTE, ""] if partial else []),
             f"Command: `{command}`  ",
             f"Machine: {machine_description()}  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
             f"One `MultiHeadAttention` layer (projections included), B={batch}, H={heads}, D={head_dim}, "
             f"fp32; sparse window {SPARSE_WINDOW}; SH scales {default_head_scales(heads)}. Time: "
             "median over round-robin repeats; memory: peak RSS increase of one forward+backward "
             "call in a fresh subprocess (VmHWM reset through /proc/self/clear_refs); FLOPs: "
             "FlopCounterMode, matrix products only (BN's statistics and SH's pooling are not "
             "counted; softmax kernels on the math path, so `sparse` counts the dense band-masked "
             "product). A variant stops once one call exceeds the time limit.", "",
             "![scaling](scaling.png)", "",
             "| variant | growth exponent (time, N >= 1024) | " + " | ".join(f"N={n}" for n in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for variant in variants:
        exponent = growth_exponent(points, variant)
        cells = []
        for n in sizes:
            p = by_key.get((variant, n))
            cells.append("" if p is None else
                         f"{p.fwd_bwd_ms:.0f} ms / {p.gflops:.1f} GF / "
                         + ("n/a" if p.peak_mem_mb is None else f"{p.peak_mem_mb:.0f} MiB"))
        lines.append(f"| {variant} | {'–' if exponent is None else f'{exponent:.2f}'} | "
                     + " | ".join(cells) + " |")
    path = out_dir / "scaling.md"
    path.write_text("\n".join(lines) + "\n")
    return path
