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
  and at a strong damping (1, halfway to plain);
* ``compensated``: (sequential calibration) the compensated target, its correction shrunk
  toward W by a ridge of each strength in SHRINK.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .calibrate import Stats
from .factorize import SVD, compensated_svd, split, svd, whitened_svd

SHRINK = (1e-2, 1e-1, 1.0)  # ridge strengths of the compensation, x mean input energy
STRONG_DAMPING = 1.0
ROWS_PER_INPUT = 4  # fewer calibration rows than this many per input feature: warn


def held_out_error(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   held: tuple[torch.Tensor, torch.Tensor | None]) -> float:
    """E||W x - u v x'||^2 - E||W x||^2 on the held-out rows (the constant term is left out:
    it is the same for every candidate). ``held`` = (E[x' x'^T], E[x x'^T] or None: x = x')."""
    gram, cross = (t.to(torch.float64) for t in (held[0], held[0] if held[1] is None else held[1]))
    w, u, v = weight.to(torch.float64), u.to(torch.float64), v.to(torch.float64)
    return float(-2 * (u * (w @ cross @ v.T)).sum() + ((u.T @ u) * (v @ gram @ v.T)).sum())


def candidates(weight: torch.Tensor, compensate: bool, damping: float
               ) -> dict[str, Callable[..., SVD]]:
    """label -> fit(gram, cross, top=None) of every candidate (see the module's docstring);
    ``top``: only the leading triplets are needed (a cheaper, randomized SVD)."""
    plain = functools.cache(lambda top=None: svd(weight, top))  # the same whatever the data
    out: dict[str, Callable] = {"plain": lambda g, c, top=None: plain(top),
                                "whiten": lambda g, c, top=None: whitened_svd(weight, g, damping, top)}
    if damping < STRONG_DAMPING:
        out[f"whiten damping={STRONG_DAMPING:g}"] = \
            lambda g, c, top=None: whitened_svd(weight, g, STRONG_DAMPING, top)
    if compensate:
        for lam in SHRINK:
            out[f"compensated shrink={lam:g}"] = \
                lambda g, c, top=None, lam=lam: compensated_svd(weight, g, c, damping, lam, top)
    return out


def default_fit(weight: torch.Tensor, stats: Stats, damping: float) -> tuple[SVD, str]:
    """The data-aware fit on all rows, with no choice: whitened, or compensated when the
    inputs changed (sequential calibration)."""
    if stats.cross is None:
        return whitened_svd(weight, stats.gram, damping), "whiten"
    return compensated_svd(weight, stats.gram, stats.cross, damping), f"compensated shrink={damping:g}"


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
        return default_fit(weight, stats, damping)
    fits = candidates(weight, stats.cross is not None, damping)
    fit_gram, fit_cross = stats.fit
    scores = {}
    for label, make in fits.items():
        dec = make(fit_gram, fit_cross, top=rank)  # scored on its leading triplets only
        u, v = split(dec, min(rank, dec.S.numel()))
        scores[label] = held_out_error(weight, u, v, stats.held)
    best = min(scores, key=lambda k: (scores[k], k != "plain"))  # a tie goes to plain
    return fits[best](stats.gram, stats.cross), best
