"""Length buckets: padded sequence batches rounded up to a few widths per octave, so that a GPU
sees few distinct shapes. The padding is masked (SPEC §2), so a model's outputs do not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from primal_dual_attention.attention import VARIANTS, AttentionConfig
from primal_dual_attention.data.lra import PairSplit, TokenSplit
from primal_dual_attention.data.text import ByteWindows
from primal_dual_attention.data.uea import SeriesSplit
from primal_dual_attention.models.lra import LRAClassifier
from primal_dual_attention.models.timeseries import TimeSeriesTransformer
from primal_dual_attention.training.config import TrainConfig
from primal_dual_attention.training.engine import BucketedSplit, bucket_width, length_buckets


@pytest.mark.parametrize(("width", "per_octave", "cap", "expected"), [
    (1905, 8, 2000, 1920), (1990, 8, 2000, 2000), (500, 8, 2000, 512), (513, 8, 2000, 576),
    (29, 8, 29, 29), (29, 8, 64, 30), (7, 8, 64, 7), (1024, 8, 1024, 1024), (300, 0, 2000, 300),
    (2000, 8, 1000, 2000),  # a batch wider than the cap (a pair of sequences) stays as it is
])
def test_bucket_width(width, per_octave, cap, expected):
    assert bucket_width(width, per_octave, cap) == expected


def test_buckets_bound_the_padding_and_the_number_of_shapes():
    widths = [bucket_width(w, 8, 2000) for w in range(500, 2001)]
    assert all(b >= w and (b - w) <= w / 8 for w, b in zip(range(500, 2001), widths, strict=True))
    assert len(set(widths)) <= 18


def _tokens(lengths: list[int], width: int) -> TokenSplit:
    generator = np.random.default_rng(0)
    tokens = generator.integers(1, 16, (len(lengths), width))
    tokens[np.arange(width) >= np.array(lengths)[:, None]] = 0
    return TokenSplit(tokens, np.array(lengths), np.arange(len(lengths)) % 3)


def test_bucketed_batches_are_padded_and_masked():
    split = BucketedSplit(_tokens([9, 5, 3, 2], 16), per_octave=2, cap=16)
    (tokens, mask, labels), = split.batches(4)
    assert tokens.shape == (4, 12) and mask.shape == (4, 12)  # 9 -> 12 (steps of 4 in [8, 16))
    assert mask.sum(1).tolist() == [3, 7, 9, 10] and bool((tokens[mask] == 0).all())
    unpadded = BucketedSplit(_tokens([8, 8], 16), per_octave=2, cap=16)
    assert next(iter(unpadded.batches(2)))[1] is None  # already on a bucket: no mask is made


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bucketed_batches_give_the_same_logits(variant):
    """An LRA model (masked mean pooling) in float64: the extra padding changes nothing."""
    torch.manual_seed(0)
    spec = VARIANTS[variant]
    attention = AttentionConfig(variant=variant, head_scales=(1, 2) if spec.multi_scale else None,
                                window=3 if spec.sparse else None)
    model = LRAClassifier(16, 3, 40, dim=8, depth=2, num_heads=2, mlp_dim=8, dropout=0.0,
                          attention=attention).double().eval()
    split = _tokens([19, 13, 6, 17], 40)
    for (x, mask, _), (xb, maskb, _) in zip(split.batches(4), BucketedSplit(split, 2, 40).batches(4),
                                            strict=True):
        assert xb.shape[1] > x.shape[1]
        torch.testing.assert_close(model(xb, maskb), model(x, mask), rtol=1e-10, atol=1e-10)


def test_bucketed_series_give_the_same_logits_with_flatten_pooling():
    torch.manual_seed(0)
    lengths = torch.tensor([11, 7, 4])
    mask = torch.arange(13) >= lengths[:, None]
    series = torch.randn(3, 13, 2).masked_fill(mask[..., None], 0.0)
    split = SeriesSplit(series, mask, torch.tensor([0, 1, 0]))
    model = TimeSeriesTransformer(2, 2, 13, dim=8, depth=1, num_heads=2, mlp_dim=8, dropout=0.0,
                                  attention=AttentionConfig(variant="bn_sh", head_scales=(1, 2)),
                                  pooling="flatten").double().eval()
    (x, m, _), = split.batches(3)
    (xb, mb, _), = BucketedSplit(split, 4, 13).batches(3)
    assert (x.shape[1], xb.shape[1]) == (11, 12)
    torch.testing.assert_close(model(xb.double(), mb), model(x.double(), m), rtol=1e-10, atol=1e-10)


def test_per_token_targets_wide_pairs_and_float_masks():
    """Language-model windows (targets per token) and pairs wider than the cap pass unchanged;
    a mask that is not bool is an error, not padding read as a number."""
    windows = ByteWindows(torch.arange(60, dtype=torch.uint8), 19)
    (x, mask, y), *_ = BucketedSplit(windows, 8, 40).batches(2)
    assert x.shape == (2, 19) and mask is None and y.shape == (38,)
    pairs = PairSplit(np.ones((2, 8), dtype=np.int64), np.array([4, 3]), np.array([2, 1]), np.array([0, 1]))
    (x, mask, _), = BucketedSplit(pairs, 2, 4).batches(2)
    assert x.shape == (2, 8)

    class FloatMasks(SeriesSplit):
        def batches(self, batch_size, generator=None):
            for x, mask, y in super().batches(batch_size, generator):
                yield x, mask.float(), y

    padding = torch.arange(9) >= torch.tensor([[9], [5]])
    floats = FloatMasks(torch.zeros(2, 9, 1), padding, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="key_padding_mask must be bool .*got torch.float32"):
        next(iter(BucketedSplit(floats, 2, 12).batches(2)))


def test_per_token_targets_are_sharded_by_row():
    """Under DDP each rank takes every world_size-th row of a batch; a language model's flat
    (B*T,) targets must follow the rows of its inputs."""
    from primal_dual_attention.training.distributed import Context
    from primal_dual_attention.training.engine import _place

    windows = ByteWindows(torch.arange(100, dtype=torch.uint8), 4)
    batch = next(iter(windows.batches(4)))
    x, _, y = _place(windows, Context(rank=1, world_size=2), batch)
    assert torch.equal(x, batch[0][1::2]) and torch.equal(y, batch[2].view(4, 4)[1::2].reshape(-1))
    assert torch.equal(y.view(2, 4)[:, :-1], x[:, 1:])  # targets are the next bytes of these rows


def test_buckets_by_default_on_cuda_only_and_for_sequence_models():
    sequence = LRAClassifier(16, 3, 40, dim=8, depth=1, num_heads=2, mlp_dim=8)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert length_buckets(TrainConfig(), sequence, cuda) == 8
    assert length_buckets(TrainConfig(), sequence, cpu) == 0
    assert length_buckets(TrainConfig(length_buckets=4), sequence, cpu) == 4
    assert length_buckets(TrainConfig(length_buckets=4), torch.nn.Linear(2, 2), cuda) == 0
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=f"length_buckets must be 0 .*a power of two .*got {bad}"):
            TrainConfig(length_buckets=bad).validate()
