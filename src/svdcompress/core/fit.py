"""Each layer's fit, chosen on held-out calibration rows, so that data-aware SVD never does
worse than plain SVD because calibration data is scarce.

Fitted to few rows (fewer than a few times the layer's input width), a whitened or
compensated truncation learns the calibration set rather than the data, and can be less
accurate than the plain SVD on new inputs. So every candidate fit at the layer's rank D is
made from the fit rows (the first three quarters of each calibration batch) and scored by
the output error E||W x - W_D x'||^2 on the held-out rows (the last quarter); the winner is
refitted on all rows. The candidates:

* ``plain``: the truncated SVD of W (uses no data, so it cannot overfit);
* ``whiten``: W truncated in the metric of the layer's inputs, at the configured damping
  and (parallel calibration) at a strong damping (1, halfway to plain);
* ``compensated``: (sequential calibration) the compensated target, its correction shrunk
  toward W by a ridge of each strength in SHRINK; not scored where the layer's inputs did
  not change (the first block's), where it is the whitened fit over again.

With sequential calibration and ample rows (ROWS_PER_INPUT or more per input feature) the
strongly damped whitening is not a candidate: it never won on SmolLM2-135M (16 and 64
sequences) or MiniLM (benchmarks/calibration_speed.json records the fits chosen), where the
compensated fit at the strongest shrink covers the same ground, and it cost a sixth of the
scoring. On scarce rows it is kept: there it does win (tests/test_budget.py's few rows).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .calibrate import Stats
from .factorize import (SVD, compute_dtype, damped_cholesky, thin_svd, compensated_svd, split, svd, times,
                        whitened_svd)

SHRINK = (1e-2, 1e-1, 1.0)  # ridge strengths of the compensation, x mean input energy
STRONG_DAMPING = 1.0
ROWS_PER_INPUT = 4  # fewer calibration rows than this many per input feature: warn
CLOSE_CALL = 1e-4  # float32 scores this close (x the largest) are redone in float64
SKETCH_FROM = 256  # layers this large score a small rank's candidates by a randomized SVD


def held_out_error(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   held: tuple[torch.Tensor, torch.Tensor | None], weighted: bool = False) -> float:
    """E||W x - u v x'||^2 - E||W x||^2 on the held-out rows (the constant term is left out:
    it is the same for every candidate). ``held`` = (E[x' x'^T], E[x x'^T] or None: x = x';
    ``weighted``: W (E[x x'^T] - E[x' x'^T]))."""
    gram, cross = (t.to(torch.float64) for t in (held[0], held[0] if held[1] is None else held[1]))
    w, u, v = weight.to(torch.float64), u.to(torch.float64), v.to(torch.float64)
    w_cross = w @ gram + cross if weighted and held[1] is not None else w @ cross
    return float(-2 * (u * (w_cross @ v.T)).sum() + ((u.T @ u) * (v @ gram @ v.T)).sum())


def strongly_damped(stats: Stats, weight: torch.Tensor) -> bool:
    """Whether the strongly damped whitening is a candidate (see the module's docstring)."""
    return not stats.paired or stats.rows < ROWS_PER_INPUT * weight.shape[1]


def candidates(weight: torch.Tensor, compensate: bool, damping: float, weighted: bool = False,
               strong: bool | None = None) -> dict[str, Callable[..., SVD]]:
    """label -> fit(gram, cross, top=None) of every candidate (see the module's docstring);
    ``top``: only the leading triplets are needed (a cheaper, randomized SVD)."""
    plain = functools.cache(lambda top=None: svd(weight, top, gram=True))  # the same whatever the data
    out: dict[str, Callable] = {"plain": lambda g, c, top=None: plain(top),
                                "whiten": lambda g, c, top=None: whitened_svd(weight, g, damping, top)}
    if damping < STRONG_DAMPING and (not compensate if strong is None else strong):
        out[f"whiten damping={STRONG_DAMPING:g}"] = \
            lambda g, c, top=None: whitened_svd(weight, g, STRONG_DAMPING, top)
    if compensate:
        for lam in SHRINK:
            out[f"compensated shrink={lam:g}"] = \
                lambda g, c, top=None, lam=lam: compensated_svd(weight, g, c, damping, lam, top, weighted)
    return out


def default_fit(weight: torch.Tensor, stats: Stats, damping: float) -> tuple[SVD, str]:
    """The data-aware fit on all rows, with no choice: whitened, or compensated when the
    inputs changed (sequential calibration)."""
    if not stats.paired:
        return whitened_svd(weight, stats.gram, damping), "whiten"
    return (compensated_svd(weight, stats.gram, stats.cross, damping, weighted=stats.weighted),
            f"compensated shrink={damping:g}")


class _Basis:
    """What every candidate fit of every layer fed one input shares: the eigendecomposition
    G_fit = Q diag(lam) Q^T of the fit rows' second moments, and the held-out moments in its
    basis. In it each candidate is a diagonal change of coordinates: a whitening root of
    G_fit + d*s*I is Q diag(sqrt(lam + d*s)), and a ridge inverse (G_fit + k*s*I)^-1 is
    Q diag(1 / (lam + k*s)) Q^T, so one eigendecomposition serves all dampings and shrinks
    (SVD-LLM V2 whitens through eigh of the Gram matrix too)."""

    def __init__(self, stats: Stats) -> None:
        gram, cross = (t.to(torch.float64) for t in (stats.fit[0], stats.fit[0] if stats.fit[1] is None
                                                     else stats.fit[1]))
        held_gram = stats.held[0].to(torch.float64)
        held_cross = held_gram if stats.held[1] is None else stats.held[1].to(torch.float64)
        self.scale = float(torch.diagonal(gram).mean())
        lam, self.q = torch.linalg.eigh(gram)
        self.lam = lam.clamp_min(0)
        self.held = self.q.T @ held_gram @ self.q  # Q^T G_held Q
        self.held_cross = held_cross @ self.q  # A_held Q: W A_held Q is each layer's
        # (A - G) Q; none where the inputs did not change (A = G exactly, e.g. the first
        # block's): the compensated candidates would be the whitened one over again
        self.shift = None if not _changed(stats) else (cross - gram) @ self.q
        self._cast = {}

    def root(self, damping: float) -> torch.Tensor:
        return (self.lam + damping * self.scale).sqrt()

    def as_dt(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One of the basis' matrices (``q``, ``held``, ``held_cross``, ``shift``) in
        ``dtype``, made once per input for every layer fed it."""
        if (name, dtype) not in self._cast:
            self._cast[name, dtype] = getattr(self, name).to(dtype)
        return self._cast[name, dtype]


def _changed(stats: Stats) -> bool:
    """Whether the fit rows' inputs changed (cross moments that are not the second moments
    themselves, or a weighted difference that is not all zero): where they did not, every
    compensated candidate is the whitened fit over again and is not scored."""
    cross = stats.fit[1]
    if cross is None:
        return False
    return bool(cross.any()) if stats.weighted else not torch.equal(cross, stats.fit[0])


def _basis(stats: Stats) -> _Basis:
    if "basis" not in stats.cache:
        stats.cache["basis"] = _Basis(stats)
    return stats.cache["basis"]


def _truncation_error(b: torch.Tensor, root: torch.Tensor, rank: int, n: torch.Tensor,
                      y: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """held_out_error of the rank-D truncation of B = T Q diag(root) (a candidate's target T
    whitened), W_D = [B]_D diag(1/root) Q^T, with N = diag(1/root) Q^T G_held Q diag(1/root)
    (``n``: Q^T G_held Q) and Y = W A_held Q diag(1/root) (``y``: W A_held Q):
    sum_i s_i^2 v_i^T N v_i - 2 s_i u_i^T Y v_i  over the top-D singular triplets
    (s_i, u_i, v_i) of B: exact, from the eigenvectors of B^T B (``gram`` when the caller
    has it) or B B^T, whichever is smaller (a third of an SVD's time); for a
    layer SKETCH_FROM or more wide at a rank under a quarter of its smaller side, from a
    randomized SVD, as the reference does. In the dtype of its arguments."""
    n = n / root[:, None] / root[None, :]
    y = y / root
    m_rows, n_cols = y.shape
    sketch = _sketched(m_rows, n_cols, rank)
    if sketch or m_rows >= n_cols:
        if sketch:
            u, s, vh = thin_svd(b, rank)
            u, s, v = u[:, :rank], s[:rank], vh[:rank].T
        else:  # right singular vectors: B^T B = V diag(s^2) V^T
            evals, vecs = torch.linalg.eigh(b.T @ b if gram is None else gram)
            v, s = vecs[:, -rank:], evals[-rank:].clamp_min(0).sqrt()
            u = None
        first = float((s * s * ((n @ v) * v).sum(0)).sum())
        bu = b @ v if u is None else u * s  # B v_i = s_i u_i
        second = float((bu * (y @ v)).sum())
    else:  # left singular vectors U: W_D = U U^T B L^-1
        u = torch.linalg.eigh(b @ b.T)[1][:, -rank:]
        c = u.T @ b
        first = float(((c @ n) * c).sum())
        second = float(((u.T @ y) * c).sum())
    return first - 2 * second


def _sketched(m_rows: int, n_cols: int, rank: int) -> bool:
    """Whether a candidate is scored from a randomized SVD (see ``_truncation_error``)."""
    return min(m_rows, n_cols) >= SKETCH_FROM and rank + 10 < min(m_rows, n_cols) // 4


def _grams(wq: torch.Tensor, shift: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The products every candidate's B^T B is made of: B = WQ diag(r1) + S diag(r2), so
    B^T B = r1 (Q^T W^T W Q) r1 + r1 (Q^T W^T S) r2 + its transpose + r2 (S^T S) r2 (the r's
    diagonal): three n x n products per layer instead of one per candidate."""
    out = {"pp": wq.T @ wq}
    if shift is not None:
        out["ps"], out["ss"] = wq.T @ shift, shift.T @ shift
    return out


def _candidate_gram(g: dict[str, torch.Tensor], r1: torch.Tensor, r2: torch.Tensor | None) -> torch.Tensor:
    out = r1[:, None] * g["pp"] * r1[None, :]
    if r2 is not None:
        cross = r1[:, None] * g["ps"] * r2[None, :]
        out = out + cross + cross.T + r2[:, None] * g["ss"] * r2[None, :]
    return out


def scores(weight: torch.Tensor, rank: int, stats: Stats, damping: float,
           only: set[str] | None = None, memo: dict | None = None) -> dict[str, float] | None:
    """held_out_error of every candidate's rank-D fit on the fit rows (the labels of
    ``candidates``), exact, from one shared eigendecomposition per input (``_Basis``) and
    one eigendecomposition of a Gram matrix of min(m, n) per candidate; None when the
    inputs carry no energy or there is no damping (the reference path handles those). A
    layer with fewer outputs than inputs whose input has no basis yet (a down projection,
    alone in its group) is scored on its output side instead (``_output_side_scores``).

    The shared basis is float64; each candidate's eigendecomposition and products run in
    the weight's compute dtype (float32 for a float32 or half model, as its final SVD
    does: twice as fast, and its round-off, ~1e-6 of the layer's output energy, is far
    below the differences between candidates that decide anything). ``only``: score just
    these labels (a close call redone in float64); ``memo``: what a second call for the same
    layer may reuse (``_output_side_scores``' float64 solves)."""
    if not damping > 0:
        return None
    if stats.weighted or ("basis" not in stats.cache and weight.shape[0] < weight.shape[1]):
        return _output_side_scores(weight, rank, stats, damping, only, memo)
    basis = _basis(stats)
    if not basis.scale > 0:
        return None
    dt = compute_dtype(weight.dtype)
    w = weight.detach().to(dt)  # (the products in the compute dtype too: the basis' matrices
    # were formed in float64, the differences A - G included)
    wq, y = w @ basis.as_dt("q", dt), w @ basis.as_dt("held_cross", dt)
    n = basis.as_dt("held", dt)
    shift = None if basis.shift is None else w @ basis.as_dt("shift", dt)
    roots = {"plain": (torch.ones_like(basis.lam), None), "whiten": (basis.root(damping), None)}
    if damping < STRONG_DAMPING and strongly_damped(stats, weight):
        roots[f"whiten damping={STRONG_DAMPING:g}"] = (basis.root(STRONG_DAMPING), None)
    if shift is not None:  # T = W + W (A - G) (G + lam s I)^-1, whitened
        root = basis.root(damping)
        for lam in SHRINK:
            roots[f"compensated shrink={lam:g}"] = (root, root / (basis.lam + lam * basis.scale))
    roots = {k: v for k, v in roots.items() if only is None or k in only}
    m_rows, n_cols = wq.shape
    shared = _grams(wq, shift) if m_rows >= n_cols and not _sketched(m_rows, n_cols, rank) else None
    out = {}
    for label, (r1, r2) in roots.items():
        r1 = r1.to(dt)
        r2 = None if r2 is None else r2.to(dt)
        b = wq * r1 if r2 is None else wq * r1 + shift * r2
        gram = None if shared is None else _candidate_gram(shared, r1, r2)
        out[label] = _truncation_error(b, r1, rank, n, y, gram)
    return out


MEMO_BYTES = 64 << 20  # float64 solves up to this size are kept for a close call's rescoring


def _output_side_scores(weight: torch.Tensor, rank: int, stats: Stats, damping: float,
                        only: set[str] | None = None, memo: dict | None = None) -> dict[str, float] | None:
    """``scores`` of a wide layer (m outputs < n inputs) without any n x n eigendecomposition:
    a candidate (target T, metric M) truncates to W_D = U U^T T, U the top-D eigenvectors of
    T M T^T (m x m); its error is tr U^T (T G_h T^T - 2 W A_h T^T) U. With
    S = W (A - G) (G + k s I)^-1 (one Cholesky solve per shrink k), T = W + S and
    S G = W (A - G) - k s S, every m x m term comes from products of m x n matrices."""
    f64, dt = torch.float64, compute_dtype(weight.dtype)
    gram64 = stats.fit[0].to(f64)
    scale = float(torch.diagonal(gram64).mean())
    if not scale > 0:
        return None
    # products in the weight's compute dtype (as in ``scores``), each n x n statistic
    # converted a column block at a time (``times``: no n x n copy); the ridge solves in float64
    held = stats.held[0]
    w = weight.detach().to(dt)
    w_held = times(w, held, dt)  # W G_h
    if stats.held[1] is None:  # W A_h (A_h = G_h when the inputs are unchanged)
        w_a = w_held
    else:
        w_a = w_held + stats.held[1].to(dt) if stats.weighted else times(w, stats.held[1], dt)
    base = {"ww": w @ w.T, "wgw": times(w, gram64, dt) @ w.T, "wgh": w_held @ w.T, "wa": w_a @ w.T}

    def error(k_mat: torch.Tensor, t_held_t: torch.Tensor, w_a_t: torch.Tensor) -> float:
        u = torch.linalg.eigh(k_mat)[1][:, -rank:]
        return float(((u.T @ t_held_t) * u.T).sum() - 2 * ((u.T @ w_a_t) * u.T).sum())

    def metric(d: float) -> torch.Tensor:  # W (G + d s I) W^T
        return base["wgw"] + d * scale * base["ww"]

    def wanted(label: str) -> bool:
        return only is None or label in only

    whitened = {"plain": None, "whiten": damping}
    if damping < STRONG_DAMPING and strongly_damped(stats, weight):
        whitened[f"whiten damping={STRONG_DAMPING:g}"] = STRONG_DAMPING
    out = {label: error(base["ww"] if d is None else metric(d), base["wgh"], base["wa"])
           for label, d in whitened.items() if wanted(label)}
    shrinks = [lam for lam in SHRINK if wanted(f"compensated shrink={lam:g}")]
    if shrinks and _changed(stats):
        # W (A - G), the compensation's numerator (A - G: a small difference, taken in float64)
        # (in column blocks: no n x n difference is made, an 11,008-wide input's is 0.9 GiB),
        # and S = R (G + lam s I)^-1 by one Cholesky solve per shrink, all in float64: the
        # same for a float32 and a float64 scoring of this layer, so a close call's
        # rescoring reuses them from ``memo`` when they are small (MEMO_BYTES)
        memo = {} if memo is None else memo
        r64 = memo.get("r")
        if r64 is None:
            r64 = stats.fit[1].to(f64) if stats.weighted else times(w, stats.fit[1], f64, minus=gram64)
        keep = (len(SHRINK) + 1) * r64.numel() * r64.element_size() <= MEMO_BYTES
        if keep:
            memo["r"] = r64
        r = r64.to(dt)
        rw = r @ w.T
        for lam in shrinks:
            shift64 = memo.get(lam)
            if shift64 is None:
                chol, ok = damped_cholesky(gram64, lam * scale)
                if not ok:
                    raise torch.linalg.LinAlgError("the damped second moments are not positive definite")
                shift64 = torch.cholesky_solve(r64.T, chol).T  # S = R (G + lam s I)^-1
                del chol
                if keep:
                    memo[lam] = shift64
            shift = shift64.to(dt)
            sw, ss, rs = shift @ w.T, shift @ shift.T, r @ shift.T
            sg_w, sg_s = rw - lam * scale * sw, rs - lam * scale * ss  # S G W^T, S G S^T
            k_mat = metric(damping) + sg_w + sg_w.T + sg_s + damping * scale * (sw + sw.T + ss)
            s_held = times(shift, held, dt)  # S G_h
            shw = s_held @ w.T
            t_held_t = base["wgh"] + shw + shw.T + s_held @ shift.T
            out[f"compensated shrink={lam:g}"] = error(k_mat, t_held_t, base["wa"] + w_a @ shift.T)
    return out


@torch.no_grad()
def fit_layer(weight: torch.Tensor, rank: int, stats: Stats | None, damping: float,
              select: bool = True) -> tuple[SVD, str]:
    """The decomposition to truncate at ``rank`` and its label ("plain", "whiten", ...).

    No statistics: the plain SVD. ``select`` off, or no held-out rows (batches of fewer than
    4 rows): the data-aware fit on all rows. Otherwise the candidate with the smallest
    held-out output error at this rank, refitted on all rows."""
    if stats is None:
        return svd(weight), "plain"
    if not select or stats.fit is None or stats.held is None:
        stats.scored()
        return default_fit(weight, stats, damping)
    fits = candidates(weight, stats.paired, damping, stats.weighted, strongly_damped(stats, weight))
    memo: dict = {}
    found = scores(weight, min(rank, *weight.shape), stats, damping, None, memo)
    if found is not None and compute_dtype(weight.dtype) != torch.float64:
        least, window = min(found.values()), CLOSE_CALL * max(abs(v) for v in found.values())
        close = {k for k, v in found.items() if v - least <= window}
        if len(close) > 1:
            # too close to call in float32 (its scores are within ~1e-5 of the largest):
            # float64 decides among those close to the best (no other can be the exact
            # best), so the choice is the one exact scores make
            found.update(scores(weight.double(), min(rank, *weight.shape), stats, damping, close, memo))
    memo.clear()  # (the float64 solves are not needed by the refit)
    if found is None:  # the reference: each candidate factorised apart, scored on its top rank
        found = {}
        fit_gram, fit_cross = stats.fit
        for label, make in fits.items():
            dec = make(fit_gram, fit_cross, top=rank)
            found[label] = held_out_error(weight, *split(dec, min(rank, dec.S.numel())), stats.held,
                                          stats.weighted)
    least = min(found.values())
    tied = [k for k, e in found.items() if e <= least + 1e-9 * abs(least)]  # round-off apart
    best = "plain" if "plain" in tied else tied[0]  # a tie goes to plain
    stats.scored()  # the last layer fed these inputs: the parts become the totals
    return fits[best](stats.gram, stats.cross), best
