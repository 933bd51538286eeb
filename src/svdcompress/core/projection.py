"""The rank-D projection P_D(W) = U_D S_D V_D^T used in dynamic training, and its
straight-through matmul.

Two ways to get the factors of P_D(W):

* ``exact``: torch.linalg.svd of W (the reference; O(m n min(m, n)) per call).
* ``subspace`` (the default): W changes little between training steps, so the previous
  step's top-k right singular vectors (k = D + oversample) are an excellent start for a
  block power iteration with Rayleigh-Ritz: Y = W V, Q = qr(Y), Z = W^T Q = P S R^T, then
  U = Q R, V = P. One iteration costs two (m x n) x (n x k) matmuls -- about 2k/(3b) of a
  dense training step's matmuls at batch b -- instead of a full SVD.
"""

from __future__ import annotations

import torch

from torch import nn

from .errors import ConfigError
from .factorize import compute_dtype, split, svd
from .layers import LowRankLinear, check_rank


def exact_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, v, basis): P_D(W) = u @ v from a full SVD; basis = top right singular vectors."""
    dec = svd(weight)
    u, v = split(dec, rank)
    return u, v, dec.Vh.T


def subspace_iteration(weight: torch.Tensor, basis: torch.Tensor, iters: int = 1):
    """Refine an orthonormal (n x k) ``basis`` of W's top right singular subspace.

    Returns (U, S, V): the Rayleigh-Ritz approximations of W's top-k singular triplets,
    U (m x k), S (k,), V (n x k), all in the compute dtype.
    """
    w = weight.detach().to(compute_dtype(weight.dtype))
    v = basis.to(w.dtype)
    for _ in range(iters):
        q = torch.linalg.qr(w @ v).Q  # (m, k): orthonormal basis of W's range on v
        # W^T Q = P S R^T; computed as (Q^T W)^T, which reads W row by row (faster)
        p, s, rh = torch.linalg.svd((q.T @ w).T, full_matrices=False)
        v = p
    return q @ rh.T, s, v


def subspace_change(old: torch.Tensor, new: torch.Tensor) -> float:
    """How far ``new``'s columns lie outside span(``old``): ||(I - old old^T) new||_F / sqrt(cols).

    Both have orthonormal columns; 0 when the subspace did not move (a converged iteration).
    """
    resid = new - old @ (old.T @ new)
    return float(torch.linalg.norm(resid)) / max(1, new.shape[1]) ** 0.5


def projection_error(u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, rank: int) -> float:
    """||u v - P_D(W)||_F / ||P_D(W)||_F against the exact projection (for tests, benchmarks)."""
    ue, ve, _ = exact_factors(weight, rank)
    exact = ue @ ve
    return float(torch.linalg.norm(u.to(exact.dtype) @ v.to(exact.dtype) - exact) /
                 torch.linalg.norm(exact).clamp_min(1e-30))


class ProjectedMatmul(torch.autograd.Function):
    """y = x P^T + b with P = u @ v, never formed; dL/dW := dL/dP (straight-through)."""

    @staticmethod
    def forward(ctx, x, weight, bias, u, v):
        ctx.save_for_backward(x, u, v)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(torch.nn.functional.linear(x, v), u, bias)

    @staticmethod
    def backward(ctx, grad):
        x, u, v = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ u) @ v  # grad P, through the factors
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = g2.T @ x.reshape(-1, x.shape[-1])  # the gradient w.r.t. P, handed to W
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None


PROJECTION_METHODS = ("subspace", "exact")


class ProjectedLinear(nn.Linear):
    """Dynamic SVD training: the full W is the parameter; the forward pass uses P_D(W).

    ``y = x P_D(W)^T + b`` is computed from the factors of P_D(W) (never the dense
    projection); the backward pass hands dL/dP_D(W) to W unchanged (straight-through).
    In training, ``method="subspace"`` tracks W's top singular subspace across steps
    (see projection.py): one block power iteration per step, more (up to ``max_iters``)
    while the top-D subspace still moves by more than ``tol``, and an exact SVD every
    ``refresh_every`` steps. ``method="exact"`` takes a full SVD every step. In eval mode
    the exact projection is used, cached while W does not change. The subspace state lives
    in buffers, so it moves with ``.to()`` and is saved in checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 method: str = "subspace", oversample: int = 16, max_iters: int = 2,
                 tol: float = 1e-3, refresh_every: int = 1000, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_rank(rank)
        if rank > min(in_features, out_features):
            raise ConfigError(f"rank must be at most min(in, out) = "
                             f"{min(in_features, out_features)}, got {rank}")
        if method not in PROJECTION_METHODS:
            raise ConfigError(f"method must be one of {PROJECTION_METHODS}, got {method!r}")
        for name, value, least in (("oversample", oversample, 0), ("max_iters", max_iters, 1),
                                   ("refresh_every", refresh_every, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        self.rank, self.method, self.oversample = rank, method, oversample
        self.max_iters, self.tol, self.refresh_every = max_iters, float(tol), refresh_every
        k = min(rank + oversample, in_features, out_features)
        cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer("basis", torch.zeros(in_features, k, device=device, dtype=cdtype))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))
        self._cache_key, self._cache = None, None
        self.last_change = float("nan")  # the tracker's last subspace change (diagnostics)
        self.last_iters = 0  # iterations the tracker took at its last step (diagnostics)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, **kwargs) -> "ProjectedLinear":
        """Wrap ``linear``: the new layer holds the same weight and bias Parameter objects,
        so an optimiser built on the original model stays valid."""
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer.train(linear.training)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) with P_D(W) = u @ v.

        In training every call is a tracker step: W changes between steps, and an in-place
        update need not bump W's version counter (fused optimisers do not), so nothing is
        reused. In eval mode the exact factors are cached until W is replaced or modified
        in place, or the layer changes mode.
        """
        if self.training:
            with torch.no_grad():
                if self.method == "subspace":
                    u, v = self._track()
                else:
                    self.steps += 1
                    u, v, _ = exact_factors(self.weight, self.rank)
            self._cache_key, self._cache = None, (u.to(self.weight.dtype), v.to(self.weight.dtype))
            return self._cache
        key = (self.weight.data_ptr(), self.weight._version)
        if key != self._cache_key:
            with torch.no_grad():
                u, v, _ = exact_factors(self.weight, self.rank)
            self._cache = (u.to(self.weight.dtype), v.to(self.weight.dtype))
            self._cache_key = key
        return self._cache

    def train(self, mode: bool = True) -> "ProjectedLinear":
        self._cache_key = None  # W may have changed without a version bump while training
        return super().train(mode)

    def _track(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = int(self.steps)
        self.steps += 1
        if step == 0 or (self.refresh_every and step % self.refresh_every == 0):
            u, v, basis = exact_factors(self.weight, self.rank)
            self.basis.copy_(basis[:, :self.basis.shape[1]])
            self.last_change, self.last_iters = 0.0, 0
            return u, v
        basis = self.basis
        for self.last_iters in range(1, self.max_iters + 1):
            U, S, V = subspace_iteration(self.weight, basis, 1)
            self.last_change = subspace_change(basis, V[:, :self.rank])
            basis = V
            if self.last_change <= self.tol:
                break
        self.basis.copy_(basis)
        d = self.rank
        return U[:, :d], S[:d, None] * V[:, :d].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.factors()
        return ProjectedMatmul.apply(x, self.weight, self.bias, u, v)

    @torch.no_grad()
    def to_low_rank(self) -> LowRankLinear:
        """The layer's exact rank-D factors as a LowRankLinear (what eval mode computes)."""
        u, v, _ = exact_factors(self.weight, self.rank)
        dt = self.weight.dtype
        return LowRankLinear.from_factors(u.to(dt), v.to(dt), self.bias).train(self.training)

    def options(self) -> dict:
        """The tracker's settings, as saved in svdcompress.json."""
        return {"method": self.method, "oversample": self.oversample, "max_iters": self.max_iters,
                "tol": self.tol, "refresh_every": self.refresh_every}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, method={self.method}"
