"""A slow, loop-by-loop reading of SPEC.md §2, independent of the library's vectorised code.

Every sample and head is handled alone: the valid keys are gathered, pooled window by window
with Python loops, normalised, and attended with an explicit kernel. Tests compare the library
against it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _windows(length: int, scale: int, grid: tuple[int, int] | None, prefix: int) -> list[list[int]]:
    """Token indices of each SH window (prefix tokens are windows of their own)."""
    windows = [[p] for p in range(prefix)]
    if grid is None:
        body = length - prefix
        for start in range(0, body, scale):
            windows.append([prefix + t for t in range(start, min(start + scale, body))])
        return windows
    rows, cols = grid
    for r0 in range(0, rows, scale):
        for c0 in range(0, cols, scale):
            windows.append([
                prefix + r * cols + c
                for r in range(r0, min(r0 + scale, rows))
                for c in range(c0, min(c0 + scale, cols))
            ])
    return windows


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, *, kernel: str = "softmax", bn: bool = False,
    head_scales=None, window=None, key_padding_mask=None, grid_size=None,
    num_prefix_tokens: int = 0, eps: float = 1e-5,
) -> Tensor:
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    out = torch.zeros(batch, heads, n_q, v.shape[-1], dtype=q.dtype)
    for b in range(batch):
        valid = [True] * n_k if key_padding_mask is None else (~key_padding_mask[b]).tolist()
        for h in range(heads):
            scale = 1 if head_scales is None else head_scales[h]
            keys, values, positions = [], [], []
            for win in _windows(n_k, scale, grid_size, num_prefix_tokens):
                members = [t for t in win if valid[t]]
                if not members:
                    continue
                keys.append(sum(k[b, h, t] for t in members) / len(members))
                values.append(sum(v[b, h, t] for t in members) / len(members))
                positions.append(win[0])
            if not keys:
                continue  # nothing to attend to: output stays 0
            K, V = torch.stack(keys), torch.stack(values)
            Q = q[b, h]
            if bn:
                mu = K.mean(0)
                s = torch.sqrt(((K - mu) ** 2).mean(0) + eps)
                Q, K = (Q - mu) / s, (K - mu) / s
            if kernel == "softmax":
                logits = Q @ K.T / math.sqrt(Q.shape[-1])
                sim = torch.exp(logits - logits.max(-1, keepdim=True).values)
            else:
                # log(elu(x) + 1) is x below 0 and log1p(x) above: similarities in log space, each
                # row shifted by its maximum (a query's scale cancels), so that neither expm1(x) + 1
                # (0 below x = -37) nor exp (0 below -745) hides a valid key after BN over one key
                log_phi = lambda x: torch.where(x > 0, torch.log1p(x.clamp_min(0)), x)  # noqa: E731
                log_sim = torch.logsumexp(log_phi(Q)[:, None, :] + log_phi(K)[None, :, :], dim=-1)
                sim = torch.exp(log_sim - log_sim.max(-1, keepdim=True).values)
            if window is not None:
                pos = torch.tensor(positions)
                sim = sim * ((torch.arange(n_q)[:, None] - pos[None, :]).abs() <= window)
            norm = sim.sum(-1, keepdim=True)
            rows = torch.where(norm > 0, sim / torch.where(norm > 0, norm, 1), 0)
            out[b, h] = rows @ V
    return out
