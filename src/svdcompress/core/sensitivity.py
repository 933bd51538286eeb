"""What the network loses when its layers are truncated, measured on calibration data.

A layer's truncation loss (the output error it makes, summed over the discarded singular
values of its whitened SVD) lives in that layer's own output space: a unit of error in one
layer is not a unit of error in another. The sensitivity of a layer is the change of the
network's output per unit of that layer's truncation loss, measured by truncating that
layer alone at a few ranks and comparing the network's output with the original's. The
loss-aware objective weighs every layer's truncation loss by its sensitivity, so that
allocating ranks minimises an estimate of what the network loses.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .swap import replace_module

MAX_BATCHES = 4  # calibration batches the output distances are measured on ...
MAX_BYTES = 256 * 2 ** 20  # ... while their reference outputs fit in this


def first_tensor(out) -> torch.Tensor:
    """The model's main output: the tensor itself, or the first tensor of a tuple, a dict or
    a Hugging Face ModelOutput (its logits, its last hidden state or its embedding)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"the model's output holds no tensor ({type(out).__name__})")


class OutputDistance:
    """How far a model's outputs are from the original model's over a few calibration
    batches (under torchrun, over every process's share): for a model that returns logits
    (it says so with ``output_is_logits = True``, as the study's MLP and causal LMs do) the
    mean KL divergence KL(softmax(f0(x)) || softmax(f(x))) per row, which weighs the samples
    near a decision as much as confident ones; else the relative squared distance
    sum ||f(x) - f0(x)||^2 / sum ||f0(x)||^2 (embeddings, regression outputs)."""

    def __init__(self, model: nn.Module, batches: list, forward: Callable) -> None:
        self.model, self.forward = model, forward
        self.logits = bool(getattr(model, "output_is_logits", False))
        self.batches, self.reference = [], []
        size = 0
        with torch.no_grad(), _eval(model):
            for batch in batches[:MAX_BATCHES]:
                ref = first_tensor(forward(model, batch)).detach().float()
                if self.batches and size + ref.numel() * 4 > MAX_BYTES:
                    break
                self.batches.append(batch)
                self.reference.append(ref)
                size += ref.numel() * 4

    @torch.no_grad()
    def __call__(self, model: nn.Module | None = None) -> float:
        """The distance of ``model`` (default: the model, as it is now)."""
        model = self.model if model is None else model
        sums = torch.zeros(2, dtype=torch.float64)
        with _eval(model):
            for batch, ref in zip(self.batches, self.reference):
                out = first_tensor(self.forward(model, batch)).float()
                if self.logits:
                    kl = F.kl_div(F.log_softmax(out.double(), -1), F.log_softmax(ref.double(), -1),
                                  reduction="sum", log_target=True)
                    sums[0] += float(kl)
                    sums[1] += ref[..., 0].numel()  # rows
                else:
                    sums[0] += float((out - ref).double().square().sum())
                    sums[1] += float(ref.double().square().sum())
        dist.sum_(sums)
        return float(sums[0] / sums[1]) if sums[1] > 0 else 0.0

    def with_layers(self, layers: dict[str, nn.Module]) -> float:
        """The distance with these sub-modules swapped in (then put back)."""
        old = {name: replace_module(self.model, name, new) for name, new in layers.items()}
        try:
            return self()
        finally:
            for name, module in old.items():
                replace_module(self.model, name, module)


class _eval:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def sensitivity(distance: OutputDistance, name: str, truncated: Callable[[int], nn.Module],
                trials: list[tuple[int, float]]) -> tuple[float | None, list[dict]]:
    """Least-squares slope (through the origin) of the network's output distance against
    the layer's truncation loss, over ``trials`` = [(rank, truncation loss)], each measured
    with that layer alone truncated; and the measurements. None when the layer loses
    nothing at these ranks (no slope to measure)."""
    points = []
    for rank, loss in trials:
        points.append({"rank": rank, "loss": loss,
                       "distance": distance.with_layers({name: truncated(rank)})})
    den = sum(p["loss"] ** 2 for p in points)
    if not den > 0:
        return None, points
    return max(0.0, sum(p["loss"] * p["distance"] for p in points) / den), points
