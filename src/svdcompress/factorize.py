"""Truncated SVD of one weight matrix into the two factors of a low-rank layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SVD:
    """A thin SVD ``W = U diag(S) Vh`` of an (m x n) matrix, in the compute dtype."""

    U: torch.Tensor  # (m, k)
    S: torch.Tensor  # (k,) descending
    Vh: torch.Tensor  # (k, n)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.Vh.shape[1])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVD needs float32 at least: half precision weights are factorised in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def svd(weight: torch.Tensor) -> SVD:
    """Thin SVD of a 2-D weight, computed in float32 (float64 for float64 weights)."""
    if weight.dim() != 2:
        raise ValueError(f"svd expects a 2-D matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().to(compute_dtype(weight.dtype))
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return SVD(U, S, Vh)


def split(dec: SVD, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (u, v) of the best rank-D approximation: W_D = u @ v.

    As in the study, u = U_D (orthonormal columns) and v = S_D Vh_D, so that u is the output
    factor and v the input factor. Returned in the SVD's compute dtype.
    """
    if not 1 <= rank <= dec.S.numel():
        raise ValueError(f"rank must be in [1, {dec.S.numel()}], got {rank}")
    u = dec.U[:, :rank].contiguous()
    v = (dec.S[:rank, None] * dec.Vh[:rank]).contiguous()
    return u, v


def truncated_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shortcut: factors (u, v) of ``weight``'s best rank-D approximation, in its dtype."""
    u, v = split(svd(weight), rank)
    return u.to(weight.dtype), v.to(weight.dtype)
