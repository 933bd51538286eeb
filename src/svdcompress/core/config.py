"""SVDConfig: what to compress and at which rank. Frozen, validated, JSON-serialisable."""

from __future__ import annotations

import numbers
import re
from dataclasses import asdict, dataclass, fields

from .errors import ConfigError
from .rank import RankSpec



def _normalize_pattern(field: str, value):
    """A regex string (re.fullmatch on the module's full name) or a list of name suffixes."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"{field} is not a valid regular expression: {err}") from None
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) and s for s in value):
        return tuple(value)
    raise ConfigError(f"{field} must be a regex string or a list of non-empty name suffixes, "
                     f"got {value!r}")


ALLOCATIONS = ("uniform", "global", "truncation-loss", "loss-aware", "fisher")
DATA_ALLOCATIONS = ("truncation-loss", "loss-aware", "fisher")  # these need calibration batches


@dataclass(frozen=True)
class SVDConfig:
    """How to compress: exactly one of ``rank``, ``energy`` or ``ratio``, plus which modules.

    rank:   fixed rank D (int >= 1) for every target layer, clamped to the layer's size.
    energy: keep the smallest D whose squared singular values reach this fraction (0, 1].
    ratio:  keep this fraction (0, 1] of each layer's weight parameters.
    target_modules / exclude_modules: a regex (fullmatch on the full module name) or a list
        of name suffixes; by default every Linear and Conv2d is a target.
    skip_output_layer: leave the network's last Linear/Conv2d (its classifier) dense.
    method: "plain" (truncated SVD of W) or "whiten" (data-aware: the SVD of W L with
        L L^T = E[x x^T] of the layer's calibration inputs; needs calibration batches).
    damping: added to E[x x^T] as damping * mean(diag) * I before whitening.
    sequential: (whiten only; the default) factorise the layers in order, each fitted to
        reproduce the original layer's outputs from the inputs the already-compressed layers
        before it now produce, so errors do not compound. False calibrates every layer on
        the dense network's inputs (faster, less accurate at small ranks).
    allocation: "uniform" (the spec applies to each layer), or, with ``ratio``, per-layer
        ranks keeping at most ratio of all target layers' weight parameters while an
        objective summed over layers is smallest: "global" (each layer's relative
        truncation error), "truncation-loss" (each layer's absolute truncation loss, its
        output error on the calibration inputs, as SVD-LLM V2) or "loss-aware" (that loss
        times the layer's measured sensitivity, the change of the network's output per
        unit of it; kept only when the network's output on the calibration data is nearer
        the original's than with uniform ranks) or "fisher" (loss-aware for a model of
        hundreds of layers, a language model: the sensitivity from one backward pass, the
        check by truncating the whole network at once; compress.py says how). The last three
        need calibration batches.
    select_fit: (whiten only) choose each layer's fit (plain, whitened, compensated with
        a shrunk correction) by its output error on held-out calibration rows, the last
        quarter of each batch, and refit the winner on all rows, so that few calibration
        rows cannot make whitening worse than plain SVD. False: the whitened (compensated)
        fit on all rows.
    round_to: round each chosen rank up to a multiple of this (matmul kernels are faster
        on aligned sizes); rounding up never raises the truncation error.
    min_speedup: keep a layer dense unless its factorised form needs at most 1/min_speedup
        of the dense multiply-adds (m n / (D (m + n)) >= min_speedup): two thin matmuls are
        not faster than one dense one until the saving is large enough.
    speed_for: "decode" (one row per call), "prefill" (512 rows) or "generate" (both: the
        slower counts): measure instead of counting (core.speed). Each distinct layer shape
        is timed dense and factorised on inputs of those rows, and a layer stays dense unless
        its factorised form is measured ``min_speedup`` times faster (default 1: never
        slower); ranks are rounded up to an aligned size where that is measurably faster
        (unless ``round_to`` is given).
    blockwise: (whiten only) calibrate a model whose target layers sit in chained repeated
        blocks (a transformer) one block at a time, in bounded memory; False forces the
        per-layer path. Both give the same factors.
    """

    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    skip_output_layer: bool = True
    method: str = "plain"
    damping: float = 1e-2
    sequential: bool = True
    allocation: str = "uniform"
    round_to: int | None = None
    min_speedup: float | None = None
    speed_for: str | None = None
    blockwise: bool = True
    select_fit: bool = True

    def __post_init__(self) -> None:
        for name in ("rank", "energy", "ratio", "damping", "round_to", "min_speedup"):
            value = getattr(self, name)  # numpy's scalars (np.int64(4), np.float32(0.5)) as Python's
            if isinstance(value, numbers.Integral) and type(value) not in (bool, int):
                object.__setattr__(self, name, int(value))
            elif isinstance(value, numbers.Real) and type(value) not in (bool, int, float):
                object.__setattr__(self, name, float(value))
        given = [k for k in ("rank", "energy", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("SVDConfig needs exactly one of rank, energy or ratio, "
                             f"got {given or 'none'}")
        self.spec  # validates the value, naming the field
        for name in ("target_modules", "exclude_modules"):
            object.__setattr__(self, name, _normalize_pattern(name, getattr(self, name)))
        for name in ("skip_output_layer", "sequential", "blockwise", "select_fit"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.method not in ("plain", "whiten"):
            raise ConfigError(f"method must be 'plain' or 'whiten', got {self.method!r}")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) \
                or not 0 <= self.damping < float("inf"):
            raise ConfigError(f"damping must be a finite number >= 0, got {self.damping!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation != "uniform" and self.ratio is None:
            raise ConfigError(f"allocation={self.allocation!r} needs ratio (the share of parameters to keep)")
        if self.round_to is not None and (isinstance(self.round_to, bool) or
                                          not isinstance(self.round_to, int) or self.round_to < 1):
            raise ConfigError(f"round_to must be an integer >= 1, got {self.round_to!r}")
        if self.min_speedup is not None and (isinstance(self.min_speedup, bool) or
                                             not isinstance(self.min_speedup, (int, float)) or
                                             not self.min_speedup >= 1):
            raise ConfigError(f"min_speedup must be a number >= 1, got {self.min_speedup!r}")
        if self.speed_for is not None and self.speed_for not in ("decode", "prefill", "generate"):
            raise ConfigError(f"speed_for must be 'decode', 'prefill' or 'generate', got {self.speed_for!r}")

    @property
    def spec(self) -> RankSpec:
        for kind in ("rank", "energy", "ratio"):
            if getattr(self, kind) is not None:
                return RankSpec(kind, getattr(self, kind))
        raise AssertionError("unreachable: validated in __post_init__")

    @property
    def needs_calibration(self) -> bool:
        """Whitening and the data-aware allocations read calibration batches."""
        return self.method == "whiten" or self.allocation in DATA_ALLOCATIONS

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SVDConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config has unknown fields: {', '.join(unknown)}")
        return cls(**d)
