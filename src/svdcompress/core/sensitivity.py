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
CHUNK_ELEMENTS = 2 ** 24  # outputs (logits) handled at once by a distance or a backward pass


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
                if self.logits:  # in slices of rows: a language model's logits are large
                    out, ref = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
                    step = max(1, CHUNK_ELEMENTS // max(1, out.shape[-1]))
                    for i in range(0, len(out), step):
                        sums[0] += float(F.kl_div(F.log_softmax(out[i:i + step].double(), -1),
                                                  F.log_softmax(ref[i:i + step].double(), -1),
                                                  reduction="sum", log_target=True))
                    sums[1] += len(ref)  # rows
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


class _OutputGrads:
    """Hooks that make each named layer's output a node of the autograd graph (by adding a
    zero that requires grad, so no weight needs a gradient) and sum the squared gradient
    arriving there and its element count: sums[name], count[name]."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.sums = {n: 0.0 for n in modules}
        self.count = {n: 0 for n in modules}
        self.zero = torch.zeros((), requires_grad=True)
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            out = out + self.zero.to(out.dtype)

            def grab(grad: torch.Tensor) -> None:
                self.sums[name] += float(grad.detach().double().square().sum())
                self.count[name] += grad.numel()
            out.register_hook(grab)
            return out
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def fisher_sensitivities(model: nn.Module, modules: dict[str, nn.Module], batches: list,
                         forward: Callable, seed: int = 0) -> dict[str, float | None]:
    """Each layer's sensitivity from one backward pass per batch, without a trial truncation:
    E over rows of ||g||^2 / (the layer's output width), g the gradient at the layer's output
    of the log-likelihood of labels sampled from the model's own prediction (a model whose
    outputs are logits) or of a Gaussian random projection of its output (any other model).

    Both are unbiased samples of the trace of the Hessian of the output distance
    (OutputDistance) with respect to that layer's output (for logits, the Fisher
    information, the Hessian of the KL divergence at the original model). An error dy in
    the layer's output, in no particular direction, moves the distance by about
    (that trace / the width) ||dy||^2 / 2: so this weighs a layer's truncation loss (its
    E||dy||^2 on the calibration inputs) the way the measured slope of ``sensitivity``
    does, at the cost of one forward and backward pass over ``batches`` instead of two
    trial passes per layer. Under torchrun, summed over every process's batches. None for a
    layer no gradient reached."""
    logits = bool(getattr(model, "output_is_logits", False))
    gen = torch.Generator().manual_seed(seed)
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:  # the gradients at the layers' outputs only: no weight gradient
        p.requires_grad_(False)
    grads = _OutputGrads(modules)
    was = model.training
    model.eval()  # no dropout: the gradients of the deployed model
    try:
        step = 1  # rows of a batch per pass: one, until one pass says how large a row's output is
        with torch.enable_grad():
            for batch in batches:
                rows, start = _rows(batch), 0
                while start < rows:
                    n = min(step, rows - start)
                    part = _slice(batch, start, start + n) if rows > 1 else batch
                    out = first_tensor(forward(model, part))
                    flat = out.reshape(-1, out.shape[-1]).float()
                    if logits:
                        probs = torch.softmax(flat.detach(), -1).cpu()
                        labels = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(out.device)
                        del probs
                        loss = F.cross_entropy(flat, labels, reduction="sum")
                    else:
                        loss = (flat * torch.randn(flat.shape, generator=gen).to(flat.device)).sum()
                    if loss.requires_grad:  # else no target layer reaches the output
                        loss.backward()
                    start += n
                    step = max(1, CHUNK_ELEMENTS * n // max(1, out.numel()))
                    del out, flat, loss
    finally:
        grads.remove()
        model.train(was)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    sums = torch.tensor([[grads.sums[n], float(grads.count[n])] for n in modules], dtype=torch.float64)
    dist.sum_(sums)  # E||g||^2 / width = (sum of g^2) / (rows x width = the elements)
    return {n: float(s) / c if c > 0 else None for n, (s, c) in zip(modules, sums.tolist())}


def _rows(batch) -> int:
    """The batch's rows (leading size of its tensors); 1 when it has no tensor to slice."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch.values()) \
        if isinstance(batch, dict) else list(batch) if isinstance(batch, (tuple, list)) else []
    sizes = {t.shape[0] for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else 1


def _slice(batch, start: int, stop: int):
    """Rows start:stop of every tensor of a batch (a tensor, a tuple or a dict of them)."""
    cut = lambda t: t[start:stop] if isinstance(t, torch.Tensor) and t.dim() > 0 else t  # noqa: E731
    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(t) for t in batch)
    return cut(batch)
