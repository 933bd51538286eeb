"""Layer-input statistics for data-aware (whitened) SVD, collected with forward hooks.

For each target layer, the second-moment matrix E[x x^T] of the inputs it really sees,
accumulated in float64 while streaming calibration batches: memory O(in^2) per layer.
Conv2d inputs are unfolded into the (in * kh * kw) patches the weight matrix multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import dist
from .errors import ConfigError
from .kinds import dense_kind


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (nothing after the layer is needed)."""


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weight matrix multiplies: (N, in) or (N, in * kh * kw)."""
    kind = dense_kind(module)
    if kind is None:
        raise TypeError(f"no layer kind for {type(module).__name__}")
    return kind.inputs(module, x)


HELD_OUT = 4  # the last 1/HELD_OUT of each batch's rows are held out


def held_out_start(rows: int) -> int:
    """Rows [start:] of a batch's ``rows`` are held out: its last quarter (whole samples when
    a batch holds several; nothing from a batch of fewer than 4 rows)."""
    return rows - rows // HELD_OUT


@dataclass
class Stats:
    """One layer's calibration statistics: means over all rows, and over the fit and the
    held-out rows apart (to choose a fit by its error on rows it was not fitted to).

    ``gram`` = E[y y^T] of the inputs y the layer is fitted on; ``cross`` = E[x y^T] where x
    are its inputs in the original network (sequential calibration), None when x = y."""

    gram: torch.Tensor
    cross: torch.Tensor | None
    rows: int
    fit: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (gram, cross) of the fit rows
    held: tuple[torch.Tensor, torch.Tensor | None] | None = None  # ... and of the held-out rows
    # what the fits of the layers fed these inputs share (fit.py: one eigendecomposition)
    cache: dict = field(default_factory=dict, repr=False, compare=False)


class Moments:
    """Running float64 sums of y y^T (and x y^T for paired rows), fit and held-out rows apart.

    Products are taken in float32 (float64 for a float64 model) and summed in float64: a
    batch's product in float32 is accurate to ~1e-6, and twice as fast."""

    def __init__(self) -> None:
        self.yy = self.xy = None  # (2, n, n): [fit rows, held-out rows]
        self.count = [0, 0]

    @staticmethod
    def _rows(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)

    def add(self, y: torch.Tensor, x: torch.Tensor | None = None) -> None:
        y = self._rows(y)
        x = None if x is None else self._rows(x).to(y.device)
        if self.yy is None:
            n = y.shape[1]
            self.yy = torch.zeros(2, n, n, dtype=torch.float64, device=y.device)
            if x is not None:
                self.xy = torch.zeros(2, x.shape[1], n, dtype=torch.float64, device=y.device)
        cut = held_out_start(y.shape[0])
        for part, rows in enumerate((slice(0, cut), slice(cut, None))):
            ys = y[rows]
            if ys.shape[0] == 0:
                continue
            self.yy[part].add_((ys.T @ ys).to(torch.float64))
            if x is not None:
                self.xy[part].add_((x[rows].T @ ys).to(torch.float64))
            self.count[part] += ys.shape[0]

    def stats(self, name: str = "") -> Stats:
        """The means; under torchrun the sums over every process's share of the batches."""
        if self.yy is None:
            raise ConfigError(f"no calibration inputs reached layer {name}".strip())
        dist.sum_(self.yy)
        if self.xy is not None:
            dist.sum_(self.xy)
        fit, held = (dist.sum_int(c) for c in self.count)
        if fit + held == 0:
            raise ConfigError(f"no calibration inputs reached layer {name}".strip())
        total = fit + held
        gram = _finite(name, self.yy.sum(0) / total)
        cross = None if self.xy is None else self.xy.sum(0) / total
        parts = [None, None]
        if fit and held:
            for part, count in enumerate((fit, held)):
                parts[part] = (self.yy[part] / count,
                               None if self.xy is None else self.xy[part] / count)
        return Stats(gram, cross, total, *parts)


@torch.no_grad()
def collect(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable,
            forward: Callable | None = None, progress: bool = False) -> dict[str, Stats]:
    """E[x x^T] of each named module's input over ``batches`` (model in eval mode), with
    the held-out rows' apart (Stats).

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``).
    """
    stats = {name: Moments() for name in modules}
    handles = []

    def hook(name):
        def fn(module, args):
            rows = layer_inputs(module, args[0])
            stats[name].add(rows)
        return fn

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibrating", disable=not progress, leave=False):
            forward(model, batch) if forward is not None else model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n, s in stats.items() if s.yy is None]
    if missing:
        raise ConfigError(f"no calibration inputs reached layer(s): {', '.join(missing[:5])}")
    return {name: s.stats(name) for name, s in stats.items()}


@torch.no_grad()
def record_inputs(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable,
                  forward: Callable) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Each named module's input rows from one pass of ``model``, batch by batch (float32):
    (rows of every call in that batch's forward pass, in call order; the number of calls).
    A module called several times per forward pass (shared, or reused) gets all its calls.
    The result lists the modules in the order they first run (not their definition order:
    a Phi-3 block defines o_proj before the qkv_proj that runs first)."""
    rows: dict[str, list[list[torch.Tensor]]] = {name: [] for name in modules}
    order: dict[str, None] = {}

    def hook(mod, args, name):
        order.setdefault(name)
        rows[name][-1].append(layer_inputs(mod, args[0]).detach().float())

    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
               for name, m in modules.items()]
    was = model.training
    model.eval()
    try:
        for batch in batches:
            for calls in rows.values():
                calls.append([])
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {name: [(torch.cat(c) if c else torch.zeros(0, 0), len(c)) for c in rows[name]]
            for name in [*order, *(n for n in rows if n not in order)]}


@torch.no_grad()
def collect_paired(compressed: nn.Module, name: str, batches: Iterable, forward: Callable,
                   original_rows: list[tuple[torch.Tensor, int]]) -> Stats:
    """For layer ``name``: Stats with gram E[x' x'^T] and cross E[x x'^T], x' its input in ``compressed`` (whose
    earlier layers are already factorised) and x its input in the original network
    (``original_rows``, batch by batch from ``record_inputs``). Each pass stops once the
    layer has been called as often as in the original pass, so rows pair call by call."""
    seen: list[torch.Tensor] = []
    want = 0

    def grab(module, args):
        seen.append(layer_inputs(module, args[0]).detach())
        if len(seen) == want:
            raise _Stop

    handle = compressed.get_submodule(name).register_forward_pre_hook(grab)
    was = compressed.training
    compressed.eval()
    moments = Moments()
    try:
        for batch, (x, calls) in zip(batches, original_rows):
            if calls == 0:
                continue
            seen.clear()
            want = calls
            try:
                forward(compressed, batch)
            except _Stop:
                pass
            y = torch.cat(seen) if seen else torch.zeros(0, 0)
            if len(seen) != calls or y.shape != x.shape:
                raise ConfigError(f"layer {name!r} ran {calls} time(s) per batch in the original "
                                  f"network but {len(seen)} in the compressed one: its inputs cannot be "
                                  "paired; compress with sequential=False (--calibration parallel)")
            start = 0
            for call in seen:  # each call's rows split apart: held-out rows from every call
                moments.add(call, x[start:start + call.shape[0]])
                start += call.shape[0]
    finally:
        handle.remove()
        compressed.train(was)
    return moments.stats(name)


def _finite(name: str, stat: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(stat).all():
        raise ConfigError(f"the calibration inputs of layer {name!r} are not finite (NaN or Inf)")
    return stat
