"""compress_: replace a model's target layers by their truncated-SVD factorisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

from torch import nn

from .config import SVDConfig
from .calibrate import collect, collect_paired, record_inputs
from .factorize import SVD, compensated_svd, split, svd, whitened_svd
from .layers import LowRankConv2d, LowRankLinear
from .rank import (allocate_ranks, choose_rank, factorized_params, round_rank, saves_parameters,
                   truncation_error)
from .swap import candidate_modules, output_layer_name, replace_module


@dataclass
class LayerReport:
    name: str
    kind: str  # "linear" or "conv2d"
    shape: tuple[int, int]  # the factorised matrix (out, in) or (out, in*kh*kw)
    rank: int | None  # None when kept dense
    params_before: int
    params_after: int
    rel_error: float  # ||W - W_D||_F / ||W||_F (0 when dense)
    note: str = ""  # why a layer stayed dense


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def compressed(self) -> list[LayerReport]:
        return [r for r in self.layers if r.rank is not None]

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers],
                "params_before": self.params_before, "params_after": self.params_after}

    def __str__(self) -> str:
        head = f"{'layer':<28} {'shape':>12} {'rank':>6} {'params':>10} {'->':>2} {'after':>10} {'rel.err':>8}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            rank = str(r.rank) if r.rank is not None else "dense"
            err = f"{r.rel_error:.4f}" if r.rank is not None else ""
            line = (f"{r.name:<28} {shape:>12} {rank:>6} {r.params_before:>10,} {'':>2} "
                    f"{r.params_after:>10,} {err:>8}")
            lines.append(line + (f"  ({r.note})" if r.note else ""))
        ratio = self.params_after / max(1, self.params_before)
        lines.append(f"total: {self.params_before:,} -> {self.params_after:,} parameters in "
                     f"these layers ({ratio:.1%} kept)")
        return "\n".join(lines)


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w[0].numel())


def _dense_report(name, module, kind, note) -> LayerReport:
    n = sum(p.numel() for p in module.parameters(recurse=False))
    return LayerReport(name, kind, _matrix_shape(module), None, n, n, 0.0, note)


def _factorise(module: nn.Module, dec: SVD, rank: int) -> nn.Module:
    u, v = split(dec, rank)
    u, v = u.to(module.weight.dtype), v.to(module.weight.dtype)
    if isinstance(module, nn.Linear):
        new = LowRankLinear.from_factors(u, v, module.bias)
    else:
        new = LowRankConv2d.from_factors(module, u, v)
    return new.train(module.training)


def _keep_dense(rank, shape, config: SVDConfig) -> str:
    """Why this layer stays dense at this rank ('' when it should be factorised)."""
    if rank is None:
        return "dense by allocation"
    if not saves_parameters(rank, shape):
        return f"rank {rank} saves no parameters"
    speedup = shape[0] * shape[1] / factorized_params(rank, shape)
    if config.min_speedup and speedup < config.min_speedup:
        return f"not faster: {speedup:.2f}x fewer multiply-adds < {config.min_speedup}"
    return ""


def _decompose(module: nn.Module, shape, gram, config: SVDConfig) -> SVD:
    w = module.weight.reshape(shape)
    return svd(w) if gram is None else whitened_svd(w, gram, config.damping)


def _run_batch(model: nn.Module, batch) -> None:
    """A calibration batch is a tensor, a tuple of positional inputs, or a dict of keywords."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def compress_(model: nn.Module, config: SVDConfig, calibration: Iterable | None = None, *,
              progress: bool = False) -> CompressionReport:
    """Factorise ``model``'s target Linear/Conv2d layers in place; report each layer.

    A layer stays dense (and the report says why) when it is the output layer and
    ``config.skip_output_layer`` is set, when it is a grouped convolution, or when its
    factorisation at the chosen rank would not save parameters (D * (m + n) >= m * n).
    ``calibration`` (needed by method="whiten") is a re-iterable of model inputs: tensors,
    tuples of positional inputs, or dicts of keyword inputs. With whitening, the report's
    rel_error is the relative output error on the calibration inputs.
    """
    if not isinstance(config, SVDConfig):
        raise TypeError(f"config must be an SVDConfig, got {type(config).__name__}")
    whiten = config.method == "whiten"
    if whiten and calibration is None:
        raise ValueError("method='whiten' needs calibration batches")
    output = output_layer_name(model) if config.skip_output_layer else None
    report = CompressionReport()
    eligible = []
    for name, module in list(candidate_modules(model, config.target_modules, config.exclude_modules)):
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        if name == output:
            report.layers.append(_dense_report(name, module, kind, "output layer"))
        elif kind == "conv2d" and module.groups != 1:
            report.layers.append(_dense_report(name, module, kind, "grouped conv"))
        else:
            eligible.append((name, module, kind, _matrix_shape(module)))
    grams = {}
    if whiten:
        grams = collect(model, {n: m for n, m, _, _ in eligible}, calibration, _run_batch, progress)
    decs = {n: _decompose(m, shape, grams.get(n), config) for n, m, _, shape in eligible}
    originals = {}
    if whiten and config.sequential:  # the dense network's layer inputs, recorded once
        originals = record_inputs(model, {n: m for n, m, _, _ in eligible}, calibration, _run_batch)
    if config.allocation == "global":
        budget = int(config.ratio * sum(shape[0] * shape[1] for _, _, _, shape in eligible))
        ranks = allocate_ranks({n: (decs[n].S, shape) for n, _, _, shape in eligible}, budget)
    else:
        ranks = {n: choose_rank(decs[n].S, config.spec, shape) for n, _, _, shape in eligible}
    for name, module, kind, shape in eligible:
        rank = ranks[name]
        if rank is not None and config.round_to:
            rank = round_rank(rank, config.round_to, shape)
        note = _keep_dense(rank, shape, config)
        if note:
            report.layers.append(_dense_report(name, module, kind, note))
            continue
        dec = decs[name]
        if name in originals:  # fit the original layer's outputs from the inputs that the
            # already-compressed layers before it now produce: errors do not compound
            gram, cross = collect_paired(model, name, calibration, _run_batch, originals.pop(name))
            dec = compensated_svd(module.weight.reshape(shape), gram, cross, config.damping)
        replace_module(model, name, _factorise(module, dec, rank))
        bias = 0 if module.bias is None else module.bias.numel()
        report.layers.append(LayerReport(
            name, kind, shape, rank, module.weight.numel() + bias,
            factorized_params(rank, shape) + bias, truncation_error(dec.S, rank)))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda r: order.get(r.name, -1))
    return report
