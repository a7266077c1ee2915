"""Masked softmax attention on the CPU: SDPA against the explicit (math) path, eager and compiled.

The probe behind ``functional.COMPILED_CPU_MATH_MAX_KEYS`` (issue 13): one forward and backward
of ``functional.attend`` on the fused path (SDPA with the library's boolean key padding mask; the
rule is switched off while probing) and on the math path (``fused=False``) for batch 16, 8 heads,
head dimensions 16 and 32, N queries and M keys (M <= N, as for SH's pooled heads), timed
round-robin (median of 9 rounds). Each cell is the math path's time over SDPA's, SDPA's time in
brackets; below 1 the math path is faster. Run it on a quiet machine:

    python scripts/probe_masked_sdpa.py --threads 2 --out results/speed/cpu/masked_sdpa.md
"""

from __future__ import annotations

import argparse
import functools
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from primal_dual_attention import functional
from primal_dual_attention.functional import AttentionOptions, attend
from primal_dual_attention.utils import machine_description

BATCH, HEADS = 16, 8
HEAD_DIMS = (16, 32)
QUERIES = (16, 32, 64)
KEYS = (4, 8, 16, 24, 32, 64)
PATHS = {"sdpa": AttentionOptions(fused=True), "math": AttentionOptions(fused=False)}


def path_of(options: AttentionOptions) -> Callable[..., Tensor]:
    """``functional.attend`` on one path: ``(q, k, v, mask) -> out``."""

    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return attend(q, k, v, options, key_padding_mask=mask)[0]

    return run


def median_us(steps: dict[str, Callable[[], None]], rounds: int = 9, calls: int = 5) -> dict[str, float]:
    """Median microseconds per call of each step, timed in turn after three warm-up calls."""
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def cell(paths: dict[str, Callable[..., Tensor]], queries: int, keys: int, head_dim: int,
         generator: torch.Generator) -> str:
    """One size: the math path's time over SDPA's, and SDPA's time."""
    q = torch.randn(BATCH, HEADS, queries, head_dim, generator=generator, requires_grad=True)
    k, v = (torch.randn(BATCH, HEADS, keys, head_dim, generator=generator, requires_grad=True)
            for _ in range(2))
    lengths = torch.randint(1, keys + 1, (BATCH,), generator=generator)
    lengths[0] = keys
    mask = torch.arange(keys)[None] >= lengths[:, None]
    grad = torch.randn(BATCH, HEADS, queries, head_dim, generator=generator)

    def step(path: Callable[..., Tensor]) -> None:
        path(q, k, v, mask).backward(grad)

    us = median_us({name: functools.partial(step, path) for name, path in paths.items()})
    return f"{us['math'] / us['sdpa']:.2f} ({us['sdpa']:.0f} us)"


def table(compiled: bool) -> list[str]:
    wrap = (lambda f: torch.compile(f, dynamic=False)) if compiled else (lambda f: f)
    paths = {name: wrap(path_of(options)) for name, options in PATHS.items()}
    generator = torch.Generator().manual_seed(0)
    lines = ["| head dim | N | " + " | ".join(f"M={keys}" for keys in KEYS) + " |",
             "|---|---|" + "---|" * len(KEYS)]
    for head_dim in HEAD_DIMS:
        for queries in QUERIES:
            cells = [cell(paths, queries, keys, head_dim, generator) if keys <= queries else ""
                     for keys in KEYS]
            lines.append(f"| {head_dim} | {queries} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", help="markdown file to write (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 256  # one graph per shape
    functional.COMPILED_CPU_MATH_MAX_KEYS = 0  # compiled SDPA stays SDPA while probing
    text = ["# Masked attention on the CPU: math path time / SDPA time (forward + backward)\n",
            f"`python scripts/probe_masked_sdpa.py {shlex.join(sys.argv[1:])}` on {machine_description()}; "
            f"batch {BATCH}, {HEADS} heads, fp32, "
            "a random key padding mask (every sequence keeps at least one key), median of 9 rounds. "
            "Below 1 the math path is faster; SDPA's time per call in brackets.\n"]
    for compiled in (False, True):
        section = [f"## {'torch.compile (Inductor)' if compiled else 'eager'}\n", *table(compiled), ""]
        print("\n".join(section), flush=True)
        text += section
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(text))


if __name__ == "__main__":
    main()
