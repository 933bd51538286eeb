"""Measured speed of a layer shape, dense against factorised, for the inputs it will serve.

A multiply-add count says a rank-D layer costs D (m + n) / (m n) of the dense one; on real
hardware two thin matmuls are slower than that, and at one token (decoding) a small layer's
time is mostly fixed overhead. ``SVDConfig(speed_for="decode" | "prefill" | "generate")``
times every distinct (shape, rank, dtype, device) once, dense ``x W^T`` against
``(x v^T) u^T`` on random inputs of the rows the model will see (decode: 1 row; prefill:
PREFILL_ROWS; generate: both, and the slower of the two counts), and keeps a layer dense
unless its factorised form is measured ``min_speedup`` times faster (default 1: never
slower). Ranks are rounded up to the fastest of a few aligned sizes (8, 16, 32, 64),
where that is measurably faster and adds at most ROUND_LIMIT of the rank.

Each timing reads its weights from memory, not from the cache, as a model's forward pass
does when its weights outgrow the processor's caches (every language model): the product
cycles through copies of the layer's weights filling COLD_BYTES. Timed on one copy, a layer
that fits in the cache looks faster than it runs in the model, and the dense and
factorised forms not by the same factor. At most MAX_COPIES copies are made, so a layer
under 1.5 MiB is timed partly from the cache. The factors have the layer's own memory
layout (``layers.out_major``). Timings are the median of repeats after warm-up, each
repeat long enough to read on a coarse clock, and cached for the process (a shape is timed
once per compression, however many layers have it).
"""

from __future__ import annotations

import statistics
import time

import torch

from .layers import out_major

PREFILL_ROWS = 512
# the rows of the inputs each layer is timed on: a model generating text runs both
SPEED_FOR = {"decode": (1,), "prefill": (PREFILL_ROWS,), "generate": (1, PREFILL_ROWS)}
ALIGNMENTS = (8, 16, 32, 64)
ROUND_LIMIT = 0.125  # a rounded rank adds at most this share of the rank
FASTER = 0.97  # a rounded rank must take at most this share of the unrounded one's time
COLD_BYTES = 96 * 2 ** 20  # weights cycled through per timing: more than a CPU's last-level cache
MAX_COPIES = 64
_cache: dict[tuple, float] = {}


def _seconds(fn, min_time: float = 2e-3, repeats: int = 7) -> float:
    """Median seconds of one call of ``fn``, each repeat timing enough calls to last ``min_time``."""
    fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_time / 4 or n < 1:
        fn()
        n += 1
    per = max((time.perf_counter() - t0) / n, 1e-9)
    calls = max(1, int(min_time / per))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def layer_seconds(shape: tuple[int, int], rank: int | None, rows: int, dtype=torch.float32,
                  device="cpu") -> float:
    """Seconds of one product of a (rows x n) input with an (m x n) layer: dense when ``rank``
    is None, else through its factors (m x rank) and (rank x n). Cached per process."""
    device = torch.device(device)
    key = (tuple(shape), rank, rows, str(dtype), str(device), torch.get_num_threads())
    if key not in _cache:
        m, n = shape
        g = torch.Generator().manual_seed(0)
        make = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        x = make(rows, n)
        size = m * n if rank is None else rank * (m + n)
        copies = max(1, min(MAX_COPIES, -(-COLD_BYTES // (size * x.element_size()))))
        if rank is None:
            w = make(m, n)
            ws = [w.clone() for _ in range(copies)]
            fn = lambda: [torch.nn.functional.linear(x, w) for w in ws]  # noqa: E731
        else:
            u, v = out_major(m, rank, dtype=dtype, device=device).copy_(make(m, rank)), make(rank, n)
            uvs = [(u.clone(), v.clone()) for _ in range(copies)]  # (clone keeps u's layout)
            fn = lambda: [torch.nn.functional.linear(torch.nn.functional.linear(x, v), u)  # noqa: E731
                          for u, v in uvs]
        if device.type == "cuda":
            def timed(fn=fn):
                fn()
                torch.cuda.synchronize(device)
            fn = timed
        with torch.inference_mode():
            _cache[key] = _seconds(fn) / copies
    return _cache[key]


def measured_speedup(shape, rank: int, rows: int, dtype=torch.float32, device="cpu") -> float:
    """Dense time over factorised time of the layer shape at ``rank``."""
    return layer_seconds(shape, None, rows, dtype, device) / layer_seconds(shape, rank, rows, dtype, device)


def slowest_speedup(shape, rank: int, setting: str, dtype=torch.float32, device="cpu") -> tuple[float, int]:
    """The smallest measured speed-up of the layer shape at ``rank`` over the rows of
    ``setting`` (a key of SPEED_FOR), and the rows it was measured on."""
    return min((measured_speedup(shape, rank, rows, dtype, device), rows) for rows in SPEED_FOR[setting])


def fastest_rank(shape, rank: int, setting: str, dtype=torch.float32, device="cpu") -> int:
    """``rank``, or a rank rounded up to an aligned size when that is measurably faster (by
    1 - FASTER) on every row count of ``setting`` and adds at most ROUND_LIMIT of ``rank``;
    never to a rank whose factors would hold as many parameters as the dense weight."""
    m, n = shape
    seconds = lambda r: [layer_seconds(shape, r, rows, dtype, device) for rows in SPEED_FOR[setting]]  # noqa: E731
    best, best_time = rank, seconds(rank)
    saving = (m * n - 1) // (m + n)  # the largest rank with D (m + n) < m n
    limit = min(saving, int(rank * (1 + ROUND_LIMIT)))
    for a in ALIGNMENTS:
        r = -(-rank // a) * a
        if rank < r <= limit:
            t = seconds(r)
            if all(x < FASTER * y for x, y in zip(t, best_time)):
                best, best_time = r, t
    return best
