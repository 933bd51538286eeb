"""Finding target modules by name, replacing them in place, and undoing that."""

from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from .layers import LOW_RANK_TYPES

DENSE_TYPES = (nn.Linear, nn.Conv2d)


def name_matches(name: str, pattern) -> bool:
    """``pattern`` is a regex (re.fullmatch) or a tuple of name suffixes (PEFT's rule)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == s or name.endswith("." + s) for s in pattern)


def output_layer_name(model: nn.Module) -> str | None:
    """The network's output layer: its last Linear/Conv2d (or low-rank one) in module order."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, DENSE_TYPES + LOW_RANK_TYPES):
            last = name
    return last


def candidate_modules(model: nn.Module, target_modules=None,
                      exclude_modules=None) -> Iterator[tuple[str, nn.Module]]:
    """Dense Linear/Conv2d sub-modules whose full name passes the include/exclude filters."""
    for name, module in model.named_modules():
        if not name or not isinstance(module, DENSE_TYPES):
            continue  # the root itself cannot be replaced in place
        if target_modules is not None and not name_matches(name, target_modules):
            continue
        if exclude_modules is not None and name_matches(name, exclude_modules):
            continue
        yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the sub-module ``name`` was; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def low_rank_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LOW_RANK_TYPES)]


def densify_(model: nn.Module) -> nn.Module:
    """Undo compression in place: every low-rank layer becomes a dense one holding u @ v."""
    for name, module in low_rank_modules(model):
        replace_module(model, name, module.to_dense())
    return model
