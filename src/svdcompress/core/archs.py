"""THE registry of model architectures that ``load(directory)`` can rebuild without code.

A model that wants this has an ``arch_spec()`` method returning a JSON object with a
``name``; svdcompress.json stores that spec, nothing more. The name is looked up here:
registered by ``register_architecture`` or, lazily, through the ``svdcompress.architectures``
entry-point group (how the study's MLP and the Hugging Face integration declare theirs in
pyproject.toml, and how a third-party package can add its own). The core names none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from torch import nn

from .errors import FormatError

ENTRY_POINTS = "svdcompress.architectures"


@dataclass(frozen=True)
class Architecture:
    """``build(spec, directory)`` makes an empty model of ``spec`` (its tensors are loaded
    after); ``write_files(model, directory)``, if given, puts the files that ``build`` needs
    (a config, a tokenizer) in the run directory being written. ``reads``: glob patterns of
    the file names ``build`` (or the library under it) would read from a directory: such a
    file that svdcompress.json does not list was added after the run was written, and
    loading refuses it."""

    name: str
    build: Callable[[dict, Path], nn.Module]
    write_files: Callable[[nn.Module, Path], None] | None = None
    reads: tuple[str, ...] = ()


_ARCHS: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    _ARCHS[arch.name] = arch
    return arch


def architecture(name) -> Architecture:
    """The registered architecture called ``name`` (FormatError if none is)."""
    if not isinstance(name, str):
        raise FormatError(f"architecture name must be a string, got {name!r}")
    if name not in _ARCHS:
        for ep in entry_points(group=ENTRY_POINTS):
            if ep.name == name:
                register_architecture(ep.load())
    if name not in _ARCHS:
        known = sorted(set(_ARCHS) | {ep.name for ep in entry_points(group=ENTRY_POINTS)})
        raise FormatError(f"unknown architecture {name!r} (known: {', '.join(known) or 'none'})")
    return _ARCHS[name]


def spec_of(model: nn.Module) -> dict | None:
    """The model's architecture spec, checked to name a registered architecture; None if it
    has none (then loading needs the model from the caller)."""
    if not hasattr(model, "arch_spec"):
        return None
    spec = model.arch_spec()
    if not isinstance(spec, dict):
        raise TypeError(f"{type(model).__name__}.arch_spec() must return a dict")
    architecture(spec.get("name"))
    return spec
