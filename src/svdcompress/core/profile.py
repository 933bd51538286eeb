"""Where a compression's time goes: seconds per phase, for ``compress_(..., profile=...)``
and ``svdcompress compress --profile``.

Phases nest (a fit inside a layer's finishing); each phase's figure is its own wall time,
inclusive of anything nested in it that has no phase of its own. A ``Profile`` is passed
down explicitly: no global state.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class Profile:
    """Seconds and calls per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def to_dict(self) -> dict:
        return {name: {"seconds": self.seconds[name], "calls": self.calls[name]} for name in self.seconds}

    def __str__(self) -> str:
        width = max((len(n) for n in self.seconds), default=5)
        rows = [f"{'phase':<{width}} {'seconds':>9} {'calls':>7}"]
        for name, sec in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            rows.append(f"{name:<{width}} {sec:>9.2f} {self.calls[name]:>7}")
        return "\n".join(rows)


@contextmanager
def phase(profile: Profile | None, name: str):
    """``profile.phase(name)``, or nothing when no profile is kept."""
    if profile is None:
        yield
    else:
        with profile.phase(name):
            yield
