"""``pda bench precision``: each variant under bf16/fp16 autocast against fp32 (SPEC.md §2).

For one attention layer per variant: forward+backward throughput (sequences/s) per precision
and the largest deviation of the low-precision output from fp32, relative to the output's
largest magnitude; optionally through ``torch.compile``. ``scripts/gpu_check.sh`` runs it on
a GPU; on the CPU it checks bf16.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from primal_dual_attention.attention import VARIANTS, MultiHeadAttention, get_variant
from primal_dual_attention.training.distributed import resolve_device
from primal_dual_attention.training.engine import autocast
from primal_dual_attention.utils import synchronise


def _step(run: Callable[..., Tensor], layer: nn.Module, x: Tensor, mask: Tensor, device: torch.device,
          precision: str) -> tuple[Tensor, bool]:
    """One forward+backward call under ``precision``: its output and whether every gradient is
    finite (gradients are cleared first, so each call's are its own)."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        out = run(x, key_padding_mask=mask)
    out.float().sum().backward()
    grads = [x.grad, *(p.grad for p in layer.parameters() if p.grad is not None)]
    return out.detach(), all(bool(torch.isfinite(g).all()) for g in grads)


def precision_check(device: str = "auto", precisions=("fp32", "bf16"), *, batch: int = 8,
                    num_tokens: int = 1024, dim: int = 256, heads: int = 8, repeats: int = 5,
                    compile_model: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """One row per variant and precision: forward+backward throughput (the precisions timed in
    turn, one call of each per round, median), the output's largest deviation from fp32 relative
    to its largest magnitude, and whether the output and every gradient are finite."""
    target = resolve_device(device)
    rows = []
    for variant in VARIANTS:
        torch.manual_seed(0)
        layer = MultiHeadAttention(dim, heads, variant=variant,
                                   window=64 if get_variant(variant).sparse else None)
        layer = layer.to(target)
        if compile_model:
            torch._dynamo.reset()  # one compiled layer per variant: do not count as recompiles
        run = torch.compile(layer) if compile_model else layer
        x = torch.randn(batch, num_tokens, dim, device=target, requires_grad=True)
        mask = torch.arange(num_tokens, device=target)[None] >= torch.tensor(
            [num_tokens - 37 * i for i in range(batch)], device=target)[:, None]
        with torch.no_grad():
            reference = run(x, key_padding_mask=mask)

        step = functools.partial(_step, run, layer, x, mask, target)
        seconds: dict[str, list[float]] = {precision: [] for precision in precisions}
        checks = {}
        for precision in precisions:
            for _ in range(2):  # warm-up (and compilation)
                checks[precision] = step(precision)
        for _ in range(repeats):
            for precision in precisions:
                synchronise(target)
                start = time.perf_counter()
                step(precision)
                synchronise(target)
                seconds[precision].append(time.perf_counter() - start)
        for precision in precisions:
            out, grads_finite = checks[precision]
            valid = ~mask
            deviation = float((out.float() - reference)[valid].abs().max() / reference[valid].abs().max())
            throughput = batch / statistics.median(seconds[precision])
            row = {"variant": variant, "precision": precision, "device": str(target),
                   "sequences_per_s": throughput, "max_rel_deviation": deviation,
                   "finite": bool(torch.isfinite(out).all()) and grads_finite}
            rows.append(row)
            log(f"{variant:13} {precision:5} {throughput:9.1f} seq/s  max rel. deviation {deviation:.2e}"
                f"{'' if row['finite'] else '  NON-FINITE (output or gradients)'}")
    return rows
