"""Truncated SVD of one weight matrix into the two factors of a low-rank layer.

Plain SVD minimises ||W - W_D||_F. The whitened SVD minimises the output error on the
inputs the layer sees, ||(W - W_D) X||_F: with E[x x^T] + damping = L L^T, take the SVD of
W L, truncate it, and undo L on the input factor (the idea behind SVD-LLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class SVD:
    """A thin SVD ``W = U diag(S) Vh`` of an (m x n) matrix, in the compute dtype."""

    U: torch.Tensor  # (m, k)
    S: torch.Tensor  # (k,) descending
    Vh: torch.Tensor  # (k, n), or (k, k') coordinates that ``unwhiten`` maps to the n inputs
    # For a whitened SVD (of W L): maps an input factor B (D x n, or D x k') in whitened
    # coordinates back to the layer's inputs, B -> B L^{-1}. None for a plain SVD.
    unwhiten: Callable[[torch.Tensor], torch.Tensor] | None = None
    inputs: int | None = None  # n, where Vh's columns are not the inputs

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.inputs if self.inputs is not None else self.Vh.shape[1])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVD needs float32 at least: half precision weights are factorised in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def thin_svd(a: torch.Tensor, top: int | None = None):
    """Thin SVD; with ``top``, only (about) the leading ``top`` triplets, by a randomized
    SVD (oversampled by 10, four power iterations) when that is much cheaper. Used to score
    candidate fits, never for the factors a model keeps. The random sketch is drawn from a
    fixed seed on a forked generator: the result does not depend on (or change) the
    caller's random state, so a compression is reproducible whatever ran before it."""
    if top is not None and top + 10 < min(a.shape) // 2:
        cuda = [a.device.index if a.device.index is not None else torch.cuda.current_device()] \
            if a.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(a, q=top + 10, niter=4)
        return U, S, V.T
    return torch.linalg.svd(a, full_matrices=False)


GRAM_FLOOR = 1e-5  # gram_svd: U = B V / S while every S_i exceeds this x S_1, else by QR


def gram_svd(b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The thin SVD (U, S, Vh) of a float64 matrix B with at least as many rows as columns,
    from the float64 eigendecomposition of B^T B (n x n): V and S^2 from eigh, U = B V / S;
    returned in ``dtype``; None for a wide B. Faster on CPU than LAPACK's SVD of B in
    float32 (1536 x 576: 41 ms against 79; 4096 x 4096: 8.3 s against 10.6) and more
    accurate for every singular value the float32 SVD resolves: S^2 carries ~1e-16 of S_1^2,
    so S_i is off by ~1e-16 (S_1 / S_i)^2 relative, under float32's ~1e-7 S_1 / S_i for any
    S_i above 1e-9 S_1. U = B V / S keeps its columns orthonormal to ~1e-16 S_1^2 / (S_i S_j):
    when some S_i is under GRAM_FLOOR x S_1, U is the Q of B V's QR decomposition instead.
    CPU only (None on a GPU, whose float64 throughput may be a 64th of its float32's)."""
    m, n = b.shape
    if m < n or n == 0 or b.device.type != "cpu":
        return None
    evals, vecs = torch.linalg.eigh(b.T @ b)
    s, v = evals.flip(0).clamp_min(0).sqrt(), vecs.flip(1)
    if s[-1] > GRAM_FLOOR * s[0]:  # U a column block at a time: no m x n float64 copy besides B
        u = torch.empty(m, n, dtype=dtype)
        for j in range(0, n, COLUMNS):
            u[:, j:j + COLUMNS] = (b @ v[:, j:j + COLUMNS]).div_(s[j:j + COLUMNS])
    else:
        u, r = torch.linalg.qr(b @ v)
        u = (u * torch.where(r.diagonal() < 0, -1.0, 1.0).to(u.dtype)).to(dtype)
    return u, s.to(dtype), v.T.to(dtype)


@torch.no_grad()
def svd(weight: torch.Tensor, top: int | None = None, gram: bool = False) -> SVD:
    """Thin SVD of a 2-D weight, computed in float32 (float64 for float64 weights). With
    ``gram`` (the data-aware fits' plain candidate), a float32 result comes from
    ``gram_svd`` of W or of W^T, whichever is tall: faster, and more accurate."""
    if weight.dim() != 2:
        raise ValueError(f"svd expects a 2-D matrix, got shape {tuple(weight.shape)}")
    dtype = compute_dtype(weight.dtype)
    if gram and top is None and dtype != torch.float64 and weight.device.type == "cpu":
        w64 = weight.detach().to(torch.float64)
        tall = w64.shape[0] >= w64.shape[1]
        found = gram_svd(w64 if tall else w64.T, dtype)  # W^T = V S U^T
        if found is not None:
            U, S, Vh = found if tall else (found[2].T, found[1], found[0].T)
            return SVD(U, S, Vh)
    w = weight.detach().to(dtype)
    U, S, Vh = thin_svd(w, top)
    return SVD(U, S, Vh)


def split(dec: SVD, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (u, v) of the best rank-D approximation: W_D = u @ v.

    As in the study, u = U_D (orthonormal columns) and v = S_D Vh_D, so that u is the output
    factor and v the input factor. Returned in the SVD's compute dtype.
    """
    if not 1 <= rank <= dec.S.numel():
        raise ValueError(f"rank must be in [1, {dec.S.numel()}], got {rank}")
    u = dec.U[:, :rank].contiguous()
    v = dec.S[:rank, None] * dec.Vh[:rank]
    if dec.unwhiten is not None:
        v = dec.unwhiten(v)
    return u, v.contiguous()


def truncated_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shortcut: factors (u, v) of ``weight``'s best rank-D approximation, in its dtype."""
    u, v = split(svd(weight), rank)
    return u.to(weight.dtype), v.to(weight.dtype)


def damped(c: torch.Tensor, shift: float) -> torch.Tensor:
    """c + shift * I, a new matrix (no n x n identity is made: the diagonal is shifted)."""
    out = c.clone()
    out.diagonal().add_(shift)
    return out


COLUMNS = 1024  # column block of the chunked products below


def damped_cholesky(c: torch.Tensor, shift: float) -> tuple[torch.Tensor, bool]:
    """The Cholesky factor of c + shift * I, made in place in one copy of c (no second
    n x n matrix: an 11,008-wide input's is 0.9 GiB); and whether it exists."""
    out = damped(c, shift)
    _, info = torch.linalg.cholesky_ex(out, out=(out, torch.empty((), dtype=torch.int32, device=c.device)))
    return out, int(info) == 0


def times(x: torch.Tensor, big: torch.Tensor, dtype: torch.dtype | None = None,
          minus: torch.Tensor | None = None) -> torch.Tensor:
    """x @ big (x: k x n, big: n x n, k < n) in ``dtype`` (x's by default), taken in column
    blocks of ``big`` converted one at a time: no copy of ``big`` in another dtype is made.
    With ``minus``: x @ (big - minus), the difference taken in big's dtype block by block."""
    dtype = dtype or x.dtype
    x = x.to(dtype)
    cols = []
    for j in range(0, big.shape[1], COLUMNS):
        block = big[:, j:j + COLUMNS]
        if minus is not None:
            block = block - minus[:, j:j + COLUMNS].to(block.dtype)
        cols.append(x @ block.to(dtype))
    return torch.cat(cols, 1)


def _thin(make: Callable[[], torch.Tensor], dtype: torch.dtype, top: int | None):
    """(U, S, Vh) in ``dtype`` of the float64 B that ``make`` returns: all of them by
    ``gram_svd`` where it serves a float32 result, else by ``thin_svd`` in ``dtype`` (the
    float64 B freed first; a float64 model keeps LAPACK's float64 SVD: the Gram route
    resolves singular values down to ~1e-8 of the largest, not 1e-16)."""
    b = make()
    found = gram_svd(b, dtype) if top is None and dtype != torch.float64 else None
    if found is not None:
        return found
    b = b.to(dtype)
    return thin_svd(b, top)


@torch.no_grad()
def whitened_svd(weight: torch.Tensor, second_moment: torch.Tensor, damping: float = 1e-2,
                 top: int | None = None, dtype: torch.dtype | None = None) -> SVD:
    """SVD of W L where L L^T = E[x x^T] + damping * mean(diag) * I, in float64.

    Its singular values measure output error on the calibration inputs, so truncating it
    gives the rank-D weight with the smallest such error. When Cholesky fails (a singular
    or indefinite matrix despite damping), an eigendecomposition is used instead, with
    directions of zero input energy dropped (a pseudo-inverse).
    """
    w = weight.detach().to(torch.float64)
    c = second_moment.to(device=w.device, dtype=torch.float64)
    n = c.shape[0]
    if c.shape != (n, n) or w.shape[1] != n:
        raise ValueError(f"second-moment matrix {tuple(c.shape)} does not match weight {tuple(w.shape)}")
    scale = float(torch.diagonal(c).mean())
    if not scale > 0:  # no input energy at all: whitening is meaningless, the plain SVD is exact
        return svd(weight.to(torch.float64), top)
    # The second moments, their factor and its inverse in float64 (their conditioning is the
    # inputs'); the SVD of W L from its float64 Gram matrix for a float32 result (gram_svd:
    # faster than a float32 SVD, and more accurate), float64's own SVD for a float64 one; a
    # randomized SVD when only the ``top`` triplets are asked for (candidate scores).
    dtype = dtype or compute_dtype(weight.dtype)
    if top is None and w.shape[0] < n:  # a wide layer: the m x m side, no n x n factor
        return _output_side(w, c, damping * scale, dtype)
    chol, ok = damped_cholesky(c, damping * scale)
    if ok:
        U, S, Vh = _thin(lambda: w @ chol, dtype, top)
        # B L^{-1} = (L^{-T} B^T)^T: one triangular solve
        unwhiten = lambda b: torch.linalg.solve_triangular(  # noqa: E731
            chol.T, b.to(torch.float64).T, upper=True).T
        return SVD(U, S, Vh, unwhiten)
    del chol
    evals, evecs = torch.linalg.eigh(damped(c, damping * scale))
    keep = evals > evals.max() * n * torch.finfo(torch.float64).eps
    root = evals[keep].sqrt()
    basis = evecs[:, keep]  # L = basis diag(root), L^+ = diag(1/root) basis^T
    U, S, Vh = _thin(lambda: w @ (basis * root), dtype, top)
    unwhiten = lambda b: (b.to(torch.float64) / root) @ basis.T  # noqa: E731
    return SVD(U, S, Vh, unwhiten)


def _output_side(w: torch.Tensor, c: torch.Tensor, shift: float, dtype: torch.dtype) -> SVD:
    """The whitened SVD of a wide W (m < n outputs than inputs) from its m x m side: the left
    singular vectors U of W L (L L^T = C + shift I) are the eigenvectors of
    W (C + shift I) W^T, its singular values the roots of their eigenvalues, and the rank-D
    truncation is U_D U_D^T W, whatever the root L: no n x n Cholesky factor, inverse or
    SVD (an 11,008-wide down projection's are the largest costs of its fit). Float64
    throughout, so the squared singular values keep ~1e-16 of the largest: below the
    float32 SVD's round-off for every singular value above 1e-8 of the largest."""
    k = times(w, c) @ w.T
    k.add_(w @ w.T, alpha=shift)
    evals, evecs = torch.linalg.eigh((k + k.T) / 2)
    del k
    evecs = evecs.flip(1)
    S = evals.flip(0).clamp_min(0).sqrt().to(dtype)
    U = evecs.to(dtype)
    safe = torch.where(S > 0, S, torch.ones_like(S)).double()

    def unwhiten(b: torch.Tensor) -> torch.Tensor:  # S_D U_D^T -> U_D^T W (a zero S: a zero row)
        return (b.to(torch.float64) / safe[:b.shape[0], None]) @ w
    return SVD(U, S, U.T, unwhiten, inputs=w.shape[1])


@torch.no_grad()
def compensated_svd(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
                    damping: float = 1e-2, shrink: float | None = None, top: int | None = None,
                    weighted: bool = False) -> SVD:
    """Rank-D factors minimising ||W X - W_D X'|| when the layer's inputs changed from X (the
    original network) to X' (the network whose earlier layers are compressed).

    With C' = E[x' x'^T] and A = E[x x'^T], the unconstrained optimum is W* = W A C'^{-1}
    = W + W (A - C') C'^{-1}; the error splits into a part no W_D can remove plus
    ||(W* - W_D) X'||, so the answer is the whitened truncation of W* in the metric of C'.
    Estimated from few rows, the correction W (A - C') C'^{-1} fits the calibration set
    rather than the data: it is shrunk toward W by a ridge, (C' + shrink * mean(diag) I)
    in place of C' (``shrink`` defaults to ``damping``; 0 is the exact optimum).
    ``weighted``: ``cross`` is W (A - C') (m x n) already (calibrate.Stats.weighted).
    """
    w = weight.detach().to(torch.float64)
    c = gram.to(w.device, torch.float64)
    scale = float(torch.diagonal(c).mean())
    if not scale > 0:
        return svd(w, top)
    ridge = damping if shrink is None else shrink
    if weighted:
        rhs = cross.to(w.device, torch.float64).T
    else:
        rhs = times(w, cross.to(w.device), torch.float64, minus=c).T  # (A - C)^T W^T, no n x n difference
    chol, ok = damped_cholesky(c, ridge * scale)  # (positive definite unless the ridge is 0)
    if not ok:
        del chol
        chol = damped(c, ridge * scale)
    target = w + (torch.cholesky_solve(rhs, chol) if ok else torch.linalg.solve(chol, rhs)).T
    del rhs, chol
    return whitened_svd(target, c, damping, top, compute_dtype(weight.dtype))
