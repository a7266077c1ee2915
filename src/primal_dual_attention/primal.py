"""The primal side of attention (SPEC.md §1): feature maps, primal layers, SVR expansions and fits.

Attention is the dual (support vector expansion) of an SVR fitted on the pairs ``(k_j, v_j)``;
its primal is the layer ``f(x) = W Phi(x) / h(x) + b``. This module builds that layer from
keys and values (:func:`dual_to_primal`), evaluates the expansion explicitly
(:func:`svr_expansion`) and fits a real epsilon-SVR with the attention kernel (:func:`fit_svr`).
Shapes: ``keys`` ``(..., N, D)``, ``values`` ``(..., N, Dv)``, ``queries`` ``(..., Nq, D)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from primal_dual_attention.functional import (
    check_eps,
    check_key_padding_mask,
    check_positive_int,
    elu_feature_map,
    get_kernel,
    pool_tokens,
    query_feature_map,
)


def _check_pairs(keys: Tensor, values: Tensor, queries: Tensor | None = None) -> None:
    if keys.ndim < 2 or values.ndim != keys.ndim:
        raise ValueError(f"keys (..., N, D) and values (..., N, Dv) must have the same rank >= 2, "
                         f"got {tuple(keys.shape)} and {tuple(values.shape)}")
    if keys.shape[:-1] != values.shape[:-1]:
        raise ValueError(f"keys and values must pair up one to one (same leading shape and N), got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    tensors = {"keys": keys, "values": values} | ({} if queries is None else {"queries": queries})
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contain NaN or inf")
    if queries is not None and queries.shape[-1] != keys.shape[-1]:
        raise ValueError(f"queries and keys must share the feature size D, got {queries.shape[-1]} "
                         f"and {keys.shape[-1]}")


# ------------------------------------------------------------------------------------ kernels


def log_kernel_matrix(x: Tensor, y: Tensor, kernel: str) -> Tensor:
    """``log kappa(x_i, y_j)``: ``x.y / sqrt(D)`` (softmax) or ``log Phi(x).Phi(y)`` (linear).

    Working in the log domain keeps the explicit expansions finite where ``exp`` would overflow.
    """
    return get_kernel(kernel).log_kernel(x, y)


def kernel_matrix(x: Tensor, y: Tensor, kernel: str) -> Tensor:
    """``kappa(x_i, y_j)``: ``exp(x.y / sqrt(D))`` (softmax) or ``Phi(x).Phi(y)``, ``Phi = elu+1``."""
    return torch.exp(log_kernel_matrix(x, y, kernel))


# ------------------------------------------------------------------------------- feature maps


class FeatureMap(nn.Module):
    """An explicit ``Phi`` with ``Phi(x).Phi(y)`` equal (or close) to the ``kernel``."""

    kernel: str = "linear"
    exact: bool = True

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def query(self, x: Tensor) -> Tensor:
        """``Phi(x)`` up to a positive factor per row, for the side whose scale cancels in
        ``W Phi(x) / h(x)`` (the queries); :meth:`forward` unless a map rescales it."""
        return self(x)


class EluFeatureMap(FeatureMap):
    """``Phi(x) = elu(x) + 1``: the linear kernel, exact and finite (D features)."""

    kernel, exact = "linear", True

    def forward(self, x: Tensor) -> Tensor:
        return elu_feature_map(x)

    def query(self, x: Tensor) -> Tensor:
        """Rescaled so the largest feature is at least 1 (:func:`.functional.query_feature_map`):
        no row underflows, as in the attention it reproduces."""
        return query_feature_map(x)


class PositiveRandomFeatures(FeatureMap):
    """Positive random features of ``exp(x.y / sqrt(D))``: unbiased, variance ~ 1/m.

    ``Phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = x / D^(1/4)`` and the m rows of
    ``W`` drawn from N(0, I), so ``E[Phi(x).Phi(y)] = exp(x'.y')``.
    """

    kernel, exact = "softmax", False

    def __init__(self, dim: int, num_features: int, *, seed: int = 0, dtype: torch.dtype = torch.float64):
        super().__init__()
        dim, num_features = check_positive_int("dim", dim), check_positive_int("num_features", num_features)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(num_features, dim, generator=generator,
                                                       dtype=dtype))
        self.dim, self.num_features = dim, num_features

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"feature map built for D={self.dim}, got inputs with D={x.shape[-1]}")
        scaled = x / self.dim ** 0.25
        logits = scaled @ self.projection.to(x.dtype).T - scaled.square().sum(-1, keepdim=True) / 2
        return torch.exp(logits) / math.sqrt(self.num_features)


class TaylorFeatures(FeatureMap):
    """Truncated Taylor features of ``exp(x.y / sqrt(D))`` up to ``order``: exact as the order
    grows, ``sum_p D^p`` features, so for small D only."""

    kernel, exact = "softmax", False

    def __init__(self, dim: int, order: int = 2):
        super().__init__()
        if isinstance(order, bool) or not isinstance(order, int) or order < 0 or order % 2:
            raise ValueError(f"order must be an even integer >= 0 (an odd truncation of exp can be "
                             f"negative, and so can the primal normaliser h it gives), got {order!r}")
        self.dim, self.order = dim, order

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"feature map built for D={self.dim}, got inputs with D={x.shape[-1]}")
        scaled = x / self.dim ** 0.25
        parts, power = [torch.ones_like(scaled[..., :1])], torch.ones_like(scaled[..., :1])
        for p in range(1, self.order + 1):
            power = (power.unsqueeze(-1) * scaled.unsqueeze(-2)).flatten(-2)  # x^{(x)p}
            parts.append(power / math.sqrt(math.factorial(p)))
        return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------- primal layers


class PrimalLayer(nn.Module):
    """``f(x) = W Phi(x) / h(x) + b`` with ``h(x) = Phi(x).z``: the primal form (SPEC.md §1).

    With ``shift``/``scale`` set (Attention-BN) the inputs are normalised first,
    ``x^ = (x - shift) / scale``: a BN layer with the training (key) statistics in front of the
    feature map. ``W`` is ``(..., Dv, D_phi)``, ``z`` is ``(..., D_phi)``.
    """

    def __init__(self, feature_map: FeatureMap, weight: Tensor, normaliser: Tensor,
                 bias: Tensor | None = None, shift: Tensor | None = None, scale: Tensor | None = None):
        super().__init__()
        self.feature_map = feature_map
        self.weight = nn.Parameter(weight)
        self.register_buffer("normaliser", normaliser)
        self.bias = nn.Parameter(torch.zeros(weight.shape[:-1], dtype=weight.dtype,
                                                     device=weight.device) if bias is None else bias)
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.shift is not None:
            x = (x - self.shift) / self.scale
        features = self.feature_map.query(x)  # (..., Nq, D_phi); its row scale cancels below
        h = (features * self.normaliser.unsqueeze(-2)).sum(-1, keepdim=True)
        out = features @ self.weight.transpose(-2, -1) / h.clamp_min(torch.finfo(h.dtype).tiny)
        return out + self.bias.unsqueeze(-2)


@dataclass
class TrainingSet:
    """The SVR training pairs of a head after SH pooling / BN (what its primal is fitted on)."""

    keys: Tensor
    values: Tensor
    mask: Tensor | None
    shift: Tensor | None = None
    scale: Tensor | None = None


def key_statistics(keys: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the valid keys ``(B, ..., N, D)`` (``mask`` ``(B, N)``, True =
    padding; none valid: 0 and 0), in at least float32 (SPEC.md §2, Attention-BN). Written out here
    rather than taken from the attention code, so that ``pda verify``'s expansions check the
    statistics attention uses instead of sharing them."""
    stat = keys.to(torch.promote_types(keys.dtype, torch.float32))
    if mask is None:
        valid = torch.ones_like(stat[..., :1])
    else:
        valid = (~mask).to(stat.dtype).view(mask.shape[0], *([1] * (keys.ndim - 3)), mask.shape[1], 1)
    count = valid.sum(-2, keepdim=True).clamp_min(1.0)
    mean = (stat * valid).sum(-2, keepdim=True) / count
    return mean, ((stat - mean).square() * valid).sum(-2, keepdim=True) / count


def training_set(keys: Tensor, values: Tensor, *, key_padding_mask: Tensor | None = None,
                 bn: bool = False, head_scale: int = 1, eps: float = 1e-5,
                 grid_size: tuple[int, int] | None = None, num_prefix_tokens: int = 0) -> TrainingSet:
    """Down-sample (SH, factor ``head_scale``) and normalise (BN) the pairs as SPEC.md §2 says.

    ``keys``/``values`` are ``(B, ..., N, D)`` with a ``(B, N)`` mask. SH pools on the 2-D
    ``grid_size`` when given, never pooling the ``num_prefix_tokens`` leading tokens. BN
    statistics are the masked moments of the (pooled) keys (:func:`key_statistics`); the returned
    keys are normalised, and ``shift`` / ``scale`` normalise the queries the same way, all in the
    keys' dtype.
    """
    check_eps(eps)
    check_key_padding_mask(key_padding_mask, keys.shape[0], keys.shape[-2])
    pool = dict(grid_size=grid_size, num_prefix_tokens=num_prefix_tokens)
    keys, mask = pool_tokens(keys, head_scale, key_padding_mask, **pool)
    values, _ = pool_tokens(values, head_scale, key_padding_mask, **pool)
    if not bn:
        return TrainingSet(keys, values, mask)
    shift, var = key_statistics(keys, mask)
    scale = torch.sqrt(var + eps)
    normalised = (keys.to(shift.dtype) - shift) / scale
    return TrainingSet(normalised.to(keys.dtype), values, mask, shift.to(keys.dtype), scale.to(keys.dtype))


def dual_to_primal(keys: Tensor, values: Tensor, feature_map: FeatureMap, *,
                   key_padding_mask: Tensor | None = None, bn: bool = False, head_scale: int = 1,
                   eps: float = 1e-5, kernel: str | None = None, grid_size: tuple[int, int] | None = None,
                   num_prefix_tokens: int = 0) -> PrimalLayer:
    """The primal layer whose evaluation at the queries reproduces attention.

    With the attention choice ``alpha_j - alpha~_j = h(k_j) v_j`` (SPEC.md §1) the weights are
    ``W = sum_j v_j Phi(k_j)^T`` and the normaliser ``z = sum_j Phi(k_j)``, over the head's own
    training set (SH: pooled, on the 2-D ``grid_size`` after ``num_prefix_tokens`` when given, as
    a ViT layer pools; BN: normalised; padding excluded).
    """
    _check_pairs(keys, values)
    if kernel is not None:
        check_feature_map(feature_map, kernel)
    data = training_set(keys, values, key_padding_mask=key_padding_mask, bn=bn, head_scale=head_scale,
                        eps=eps, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens)
    features = feature_map(data.keys)
    if data.mask is not None:
        shape = (data.mask.shape[0],) + (1,) * (features.ndim - 3) + (data.mask.shape[1], 1)
        features = features * (~data.mask).to(features.dtype).view(shape)
    weight = data.values.transpose(-2, -1) @ features
    return PrimalLayer(feature_map, weight, features.sum(-2), shift=data.shift, scale=data.scale)


def sparse_primal_weights(keys: Tensor, values: Tensor, feature_map: FeatureMap,
                          window: int) -> tuple[Tensor, Tensor]:
    """Per-query primal weights of sparse attention: ``W_i = sum_{|i-j|<=w} v_j Phi(k_j)^T``,
    from prefix sums in O(N Dv D_phi); returns ``(W (.., N, Dv, D_phi), z (.., N, D_phi))``."""
    window = check_positive_int("window", window, allow_zero=True)
    features = feature_map(keys)
    outer = values.unsqueeze(-1) * features.unsqueeze(-2)  # (..., N, Dv, D_phi)
    n = keys.shape[-2]

    def window_sums(x: Tensor) -> Tensor:
        cumulative = torch.cat([torch.zeros_like(x[..., :1, :]), x.cumsum(-2)], dim=-2)
        upper = torch.arange(n).add(window + 1).clamp_max(n)
        lower = torch.arange(n).sub(window).clamp_min(0)
        return cumulative[..., upper, :] - cumulative[..., lower, :]

    weight = window_sums(outer.flatten(-2)).unflatten(-1, outer.shape[-2:])
    return weight, window_sums(features)


def svr_expansion(queries: Tensor, keys: Tensor, values: Tensor, kernel: str,
                  visible: Tensor | None = None) -> Tensor:
    """Evaluate the support vector expansion explicitly (SPEC.md §1):

    ``f(q_i) = sum_{j in M_i} c_j kappa(q_i, k_j) / (h_i(q_i) h_i(k_j))`` with the attention
    coefficients ``c_j = alpha_j - alpha~_j = h_i(k_j) v_j`` and ``h_i(x) = sum_{l in M_i}
    kappa(x, k_l)``; ``visible`` ``(.., Nq, Nk)`` bool gives each query's training set ``M_i``.
    Kernels and normalisers are carried as logarithms so that no term overflows.
    """
    _check_pairs(keys, values, queries)
    if visible is None:
        visible = torch.ones(queries.shape[-2], keys.shape[-2], dtype=torch.bool, device=queries.device)
    if visible.dtype != torch.bool:
        raise TypeError(f"visible must be a bool tensor (True = a pair of the query's training set), "
                        f"got {visible.dtype}")
    outside = torch.zeros(visible.shape, dtype=queries.dtype, device=queries.device)
    outside = outside.masked_fill(~visible, float("-inf"))
    log_gram_q = log_kernel_matrix(queries, keys, kernel) + outside  # (.., Nq, Nk)
    log_h_query = torch.logsumexp(log_gram_q, dim=-1, keepdim=True)
    log_gram_k = log_kernel_matrix(keys, keys, kernel)  # (.., Nk, Nk)
    # h_i(k_j) = sum over the query's training set l of kappa(k_j, k_l): (.., Nq, Nk)
    log_h_key = torch.logsumexp(log_gram_k.unsqueeze(-3) + outside.unsqueeze(-2), dim=-1)
    log_coefficient = log_h_key  # c_j = exp(log_h_key) * v_j
    log_terms = log_coefficient + log_gram_q - log_h_query - log_h_key
    # a query without any training pair gives 0 (its terms are -inf - -inf = NaN); all others are finite
    terms = torch.exp(log_terms).where(visible.any(dim=-1, keepdim=True), 0.0)
    return terms @ values if values.ndim == terms.ndim else (terms.unsqueeze(-1) * values).sum(-2)


def smallest_feasible_c(keys: Tensor, values: Tensor, kernel: str) -> float:
    """The smallest SVR box constant ``C`` with ``|alpha_j - alpha~_j| = |h(k_j) v_j| <= C``."""
    _check_pairs(keys, values)
    log_h_key = torch.logsumexp(log_kernel_matrix(keys, keys, kernel), dim=-1, keepdim=True)
    return float((torch.exp(log_h_key) * values.abs()).max())


# ------------------------------------------------------------------------------------ SVR fit


@dataclass
class SVRFit:
    """A fitted epsilon-SVR per output coordinate with the normalised attention kernel."""

    dual_coef: list[np.ndarray]
    support: list[np.ndarray]
    intercept: np.ndarray
    keys: Tensor
    kernel: str

    @property
    def num_support_vectors(self) -> float:
        return float(np.mean([len(s) for s in self.support]))

    def predict(self, queries: Tensor) -> Tensor:
        """The fitted regression at ``queries`` (computed in the fit's float64 on the CPU, returned in
        the queries' dtype and on their device)."""
        gram = normalised_kernel(queries.detach().cpu().to(self.keys.dtype), self.keys, self.kernel).numpy()
        columns = [gram[:, sv] @ coef + b
                   for coef, sv, b in zip(self.dual_coef, self.support, self.intercept, strict=True)]
        return torch.from_numpy(np.stack(columns, axis=-1)).to(queries.device, queries.dtype)


def normalised_kernel(x: Tensor, keys: Tensor, kernel: str) -> Tensor:
    """``kappa(x, k_j) / (h(x) h(k_j))`` with ``h`` the sum over the training keys."""
    log_gram = log_kernel_matrix(x, keys, kernel)
    log_h_key = torch.logsumexp(log_kernel_matrix(keys, keys, kernel), dim=-1)
    return torch.exp(log_gram - torch.logsumexp(log_gram, dim=-1, keepdim=True) - log_h_key)


def fit_svr(keys: Tensor, values: Tensor, kernel: str = "softmax", C: float = 1.0,
            epsilon: float = 0.1) -> SVRFit:
    """Solve the epsilon-SVR dual on ``(keys -> values)`` with scikit-learn (precomputed kernel),
    one output coordinate at a time. ``keys`` ``(N, D)``, ``values`` ``(N, Dv)``."""
    from sklearn.svm import SVR

    _check_pairs(keys, values)
    if keys.ndim != 2:
        raise ValueError(f"fit_svr takes one head's keys (N, D), got {tuple(keys.shape)}")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    keys, values = keys.detach().cpu().double(), values.detach().cpu().double()  # scikit-learn's float64
    gram = normalised_kernel(keys, keys, kernel).numpy()
    coefs, supports, intercepts = [], [], []
    for target in values.T.numpy():
        model = SVR(kernel="precomputed", C=C, epsilon=epsilon).fit(gram, target)
        coefs.append(model.dual_coef_[0])
        supports.append(model.support_)
        intercepts.append(model.intercept_[0])
    return SVRFit(coefs, supports, np.array(intercepts), keys, kernel)


def check_feature_map(feature_map: FeatureMap, kernel: str) -> None:
    """Raise if ``feature_map`` approximates another kernel than ``kernel``."""
    if feature_map.kernel != kernel:
        raise ValueError(f"feature map {type(feature_map).__name__} computes the {feature_map.kernel!r} "
                         f"kernel, not {kernel!r}")
