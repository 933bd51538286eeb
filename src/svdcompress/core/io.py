"""Saving and loading a (compressed) model: a run directory of model.safetensors (every
tensor) and svdcompress.json (format, architecture, low-rank layers, config, run info, and
the SHA-256 of every other file in the directory).

Writes build the whole directory beside its destination and move it into place in one step
(files.staged_directory). Loading verifies every file's hash, validates the metadata as a
whole, rebuilds the low-rank modules at the recorded shapes, then loads the tensors,
refusing non-finite ones and keeping each tensor's dtype. No pickle anywhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .archs import architecture, spec_of
from .config import SVDConfig
from .errors import ConfigError, FormatError
from .files import read_json, sha256_file, staged_directory, write_json
from .kinds import kind_named, low_rank_kind
from .runinfo import RunInfo
from .swap import low_rank_modules, replace_module

FORMAT = "svdcompress"
FORMAT_VERSION = 2  # 2: svdcompress.json records the hash of every file
READABLE_VERSIONS = (1, 2)  # version 1 runs (no hashes) still load
WEIGHTS = "model.safetensors"
META = "svdcompress.json"


# ---------------------------------------------------------------- tensors

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


def check_finite(tensors: dict, where: str) -> None:
    """Refuse NaN or Inf in any floating-point tensor, naming it."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FormatError(f"{where}: tensor {key!r} holds NaN or Inf values")


def load_state(model: nn.Module, tensors: dict, aliases: dict, where: str = WEIGHTS) -> None:
    """Load ``tensors`` into ``model`` after checking keys, shapes and values, one clear error
    each. Each of the model's tensors takes the saved tensor's dtype (float16 stays float16)."""
    expected = model.state_dict()
    if not isinstance(aliases, dict) or not all(
            isinstance(a, str) and isinstance(t, str) for a, t in aliases.items()):
        raise FormatError(f"{where}: tied tensors must map names to names")
    for alias, target in aliases.items():
        if target not in tensors or alias in tensors:
            raise FormatError(f"tied tensor {alias!r} -> {target!r}: the target must be stored "
                              "in the file and the alias must not be")
        if alias not in expected or expected[alias].data_ptr() != expected[target].data_ptr():
            raise FormatError(f"tied tensor {alias!r} is not tied to {target!r} in the model")
        tensors[alias] = tensors[target]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise FormatError(f"{where} lacks {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected:
        raise FormatError(f"{where} has {len(unexpected)} unexpected tensor(s): "
                          f"{', '.join(unexpected[:5])}")
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise FormatError(f"tensor {key!r} has shape {tuple(t.shape)}, the model expects "
                              f"{tuple(expected[key].shape)}")
        if t.is_floating_point() != expected[key].is_floating_point() or \
                (not t.is_floating_point() and t.dtype != expected[key].dtype):  # int8 stays int8
            raise FormatError(f"tensor {key!r} is {t.dtype}, the model expects {expected[key].dtype}")
    check_finite(tensors, where)
    _take_dtypes(model, tensors)
    model.load_state_dict(tensors, strict=True)


def _take_dtypes(model: nn.Module, tensors: dict) -> None:
    for key, t in tensors.items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        current = getattr(owner, attr)
        if isinstance(current, torch.Tensor) and current.dtype != t.dtype:
            current.data = current.data.to(t.dtype)


# ---------------------------------------------------------------- save

def write_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its failures (a full disk) raised as the OSError they are."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        raise OSError(f"cannot write {path}: {err}") from None


def layer_entry(name: str, module: nn.Module) -> dict:
    """What the JSON records about one low-rank layer: enough to rebuild it empty."""
    kind = low_rank_kind(module)
    return {"name": name, "kind": kind.name, **kind.entry(module)}


def save(model: nn.Module, directory: str | Path, *, config: SVDConfig | None = None,
         info: RunInfo | None = None, overwrite: bool = False,
         files: dict[str, str | Path] | None = None) -> Path:
    """Write ``model`` as the run directory ``directory``.

    ``info`` describes the run (data, source, metrics, history...); ``files`` are more files
    to put in the run (name -> path, e.g. a training checkpoint). A model whose
    ``arch_spec()`` names a registered architecture also records it (and the files that
    architecture writes), so ``load(directory)`` needs no model from the caller. The whole
    directory appears at once; an existing non-empty one is replaced only with ``overwrite``.
    """
    spec = spec_of(model)
    tensors, aliases = unique_tensors(model.state_dict())
    try:
        check_finite(tensors, "the model")
    except FormatError as err:
        raise ConfigError(f"{err}: not saved") from None
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": spec,
        "layers": [layer_entry(n, m) for n, m in low_rank_modules(model)],
        "tied": aliases,
        "config": config.to_dict() if config is not None else None,
        **(info.to_dict() if info is not None else {}),
    }
    with staged_directory(directory, overwrite=overwrite) as stage:
        if spec is not None and architecture(spec["name"]).write_files is not None:
            architecture(spec["name"]).write_files(model, stage)
        write_tensors(tensors, stage / WEIGHTS)
        for name, src in (files or {}).items():
            shutil.copyfile(src, stage / name)
        meta["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(stage.iterdir()) if p.is_file()}
        write_json(stage / META, meta)
    return Path(directory)


# ---------------------------------------------------------------- load

def read_meta(directory: str | Path, verify: bool = True) -> dict:
    """The run's svdcompress.json, checked as a whole; with ``verify``, every file it
    names is checked against its recorded size and SHA-256."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FormatError(f"run directory not found: {directory}")
    where = directory / META
    meta = read_json(where, "svdcompress.json")
    if meta.get("format") != FORMAT:
        raise FormatError(f"{where} was not written by svdcompress")
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise FormatError(f"unsupported format_version {version!r} in {where} "
                          f"(this svdcompress reads {', '.join(map(str, READABLE_VERSIONS))})")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in layers):
        raise FormatError(f"{where}: 'layers' must be a list of objects with a name")
    names = [e["name"] for e in layers]
    if len(set(names)) != len(names):
        raise FormatError(f"{where}: a layer is listed twice")
    if not isinstance(meta.get("tied", {}), dict):
        raise FormatError(f"{where}: 'tied' must be an object")
    if meta.get("architecture") is not None and not isinstance(meta["architecture"], dict):
        raise FormatError(f"{where}: 'architecture' must be an object")
    read_config(meta)
    RunInfo.from_dict(meta)
    if version >= 2 or "files" in meta:  # (a version edited down does not skip the hashes)
        _check_files(directory, meta.get("files"), verify)
    elif verify:
        warnings.warn(f"{directory} has format_version 1: its files carry no hashes and are "
                      "not verified (save it again to add them)", stacklevel=2)
    return meta


def _check_files(directory: Path, files, verify: bool) -> None:
    where = directory / META
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise FormatError(f"{where}: 'files' must record every file of the run")
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and
                isinstance(entry.get("bytes"), int) and "/" not in name and name not in ("", ".", "..")):
            raise FormatError(f"{where}: the entry of file {name!r} is invalid")
        path = directory / name
        if not path.is_file():
            raise FormatError(f"{name!r} not found: the run {directory} is incomplete")
        if not verify:
            continue
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise FormatError(f"{path} does not match the hash in svdcompress.json: "
                              "the file is corrupt or was changed")


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FormatError(f"model.safetensors not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FormatError(f"cannot read {path}: {err}") from None


def read_info(directory: str | Path) -> RunInfo:
    """The run's typed metadata (data, source, metrics...)."""
    return RunInfo.from_dict(read_meta(directory, verify=False))


def dense_origin(run: str | Path) -> str | None:
    """The dense model a run descends from: its recorded teacher or source, followed through
    the runs between (a recovered run's source is the compressed run it started from, a
    quantized run's the run it was quantized from)."""
    path = Path(run)
    for _ in range(32):  # (a chain of runs, never a cycle)
        info = read_info(path)
        nxt = (info.distill or {}).get("teacher") or info.source
        if not nxt or not (Path(nxt) / "svdcompress.json").is_file():
            return nxt
        path = Path(nxt)
    return None


def read_config(meta: dict) -> SVDConfig | None:
    """The SVDConfig a run was compressed with, if any."""
    if meta.get("config") is None:
        return None
    try:
        return SVDConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise FormatError(f"svdcompress.json: invalid config: {err}") from None


def build(directory: Path, meta: dict) -> nn.Module:
    """An empty model of the run's recorded architecture, built from the files the run
    lists (and verified) alone: a file dropped into the run later cannot change it."""
    spec = meta.get("architecture")
    if spec is None:
        raise FormatError(f"{directory} holds no built-in architecture: pass the base "
                          "model, as load(directory, model=base)")
    arch = architecture(spec.get("name"))
    with _listed_only(directory, meta, arch.reads) as listed:
        try:
            return arch.build(spec, listed)
        except FormatError as err:  # name the run, not the temporary directory
            raise FormatError(str(err).replace(str(listed), str(directory))) from err
        except (TypeError, ValueError) as err:
            raise FormatError(f"{directory / META}: {err}") from None


@contextmanager
def _listed_only(directory: Path, meta: dict, reads: tuple[str, ...]):
    """A temporary directory of links to the run's listed files (not the weights, which are
    read separately); the run itself for a version 1 run, which lists none. An unlisted file
    of a name the architecture reads is refused."""
    files = meta.get("files")
    if not isinstance(files, dict):
        yield directory
        return
    for path in sorted(directory.iterdir()):
        if path.name not in files and any(fnmatch(path.name, p) for p in reads):
            raise FormatError(f"{path} is not listed in {META}: it was added after the run was "
                              "written and would change how the model loads (remove it)")
    with tempfile.TemporaryDirectory(prefix="svdcompress-load-") as tmp:
        for name in files:
            if name != WEIGHTS:
                os.symlink((directory / name).resolve(), Path(tmp) / name)
        yield Path(tmp)


def _header(directory: Path) -> dict[str, tuple]:
    """Name -> shape of every tensor in model.safetensors, from its header (nothing loaded)."""
    try:
        with safe_open(str(directory / WEIGHTS), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FormatError(f"cannot read {directory / WEIGHTS}: {err}") from None


def _check_shapes(directory: Path, meta: dict) -> None:
    """Build the recorded architecture on the meta device (no memory) and check its tensor
    shapes against the file before the real model is allocated."""
    with torch.device("meta"):
        probe = build(directory, meta)
        for entry in meta["layers"]:
            try:
                current = probe.get_submodule(entry["name"])
            except AttributeError:
                raise FormatError(f"layer {entry['name']!r} of the saved run is not in the model") from None
            replace_module(probe, entry["name"], kind_named(entry.get("kind")).rebuild(entry, current))
    stored = _header(directory)
    aliases = meta.get("tied", {})
    for key, t in probe.state_dict().items():
        shape = stored.get(aliases.get(key, key)) if isinstance(aliases, dict) else stored.get(key)
        if shape is not None and shape != tuple(t.shape):
            raise FormatError(f"tensor {key!r} has shape {shape} in the file, the recorded "
                              f"architecture makes it {tuple(t.shape)}")


def _check_layer_tensors(name: str, tensors: dict) -> None:
    """A low-rank layer's own tensors in the file: its float tensors (factors, bias) in one
    dtype (a float16 u beside a float32 v fails at the first forward pass), and int8 scales
    (``*_scale``) floating and positive (float32 as quantize_ makes them, or the dtype a
    model's .half() cast them to; load_state refuses non-finite values)."""
    own = {k[len(name) + 1:]: t for k, t in tensors.items()
           if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
    scales = {k for k in own if k.endswith("_scale")}
    floats = {str(t.dtype).removeprefix("torch.") for k, t in own.items() if t.is_floating_point() and k not in scales}
    if len(floats) > 1:
        raise FormatError(f"layer {name!r} mixes tensor dtypes in the file ({', '.join(sorted(floats))})")
    for k in sorted(scales):
        t = own[k]
        if not t.is_floating_point() or not bool((t > 0).all()):  # (NaN fails too)
            raise FormatError(f"tensor {name + '.' + k!r}: int8 scales must be floating and positive")


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a saved run: into ``model`` (rebuilt in place), or into its recorded architecture."""
    directory = Path(directory)
    meta = read_meta(directory)
    if model is not None and any(t.is_meta for t in model.state_dict().values()):
        raise ConfigError("the model to load into has tensors on the meta device: build it on a "
                          "real device (the run's weights fill it), or load the run without model=")
    if model is None:
        _check_shapes(directory, meta)
        model = build(directory, meta)
    new = {}
    for entry in meta["layers"]:  # every entry checked before the model is touched
        try:
            current = model.get_submodule(entry["name"])
        except AttributeError:
            raise FormatError(f"layer {entry['name']!r} of the saved run is not in the model") from None
        new[entry["name"]] = kind_named(entry.get("kind")).rebuild(entry, current).train(current.training)
    tensors = read_tensors(directory)
    for name in new:
        _check_layer_tensors(name, tensors)
    for name, layer in new.items():
        replace_module(model, name, layer)
    load_state(model, tensors, meta.get("tied", {}))
    return model
