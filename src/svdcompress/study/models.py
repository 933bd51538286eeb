"""The study's reference network, and rebuilding a built-in model from its JSON spec."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.archs import Architecture
from ..core.errors import ConfigError


class MLP(nn.Module):
    """in_features -> hidden[0] -> ... -> hidden[-1] -> num_classes, ReLU between layers.

    The reference network of the study is MLP(784, [1024] * 5, 10).
    """

    output_is_logits = True  # its outputs are class logits (compared by KL when allocating ranks)

    def __init__(self, in_features: int = 784, hidden: list[int] | tuple[int, ...] = (1024,) * 5,
                 num_classes: int = 10) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        weights = sum(a * b for a, b in zip(sizes, [*sizes[1:], num_classes]))
        if weights > 2 ** 31:  # a typo, not a model: refuse before allocating terabytes
            raise ConfigError(f"an MLP of sizes {sizes + [num_classes]} has {weights:,} weights; "
                              "the limit is 2^31")
        self.in_features, self.num_classes = in_features, num_classes
        self.hidden_sizes = [int(h) for h in hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)

    def example_inputs(self, batch: int, device="cpu") -> dict:
        """Random inputs of the right shape (benchmarks, ONNX export)."""
        return {"x": torch.randn(batch, self.in_features, device=device)}

    def arch_spec(self) -> dict:
        """What ``build_model`` needs to rebuild this network (its dense shape)."""
        return {"name": "mlp", "in_features": self.in_features, "hidden": self.hidden_sizes,
                "num_classes": self.num_classes}


def _positive_int(spec: dict, key: str) -> int:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"architecture field {key!r} must be a positive integer, got {value!r}")
    return value


def build_model(spec: dict) -> nn.Module:
    """Rebuild a built-in (dense, freshly initialised) model from its ``arch_spec()``."""
    if not isinstance(spec, dict) or spec.get("name") != "mlp":
        name = spec.get("name") if isinstance(spec, dict) else spec
        raise ValueError(f"unknown built-in architecture {name!r} (known: 'mlp')")
    hidden = spec.get("hidden")
    if not isinstance(hidden, list) or not hidden:
        raise ValueError(f"architecture field 'hidden' must be a non-empty list, got {hidden!r}")
    for i, h in enumerate(hidden):
        _positive_int({f"hidden[{i}]": h}, f"hidden[{i}]")
    return MLP(_positive_int(spec, "in_features"), hidden, _positive_int(spec, "num_classes"))


def _build(spec: dict, directory: Path) -> nn.Module:
    return build_model(spec)


# Found by svdcompress.load through the entry point "mlp" in pyproject.toml.
ARCHITECTURE = Architecture("mlp", _build)
