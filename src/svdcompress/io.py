"""Saving and loading a (compressed) model: model.safetensors + svdcompress.json.

Loading reads the JSON first, rebuilds the low-rank modules at the recorded shapes, then
loads the tensors: no pickle anywhere. Writes are atomic (temp file, then os.replace), and
the JSON is written last, so a run directory with a JSON is always complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SVDConfig
from .layers import LowRankConv2d, LowRankLinear, ProjectedLinear
from .models import build_model
from .swap import low_rank_modules, replace_module

FORMAT = "svdcompress"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "svdcompress.json"


class FormatError(ValueError):
    """A run directory that is missing, incomplete, or not what svdcompress wrote."""


# ---------------------------------------------------------------- atomic writes

def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object")
    return data


# ---------------------------------------------------------------- layer entries

def layer_entry(name: str, module: nn.Module) -> dict:
    """What the JSON records about one low-rank layer: enough to rebuild it empty."""
    entry = {"name": name, "rank": module.rank, "bias": module.bias is not None}
    if isinstance(module, LowRankLinear):
        entry.update(kind="linear", in_features=module.in_features,
                     out_features=module.out_features)
    elif isinstance(module, ProjectedLinear):
        entry.update(kind="projected", in_features=module.in_features,
                     out_features=module.out_features, options=module.options())
    else:
        entry.update(kind="conv2d", in_channels=module.in_channels,
                     out_channels=module.out_channels, kernel_size=list(module.kernel_size),
                     stride=list(module.stride), dilation=list(module.dilation),
                     padding=module.padding if isinstance(module.padding, str)
                     else list(module.padding), padding_mode=module.padding_mode)
    return entry


def _need(entry: dict, key: str, kind):
    value = entry.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise FormatError(f"layer {entry.get('name')!r}: field {key!r} is missing or invalid")
    return value


def _empty_layer(entry: dict, current: nn.Module) -> nn.Module:
    """An empty low-rank layer of the entry's shape, checked against the model's module."""
    name, kind, rank = entry["name"], entry["kind"], _need(entry, "rank", int)
    kw = {"device": current.weight.device if hasattr(current, "weight") else None}
    if kind in ("linear", "projected"):
        n, m = _need(entry, "in_features", int), _need(entry, "out_features", int)
        if getattr(current, "in_features", None) != n or getattr(current, "out_features", None) != m:
            raise FormatError(f"layer {name!r}: saved as {m}x{n} but the model's module is "
                              f"{type(current).__name__} {_describe(current)}")
        if kind == "linear":
            return LowRankLinear(n, m, rank, bias=_need(entry, "bias", bool), **kw)
        try:
            return ProjectedLinear(n, m, rank, bias=_need(entry, "bias", bool),
                                   **_need(entry, "options", dict), **kw)
        except (TypeError, ValueError) as err:
            raise FormatError(f"layer {name!r}: invalid projection options: {err}") from None
    if kind == "conv2d":
        cin, cout = _need(entry, "in_channels", int), _need(entry, "out_channels", int)
        if getattr(current, "in_channels", None) != cin or getattr(current, "out_channels", None) != cout:
            raise FormatError(f"layer {name!r}: saved as conv {cin}->{cout} channels but the "
                              f"model's module is {type(current).__name__} {_describe(current)}")
        return LowRankConv2d(cin, cout, _need(entry, "kernel_size", list), rank,
                             stride=_need(entry, "stride", list), padding=entry.get("padding", 0),
                             dilation=_need(entry, "dilation", list),
                             bias=_need(entry, "bias", bool),
                             padding_mode=entry.get("padding_mode", "zeros"), **kw)
    raise FormatError(f"layer {name!r}: unknown kind {kind!r}")


def _describe(module: nn.Module) -> str:
    w = getattr(module, "weight", None)
    return f"with weight {tuple(w.shape)}" if isinstance(w, torch.Tensor) else ""


# ---------------------------------------------------------------- save

def unique_tensors(state: dict) -> tuple[dict, dict]:
    """safetensors refuses shared storage: keep one copy of tied tensors, name the aliases."""
    tensors, aliases, seen = {}, {}, {}
    for key, t in state.items():
        ident = (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def save(model: nn.Module, directory: str | Path, *, config: SVDConfig | None = None,
         extra: dict | None = None) -> Path:
    """Write ``model`` to ``directory``/model.safetensors and ``directory``/svdcompress.json.

    ``extra`` is merged into the JSON (metrics, data, history...). Built-in models also
    record their architecture, so ``load(directory)`` needs no model from the caller.
    """
    directory = Path(directory)
    tensors, aliases = unique_tensors(model.state_dict())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.arch_spec() if hasattr(model, "arch_spec") else None,
        "layers": [layer_entry(n, m) for n, m in low_rank_modules(model)],
        "tied": aliases,
        "config": config.to_dict() if config is not None else None,
    }
    for key, value in (extra or {}).items():
        if key in meta:
            raise ValueError(f"extra metadata may not override {key!r}")
        meta[key] = value
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    write_json(directory / META, meta)
    return directory


# ---------------------------------------------------------------- load

def read_meta(directory: str | Path) -> dict:
    """The run's svdcompress.json, checked to be one that this version can read."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FormatError(f"run directory not found: {directory}")
    meta = read_json(directory / META, "svdcompress.json")
    if meta.get("format") != FORMAT:
        raise FormatError(f"{directory / META} was not written by svdcompress")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported format_version {version!r} in {directory / META} "
                          f"(this svdcompress reads {FORMAT_VERSION})")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in layers):
        raise FormatError(f"{directory / META}: 'layers' must be a list of objects with a name")
    if not isinstance(meta.get("tied", {}), dict):
        raise FormatError(f"{directory / META}: 'tied' must be an object")
    return meta


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FormatError(f"model.safetensors not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"cannot read {path}: {err}") from None


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a saved run: into ``model`` (rebuilt in place), or into its built-in architecture."""
    directory = Path(directory)
    meta = read_meta(directory)
    if model is None:
        if meta.get("architecture") is None:
            raise FormatError(f"{directory} holds no built-in architecture: pass the base "
                              "model, as load(directory, model=base)")
        arch = meta["architecture"]
        try:
            if isinstance(arch, dict) and arch.get("name") == "hf-encoder":
                from .hf import build_encoder
                model = build_encoder(directory, arch)
            else:
                model = build_model(arch)
        except ValueError as err:
            raise FormatError(f"{directory / META}: {err}") from None
    for entry in meta["layers"]:
        try:
            current = model.get_submodule(entry["name"])
        except AttributeError:
            raise FormatError(f"layer {entry['name']!r} of the saved run is not in the model") from None
        new = _empty_layer(entry, current).train(current.training)
        replace_module(model, entry["name"], new)
    load_state(model, read_tensors(directory), meta.get("tied", {}))
    return model


def load_state(model: nn.Module, tensors: dict, aliases: dict) -> None:
    """Load ``tensors`` into ``model`` after checking keys and shapes, one clear error each."""
    expected = model.state_dict()
    for alias, target in aliases.items():
        if target not in tensors:
            raise FormatError(f"tied tensor {alias!r} points to missing {target!r}")
        tensors[alias] = tensors[target]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise FormatError(f"model.safetensors lacks {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected:
        raise FormatError(f"model.safetensors has {len(unexpected)} unexpected tensor(s): "
                          f"{', '.join(unexpected[:5])}")
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise FormatError(f"tensor {key!r} has shape {tuple(t.shape)}, the model expects "
                              f"{tuple(expected[key].shape)}")
    model.load_state_dict(tensors, strict=True)
