"""Layer-input statistics for data-aware (whitened) SVD, collected with forward hooks.

For each target layer, the second-moment matrix E[x x^T] of the inputs it really sees,
accumulated in float64 while streaming calibration batches: memory O(in^2) per layer.
Conv2d inputs are unfolded into the (in * kh * kw) patches the weight matrix multiplies.
"""

from __future__ import annotations

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


class SecondMoments:
    """Running sum of x x^T (float64) and the number of rows seen."""

    def __init__(self, dim: int, device=None) -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        self.sum.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ConfigError("no calibration inputs reached this layer")
        return self.sum / self.count


@torch.no_grad()
def collect(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable,
            forward: Callable | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """E[x x^T] of each named module's input over ``batches`` (model in eval mode).

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``).
    """
    stats = {name: None for name in modules}
    handles = []

    def hook(name):
        def fn(module, args):
            rows = layer_inputs(module, args[0])
            if stats[name] is None:
                stats[name] = SecondMoments(rows.shape[1], rows.device)
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
    missing = [n for n, s in stats.items() if s is None]
    if missing:
        raise ConfigError(f"no calibration inputs reached layer(s): {', '.join(missing[:5])}")
    for s in stats.values():  # under torchrun: the sums over every process's share
        dist.sum_(s.sum)
        s.count = dist.sum_int(s.count)
    return {name: _finite(name, s.mean()) for name, s in stats.items()}


@torch.no_grad()
def record_inputs(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable,
                  forward: Callable) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Each named module's input rows from one pass of ``model``, batch by batch (float32):
    (rows of every call in that batch's forward pass, in call order; the number of calls).
    A module called several times per forward pass (shared, or reused) gets all its calls."""
    rows: dict[str, list[list[torch.Tensor]]] = {name: [] for name in modules}

    def hook(mod, args, name):
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
    return {name: [(torch.cat(c) if c else torch.zeros(0, 0), len(c)) for c in calls]
            for name, calls in rows.items()}


@torch.no_grad()
def collect_paired(compressed: nn.Module, name: str, batches: Iterable, forward: Callable,
                   original_rows: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """For layer ``name``: (E[x' x'^T], E[x x'^T]), x' its input in ``compressed`` (whose
    earlier layers are already factorised) and x its input in the original network
    (``original_rows``, batch by batch from ``record_inputs``). Each pass stops once the
    layer has been called as often as in the original pass, so rows pair call by call."""
    seen: list[torch.Tensor] = []
    want = 0

    def grab(module, args):
        seen.append(layer_inputs(module, args[0]).detach().to(torch.float64))
        if len(seen) == want:
            raise _Stop

    handle = compressed.get_submodule(name).register_forward_pre_hook(grab)
    was = compressed.training
    compressed.eval()
    gram = cross = None
    count = 0
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
            y = torch.cat(seen) if seen else torch.zeros(0, 0, dtype=torch.float64)
            if len(seen) != calls or y.shape != x.shape:
                raise ConfigError(f"layer {name!r} ran {calls} time(s) per batch in the original "
                                  f"network but {len(seen)} in the compressed one: its inputs cannot be "
                                  "paired; compress with sequential=False (--calibration parallel)")
            x = x.to(torch.float64)
            if gram is None:
                gram, cross = y.T @ y, x.T @ y
            else:
                gram.addmm_(y.T, y)
                cross.addmm_(x.T, y)
            count += y.shape[0]
    finally:
        handle.remove()
        compressed.train(was)
    if count == 0:
        raise ConfigError(f"no calibration inputs reached layer {name}")
    dist.sum_(gram)
    dist.sum_(cross)
    count = dist.sum_int(count)
    return _finite(name, gram / count), cross / count


def _finite(name: str, stat: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(stat).all():
        raise ConfigError(f"the calibration inputs of layer {name!r} are not finite (NaN or Inf)")
    return stat
