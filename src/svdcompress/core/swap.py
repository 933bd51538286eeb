"""Finding target modules by name, replacing them in place, and undoing that."""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterator

from torch import nn

from .errors import ConfigError
from .kinds import LayerKind, any_kind, dense_kind, low_rank_kind
from .layers import Int8LowRankLinear, LowRankLinear, check_rank
from .projection import ProjectedLinear


def name_matches(name: str, pattern) -> bool:
    """``pattern`` is a regex (re.fullmatch) or a tuple of name suffixes (PEFT's rule)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == s or name.endswith("." + s) for s in pattern)


def output_layer_name(model: nn.Module) -> str | None:
    """The network's output layer: its last layer of a registered kind, in module order."""
    last = None
    for name, module in model.named_modules():
        if any_kind(module) is not None:
            last = name
    return last


def _has_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each sub-module object is reachable (a shared module has
    several), keyed by id(module), in module order."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def candidate_modules(model: nn.Module, target_modules=None,
                      exclude_modules=None) -> Iterator[tuple[str, nn.Module, LayerKind | None]]:
    """(name, module, kind) of every module that passes the include/exclude filters and is
    either of a registered dense kind or holds parameters of its own (kind None: the caller
    reports why it stays dense: an embedding, a norm, an unsupported type). A module reachable under several
    names is yielded once, under its first name; it is a target when one of its names is
    targeted and none is excluded."""
    names = module_names(model)
    for name, module in model.named_modules():
        if not name or low_rank_kind(module) is not None:
            continue  # the root itself cannot be replaced in place
        kind = dense_kind(module)
        if kind is None and not _has_parameters(module):
            continue
        aliases = names[id(module)]
        if target_modules is not None and not any(name_matches(n, target_modules) for n in aliases):
            continue
        if exclude_modules is not None and any(name_matches(n, exclude_modules) for n in aliases):
            continue
        yield name, module, kind


def shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """For each parameter held by more than one module object: the names of those modules."""
    owners: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), {}).setdefault(id(module), name)
    return {pid: list(mods.values()) for pid, mods in owners.items() if len(mods) > 1}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` wherever the sub-module ``name`` is (under every name a shared module
    has, so it stays one object); returns the old one."""
    old = model.get_submodule(name)
    for alias in module_names(model)[id(old)]:
        parent_name, _, child = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return old


def low_rank_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer that svdcompress put in: low-rank (two factors) or projected."""
    return [(n, m) for n, m in model.named_modules() if low_rank_kind(m) is not None]


def densify_(model: nn.Module) -> nn.Module:
    """Undo compression in place: every low-rank layer becomes a dense one holding u @ v."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "to_dense") and low_rank_kind(module) is not None:
            replace_module(model, name, module.to_dense())
    return model


def project_(model: nn.Module, rank: int, *, method: str = "subspace", target_modules=None,
             exclude_modules=None, skip_output_layer: bool = True, **options) -> list[str]:
    """Dynamic SVD training: target Linear layers become ProjectedLinear (in place).

    Each keeps its own weight and bias Parameters (an existing optimiser stays valid); its
    forward pass uses the rank-min(D, m, n) projection of W with a straight-through
    gradient. ``options`` go to ProjectedLinear (oversample, max_iters, tol, refresh_every).
    Returns the names of the projected layers.
    """
    check_rank(rank)
    output = output_layer_name(model) if skip_output_layer else None
    names = []
    for name, module, kind in list(candidate_modules(model, target_modules, exclude_modules)):
        if name == output or not isinstance(module, nn.Linear) or kind.own_computation(module):
            continue  # (a Linear subclass with a forward of its own is not a plain x W^T + b)
        d = min(rank, module.in_features, module.out_features)
        replace_module(model, name, ProjectedLinear.from_linear(module, d, method=method, **options))
        names.append(name)
    if not names:
        raise ConfigError("project_ found no Linear layer to project (check the module filters)")
    return names


def unproject_(model: nn.Module) -> list[str]:
    """After dynamic training: each ProjectedLinear becomes a LowRankLinear holding the
    exact rank-D factors of its final W (what its eval mode computed)."""
    names = [n for n, m in model.named_modules() if isinstance(m, ProjectedLinear)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).to_low_rank())
    return names


QUANTIZE = ("int8",)


def quantize_(model: nn.Module, scheme: str = "int8") -> int:
    """Store every low-rank Linear's factors in int8 with a float32 scale per row (in
    place); returns how many layers. Quantize last: after recovery training, the factors
    are no longer trainable (``dequantize_`` gives float ones back). Low-rank convolutions
    and dynamic training's projected layers stay as they are."""
    if scheme not in QUANTIZE:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {scheme!r}")
    done = 0
    for name, module in list(model.named_modules()):
        if type(module) is LowRankLinear:
            replace_module(model, name, Int8LowRankLinear.from_low_rank(module).train(module.training))
            done += 1
    if not done:
        kinds = Counter(type(m).__name__ for m in model.modules() if low_rank_kind(m) is not None)
        if not kinds:
            raise ConfigError("nothing to quantize: the model has no low-rank layer (compress it first)")
        if set(kinds) == {Int8LowRankLinear.__name__}:
            raise ConfigError("nothing to quantize: the model's factors are int8 already")
        raise ConfigError("nothing to quantize: int8 factors are made from LowRankLinear layers only, the "
                          "model's low-rank layers are " + ", ".join(f"{n} x {k}" for k, n in kinds.items()))
    return done


def dequantize_(model: nn.Module) -> nn.Module:
    """Int8 factors back to float ones (exactly their dequantized values), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8LowRankLinear):
            replace_module(model, name, module.to_float().train(module.training))
    return model
