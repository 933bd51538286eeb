"""SVDConfig: what to compress and at which rank. Frozen, validated, JSON-serialisable."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from .rank import RankSpec



def _normalise_pattern(field: str, value):
    """A regex string (re.fullmatch on the module's full name) or a list of name suffixes."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{field} is not a valid regular expression: {err}") from None
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) and s for s in value):
        return tuple(value)
    raise ValueError(f"{field} must be a regex string or a list of non-empty name suffixes, "
                     f"got {value!r}")


@dataclass(frozen=True)
class SVDConfig:
    """How to compress: exactly one of ``rank``, ``energy`` or ``ratio``, plus which modules.

    rank:   fixed rank D (int >= 1) for every target layer, clamped to the layer's size.
    energy: keep the smallest D whose squared singular values reach this fraction (0, 1].
    ratio:  keep this fraction (0, 1] of each layer's weight parameters.
    target_modules / exclude_modules: a regex (fullmatch on the full module name) or a list
        of name suffixes; by default every Linear and Conv2d is a target.
    skip_output_layer: leave the network's last Linear/Conv2d (its classifier) dense.
    """

    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    skip_output_layer: bool = True

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "energy", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("SVDConfig needs exactly one of rank, energy or ratio, "
                             f"got {given or 'none'}")
        self.spec  # validates the value, naming the field
        for name in ("target_modules", "exclude_modules"):
            object.__setattr__(self, name, _normalise_pattern(name, getattr(self, name)))
        if not isinstance(self.skip_output_layer, bool):
            raise ValueError(f"skip_output_layer must be a bool, got {self.skip_output_layer!r}")

    @property
    def spec(self) -> RankSpec:
        for kind in ("rank", "energy", "ratio"):
            if getattr(self, kind) is not None:
                return RankSpec(kind, getattr(self, kind))
        raise AssertionError("unreachable: validated in __post_init__")

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SVDConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config has unknown fields: {', '.join(unknown)}")
        return cls(**d)
