"""compress_: replace a model's target layers by their truncated-SVD factorisation."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import SVDConfig
from .calibrate import collect, collect_paired, record_inputs
from .factorize import SVD, compensated_svd, split, svd, whitened_svd
from .errors import ConfigError
from .kinds import LayerKind
from .rank import (allocate_ranks, choose_rank, factorized_params, round_rank, saves_parameters,
                   truncation_error)
from .report import CompressionReport, KeepDense, LayerReport
from .swap import candidate_modules, output_layer_name, replace_module, shared_weights


def _dense_report(name: str, module: nn.Module, kind: str, shape, reason: KeepDense,
                  detail: str = "") -> LayerReport:
    n = sum(p.numel() for p in module.parameters(recurse=False))
    return LayerReport(name, kind, shape, None, n, n, 0.0, reason, detail)


def _keep_dense(rank, shape, config: SVDConfig) -> tuple[KeepDense | None, str]:
    """Why this layer stays dense at this rank, with the numbers (None: factorise it)."""
    if rank is None:
        return KeepDense.BY_ALLOCATION, ""
    if not saves_parameters(rank, shape):
        return KeepDense.NO_SAVING, f"rank {rank}"
    speedup = shape[0] * shape[1] / factorized_params(rank, shape)
    if config.min_speedup and speedup < config.min_speedup:
        return KeepDense.NOT_FASTER, f"{speedup:.2f}x fewer multiply-adds < {config.min_speedup}"
    return None, ""


def _decompose(matrix, gram, config: SVDConfig) -> SVD:
    return svd(matrix) if gram is None else whitened_svd(matrix, gram, config.damping)


def _factorize(kind: LayerKind, module: nn.Module, dec: SVD, rank: int) -> nn.Module:
    u, v = split(dec, rank)
    dtype = module.weight.dtype
    return kind.replace(module, u.to(dtype), v.to(dtype)).train(module.training)


def check_rank_fits(model: nn.Module, config: SVDConfig) -> None:
    """A fixed rank above every target layer's size is a user error, not a silent clamp."""
    output = output_layer_name(model) if config.skip_output_layer else None
    sizes = [min(kind.matrix(m).shape) for name, m, kind in
             candidate_modules(model, config.target_modules, config.exclude_modules)
             if kind is not None and name != output]
    if not sizes:
        raise ConfigError("no layer of the model matches the target modules")
    if config.rank is not None and config.rank > max(sizes):
        raise ConfigError(f"rank {config.rank} is above every target layer's size "
                          f"(the largest allows {max(sizes)})")


def _batches(calibration) -> list:
    """Calibration batches as a list: several passes read them, so a one-shot iterator (a
    generator, a DataLoader iterator) is read once, here."""
    if calibration is None:
        raise ConfigError("method='whiten' needs calibration batches")
    if isinstance(calibration, (torch.Tensor, dict, str, bytes)) or not isinstance(calibration, Iterable):
        raise ConfigError("calibration must be an iterable of batches (a list of tensors, "
                          f"tuples or dicts), got {type(calibration).__name__}")
    batches = list(calibration)
    if not batches:
        raise ConfigError("calibration has no batches")
    return batches


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
    ``calibration`` (needed by method="whiten") is any iterable of model inputs (read once): tensors,
    tuples of positional inputs, or dicts of keyword inputs. With whitening, the report's
    rel_error is the relative output error on the calibration inputs.
    """
    if not isinstance(config, SVDConfig):
        raise TypeError(f"config must be an SVDConfig, got {type(config).__name__}")
    whiten = config.method == "whiten"
    calibration = _batches(calibration) if whiten else None
    output = output_layer_name(model) if config.skip_output_layer else None
    shared = shared_weights(model)
    report = CompressionReport()
    eligible = []  # (name, module, kind, matrix)
    for name, module, kind in list(candidate_modules(model, config.target_modules,
                                                     config.exclude_modules)):
        if kind is None:
            w = module.weight
            report.layers.append(_dense_report(name, module, type(module).__name__,
                                               (w.shape[0], w[0].numel()), KeepDense.UNSUPPORTED,
                                               type(module).__name__))
            continue
        matrix = kind.matrix(module)
        reason = KeepDense.OUTPUT_LAYER if name == output else kind.why_dense(module)
        others = [n for n in shared.get(id(module.weight), []) if n != name]
        if reason is None and others:  # a tied weight: factorising one user unties it
            reason = KeepDense.SHARED
        if reason is not None:
            detail = f"also used by {', '.join(others)}" if reason is KeepDense.SHARED else ""
            report.layers.append(_dense_report(name, module, kind.name, tuple(matrix.shape),
                                               reason, detail))
            continue
        if not torch.isfinite(matrix).all():
            raise ConfigError(f"layer {name!r} has non-finite weights (NaN or Inf): "
                              "it cannot be factorised")
        eligible.append((name, module, kind, matrix))
    grams = {}
    if whiten:
        grams = collect(model, {n: m for n, m, _, _ in eligible}, calibration, _run_batch, progress)
    decs = {n: _decompose(w, grams.get(n), config) for n, _, _, w in eligible}
    originals = {}
    if whiten and config.sequential:  # the dense network's layer inputs, recorded once
        originals = record_inputs(model, {n: m for n, m, _, _ in eligible}, calibration, _run_batch)
    shapes = {n: tuple(w.shape) for n, _, _, w in eligible}
    if config.allocation == "global":
        budget = int(config.ratio * sum(m * n for m, n in shapes.values()))
        ranks = allocate_ranks({n: (decs[n].S, shapes[n]) for n in shapes}, budget)
    else:
        ranks = {n: choose_rank(decs[n].S, config.spec, shapes[n]) for n in shapes}
    for name, module, kind, matrix in eligible:
        rank, shape = ranks[name], shapes[name]
        if rank is not None and config.round_to:
            rank = round_rank(rank, config.round_to, shape)
        reason, detail = _keep_dense(rank, shape, config)
        if reason is not None:
            report.layers.append(_dense_report(name, module, kind.name, shape, reason, detail))
            continue
        dec = decs[name]
        if name in originals:  # fit the original layer's outputs from the inputs that the
            # already-compressed layers before it now produce: errors do not compound
            gram, cross = collect_paired(model, name, calibration, _run_batch, originals.pop(name))
            dec = compensated_svd(matrix, gram, cross, config.damping)
        replace_module(model, name, _factorize(kind, module, dec, rank))
        bias = 0 if module.bias is None else module.bias.numel()
        report.layers.append(LayerReport(
            name, kind.name, shape, rank, module.weight.numel() + bias,
            factorized_params(rank, shape) + bias, truncation_error(dec.S, rank)))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda r: order.get(r.name, -1))
    return report
