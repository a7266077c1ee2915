"""The lean eager path and compilation (issue 13), checked without timing anything: the number
of operations one layer dispatches per variant, compiled == eager, bounded recompilation."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import primal_dual_attention.functional as PF
from primal_dual_attention.attention import VARIANTS, AttentionConfig, MultiHeadAttention
from primal_dual_attention.training.config import TrainConfig
from primal_dual_attention.training.engine import fit, seed_everything
from primal_dual_attention.training.tasks import build_task

# views whose schema does not say so (no alias annotation)
ALIASING = {torch.ops.aten._unsafe_view.default}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active (what eager mode pays per op), and
    among them the kernels: operations that compute a tensor rather than a view of one (what a
    GPU pays per launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        out = func(*args, **(kwargs or {}))
        computes = not (func.is_view or func in ALIASING) and any(isinstance(t, torch.Tensor) for t in (
            out if isinstance(out, (tuple, list)) else (out,)))
        if computes:
            self.kernels[str(func.overloadpacket)] += 1
        return out


def layer_ops(variant: str, *, grid: bool, padded: bool, kernels: bool = False) -> int:
    """Operations (or, with ``kernels``, kernels) of one forward + backward of a vit_cifar-sized
    layer (65 tokens, 4 heads) or a 1-D layer of 64 tokens and 8 heads."""
    heads, tokens = (4, 65) if grid else (8, 64)
    config = AttentionConfig(variant=variant, window=8 if variant == "sparse" else None,
                             **({"grid_size": (8, 8), "num_prefix_tokens": 1} if grid else {}))
    layer = MultiHeadAttention(128, heads, config)
    x = torch.randn(2, tokens, 128, requires_grad=True)
    mask = torch.arange(tokens)[None] >= torch.tensor([tokens, tokens - 10])[:, None] if padded else None
    layer(x, key_padding_mask=mask)  # a step like every later one (shape constants are built once)
    with OpCounter() as counter:
        layer(x, key_padding_mask=mask).sum().backward()
    return sum((counter.kernels if kernels else counter.ops).values())


# Extra operations over softmax in the same setting (forward + backward, torch 2.14). A change
# that makes BN or SH dispatch more work per step fails here; lower them when the path gets leaner.
EXTRA_OPS = {  # variant: (2-D grid, 1-D, 1-D padded)
    "bn": (19, 19, 41),  # the keys centred too (functional._BNFoldQueries); its unmasked backward regrouped
    "sh": (34, 65, 26),  # padded: every head in one call (functional.packs_heads)
    "bn_sh": (73, 144, 67),
}


# Extra kernels (operations that compute, not views) over softmax, same settings (softmax: 14, 14, 25).
EXTRA_KERNELS = {
    "bn": (14, 14, 34),
    "sh": (13, 23, 12),
    "bn_sh": (42, 82, 46),
}


@pytest.mark.parametrize("kernels", [False, True], ids=["ops", "kernels"])
@pytest.mark.parametrize("variant", list(EXTRA_OPS))
def test_bn_and_sh_dispatch_few_operations_more_than_softmax(variant, kernels):
    if not kernels and torch.__version__ < "2.14":
        pytest.skip("operation budgets are torch 2.14's (torch 2.5 dispatches 3 more views for SH)")
    budgets = (EXTRA_KERNELS if kernels else EXTRA_OPS)[variant]
    for budget, grid, padded in zip(budgets, (True, False, False), (False, False, True), strict=True):
        extra = (layer_ops(variant, grid=grid, padded=padded, kernels=kernels)
                 - layer_ops("softmax", grid=grid, padded=padded, kernels=kernels))
        what = "kernels" if kernels else "ops"
        assert extra <= budget, f"{variant} (grid={grid}, padded={padded}): {extra} {what} over softmax"


def test_the_counter_sees_a_regression():
    """The op counter is not blind: a layer doing one more thing per head counts more."""
    plain = layer_ops("sh", grid=False, padded=False)
    slow = AttentionConfig(variant="sh", head_scales=(1, 2, 3, 4, 5, 6, 7, 8))
    layer = MultiHeadAttention(128, 8, slow)
    x = torch.randn(2, 64, 128, requires_grad=True)
    with OpCounter() as counter:
        layer(x).sum().backward()
    assert sum(counter.ops.values()) > plain


def _compiled_matches_eager(variant: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled code runs the ops eager code runs: SH with padding is packed in eager mode only
    (``functional.packs_heads``), so eager is held to the grouped path here; packed == grouped is
    checked in float64 by tests/test_functional.py (in fp32 the two orders of summation differ by
    about the fp32 error of BN over a few pooled keys, ~1e-5 on these gradients, on either path)."""
    monkeypatch.setattr(PF, "PACKED_SH_MAX_TOKENS", 0)
    torch.manual_seed(0)
    config = AttentionConfig(variant=variant, window=2 if variant == "sparse" else None)
    layer = MultiHeadAttention(16, 4, config)
    x = torch.randn(2, 12, 16, requires_grad=True)
    mask = torch.arange(12)[None] >= torch.tensor([12, 9])[:, None]
    eager = layer(x, key_padding_mask=mask)
    (grad_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)(x, key_padding_mask=mask)
    (grad_compiled,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_compiles_whole_and_matches_eager(variant, monkeypatch):
    """One graph per layer (``fullgraph``), traced forward and backward through AOTAutograd."""
    torch._dynamo.reset()
    _compiled_matches_eager(variant, "aot_eager", monkeypatch)


@pytest.mark.parametrize("variant", ["bn_sh", "linear_bn_sh"])
def test_bn_sh_compiles_with_dynamic_shapes(variant):
    """``torch.compile(dynamic=True)``: BN+SH with two head groups failed in Dynamo (the config's
    eps, made a symbol, passed to a second BN autograd.Function). Dynamo's own backend (``eager``)
    is enough to trace it and keeps the test short; the variants with one BN call per layer or
    none compiled already."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, AttentionConfig(variant=variant))
    compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=True)
    x = torch.randn(2, 12, 16, requires_grad=True)
    mask = torch.arange(12)[None] >= torch.tensor([12, 7])[:, None]
    out, eager = compiled(x, key_padding_mask=mask), layer(x, key_padding_mask=mask)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    (grad,), (grad_eager,) = (torch.autograd.grad(y.sum(), x) for y in (out, eager))
    torch.testing.assert_close(grad, grad_eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [True, False], ids=["grid", "1d-padded"])
def test_packed_sh_compiles_whole_and_matches_eager(grid):
    """``pack_heads=True`` (every SH head in one call, the option GPU runs measure) traces as one
    graph too: its window constants are built from plain Python inside the compiled region."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    options = {"grid_size": (4, 4), "num_prefix_tokens": 1, "head_scales": (1, 1, 2, 2)} if grid else {}
    layer = MultiHeadAttention(16, 4, AttentionConfig(variant="bn_sh", pack_heads=True, **options))
    tokens = 17 if grid else 12
    x = torch.randn(2, tokens, 16, requires_grad=True)
    mask = None if grid else torch.arange(tokens)[None] >= torch.tensor([tokens, 9])[:, None]
    eager = layer(x, key_padding_mask=mask)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x, key_padding_mask=mask)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    (grad_compiled,) = torch.autograd.grad(compiled.sum(), x)
    (grad_eager,) = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-5)


def _compiled_calls_sdpa(tokens: int, padded: bool, variant: str = "softmax") -> bool:
    """Whether the graph torch.compile traces for one masked (or unmasked) layer calls SDPA."""
    torch._dynamo.reset()
    targets: set[str] = set()

    def record(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        targets.update(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    layer = MultiHeadAttention(16, 4, AttentionConfig(variant=variant))
    x = torch.randn(2, tokens, 16)
    mask = torch.arange(tokens)[None] >= torch.tensor([tokens, tokens - 3])[:, None] if padded else None
    torch.compile(layer, backend=record, fullgraph=True)(x, key_padding_mask=mask)
    return any("scaled_dot_product_attention" in target for target in targets)


@pytest.mark.parametrize("variant", ["softmax", "bn"])
def test_compiled_cpu_takes_the_math_path_for_masked_calls_over_few_keys(variant):
    """``functional.COMPILED_CPU_MATH_MAX_KEYS``: compiled CPU code runs a masked call over few keys
    on the math path (SDPA with a mask is slow there); more keys, or no mask, keep SDPA."""
    few, many = PF.COMPILED_CPU_MATH_MAX_KEYS, PF.COMPILED_CPU_MATH_MAX_KEYS + 8
    assert not _compiled_calls_sdpa(few, padded=True, variant=variant)
    assert _compiled_calls_sdpa(many, padded=True, variant=variant)
    assert _compiled_calls_sdpa(few, padded=False, variant=variant)


def test_the_compiled_cpu_math_rule_leaves_eager_code_and_other_devices_alone(monkeypatch):
    mask = torch.tensor([[False] * 7 + [True]])
    q = k = v = torch.randn(1, 2, 8, 4)
    assert PF._softmax_fused(q, k, v, mask, None, 0.0) is not None  # eager: SDPA
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert PF._compiled_cpu_prefers_math(k, mask)
    assert not PF._compiled_cpu_prefers_math(k.to("meta"), mask.to("meta"))  # e.g. a GPU


def test_inductor_code_matches_eager(monkeypatch):
    """Generated kernels (inductor, fp32) agree with eager within 1e-5 on the richest variant."""
    torch._dynamo.reset()
    _compiled_matches_eager("bn_sh", "inductor", monkeypatch)


def test_compile_auto_compiles_on_cuda_only():
    from primal_dual_attention.training.compilation import compile_mode

    assert compile_mode("auto", torch.device("cuda")) == "default"
    assert compile_mode("auto", torch.device("cpu")) is None
    assert compile_mode("off", torch.device("cuda")) is None
    assert compile_mode("cudagraphs", torch.device("cuda")) == "reduce-overhead"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        compile_mode("cudagraphs", torch.device("cpu"))
    with pytest.raises(ValueError, match="compile must be one of"):
        TrainConfig(compile="yes").validate()


GRAPHS: list[int] = []


@torch._dynamo.register_backend(name="pda_count_graphs")
def _count_graphs(gm, example_inputs):
    GRAPHS.append(1)
    return gm.forward


def test_sparse_lengths_up_to_its_block_do_not_recompile_each(tmp_path):
    """A sparse layer over trimmed lengths of 15 to 32 tokens (its blocked path, one block): its
    block size once depended on the length below 32, a graph per length."""
    torch._dynamo.reset()
    GRAPHS.clear()
    layer = MultiHeadAttention(16, 2, variant="sparse", window=3)
    compiled = torch.compile(layer, backend="pda_count_graphs")
    for length in range(15, 33):
        x = torch.randn(2, length, 16)
        compiled(x, key_padding_mask=torch.arange(length) >= torch.tensor([[length], [length - 2]]))
    assert len(GRAPHS) <= 3, len(GRAPHS)


def test_every_run_of_a_process_is_compiled(tmp_path, monkeypatch):
    """The runs of one process (``pda demo``, a sweep worker) each get their own graphs: their
    models share one ``forward``, of which Dynamo keeps 8 versions, and the later runs trained
    eagerly once the earlier ones had used them up."""
    monkeypatch.setenv("PDA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("primal_dual_attention.training.tasks.LRA_GENERATED_SIZES",
                        {"listops": (16, 4, 4), "pathfinder": (16, 4, 4)})
    torch._dynamo.reset()
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    new_graphs = []
    for variant in ("softmax", "bn", "sh", "linear"):
        GRAPHS.clear()
        cfg = replace(TrainConfig(), task="lra", dataset="listops", variant=variant, max_len=48, dim=16,
                      depth=1, heads=2, mlp_dim=16, epochs=1, batch_size=4, steps=2, max_eval_samples=4,
                      out_dir=str(tmp_path), progress=False, threads=1, compile="on",
                      compile_backend="pda_count_graphs").validate()
        with torch._dynamo.config.patch(**{limit: 2}):  # one graph per run here: 2 runs fill it
            fit(cfg, build_task(cfg))
        new_graphs.append(len(GRAPHS))
    assert min(new_graphs) >= 1, new_graphs


@pytest.mark.parametrize("variant", ["bn_sh", "linear"])
def test_trimmed_batch_lengths_do_not_recompile_every_batch(tmp_path, variant):
    """JapaneseVowels' batches are cut to their longest series (7 to 29 steps): an epoch of them
    through the engine compiles a bounded number of graphs, not one per length."""
    torch._dynamo.reset()
    GRAPHS.clear()
    cfg = replace(TrainConfig(), dataset="JapaneseVowels", variant=variant, dim=16, depth=1, heads=4,
                  mlp_dim=16, epochs=1, batch_size=8, pooling="mean", protocol="clean",
                  out_dir=str(tmp_path), progress=False, threads=1, compile="on",
                  compile_backend="pda_count_graphs").validate()
    seed_everything(0)
    task = build_task(cfg)
    lengths = {int(batch[0].shape[1]) for batch in task.train.batches(cfg.batch_size,
                                                                       torch.Generator().manual_seed(0))}
    fit(cfg, task)
    # 4 graphs before functional.COMPILED_CPU_MATH_MAX_KEYS; its shape guard (<= 24 keys) adds one
    # where lengths straddle 24, as JapaneseVowels' do
    # torch 2.5's shape rule of avg_pool2d in ceil mode guards the length modulo each SH scale: 7
    bound = 5 if torch.__version__ >= "2.14" else 8
    assert len(lengths) > 8 and len(GRAPHS) <= bound, (sorted(lengths), len(GRAPHS))
