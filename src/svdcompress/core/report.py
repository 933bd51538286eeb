"""What compress_ did, layer by layer: ranks, parameters, errors, and why a layer stayed dense."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from torch import nn


class KeepDense(str, Enum):
    """Why a layer was left dense. Compare these, never the printed note."""

    OUTPUT_LAYER = "output layer"
    GROUPED_CONV = "grouped conv"
    UNSUPPORTED = "unsupported module type"
    EMBEDDING = "embedding (a lookup, not a matmul)"
    VECTOR = "norm or vector parameters only"
    NO_SAVING = "saves no parameters"
    NOT_FASTER = "not faster"
    BY_ALLOCATION = "dense by allocation"
    SHARED = "shared weight"
    READ_DIRECTLY = "its weight is read directly by its parent (MultiheadAttention)"
    OWN_FORWARD = "a subclass that computes its own way"


@dataclass
class LayerReport:
    name: str
    kind: str  # the layer kind ("linear", "conv2d", ...) or the module's type when unsupported
    shape: tuple[int, int]  # the factorised matrix (out, in) or (out, in*kh*kw)
    rank: int | None  # None when kept dense
    params_before: int
    params_after: int
    rel_error: float  # ||W - W_D||_F / ||W||_F (0 when dense)
    reason: KeepDense | None = None  # why the layer stayed dense
    detail: str = ""  # the numbers behind the reason
    fit: str = ""  # which fit the factors come from: "plain", "whiten", "compensated shrink=0.1"

    @property
    def note(self) -> str:
        """The reason as printed: 'rank 5 saves no parameters', 'output layer', ..."""
        if self.reason is None:
            return ""
        if self.reason is KeepDense.NO_SAVING:
            return f"{self.detail} {self.reason.value}".strip()
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "rank": self.rank,
                "params_before": self.params_before, "params_after": self.params_after,
                "rel_error": self.rel_error,
                "reason": self.reason.name.lower() if self.reason else None, "note": self.note,
                "fit": self.fit}


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)
    # with a budget allocated by a data-aware objective: what it measured and chose
    allocation: dict | None = None

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def compressed(self) -> list[LayerReport]:
        return [r for r in self.layers if r.rank is not None]

    def considered(self) -> list[LayerReport]:
        """The layers compress_ could have factorised (not the output layer, a grouped conv,
        an embedding, a norm or an unsupported type)."""
        skip = (KeepDense.OUTPUT_LAYER, KeepDense.GROUPED_CONV, KeepDense.UNSUPPORTED,
                KeepDense.EMBEDDING, KeepDense.VECTOR, KeepDense.READ_DIRECTLY)
        return [r for r in self.layers if r.reason not in skip]

    def to_dict(self) -> dict:
        out = {"layers": [r.to_dict() for r in self.layers],
               "params_before": self.params_before, "params_after": self.params_after}
        if self.allocation is not None:
            out["allocation"] = self.allocation
        return out

    def __str__(self) -> str:
        head = f"{'layer':<28} {'shape':>12} {'rank':>6} {'params':>10} {'->':>2} {'after':>10} {'rel.err':>8}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            rank = str(r.rank) if r.rank is not None else "dense"
            err = f"{r.rel_error:.4f}" if r.rank is not None else ""
            line = (f"{r.name:<28} {shape:>12} {rank:>6} {r.params_before:>10,} {'':>2} "
                    f"{r.params_after:>10,} {err:>8}")
            fit = f"  [{r.fit}]" if r.fit and r.rank is not None else ""
            lines.append(line + fit + (f"  ({r.note})" if r.note else ""))
        ratio = self.params_after / max(1, self.params_before)
        lines.append(f"total: {self.params_before:,} -> {self.params_after:,} parameters in "
                     f"these layers ({ratio:.1%} kept)")
        if self.allocation and self.allocation.get("chosen"):
            found = self.allocation.get("output_distance", {})
            lines.append(f"ranks: {self.allocation['objective']} allocation, kept the {self.allocation['chosen']} "
                         "choice; output distance to the original on held-out calibration batches: "
                         + ", ".join(f"{k} {v:.4g}" for k, v in found.items()))
        return "\n".join(lines)


def model_size(model: nn.Module) -> dict:
    """Parameters and bytes of every parameter the model holds (each shared one once)."""
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params)}
