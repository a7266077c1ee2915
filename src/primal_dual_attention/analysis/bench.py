"""Micro-benchmark of one attention call per variant: time, FLOPs and peak memory.

``pda bench attention`` runs it. Time is the median forward+backward wall time over repeated
runs in this process. FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` on the
explicit math path (the counter does not see the CPU SDPA kernel; the math path performs the
same matrix products). Peak memory is measured in a fresh subprocess per point: after one
warm-up call the kernel's peak-RSS counter (``VmHWM``) is reset through
``/proc/self/clear_refs`` and the increase of the peak over the resident set before the timed
call is reported; glibc's mmap threshold is pinned so freed tensors return to the OS.
"""

from __future__ import annotations

import concurrent.futures
import csv
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from primal_dual_attention.attention import VARIANTS, AttentionConfig, MultiHeadAttention, get_variant
from primal_dual_attention.functional import attention, default_head_scales, get_kernel, masked_mean_var
from primal_dual_attention.utils import machine_description

SPARSE_WINDOW = 64
T = TypeVar("T")
BASELINES = ("sdpa", "naive", "bn_query_fold")


@dataclass(frozen=True)
class Case:
    """One benchmark point: a variant (or baseline) at one shape, with or without padding."""

    name: str
    num_tokens: int
    batch: int = 4
    heads: int = 8
    head_dim: int = 32
    padded: bool = False
    layer: bool = False  # a whole MultiHeadAttention layer (projections included), dim = H * D

    @property
    def label(self) -> str:
        return f"{self.name}+pad" if self.padded else self.name


@dataclass
class Result:
    case: Case
    time_ms: float
    gflops: float
    peak_mem_mb: float | None = None
    ratio_to_sdpa: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def padding_mask(case: Case) -> torch.Tensor | None:
    """Ragged lengths N, 7N/8, 3N/4, N/2 (cycled over the batch) when the case is padded."""
    if not case.padded:
        return None
    fractions = (1.0, 0.875, 0.75, 0.5)
    lengths = torch.tensor([int(case.num_tokens * fractions[i % 4]) for i in range(case.batch)])
    return torch.arange(case.num_tokens)[None, :] >= lengths[:, None]


def _naive(q, k, v, mask):
    """Attention as research code writes it: explicit matmul, masked_fill, softmax, matmul."""
    logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(mask[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1) @ v


def _bn_query_fold(q, k, v, mask):
    """BN for the softmax kernel with the key-centring dropped (SPEC.md §2): only q changes.

    ``q^.k^ = ((q - mu) / s^2) . k + const_j``, so normalising the queries alone gives the
    same softmax. Measured to decide which form the library uses.
    """
    mean, var = masked_mean_var(k, mask)
    q_fold = ((q - mean) / (var + 1e-5)).to(q.dtype)
    attn_mask = None if mask is None else ~mask[:, None, None, :]
    return F.scaled_dot_product_attention(q_fold, k, v, attn_mask=attn_mask)


def _attention_fn(case: Case, fused: bool) -> Callable:
    if case.name == "sdpa":
        return lambda q, k, v, m: F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if m is None else ~m[:, None, None, :])
    if case.name == "naive":
        return _naive
    if case.name == "bn_query_fold":
        return _bn_query_fold
    config = _variant_config(case, fused)
    return lambda q, k, v, m: attention(q, k, v, config, key_padding_mask=m)


def _variant_config(case: Case, fused: bool) -> AttentionConfig:
    """The case's variant for ``case.heads`` heads (sparse with the benchmark's window)."""
    window = SPARSE_WINDOW if get_variant(case.name).sparse else None
    return AttentionConfig(variant=case.name, window=window, fused=fused).for_heads(case.heads)


Workload = tuple[Callable[[], torch.Tensor], Callable[[], None]]


def _workload(case: Case, fused: bool) -> Workload:
    """``(forward, clear_grads)`` for a case: a function call on (B, H, N, D) tensors, or a
    whole attention layer on (B, N, H * D) inputs."""
    generator = torch.Generator().manual_seed(0)
    mask = padding_mask(case)
    if case.layer:
        dim = case.heads * case.head_dim
        module = MultiHeadAttention(dim, case.heads, _variant_config(case, fused))
        x = torch.randn(case.batch, case.num_tokens, dim, generator=generator, requires_grad=True)

        def clear_layer() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None

        return (lambda: module(x, key_padding_mask=mask)), clear_layer
    shape = (case.batch, case.heads, case.num_tokens, case.head_dim)
    q, k, v = (torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3))
    fn = _attention_fn(case, fused)

    def clear() -> None:
        for t in (q, k, v):
            t.grad = None

    return (lambda: fn(q, k, v, mask)), clear


def _run(workload: Workload, backward: bool = True) -> None:
    forward, clear = workload
    if backward:
        out = forward()
        out.backward(torch.ones_like(out))
        clear()
    else:
        with torch.no_grad():
            forward()


def time_cases(cases: list[Case], repeats: int, backward: bool = True) -> dict[Case, float]:
    """Median wall time (ms) per case, forward+backward (or forward only).

    After one warm-up call each, the cases are timed round-robin (one call of every case per
    round), so slow drifts of the machine's speed affect every case alike and the ratios to
    SDPA stay fair.
    """
    prepared = [(case, _workload(case, fused=True)) for case in cases]
    times: dict[Case, list[float]] = {case: [] for case in cases}
    for _, workload in prepared:
        _run(workload, backward)
    for _ in range(repeats):
        for case, workload in prepared:
            start = time.perf_counter()
            _run(workload, backward)
            times[case].append(time.perf_counter() - start)
    return {case: 1e3 * statistics.median(values) for case, values in times.items()}


def count_gflops(case: Case) -> float:
    """Forward+backward GFLOPs (FlopCounterMode) of the path the case runs.

    The counter does not see the CPU SDPA kernel, so softmax-kernel cases are counted on the
    explicit math path, which performs the same matrix products; linear-kernel cases are
    counted on their fused (primal) path.
    """
    name = "softmax" if case.name in ("sdpa", "bn_query_fold") else case.name
    fused = name in VARIANTS and get_kernel(get_variant(name).kernel).has_primal
    workload = _workload(replace(case, name=name), fused=fused)
    with FlopCounterMode(display=False) as counter:
        _run(workload)
    return counter.get_total_flops() / 1e9


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_rss_rise_mib(step: Callable[[], object]) -> float:
    """Rise of this process's peak resident set (MiB) over its resident set during ``step``
    (``VmHWM`` is reset through ``/proc/self/clear_refs`` first; run warmed-up steps)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def _peak_memory_worker(case: Case, threads: int) -> float:
    """Runs in a fresh process: peak RSS increase (MiB) of one forward+backward call."""
    torch.set_num_threads(threads)
    workload = _workload(case, fused=True)
    _run(workload)
    return peak_rss_rise_mib(lambda: _run(workload))


def in_fresh_process(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` in a freshly spawned process whose allocations go back to the OS:
    glibc's mmap threshold is pinned in the child, so ``VmHWM`` after a reset means the peak.
    One pool per call (not ``max_tasks_per_child``, which Python 3.10 lacks)."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            return pool.submit(function, *args).result()
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def measure_peak_memory(cases: list[Case]) -> dict[Case, float | None]:
    """Peak memory per case, each in its own spawned process (None where /proc is missing)."""
    if not Path("/proc/self/clear_refs").exists():
        return dict.fromkeys(cases)
    return {case: in_fresh_process(_peak_memory_worker, case, torch.get_num_threads()) for case in cases}


def run_attention_benchmark(
    sizes: tuple[int, ...] = (256, 1024, 2048, 4096),
    variants: tuple[str, ...] = tuple(VARIANTS),
    repeats: int = 5,
    memory: bool = True,
    naive_max_tokens: int = 4096,
    progress: Callable[[str], None] = print,
    on_size: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Time, FLOPs and peak memory of every variant (unpadded and padded) and the baselines;
    ``on_size`` gets the results so far after each N (a crash at a large N keeps the others)."""
    results: list[Result] = []
    for n in sizes:
        cases = [Case(name, n) for name in BASELINES]
        cases += [Case(name, n, padded=padded) for name in variants for padded in (False, True)]
        cases.append(Case("sdpa", n, padded=True))
        timed = [c for c in cases if not (c.name == "naive" and n > naive_max_tokens)]
        measured = []
        for case, milliseconds in time_cases(timed, repeats).items():
            result = Result(case, milliseconds, count_gflops(case))
            progress(f"N={n:5d} {case.label:<16} {result.time_ms:9.1f} ms")
            measured.append(result)
        peaks = measure_peak_memory(timed) if memory else {}
        for result in measured:
            result.peak_mem_mb = peaks.get(result.case)
            twin = Case("sdpa", n, padded=result.case.padded)
            result.ratio_to_sdpa = result.time_ms / next(r for r in measured if r.case == twin).time_ms
        results += measured
        if on_size is not None:
            on_size(results)
    return results


#: the line a table written before its last size begins with (``on_size`` writes)
PARTIAL_NOTE = ("**Partial:** the sizes measured so far (the run stopped before its last size, or is "
                "still running).")


def write_results(results: list[Result], out_dir: Path, command: str, partial: bool = False
                  ) -> tuple[Path, Path]:
    """Write ``attention.csv`` and ``attention.md`` (table, targets, machine, command); a
    ``partial`` table says so first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "attention.csv", out_dir / "attention.md"
    columns = ["variant", "padded", "num_tokens", "batch", "heads", "head_dim", "time_ms",
               "ratio_to_sdpa", "gflops", "peak_mem_mb"]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for r in results:
            case = asdict(r.case)
            writer.writerow({
                "variant": case["name"], "padded": case["padded"], "num_tokens": case["num_tokens"],
                "batch": case["batch"], "heads": case["heads"], "head_dim": case["head_dim"],
                "time_ms": f"{r.time_ms:.3f}", "ratio_to_sdpa": f"{r.ratio_to_sdpa:.3f}",
                "gflops": f"{r.gflops:.3f}",
                "peak_mem_mb": "" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}",
            })
    sizes = sorted({r.case.num_tokens for r in results})
    labels = list(dict.fromkeys(r.case.label for r in results))
    by_key = {(r.case.label, r.case.num_tokens): r for r in results}
    lines = [
        "# Attention micro-benchmark",
        "",
        *([PARTIAL_NOTE, ""] if partial else []),
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Shape: B={results[0].case.batch}, H={results[0].case.heads}, "
        f"D={results[0].case.head_dim}, fp32, forward+backward. SH scales: "
        f"{default_head_scales(results[0].case.heads)}; sparse window: {SPARSE_WINDOW}. "
        "`+pad` rows use ragged lengths N, 7N/8, 3N/4, N/2 and are compared with the padded "
        "SDPA call. `sdpa` is one `scaled_dot_product_attention` call, `naive` the explicit "
        "matmul + softmax, `bn_query_fold` BN with only the queries transformed. GFLOPs count "
        "matrix products only (FlopCounterMode: BN's statistics and transform and SH's pooling "
        "are elementwise work it does not see); those of "
        "softmax-kernel rows are counted on the explicit math path (FlopCounterMode does not see "
        "the CPU SDPA kernel); for `sparse` that is the dense band-masked product, while the "
        "fused blocked path computes only about (block + 2·window)/N of it.",
        "",
        "Median time in ms (ratio to SDPA of the same padding) / GFLOPs / peak memory MiB:",
        "",
        "| variant | " + " | ".join(f"N={n}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for label in labels:
        cells = []
        for n in sizes:
            r = by_key.get((label, n))
            if r is None:
                cells.append("")
                continue
            mem = "n/a" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}"
            cells.append(f"{r.time_ms:.1f} ({r.ratio_to_sdpa:.2f}x) / {r.gflops:.2f} / {mem}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *target_lines(by_key)]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def target_lines(by_key: dict[tuple[str, int], Result], n: int = 2048) -> list[str]:
    """The issue's speed targets at N=2048, each marked met or missed from the measurements."""
    def ratio(a: str, b: str) -> float | None:
        ra, rb = by_key.get((a, n)), by_key.get((b, n))
        return None if ra is None or rb is None else ra.time_ms / rb.time_ms

    checks = [
        ("SH / SDPA <= 0.55", ratio("sh", "sdpa"), lambda x: x <= 0.55),
        ("BN / SDPA <= 1.05", ratio("bn", "sdpa"), lambda x: x <= 1.05),
        ("naive / softmax >= 4", ratio("naive", "softmax"), lambda x: x >= 4),
    ]
    for name in VARIANTS:
        checks.append((f"{name}+pad / {name} <= 1.15", ratio(f"{name}+pad", name),
                       lambda x: x <= 1.15))
    rows = [f"| {label} | {value:.3f} | {'met' if ok(value) else 'missed'} |"
            for label, value, ok in checks if value is not None]
    if not rows:
        return [f"Targets at N={n}: not measured (no N={n} among the sizes)."]
    return [f"Targets at N={n}:", "", "| target | measured | status |", "|---|---|---|", *rows]
