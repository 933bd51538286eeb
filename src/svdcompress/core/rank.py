"""Choosing a layer's rank from its singular values: pure functions, no torch modules.

A rank spec is one of three kinds:

* ``rank``   -- a fixed rank D (int >= 1), clamped to min(m, n);
* ``energy`` -- the smallest D whose squared singular values reach that fraction of the
  total (float in (0, 1]);
* ``ratio``  -- the fraction of the layer's weight parameters to keep (float in (0, 1]):
  the largest D with D * (m + n) <= ratio * m * n, at least 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

KINDS = ("rank", "energy", "ratio")


@dataclass(frozen=True)
class RankSpec:
    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"rank spec kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "rank":
            if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 1:
                raise ConfigError(f"rank must be an integer >= 1, got {self.value!r}")
        else:
            ok = isinstance(self.value, (int, float)) and not isinstance(self.value, bool)
            if not ok or not (0.0 < float(self.value) <= 1.0) or math.isnan(float(self.value)):
                raise ConfigError(f"{self.kind} must be a number in (0, 1], got {self.value!r}")

    def __str__(self) -> str:
        return f"{self.kind}={self.value}"


def factorized_params(rank: int, shape: tuple[int, int]) -> int:
    """Weight parameters of the two factors of an (m x n) matrix at this rank."""
    m, n = shape
    return rank * (m + n)


def saves_parameters(rank: int, shape: tuple[int, int]) -> bool:
    """A factorisation is only worth it when D * (m + n) < m * n."""
    m, n = shape
    return factorized_params(rank, shape) < m * n


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Count of singular values above max(m, n) * eps * s_max (numpy's matrix_rank rule)."""
    s = singular_values
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0
    eps = torch.finfo(s.dtype).eps if s.is_floating_point() else 0.0
    tol = float(s.max()) * max(shape) * eps
    return int((s > tol).sum())


def choose_rank(singular_values: torch.Tensor, spec: RankSpec, shape: tuple[int, int]) -> int:
    """The rank D in [1, min(m, n)] that ``spec`` asks for on a matrix of this ``shape``.

    ``singular_values`` are in descending order (as torch.linalg.svd returns them); only
    ``energy`` reads them (None will do for the other kinds).
    """
    m, n = shape
    full = min(m, n)
    if spec.kind == "rank":
        return min(int(spec.value), full)
    if spec.kind == "ratio":  # (1: every parameter kept, so the full rank: the layer stays dense,
        # where the floor below gave a lossy rank that saved a rounding's worth of parameters)
        return full if spec.value >= 1 else max(1, min(full, int(math.floor(spec.value * m * n / (m + n)))))
    # energy: singular values that are numerically zero carry no energy, so energy=1.0 on a
    # rank-deficient matrix gives its numerical rank, not min(m, n) because of round-off.
    r = numerical_rank(singular_values, shape)
    if r == 0:
        return 1  # an all-zero matrix: rank 1 (zero factors) reproduces it exactly
    energy = singular_values[:r].double().square()
    cumulative = torch.cumsum(energy, 0) / energy.sum()
    # tiny slack so that energy=1.0 is reached despite the last cumsum's round-off
    reached = cumulative >= spec.value - 1e-12
    return int(torch.nonzero(reached)[0]) + 1


def round_rank(rank: int, multiple: int, shape: tuple[int, int]) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, but never above min(m, n).

    Rounding up keeps more singular triplets, so the truncation error never grows.
    """
    return min(-(-rank // multiple) * multiple, min(shape))


def truncation_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error ||W - W_D|| / ||W|| of the best rank-D approximation."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(0.0, float(energy[rank:].sum())) / total)


def tail_losses(losses: torch.Tensor) -> np.ndarray:
    """From per-triplet losses (s_i^2, in descending-s order) to the loss of truncating at
    each rank: entry d - 1 is sum_{i > d} losses_i, for d = 1 .. len(losses)."""
    e = losses.detach().double().cpu()
    return (e.sum() - torch.cumsum(e, 0)).clamp_min(0).numpy()


def allocate_ranks(layers: dict[str, tuple[torch.Tensor, tuple[int, int]]], budget: int,
                   max_units: int = 2_000_000) -> dict[str, int | None]:
    """Per-layer ranks minimising the summed *relative* squared truncation error
    (sum_{i>D} s_i^2 / sum s_i^2) under the budget; ``layers`` maps a name to (singular
    values, matrix shape). See ``allocate``."""
    curves = {}
    for name, (s, shape) in layers.items():
        tail = tail_losses(s.double().square())
        total = float(s.double().square().sum())
        curves[name] = (tail / total if total > 0 else np.zeros_like(tail), shape)
    return allocate(curves, budget, max_units)


def allocate(curves: dict[str, tuple[np.ndarray, tuple[int, int]]], budget: int,
             max_units: int = 2_000_000) -> dict[str, int | None]:
    """Per-layer ranks under a global parameter budget (None: the layer stays dense).

    ``curves`` maps a name to (loss of the layer truncated at rank d, entry d - 1; matrix
    shape); a dense layer loses nothing. The choice minimises the summed loss while the
    weight parameters kept, sum of D (m + n) or m n for a dense layer, stay within
    ``budget``. Solved exactly by dynamic programming over the budget in units of the
    costs' greatest common divisor; when that would need more than ``max_units`` units the
    costs are rounded up to a coarser unit, which keeps the budget and may leave a sliver
    of it unused. A program of more than MAX_WORK steps (a language model's hundreds of
    layers) is solved by a price on parameters instead (``_allocate_by_price``).
    """
    choices = {}  # name -> list of (cost, loss, rank or None)
    for name, (loss, (m, n)) in curves.items():
        # a spectrum shorter than min(m, n) (directions without input energy): nothing left to lose
        loss = np.concatenate([np.asarray(loss, dtype=np.float64), np.zeros(max(0, min(m, n) - len(loss)))])
        opts = [(d * (m + n), float(loss[d - 1]), d) for d in range(1, min(m, n) + 1)
                if saves_parameters(d, (m, n))]
        choices[name] = opts + [(m * n, 0.0, None)]
    least = sum(min(c for c, _, _ in opts) for opts in choices.values())
    if budget < least:
        raise ConfigError(f"ratio too small: even rank 1 in every layer keeps {least:,} "
                         f"parameters, above the budget of {budget:,}")
    costs = [c for opts in choices.values() for c, _, _ in opts]
    unit = math.gcd(*costs)
    if budget // unit > max_units:
        unit = math.ceil(budget / max_units)
    size = budget // unit + 1
    if sum(len(opts) for opts in choices.values()) * size > MAX_WORK:
        return _allocate_by_price(choices, budget)
    inf = float("inf")
    best = np.zeros(size)  # best[b]: least total error with at most b units spent so far
    picks = []
    for name, opts in choices.items():
        new = np.full(size, inf)
        pick = np.zeros(size, dtype=np.int32)
        for i, (cost, err, _) in enumerate(opts):
            k = -(-cost // unit)  # round up: never exceed the budget
            if k >= size:
                continue
            cand = best[:size - k] + err
            better = cand < new[k:]
            new[k:][better] = cand[better]
            pick[k:][better] = i
        best = new
        picks.append((name, opts, pick))
    b = int(np.argmin(best))
    out = {}
    for name, opts, pick in reversed(picks):
        cost, _, rank = opts[pick[b]]
        out[name] = rank
        b -= -(-cost // unit)
    return dict(reversed(list(out.items())))


MAX_WORK = 3e9  # options x budget units of the exact program (SmolLM2's 210 layers: 3e10)


def _allocate_by_price(choices: dict[str, list], budget: int) -> dict[str, int | None]:
    """``allocate`` by a price per parameter (Lagrangian relaxation): every layer takes the
    option of least loss + price x cost, with the least price whose choice fits the budget
    (bisection); what is left of the budget then buys, one at a time, the upgrade of most
    loss saved per parameter that still fits. Exact for the lower convex hull of each
    layer's (cost, loss) curve, and within one layer's step of the optimum otherwise (tested
    against the exact program)."""
    names = list(choices)
    cost = [np.array([c for c, _, _ in choices[n]], dtype=np.float64) for n in names]
    loss = [np.array([e for _, e, _ in choices[n]], dtype=np.float64) for n in names]

    def pick(price: float) -> list[int]:
        return [int(np.argmin(e + price * c)) for c, e in zip(cost, loss)]

    def spent(p: list[int]) -> float:
        return sum(float(c[i]) for c, i in zip(cost, p))

    best = pick(0.0)
    if spent(best) > budget:
        hi = 1e-12
        while spent(pick(hi)) > budget:  # at a high enough price every layer takes its cheapest
            hi *= 2
        lo = hi / 2 if hi > 1e-12 else 0.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if spent(pick(mid)) > budget else (lo, mid)
        best = pick(hi)
    left = budget - spent(best)
    while True:  # spend the rest on the best upgrades that fit
        gain, where = 0.0, None
        for j, (c, e) in enumerate(zip(cost, loss)):
            extra = c - c[best[j]]
            saved = e[best[j]] - e
            ok = (extra > 0) & (extra <= left) & (saved > 0)
            if ok.any():
                rate = np.where(ok, saved / np.where(extra > 0, extra, 1), -1.0)
                k = int(np.argmax(rate))
                if rate[k] > gain:
                    gain, where = float(rate[k]), (j, k)
        if where is None:
            break
        j, k = where
        left -= float(cost[j][k] - cost[j][best[j]])
        best[j] = k
    return {n: choices[n][i][2] for n, i in zip(names, best)}
