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
from .padding import masked_rows, row_mask


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


class Stats:
    """One layer's calibration statistics: means over all rows, and over the fit and the
    held-out rows apart (to choose a fit by its error on rows it was not fitted to).

    ``gram`` = E[y y^T] of the inputs y the layer is fitted on; ``cross`` = E[x y^T] where x
    are its inputs in the original network (sequential calibration), None when x = y; with
    ``weighted``, W (E[x y^T] - E[y y^T]) for the weight W of the one layer they feed.

    When the rows were split (``fit`` and ``held`` given with their shares ``weights`` of
    all rows), only the two parts are kept: ``gram`` and ``cross`` are formed from them
    each time they are asked for, so each statistic is held once (an 11,008-wide layer's
    float64 moment is 0.9 GiB)."""

    def __init__(self, gram: torch.Tensor | None, cross: torch.Tensor | None, rows: int,
                 fit: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 held: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 weights: tuple[float, float] | None = None) -> None:
        if gram is None and (fit is None or held is None or weights is None):
            raise ValueError("Stats needs gram, or both parts and their weights")
        self._gram, self._cross, self.rows = gram, cross, rows
        self.fit, self.held, self.weights = fit, held, weights
        # what the fits of the layers fed these inputs share (fit.py: one eigendecomposition)
        self.cache: dict = {}
        # how many layers will still choose their fit on these statistics; None: not counted
        # (then the parts are kept for as long as the Stats live)
        self.consumers: int | None = None
        # the cross moments are kept on the weight's side, as W (E[x y^T] - E[y y^T]) (m x n)
        # for the weight W of the one layer they feed, not E[x y^T] (n x n); see
        # blockwise.compress_blocks
        self.weighted = False

    def scored(self) -> None:
        """One layer fed these inputs has chosen its fit (fit.fit_layer, before its final
        fit). When the last counted one has, the parts are folded into the totals in place
        (the fit part's memory becomes the total, the held-out part is freed): the final fit
        of a wide layer then holds two n x n statistics, not six."""
        if self.consumers is None:
            return
        self.consumers -= 1
        if self.consumers > 0 or self._gram is not None:
            return
        self._gram, self._cross = self._total(0, in_place=True), self._total(1, in_place=True)
        self.fit = self.held = self.weights = None
        self.cache.clear()

    def _total(self, which: int, in_place: bool = False) -> torch.Tensor | None:
        """The mean over all rows (0: gram, 1: cross) from the two parts; ``in_place``: in
        the fit part's memory."""
        a, b = self.fit[which], self.held[which]
        if a is None:
            return None
        return (a.mul_ if in_place else a.mul)(self.weights[0]).add_(b, alpha=self.weights[1])

    @property
    def gram(self) -> torch.Tensor:
        return self._gram if self._gram is not None else self._total(0)

    @property
    def paired(self) -> bool:
        """Whether there are cross moments (sequential calibration), without forming them."""
        return (self._cross if self._gram is not None else self.fit[1]) is not None

    @property
    def cross(self) -> torch.Tensor | None:
        return self._cross if self._gram is not None else self._total(1)

    def __repr__(self) -> str:
        n = (self._gram if self._gram is not None else self.fit[0]).shape[0]
        return f"Stats(n={n}, rows={self.rows})"


PENDING_BYTES = 32 << 20  # rows of small batches are gathered up to this size per product


class Moments:
    """Running float64 sums of y y^T (and x y^T for paired rows), fit and held-out rows apart.

    Products are taken in float32 (float64 for a float64 model) and summed in float64: a
    product over a few thousand rows in float32 is accurate to ~1e-6, and twice as fast.
    Small batches' rows are gathered into one product (up to PENDING_BYTES, and a quarter of
    the size of the sums they feed, which bounds the extra memory where every layer of a
    model gathers at once): fewer n x n float64 additions (a 1,536-wide one moves 19 MB) and
    larger products."""

    def __init__(self) -> None:
        self.yy = self.xy = None  # [fit rows, held-out rows], each (n, n): apart, so either can be freed
        self.count = [0, 0]
        self.done = False
        # per part: rows not yet summed, as (y, x or None, whether x is y) per batch
        self.pending: list[list[tuple]] = [[], []]
        self.pending_bytes = [0, 0]

    @staticmethod
    def _rows(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)

    def add(self, y: torch.Tensor, x: torch.Tensor | None = None) -> None:
        if self.done:
            raise RuntimeError("these moments were already turned into Stats")
        y = self._rows(y)
        x = None if x is None else self._rows(x).to(y.device)
        if self.yy is None:
            n = y.shape[1]
            self.yy = [torch.zeros(n, n, dtype=torch.float64, device=y.device) for _ in range(2)]
            if x is not None:
                self.xy = [torch.zeros(x.shape[1], n, dtype=torch.float64, device=y.device) for _ in range(2)]
        cut = held_out_start(y.shape[0])
        same = x is not None and torch.equal(x, y)
        # gathered rows stay under a quarter of a part's own n x n float64 sum (and
        # PENDING_BYTES): the hooks of every layer of a model may gather at once
        limit = min(PENDING_BYTES, self.yy[0].numel() * 2)
        for part, rows in enumerate((slice(0, cut), slice(cut, None))):
            ys = y[rows]
            if ys.shape[0] == 0:
                continue
            xs = None if x is None else ys if same else x[rows]
            self.count[part] += ys.shape[0]
            size = ys.numel() * ys.element_size() * (1 if x is None or same else 2)
            if not self.pending[part] and size >= limit:  # a large batch: summed now
                self._sum(part, ys, xs, same)
                continue
            # kept as a copy (the model may change its activations in place later in its pass)
            self.pending[part].append((ys.clone(), None if xs is None or same else xs.clone(), same))
            self.pending_bytes[part] += size
            if self.pending_bytes[part] >= limit:
                self._flush(part)

    def _flush(self, part: int) -> None:
        """Sum one part's gathered rows in one product."""
        rows = self.pending[part]
        if not rows:
            return
        ys = rows[0][0] if len(rows) == 1 else torch.cat([r[0] for r in rows])
        same = all(r[2] for r in rows)
        xs = None if self.xy is None else ys if same else torch.cat([r[0] if r[2] else r[1] for r in rows])
        self.pending[part], self.pending_bytes[part] = [], 0
        self._sum(part, ys, xs, same)

    def _sum(self, part: int, ys: torch.Tensor, xs: torch.Tensor | None, same: bool) -> None:
        """Add ys^T ys (and xs^T ys) to one part's totals. Unchanged inputs (x = y in every
        batch, the first block's under sequential calibration) get cross moments summed
        exactly as the second moments are, so they are equal to the last bit (fit.py then
        knows the compensated fits are the whitened one over again)."""
        _add_product(self.yy[part], ys, ys)
        if xs is not None:
            _add_product(self.xy[part], ys if same else xs, ys)

    def stats(self, name: str = "") -> Stats:
        """The means; under torchrun the sums over every process's share of the batches.
        Once only: the sums become the means in place (no copy of an n x n matrix is made),
        and the Stats own them."""
        if self.done:
            raise RuntimeError("these moments were already turned into Stats")
        if self.yy is None:
            raise ConfigError(f"no calibration inputs reached layer {name}".strip())
        for part in (0, 1):
            self._flush(part)
        for t in self.yy + (self.xy or []):
            dist.sum_(t)
        fit, held = (dist.sum_int(c) for c in self.count)
        if fit + held == 0:
            raise ConfigError(f"no calibration inputs reached layer {name}".strip())
        total = fit + held
        yy, xy = self.yy, self.xy
        self.yy = self.xy = None
        self.done = True
        if fit and held:
            for part, count in enumerate((fit, held)):
                yy[part].div_(count)
                if xy is not None:
                    xy[part].div_(count)
            for t in yy:
                _finite(name, t)
            parts = [(yy[part], None if xy is None else xy[part]) for part in (0, 1)]
            return Stats(None, None, total, *parts, weights=(fit / total, held / total))
        gram = _finite(name, yy[0].add_(yy[1]).div_(total))
        cross = None if xy is None else xy[0].add_(xy[1]).div_(total)
        return Stats(gram, cross, total)


COLUMNS = 2048  # wider inputs' products are summed in column blocks of this many
GRAM_FROM = 512  # second moments this wide are summed by the blocks on and above the diagonal


def _add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a^T b (float64 total, products in a's dtype, added to it by type
    promotion), in column blocks when wide: the product is n x COLUMNS, not n x n (an
    11,008-wide input's whole product would be 0.5 GiB). A second moment (``a is b``) this
    wide is summed by ``_add_gram``."""
    if a is b and b.shape[1] >= GRAM_FROM:
        _add_gram(total, a)
        return
    if b.shape[1] <= COLUMNS:
        total.add_(a.T @ b)
        return
    for j in range(0, b.shape[1], COLUMNS):
        total[:, j:j + COLUMNS].add_(a.T @ b[:, j:j + COLUMNS])


def _add_gram(total: torch.Tensor, a: torch.Tensor) -> None:
    """total += a^T a from the row blocks of a^T a on and above the diagonal, each mirrored
    below it: about 60% of the whole product's multiply-adds (a 576-wide input on 3,072
    rows: 5.4 ms against 8.8), and the sum exactly symmetric."""
    n = a.shape[1]
    step = min(COLUMNS, max(256, -(-n // 4)))
    for i in range(0, n, step):
        block = a[:, i:i + step].T @ a[:, i:]  # rows i.. of a^T a, from column i on
        total[i:i + step, i:].add_(block)
        total[i + step:, i:i + step].add_(block[:, step:].T)


@torch.no_grad()
def collect(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable,
            forward: Callable | None = None, progress: bool = False) -> dict[str, Stats]:
    """E[x x^T] of each named module's input over ``batches`` (model in eval mode), with
    the held-out rows' apart (Stats).

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``).
    """
    stats = {name: Moments() for name in modules}
    handles = []
    pads = [None]  # the current batch's row_mask

    def hook(name):
        def fn(module, args):
            rows = layer_inputs(module, args[0])
            stats[name].add(masked_rows(rows, args[0], pads[0]))
        return fn

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibrating", disable=not progress, leave=False):
            pads[0] = row_mask(batch)
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
    pads = [None]  # the current batch's row_mask: padded positions' rows are not recorded

    def hook(mod, args, name):
        order.setdefault(name)
        rows[name][-1].append(masked_rows(layer_inputs(mod, args[0]).detach().float(), args[0], pads[0]))

    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
               for name, m in modules.items()]
    was = model.training
    model.eval()
    try:
        for batch in batches:
            for calls in rows.values():
                calls.append([])
            pads[0] = row_mask(batch)
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
    pads = [None]  # the current batch's row_mask (as record_inputs applied it)

    def grab(module, args):
        seen.append(masked_rows(layer_inputs(module, args[0]).detach(), args[0], pads[0]))
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
            pads[0] = row_mask(batch)
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
    if not torch.isfinite(stat.sum()):  # a NaN or Inf anywhere makes the sum one (no n x n mask)
        raise ConfigError(f"the calibration inputs of layer {name!r} are not finite (NaN or Inf)")
    return stat
