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

from .factorize import compute_dtype, split, svd


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
