"""``pack_heads="flex"``: every Attention-SH head in one FlexAttention call (issue 13).

FlexAttention has no CPU backward, so on the CPU the outputs are checked without gradients;
the gradient test runs where CUDA is (``scripts/gpu_pending.sh`` runs this file on a GPU).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from primal_dual_attention import functional as PF
from primal_dual_attention.attention import AttentionConfig, MultiHeadAttention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: flex layers need block masks of any length (torch >= 2.6); older torch refuses them, tested below
needs_flex = pytest.mark.skipif(not PF._flex_block_tables_available(),
                                reason=f"torch {torch.__version__} has no block masks of any length")


def ragged_mask(num_tokens: int, lengths: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.arange(num_tokens, device=device)[None] >= torch.tensor(lengths, device=device)[:, None]


# 1-D: 300 tokens over 8 heads at scales 1..8 spans 3, 3, 2, 2, 1, 1, 1, 1 key blocks of 128;
# 2-D: class token + 4x4 grid, heads not grouped in order. 16 features per head, the fewest
# FlexAttention's GPU kernels take.
SHAPES = {"1d": (8, 300, {}),
          "grid": (4, 17, {"grid_size": (4, 4), "num_prefix_tokens": 1, "head_scales": (1, 2, 1, 2)})}
HEAD_DIM = 16


def layers(variant: str, shape: str, device: str = "cpu") -> tuple[MultiHeadAttention, MultiHeadAttention]:
    """The same layer with flex packing and grouped (one call per scale)."""
    heads, _, options = SHAPES[shape]
    pair = []
    for pack in ("flex", False):
        torch.manual_seed(0)
        config = AttentionConfig(variant=variant, pack_heads=pack, **options)
        pair.append(MultiHeadAttention(heads * HEAD_DIM, heads, config, device=device))
    return pair[0], pair[1]


@needs_flex
@pytest.mark.parametrize("variant", ["sh", "bn_sh"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("padded", [False, True])
def test_flex_matches_grouped(variant, shape, padded, monkeypatch):
    """Same outputs as the grouped path, padding (a sample without any key too) included, and
    FlexAttention did run (once per call)."""
    calls = []
    flex_call = PF.flex_packed_attention
    monkeypatch.setattr(PF, "flex_packed_attention", lambda *a, **k: calls.append(1) or flex_call(*a, **k))
    flex, grouped = layers(variant, shape)
    heads, n, _ = SHAPES[shape]
    x = torch.randn(3, n, heads * HEAD_DIM)
    mask = ragged_mask(n, [n, n - 6, 0]) if padded else None
    with torch.no_grad():
        out = flex(x, key_padding_mask=mask)
        torch.testing.assert_close(out, grouped(x, key_padding_mask=mask), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


@needs_flex
def test_flex_block_mask_skips_the_blocks_past_each_heads_keys():
    """Heads with 300, 150, 38 and no keys: 2 full + 1 partial, 1 + 1, 0 + 1, 0 + 0 blocks."""
    hidden = torch.arange(300)[None] >= torch.tensor([300, 150, 38, 0])[:, None]
    mask = PF._key_block_mask(hidden[None], batch=2, num_queries=200)
    assert mask.kv_num_blocks.shape == (2, 4, 2)  # (batch, heads, query blocks)
    assert mask.full_kv_num_blocks[0, :, 0].tolist() == [2, 1, 0, 0]
    assert mask.kv_num_blocks[0, :, 0].tolist() == [1, 1, 1, 0]
    assert mask.full_kv_indices[1, 0, 1, :2].tolist() == [0, 1]
    assert mask.kv_indices[1, 0, 1, 0].item() == 2


@needs_flex
@pytest.mark.parametrize("device", DEVICES)
def test_flex_compiles_as_one_graph(device):
    """On CUDA the compiled layer (one graph) gives the grouped outputs and gradients; on the CPU,
    where inductor's FlexAttention cannot read the mask built in the graph, a clear error."""
    flex, grouped = layers("bn_sh", "1d", device)
    x, mask = torch.randn(2, 300, 8 * HEAD_DIM, device=device), ragged_mask(300, [300, 129], device)
    compiled = torch.compile(flex, fullgraph=True)
    if device == "cpu":
        with torch.no_grad(), pytest.raises(RuntimeError, match="compiles into a model on CUDA only"):
            compiled(x, key_padding_mask=mask)
        return
    results = []
    for layer in (compiled, grouped):
        out = layer(x, key_padding_mask=mask)
        out.square().sum().backward()
        results.append((out, layer.qkv.weight.grad if layer is grouped else flex.qkv.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


@needs_flex
def test_flex_maps_and_math_path_take_the_matrix_path():
    """Maps and ``fused=False`` are not what FlexAttention gives: the packed matrix path serves
    them, with gradients, on any device."""
    flex, _ = layers("sh", "grid")
    torch.manual_seed(0)
    packed = MultiHeadAttention(4 * HEAD_DIM, 4, replace(flex.config, pack_heads=True))
    x = torch.randn(2, 17, 4 * HEAD_DIM, requires_grad=True)
    out, maps = flex(x, need_weights=True)
    out_ref, maps_ref = packed(x, need_weights=True)
    torch.testing.assert_close(maps, maps_ref)
    torch.testing.assert_close(out, out_ref)
    flex.fused_attn = packed.fused_attn = False
    torch.testing.assert_close(flex(x), packed(x))
    flex(x).sum().backward()
    assert x.grad.isfinite().all()


def test_flex_config_errors_name_the_option():
    with pytest.raises(ValueError, match="pack_heads='flex' runs the softmax kernel .*got kernel='linear'"):
        AttentionConfig(variant="linear_sh", pack_heads="flex")
    with pytest.raises(TypeError, match="pack_heads must be True, False, 'flex' or None .*got 'Flex'"):
        AttentionConfig(variant="sh", pack_heads="Flex")


@needs_flex
def test_flex_errors_name_the_option():
    flex, _ = layers("sh", "grid")
    x = torch.randn(2, 17, 4 * HEAD_DIM)
    with pytest.raises(ValueError, match="trains on CUDA only .*cpu backward.*got device cpu"):
        flex(x)
    narrow = MultiHeadAttention(32, 4, replace(flex.config))
    with torch.no_grad(), pytest.raises(ValueError, match="head dimension of at least 16 .*got 8"):
        narrow(torch.randn(2, 17, 32))


def test_flex_on_a_torch_without_block_tables_of_any_length_is_an_error(monkeypatch):
    monkeypatch.setattr(PF, "_flex_block_tables_available", lambda: False)
    with pytest.raises(ValueError, match=r"pack_heads='flex' needs .*seq_lengths.*which torch \S+ lacks"):
        AttentionConfig(variant="bn_sh", pack_heads="flex")


@needs_flex
@pytest.mark.skipif("cuda" not in DEVICES, reason="FlexAttention trains on CUDA only")
@pytest.mark.parametrize("variant", ["sh", "bn_sh"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_flex_gradients_match_grouped_on_cuda(variant, shape):
    flex, grouped = layers(variant, shape, device="cuda")
    n = SHAPES[shape][1]
    mask = ragged_mask(n, [n, n - 6, 0], device="cuda")  # not 1 key: BN's variance would be 0
    results = []
    for layer in (flex, grouped):
        x = torch.randn(3, n, SHAPES[shape][0] * HEAD_DIM, device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0), requires_grad=True)
        out = layer(x, key_padding_mask=mask)
        out.square().sum().backward()
        results.append((out, x.grad, layer.qkv.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)
