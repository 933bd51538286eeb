"""compress_: replace a model's target layers by their truncated-SVD factorisation."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from typing import Iterable

import torch
from torch import nn

from .config import DATA_ALLOCATIONS, SVDConfig
from . import dist
from .blockwise import capture, compress_blocks, find_blocks
from .calibrate import Stats, collect, collect_paired, record_inputs
from .devices import resolve_device
from .profile import Profile, phase
from .factorize import SVD, split, svd, whitened_svd
from .fit import ROWS_PER_INPUT, fit_layer
from .errors import ConfigError
from .kinds import LayerKind, low_rank_kind
from .rank import (allocate, allocate_ranks, choose_rank, factorized_params, round_rank,
                   saves_parameters, tail_losses, truncation_error)
from .sensitivity import MAX_BATCHES, OutputDistance, fisher_sensitivities, sensitivity
from .speed import fastest_rank, slowest_speedup
from .report import CompressionReport, KeepDense, LayerReport
from .swap import candidate_modules, output_layer_name, replace_module, shared_weights


def _dense_report(name: str, module: nn.Module, kind: str, shape, reason: KeepDense,
                  detail: str = "", counted: set | None = None) -> LayerReport:
    """A layer left dense; a parameter already counted in another row (a tied weight) is not
    counted again."""
    params = [p for p in module.parameters(recurse=False) if counted is None or id(p) not in counted]
    if counted is not None:
        counted.update(id(p) for p in params)
    n = sum(p.numel() for p in params)
    return LayerReport(name, kind, shape, None, n, n, 0.0, reason, detail)


def _nothing(report: CompressionReport, model: nn.Module) -> str:
    """Why no layer can be factorised, for the error message."""
    done = sum(low_rank_kind(m) is not None for m in model.modules())
    already = f"; {done} layer(s) are low-rank already (compressed before)" if done else ""
    if not report.layers:
        return "no module matches the target modules (check target_modules / exclude_modules)" + already
    reasons: dict[str, int] = {}
    for r in report.layers:
        reasons[r.note] = reasons.get(r.note, 0) + 1
    return "every matching module stays dense (" + ", ".join(
        f"{n} x {why}" for why, n in reasons.items()) + ")" + already


def _why_no_kind(module: nn.Module) -> tuple[KeepDense, str]:
    if isinstance(module, nn.Embedding) or "Embedding" in type(module).__name__:
        return KeepDense.EMBEDDING, ""
    if all(p.dim() <= 1 for p in module.parameters(recurse=False)):
        return KeepDense.VECTOR, ""
    return KeepDense.UNSUPPORTED, type(module).__name__


def _shape_of(module: nn.Module) -> tuple[int, int]:
    w = module._parameters.get("weight")
    if w is None:
        w = next(p for p in module.parameters(recurse=False))
    return (w.shape[0], w[0].numel()) if w.dim() >= 2 else (w.numel(), 1)


def _keep_dense(rank, shape, config: SVDConfig, weight=None) -> tuple[KeepDense | None, str]:
    """Why this layer stays dense at this rank, with the numbers (None: factorise it)."""
    if rank is None:
        return KeepDense.BY_ALLOCATION, ""
    if not saves_parameters(rank, shape):
        return KeepDense.NO_SAVING, f"rank {rank}"
    if config.speed_for is not None:  # measured on this machine (core.speed)
        where = {} if weight is None else {"dtype": weight.dtype, "device": weight.device}
        speedup, rows = slowest_speedup(shape, rank, config.speed_for, **where)
        if speedup < (config.min_speedup or 1.0):
            return KeepDense.NOT_FASTER, (f"measured at {speedup:.2f}x the dense layer's speed on "
                                          f"{rows} row(s), below {config.min_speedup or 1.0}x")
        return None, ""
    speedup = shape[0] * shape[1] / factorized_params(rank, shape)
    if config.min_speedup and speedup < config.min_speedup:
        return KeepDense.NOT_FASTER, f"{speedup:.2f}x fewer multiply-adds < {config.min_speedup}"
    return None, ""


def _decompose(matrix, stats: Stats | None, config: SVDConfig) -> SVD:
    """The parallel decomposition that ranks are chosen from."""
    return svd(matrix) if stats is None else whitened_svd(matrix, stats.gram, config.damping)


def _triplet_losses(dec: SVD, stats: Stats) -> torch.Tensor:
    """Each singular triplet's part of the layer's output error on the calibration inputs,
    E||(W - W_D) x||^2 = sum over the dropped triplets: s_i^2 for a whitened SVD, and
    s_i^2 v_i^T E[x x^T] v_i for a plain one."""
    s2 = dec.S.double().square()
    if dec.unwhiten is not None:
        return s2
    vh = dec.Vh.double()
    return s2 * ((vh @ stats.gram.double()) * vh).sum(1)


def _allocate_by_loss(model: nn.Module, config: SVDConfig, eligible: list, decs: dict,
                      stats: dict, calibration: list, device, profile: Profile | None = None
                      ) -> tuple[dict, dict]:
    """Ranks under the budget minimising the summed truncation loss ("truncation-loss") or
    the summed sensitivity-weighted loss ("loss-aware", "fisher"); and what was measured,
    for the report. The weighted ranks are checked against the truncation-loss and the
    global (relative-error) allocations, uniform ranks (the same share of every layer) and
    the same rank in every layer, by the network's output on the last quarter of the
    calibration batches, and the nearest to the original's is kept, so the weighted choice
    is never measurably further from the original than the others:

    * loss-aware: sensitivities measured by truncating each layer alone at two ranks; the
      check compresses a copy of the model with each choice exactly as compress_ will, on
      the other three quarters of the batches (a model of a few dozen layers);
    * fisher: sensitivities from one backward pass over a few batches
      (``fisher_sensitivities``); the check truncates every layer of the network at once by
      its parallel decomposition (the spectra the ranks were chosen from), one forward pass
      per choice (a language model of hundreds of layers: the loss-aware way would take a
      pass per layer and rank and a whole compression per choice)."""
    shapes = {n: tuple(w.shape) for n, _, _, w in eligible}
    budget = int(config.ratio * sum(m * n for m, n in shapes.values()))
    tails = {n: tail_losses(_triplet_losses(decs[n], stats[n])) for n in shapes}
    by_loss = allocate({n: (tails[n], shapes[n]) for n in shapes}, budget)
    if config.allocation == "truncation-loss":
        return by_loss, {"objective": config.allocation}
    uniform = {n: choose_rank(None, config.spec, shapes[n]) for n in shapes}
    trunc = {n: (lambda r, n=n, m=m, k=k: _factorize(k, m, decs[n], r)) for n, m, k, _ in eligible}
    # distances on the last quarter of the batches; the trial compressions fit on the rest
    held = max(1, len(calibration) // 4) if len(calibration) > 1 else 0
    fit_batches = calibration[:len(calibration) - held]
    distance = OutputDistance(model, calibration[len(calibration) - held:] if held else calibration, _run_batch)
    trials = None
    if config.allocation == "fisher":
        with phase(profile, "sensitivities (a backward pass)"):
            slopes = fisher_sensitivities(model, {n: m for n, m, _, _ in eligible},
                                          fit_batches[:MAX_BATCHES], _run_batch)
    else:
        slopes, trials = {}, {}
        for name in shapes:
            ranks = sorted({max(1, uniform[name] // 2), uniform[name]})
            slopes[name], trials[name] = sensitivity(
                distance, name, trunc[name], [(r, float(tails[name][r - 1]) if r <= len(tails[name]) else 0.0)
                                              for r in ranks])
    known = sorted(v for v in slopes.values() if v is not None)
    typical = known[len(known) // 2] if known else 1.0
    floor = 1e-3 * typical  # a layer whose truncation did not move the output still costs
    weights = {n: max(floor, typical if v is None else v) for n, v in slopes.items()}
    ranks = allocate({n: (weights[n] * tails[n], shapes[n]) for n in shapes}, budget)
    rank = budget // sum(m + n for m, n in shapes.values())  # one rank D everywhere
    same = {n: min(rank, *shapes[n]) for n in shapes} if rank >= 1 else uniform
    candidates = {}  # the first of equal rank choices keeps its name
    for label, choice in ((config.allocation, ranks),
                          ("truncation-loss", by_loss),
                          ("global", allocate_ranks({n: (decs[n].S, shapes[n]) for n in shapes}, budget)),
                          ("uniform", uniform), ("same rank", same)):
        if choice not in candidates.values():
            candidates[label] = choice
    measured = {}
    for label, choice in candidates.items():
        if config.allocation == "fisher":  # every layer truncated at once, no refit
            with phase(profile, "allocations checked (truncated networks)"):
                measured[label] = distance.with_layers(
                    {n: trunc[n](r) for n, r in choice.items() if r is not None and saves_parameters(r, shapes[n])})
            continue
        trial = copy.deepcopy(model)
        with warnings.catch_warnings():  # the real compression warns, once
            warnings.simplefilter("ignore")
            _compress(trial, replace(config, allocation="uniform"), fit_batches, device=device, fixed=choice)
        measured[label] = distance(trial)
        del trial
    chosen = min(measured, key=measured.get)
    found = {"objective": config.allocation, "chosen": chosen, "output_distance": measured,
             "sensitivity": weights}
    return candidates[chosen], found if trials is None else {**found, "trials": trials}


def _factorize(kind: LayerKind, module: nn.Module, dec: SVD, rank: int) -> nn.Module:
    u, v = split(dec, rank)
    where = {"device": module.weight.device, "dtype": module.weight.dtype}
    return kind.replace(module, u.to(**where), v.to(**where)).train(module.training)


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


def _run_batch(model: nn.Module, batch):
    """A calibration batch is a tensor, a tuple of positional inputs, or a dict of keywords."""
    try:
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except TypeError as err:  # most often (inputs, labels) pairs from a DataLoader
        raise ConfigError(f"the model cannot run a calibration batch ({err}): a batch is a "
                          "tensor, a tuple of positional inputs or a dict of keyword inputs, "
                          "without labels") from None


def _find_chained_blocks(model: nn.Module, eligible: list, calibration: list):
    """(prefix, blocks, first-block inputs) when the target layers sit in chained repeated
    blocks, else None (the per-layer path)."""
    found = find_blocks(model, [n for n, _, _, _ in eligible])
    if found is None:
        return None
    was = model.training
    model.eval()
    try:
        streams = capture(model, found[1], calibration, _run_batch)
    finally:
        model.train(was)
    return None if streams is None else (*found, streams)


def compress_(model: nn.Module, config: SVDConfig, calibration: Iterable | None = None, *,
              progress: bool = False, device=None, profile: Profile | None = None) -> CompressionReport:
    """Factorise ``model``'s target Linear/Conv2d layers in place; report each layer.

    A layer stays dense (and the report says why) when it is the output layer and
    ``config.skip_output_layer`` is set, when it is a grouped convolution, or when its
    factorisation at the chosen rank would not save parameters (D * (m + n) >= m * n).
    ``calibration`` (needed by method="whiten") is any iterable of model inputs (read once):
    tensors, tuples of positional inputs, or dicts of keyword inputs. With whitening, the
    report's rel_error is the relative output error on the calibration inputs. A model whose
    target layers sit in chained repeated blocks (a transformer) is calibrated block by
    block (blockwise.py), in memory bounded by two block boundaries; ``device`` ("cuda")
    runs each block's statistics and SVDs there, one block at a time. ``profile`` (a
    core.profile.Profile) collects the seconds of each phase.
    """
    if not isinstance(config, SVDConfig):
        raise TypeError(f"config must be an SVDConfig, got {type(config).__name__}")
    if config.allocation in DATA_ALLOCATIONS and calibration is None:
        raise ConfigError(f"allocation={config.allocation!r} needs calibration batches")
    device = None if device is None else resolve_device(device)
    # under torchrun each process streams its share; the statistics are summed over all
    calibration = dist.share(_batches(calibration)) if config.needs_calibration else None
    return _compress(model, config, calibration, progress=progress, device=device, profile=profile)


def _compress(model: nn.Module, config: SVDConfig, calibration: list | None, *,
              progress: bool = False, device=None, fixed: dict | None = None,
              profile: Profile | None = None) -> CompressionReport:
    """compress_ on calibration batches already read (and shared under torchrun); ``fixed``:
    per-layer ranks to use instead of the config's (None: dense)."""
    whiten = config.method == "whiten"
    output = output_layer_name(model) if config.skip_output_layer else None
    shared = shared_weights(model)
    counted: set[int] = set()  # parameters already in a report row
    report = CompressionReport()
    eligible = []  # (name, module, kind, matrix)
    for name, module, kind in list(candidate_modules(model, config.target_modules,
                                                     config.exclude_modules)):
        if kind is None:
            reason, detail = _why_no_kind(module)
            report.layers.append(_dense_report(name, module, type(module).__name__,
                                               _shape_of(module), reason, detail, counted))
            continue
        matrix = kind.matrix(module)
        reason = KeepDense.OUTPUT_LAYER if name == output else kind.why_dense(module)
        subclass = kind.own_computation(module)
        if reason is None and subclass:
            reason = KeepDense.OWN_FORWARD
        others = [n for n in shared.get(id(module.weight), []) if n != name]
        if reason is None and others:  # a tied weight: factorising one user unties it
            reason = KeepDense.SHARED
        if reason is not None:
            detail = f"also used by {', '.join(others)}" if reason is KeepDense.SHARED else \
                subclass or "" if reason is KeepDense.OWN_FORWARD else ""
            report.layers.append(_dense_report(name, module, kind.name, tuple(matrix.shape),
                                               reason, detail, counted))
            continue
        if not torch.isfinite(matrix).all():
            raise ConfigError(f"layer {name!r} has non-finite weights (NaN or Inf): "
                              "it cannot be factorised")
        eligible.append((name, module, kind, matrix))
    if not eligible:
        raise ConfigError("nothing to compress: " + _nothing(report, model))
    with phase(profile, "block inputs captured"):
        blocks = _find_chained_blocks(model, eligible, calibration) if whiten and config.blockwise else None
    in_blocks = {n for n, _, _, _ in eligible if blocks and n.startswith(blocks[0] + ".")}
    spectra = fixed is None and (config.spec.kind == "energy" or config.allocation != "uniform")
    # statistics up front only where ranks need spectra, or for the per-layer path's parallel
    # fits (its sequential fits collect their own, from the compressed network)
    need = [(n, m) for n, m, _, _ in eligible
            if (whiten and not config.sequential and n not in in_blocks) or spectra]
    with phase(profile, "per-layer statistics"):
        stats = collect(model, dict(need), calibration, _run_batch, progress) \
            if calibration is not None and need else {}
    with phase(profile, "spectra (plain or parallel SVDs)"):  # a whitened fit is made at its rank
        decs = {n: _decompose(w if whiten or device is None else w.to(device),  # plain SVDs on device
                              stats.get(n) if whiten else None, config) for n, _, _, w in eligible
                if not whiten or (spectra and n in stats)}
    shapes = {n: tuple(w.shape) for n, _, _, w in eligible}
    if fixed is not None:
        ranks = {n: fixed.get(n) for n in shapes}
    elif config.allocation == "global":
        budget = int(config.ratio * sum(m * n for m, n in shapes.values()))
        ranks = allocate_ranks({n: (decs[n].S, shapes[n]) for n in shapes}, budget)
    elif config.allocation in DATA_ALLOCATIONS:
        with phase(profile, "allocation"):
            ranks, report.allocation = _allocate_by_loss(model, config, eligible, decs, stats,
                                                         calibration, device, profile)
    else:  # a fixed rank or a parameter ratio needs no spectrum
        ranks = {n: choose_rank(decs[n].S if n in decs else None, config.spec, shapes[n])
                 for n in shapes}
    # the block-wise path collects its own statistics: drop what only the ranks needed (a
    # language model's whole-network statistics and spectra are gigabytes)
    stats = {n: v for n, v in stats.items() if n not in in_blocks}
    decs = {n: v for n, v in decs.items() if n not in in_blocks or not whiten}
    todo = {}
    for name, module, kind, matrix in eligible:
        rank, shape = ranks[name], shapes[name]
        if rank is not None and config.round_to:
            rank = round_rank(rank, config.round_to, shape)
        elif rank is not None and config.speed_for is not None and saves_parameters(rank, shape):
            rank = fastest_rank(shape, rank, config.speed_for, matrix.dtype, matrix.device)
        reason, detail = _keep_dense(rank, shape, config, matrix)
        if reason is not None:
            report.layers.append(_dense_report(name, module, kind.name, shape, reason, detail, counted))
        else:
            todo[name] = (module, kind, matrix, rank)
    few: list[tuple[str, int, int]] = []  # layers calibrated on few rows per input feature

    def finish(name: str, dec: SVD, fit: str) -> None:
        module, kind, matrix, rank = todo.pop(name)
        replace_module(model, name, _factorize(kind, module, dec, rank))
        counted.update(id(p) for p in module.parameters(recurse=False))
        bias = 0 if module.bias is None else module.bias.numel()
        report.layers.append(LayerReport(
            name, kind.name, shapes[name], rank, module.weight.numel() + bias,
            factorized_params(rank, shapes[name]) + bias, truncation_error(dec.S, rank), fit=fit))

    def from_stats(name: str, layer_stats: Stats) -> None:
        matrix, rank = todo[name][2], todo[name][3]
        if layer_stats.rows < ROWS_PER_INPUT * matrix.shape[1]:
            few.append((name, layer_stats.rows, matrix.shape[1]))
        with phase(profile, "fits (SVDs, candidates)"):
            fitted = fit_layer(matrix, rank, layer_stats, config.damping, config.select_fit)
        finish(name, *fitted)

    if blocks:
        compress_blocks(blocks[1], blocks[0], [n for n in todo if n in in_blocks], blocks[2],
                        from_stats, config.sequential, device, progress, profile)
    rest = [n for n in todo if n not in in_blocks]
    originals = {}
    if whiten and config.sequential and rest:  # the network's layer inputs, recorded once
        with phase(profile, "per-layer inputs recorded"):
            originals = record_inputs(model, {n: todo[n][0] for n in rest}, calibration, _run_batch)
        rest = list(originals)  # in the order the layers run: each fitted after those before it
    for name in rest:
        if name in originals:  # fit the original layer's outputs from the inputs that the
            # already-compressed layers before it now produce: errors do not compound
            with phase(profile, "per-layer statistics"):
                layer_stats = collect_paired(model, name, calibration, _run_batch, originals.pop(name))
        elif whiten:
            layer_stats = stats.pop(name)  # (nothing else needs them: freed once fitted)
        else:
            finish(name, decs[name], "plain")
            continue
        layer_stats.consumers = 1  # one layer: the parts are folded once it has chosen
        from_stats(name, layer_stats)
    if few:
        name, rows, width = min(few, key=lambda f: f[1] / f[2])
        warnings.warn(f"{len(few)} layer(s) were calibrated on fewer than {ROWS_PER_INPUT} rows per "
                      f"input feature (fewest: {name}, {rows:,} rows for {width:,} inputs): a "
                      "whitened fit learns such data rather than the network's; each layer's fit "
                      "was chosen on held-out rows" + ("" if config.select_fit else
                      " (not with select_fit=False)") + ", and more calibration batches would help",
                      stacklevel=3)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda r: order.get(r.name, -1))
    return report
