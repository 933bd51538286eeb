"""Saving and loading a (compressed) model: model.safetensors + svdcompress.json.

Loading reads the JSON first, rebuilds the low-rank modules at the recorded shapes, then
loads the tensors: no pickle anywhere. Writes are atomic (temp file, then os.replace), and
the JSON is written last, so a run directory with a JSON is always complete.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .archs import architecture, spec_of
from .config import SVDConfig
from .errors import FormatError
from .files import atomic_write, read_json, write_json
from .kinds import kind_named, low_rank_kind
from .runinfo import RunInfo
from .swap import low_rank_modules, replace_module

FORMAT = "svdcompress"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "svdcompress.json"


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


def layer_entry(name: str, module: nn.Module) -> dict:
    """What the JSON records about one low-rank layer: enough to rebuild it empty."""
    kind = low_rank_kind(module)
    return {"name": name, "kind": kind.name, **kind.entry(module)}


def save(model: nn.Module, directory: str | Path, *, config: SVDConfig | None = None,
         info: RunInfo | None = None) -> Path:
    """Write ``model`` to ``directory``/model.safetensors and ``directory``/svdcompress.json.

    ``info`` describes the run (data, source, metrics, history...). A model whose
    ``arch_spec()`` names a registered architecture also records it (and the files that
    architecture writes), so ``load(directory)`` needs no model from the caller.
    """
    directory = Path(directory)
    spec = spec_of(model)
    tensors, aliases = unique_tensors(model.state_dict())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": spec,
        "layers": [layer_entry(n, m) for n, m in low_rank_modules(model)],
        "tied": aliases,
        "config": config.to_dict() if config is not None else None,
        **(info.to_dict() if info is not None else {}),
    }
    if spec is not None and architecture(spec["name"]).write_files is not None:
        directory.mkdir(parents=True, exist_ok=True)
        architecture(spec["name"]).write_files(model, directory)
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


def read_info(directory: str | Path) -> RunInfo:
    """The run's typed metadata (data, source, metrics...)."""
    return RunInfo.from_dict(read_meta(directory))


def read_config(meta: dict) -> SVDConfig | None:
    """The SVDConfig a run was compressed with, if any."""
    if meta.get("config") is None:
        return None
    try:
        return SVDConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise FormatError(f"svdcompress.json: invalid config: {err}") from None


def build(directory: Path, meta: dict) -> nn.Module:
    """An empty model of the run's recorded architecture."""
    spec = meta.get("architecture")
    if spec is None:
        raise FormatError(f"{directory} holds no built-in architecture: pass the base "
                          "model, as load(directory, model=base)")
    if not isinstance(spec, dict):
        raise FormatError(f"{directory / META}: 'architecture' must be an object")
    try:
        return architecture(spec.get("name")).build(spec, directory)
    except (TypeError, ValueError) as err:
        raise FormatError(f"{directory / META}: {err}") from None


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a saved run: into ``model`` (rebuilt in place), or into its recorded architecture."""
    directory = Path(directory)
    meta = read_meta(directory)
    if model is None:
        model = build(directory, meta)
    for entry in meta["layers"]:
        try:
            current = model.get_submodule(entry["name"])
        except AttributeError:
            raise FormatError(f"layer {entry['name']!r} of the saved run is not in the model") from None
        new = kind_named(entry.get("kind")).rebuild(entry, current).train(current.training)
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
