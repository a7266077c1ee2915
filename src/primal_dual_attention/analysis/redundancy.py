"""Head redundancy (SPEC.md §3): how different are the heads of a layer?

For each layer the per-head attention maps ``A^h`` (pooled SH heads spread back to N keys, rows
summing to 1) and head outputs ``A^h v^h`` are taken over a fixed evaluation set, and averaged
over head pairs, valid queries and samples:

* ``js``: mean pairwise Jensen-Shannon divergence of the heads' rows, natural log (0 for
  identical rows, ln 2 = 0.693 for disjoint ones; higher = less redundant);
* ``cos_maps``: mean pairwise cosine similarity of the flattened maps (lower = less redundant);
* ``cos_out``: mean pairwise cosine similarity of the flattened head outputs (lower = less
  redundant).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from primal_dual_attention.attention import MultiHeadAttention, attention_layers, evaluation_mode

if TYPE_CHECKING:
    from primal_dual_attention.training.config import TrainConfig

METRICS = ("js", "cos_maps", "cos_out")


def js_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """Jensen-Shannon divergence (natural log) between distributions along ``dim``."""
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-30)) - torch.log(m.clamp_min(1e-30))),
                           torch.zeros_like(a)).sum(dim)

    return (kl(p) + kl(q)) / 2


def redundancy(maps: Tensor, outputs: Tensor, key_padding_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample redundancy metrics of one layer.

    ``maps`` ``(B, H, N, N)``, ``outputs`` ``(B, H, N, Dv)``; padded queries are left out.
    Returns each metric as a ``(B,)`` tensor averaged over head pairs (and queries for ``js``);
    0 for a sample without a valid query, which :func:`model_redundancy` leaves out.
    """
    batch, heads, n, _ = maps.shape
    if heads < 2:
        raise ValueError(f"redundancy needs at least two heads, got {heads}")
    if maps.dtype in (torch.float16, torch.bfloat16):  # tiny probabilities: their logs and means
        maps, outputs = maps.float(), outputs.float()   # underflow (a JS of inf in float16)
    valid = (torch.ones(batch, n, dtype=torch.bool, device=maps.device) if key_padding_mask is None
             else ~key_padding_mask)
    query_weight = valid.to(maps.dtype)
    maps = maps * query_weight[:, None, :, None]
    outputs = outputs * query_weight[:, None, :, None]
    pairs = list(itertools.combinations(range(heads), 2))
    first, second = zip(*pairs, strict=True)
    a, b = maps[:, list(first)], maps[:, list(second)]  # (B, P, N, N)
    queries = query_weight.sum(-1, keepdim=True).clamp_min(1)
    js = (js_divergence(a, b) * query_weight[:, None]).sum(-1) / queries
    cos_maps = F.cosine_similarity(a.flatten(2), b.flatten(2), dim=-1)
    cos_out = F.cosine_similarity(outputs[:, list(first)].flatten(2), outputs[:, list(second)].flatten(2),
                                  dim=-1)
    return {"js": js.mean(1), "cos_maps": cos_maps.mean(1), "cos_out": cos_out.mean(1)}


@dataclass
class LayerCapture:
    maps: Tensor
    outputs: Tensor
    key_padding_mask: Tensor | None
    layer: int  # index among the model's attention layers (a layer run twice, e.g. on both
    # documents of LRA Retrieval, is captured twice under one index)


def capture_heads(model: nn.Module, *inputs, **kwargs) -> list[LayerCapture]:
    """Run ``model`` once and return every attention layer's head maps and head outputs, one
    capture per call of a layer, in call order.

    The maps come from the layer's math path (``need_weights``); head outputs are ``A^h v^h``
    with the layer's own value projection (for SH heads the spread map applied to the
    unpooled values equals the pooled computation, SPEC.md §3).
    """
    captured: list[LayerCapture] = []
    layers = attention_layers(model)
    index = {id(layer): number for number, layer in enumerate(layers)}

    def hook(module: MultiHeadAttention, args, kwargs_):
        x = args[0]
        mask = kwargs_.get("key_padding_mask", args[1] if len(args) > 1 else None)
        _, maps = module.forward(x, key_padding_mask=mask, need_weights=True)  # no hook recursion
        if mask is not None:  # as the layer does: padded values are 0, whatever x holds there
            x = x.masked_fill(mask[..., None], 0.0)
        b, n, _ = x.shape
        v = module.qkv(x).view(b, n, 3, module.num_heads, module.head_dim)[:, :, 2].transpose(1, 2)
        captured.append(LayerCapture(maps, maps @ v, mask, index[id(module)]))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:  # no dropout: maps whose rows sum to 1 (SPEC.md §3)
        with evaluation_mode(model), torch.inference_mode():
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def model_redundancy(model: nn.Module, batches) -> dict[int, dict[str, float]]:
    """Per-layer metrics, keyed by the layer's number (1 = the model's first attention layer;
    layers the model never ran are left out), averaged over every sample that reaches the layer
    with a valid token (an all-padding sample has no query to compare, SPEC.md §3), counted from
    the mask the layer itself sees: a layer run on each document of a pair (LRA Retrieval)
    counts each non-empty document as a sample of that layer."""
    depth = len(attention_layers(model))
    totals = [dict.fromkeys(METRICS, 0.0) for _ in range(depth)]
    counts, ran = [0] * depth, [False] * depth
    for x, mask, _ in batches:
        for capture in capture_heads(model, x, mask):
            metrics = redundancy(capture.maps, capture.outputs, capture.key_padding_mask)
            counted = (torch.ones(len(capture.maps), dtype=torch.bool) if capture.key_padding_mask is None
                       else ~capture.key_padding_mask.all(1)).to(capture.maps.device)
            for name in METRICS:
                totals[capture.layer][name] += float(metrics[name][counted].sum())
            counts[capture.layer] += int(counted.sum())
            ran[capture.layer] = True
    if not any(ran):
        raise ValueError("no attention layer ran in the model's forward: nothing to measure")
    if not all(count for count, was_run in zip(counts, ran, strict=True) if was_run):
        raise ValueError("redundancy needs at least one sample with a valid token; every sample was padding")
    return {number + 1: {name: value / counts[number] for name, value in totals[number].items()}
            for number in range(depth) if ran[number]}


def _checkpoint_configs(checkpoints: list[str], data_dir: str | None) -> list[tuple[TrainConfig, dict]]:
    """Each checkpoint's run configuration and state, checked before any data loads: the report
    compares variants of one set-up, seeds of a variant averaged, so the checkpoints must share one
    dataset, and a variant's checkpoints one attention configuration and distinct seeds."""
    from primal_dual_attention.training.config import saved_config
    from primal_dual_attention.training.engine import load_checkpoint

    loaded = []
    for path in checkpoints:
        state = load_checkpoint(path)
        loaded.append((saved_config(state["config"] | ({"data_dir": data_dir} if data_dir else {}), path),
                       state))
    datasets = sorted({cfg.dataset for cfg, _ in loaded})
    if len(datasets) > 1:
        raise ValueError(f"checkpoints are of datasets {datasets}; pda heads compares the variants of "
                         "one dataset (run it once per dataset)")
    first: dict[str, tuple[str, TrainConfig]] = {}
    seeds: dict[tuple[str, int], int] = {}
    for index, (path, (cfg, _)) in enumerate(zip(checkpoints, loaded, strict=True)):
        other = seeds.setdefault((cfg.variant, cfg.seed), index)
        if other != index:  # the same checkpoint twice counts too
            raise ValueError(f"checkpoints {checkpoints[other]} and {path} are both {cfg.variant} seed "
                             f"{cfg.seed}; a variant's checkpoints are averaged as seeds, so each needs "
                             "its own seed")
        path_0, cfg_0 = first.setdefault(cfg.variant, (path, cfg))
        if cfg_0.attention() != cfg.attention():
            raise ValueError(f"checkpoints {path_0} and {path} are both {cfg.variant} with other "
                             f"attention ({cfg_0.attention()} and {cfg.attention()}); a variant's "
                             "checkpoints are averaged as seeds of one set-up")
    return loaded


def _checkpoint_model(cfg: TrainConfig, state: dict, path: str):
    from primal_dual_attention.training.engine import load_weights, seed_everything
    from primal_dual_attention.training.tasks import build_task

    seed_everything(cfg.seed)
    task = build_task(cfg)
    load_weights(task.model, state, path)
    return task


def heads_report(checkpoints: list[str], out_dir, *, samples: int = 256, layer: int = 1,
                 data_dir: str | None = None, command: str = "pda heads", log=print):
    """``pda heads``: per-layer redundancy of each checkpoint (CSV + plot) and the attention maps
    of every head of ``layer`` for the first evaluation series, one row per variant."""
    import csv
    from pathlib import Path

    out_dir = Path(out_dir)
    loaded = _checkpoint_configs(checkpoints, data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, drawn = [], []
    for path, (cfg, state) in zip(checkpoints, loaded, strict=True):
        task = _checkpoint_model(cfg, state, path)
        depth = len(attention_layers(task.model))
        if not 1 <= layer <= depth:
            raise ValueError(f"layer must be in 1..{depth} (the attention layers of {path}), got {layer}")
        evaluation = task.test.subset(torch.arange(min(samples, len(task.test))))
        label = f"{cfg.variant} (seed {cfg.seed})"
        for number, metrics in model_redundancy(task.model, evaluation.batches(64)).items():
            rows.append({"checkpoint": path, "label": label, "variant": cfg.variant, "dataset": cfg.dataset,
                     "layer": number}
                        | {k: round(v, 6) for k, v in metrics.items()})
            log(f"{label:24} layer {number}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if all(cfg.variant != other.split(" (")[0] for other, _, _ in drawn):  # one row per variant
            x, mask, _ = next(evaluation.batches(1))
            first = next(c for c in capture_heads(task.model, x, mask) if c.layer == layer - 1)
            drawn.append((label, first.maps[0], cfg.dataset))
    _draw_maps(drawn, layer, out_dir / "maps.png")
    with open(out_dir / "redundancy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_redundancy(rows, out_dir / "redundancy.png")
    datasets = sorted({r["dataset"] for r in rows})
    (out_dir / "README.md").write_text("\n".join([
        f"# Head redundancy: {', '.join(datasets)}", "",
        f"Produced by `{command}` over the first {len(evaluation)} test series of each checkpoint:", "",
        *[f"- `{path}`" for path in checkpoints], "",
        "Per-layer metrics of SPEC §3 in `redundancy.csv` (`js` in nats: 0 = identical heads, "
        "ln 2 = 0.693 = disjoint; cosines: 1 = identical), plotted in `redundancy.png`; `maps.png` "
        f"shows every head of layer {layer} for the first test series, one row per variant.", "",
        "![redundancy](redundancy.png)", "", "![maps](maps.png)", ""]))
    return rows


def plot_redundancy(rows: list[dict], path) -> None:
    """Each metric per layer, per variant: the mean over seeds with the sample std as error bar
    (the rows of ``redundancy.csv``, as written or read back)."""
    import matplotlib
    import numpy as np

    from primal_dual_attention.analysis.uea_report import seed_std

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    for axis, metric in zip(axes, METRICS, strict=True):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            layers = sorted({int(r["layer"]) for r in rows if r["variant"] == variant})
            values = [[float(r[metric]) for r in rows if r["variant"] == variant and int(r["layer"]) == n]
                      for n in layers]
            axis.errorbar(layers, [np.mean(v) for v in values], yerr=[seed_std(v) for v in values], fmt="o-",
                          capsize=3, label=f"{variant} ({len(values[0])} seed(s))")
        axis.set_xlabel("layer")
        axis.set_title(metric + (" (higher = less redundant)" if metric == "js"
                                 else " (lower = less redundant)"), fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_maps(drawn: list[tuple[str, Tensor, str]], layer: int, path) -> None:
    """Every head's map per drawn variant on one colour scale (weights 0 to the largest drawn),
    with its colour bar, so that heads and variants compare by brightness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = max(m.shape[0] for _, m, _ in drawn)
    largest = max(float(m.max()) for _, m, _ in drawn)
    fig, axes = plt.subplots(len(drawn), heads, figsize=(max(1.6 * heads, 6.0) + 0.8, 1.7 * len(drawn) + 0.5),
                             squeeze=False)
    image = None
    for row, (label, maps, _) in enumerate(drawn):
        for head in range(heads):
            axis = axes[row][head]
            axis.set_xticks([])
            axis.set_yticks([])
            if head < maps.shape[0]:
                image = axis.imshow(maps[head].float().numpy(), cmap="viridis", vmin=0.0, vmax=largest)
            if row == 0:
                axis.set_title(f"head {head + 1}", fontsize=8)
        axes[row][0].set_ylabel(label, fontsize=7)
    fig.suptitle(f"{drawn[0][2]}, layer {layer}, first test series:\nattention maps (query x key)",
                 fontsize=9)
    fig.tight_layout()
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    fig.savefig(path, dpi=110)
    plt.close(fig)
