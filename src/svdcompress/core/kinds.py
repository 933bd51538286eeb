"""THE registry of layer kinds: everything svdcompress needs to know about one layer type.

A kind says how to view a dense module's weight as a matrix, which rows that matrix
multiplies (for calibration), how to build the low-rank replacement from factors u (m x D)
and v (D x n), what to record in svdcompress.json to rebuild it empty, and how many
multiply-adds a forward pass costs. compress_, save/load, calibration and bench ask this
registry and nothing else; a module type no kind claims is reported by name, never guessed.

Adding a kind is one ``LayerKind`` subclass and one ``register_kind`` call (built-in kinds
below; an integration registers its own when imported).
"""

from __future__ import annotations

import math
from importlib.metadata import entry_points

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FormatError
from .layers import Int8LowRankLinear, LowRankConv1d, LowRankConv2d, LowRankLinear
from .projection import ProjectedLinear
from .report import KeepDense


def need(entry: dict, key: str, kind):
    """``entry[key]`` if it has type ``kind`` (bool is not an int here), else FormatError."""
    value = entry.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise FormatError(f"layer {entry.get('name')!r}: field {key!r} is missing or invalid")
    return value


def need_dims(entry: dict, key: str, length: int) -> list[int]:
    value = need(entry, key, list)
    if len(value) != length or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                       for v in value):
        raise FormatError(f"layer {entry.get('name')!r}: field {key!r} must be {length} positive integers")
    return value


def need_rank(entry: dict, shape: tuple[int, int]) -> int:
    rank = need(entry, "rank", int)
    if not 1 <= rank <= min(shape):
        raise FormatError(f"layer {entry.get('name')!r}: rank {rank} outside [1, {min(shape)}] "
                          f"for its {shape[0]}x{shape[1]} weight")
    return rank


def _describe(module: nn.Module) -> str:
    w = getattr(module, "weight", None)
    return f"{type(module).__name__} with weight {tuple(w.shape)}" if isinstance(w, torch.Tensor) \
        else type(module).__name__


COMPUTING_METHODS = ("forward", "_conv_forward")  # what a subclass may override to compute otherwise


class LayerKind:
    """One layer type. ``dense`` is the module type compressed (None: not compressible by
    compress_), ``low_rank`` the type put in its place, ``name`` what svdcompress.json says."""

    name: str
    dense: type | str | None  # a class, or "module.QualName" of a class
    low_rank: type

    def matrix(self, module: nn.Module) -> torch.Tensor:
        """The dense module's weight as an (out, in') matrix (a view where possible)."""
        return module.weight.reshape(module.weight.shape[0], -1)

    def why_dense(self, module: nn.Module) -> KeepDense | None:
        """A reason this particular module cannot be factorised, or None."""
        return None

    def own_computation(self, module: nn.Module) -> str | None:
        """The name of the subclass when ``module`` is a subclass of this kind's dense type
        that computes its own way (a ``forward`` or ``_conv_forward`` of its own, e.g. a
        convolution that pads asymmetrically first): the low-rank layer, built from the base
        type's attributes, would compute something else, so such a module stays dense."""
        for cls in type(module).__mro__:
            if _matches(self.dense, cls):
                if cls is type(module):
                    return None
                own = any(getattr(type(module), m, None) is not getattr(cls, m, None)
                          for m in COMPUTING_METHODS)
                return type(module).__name__ if own else None
        return None

    def inputs(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The rows (N, in') that the weight matrix multiplies, from the module's input ``x``."""
        return x.reshape(-1, x.shape[-1])

    def replace(self, module: nn.Module, u: torch.Tensor, v: torch.Tensor) -> nn.Module:
        raise NotImplementedError

    def entry(self, layer: nn.Module) -> dict:
        """What svdcompress.json records about a low-rank layer of this kind."""
        raise NotImplementedError

    def rebuild(self, entry: dict, current: nn.Module) -> nn.Module:
        """An empty low-rank layer of the entry's shape, checked against the model's module."""
        raise NotImplementedError

    def macs(self, module: nn.Module, out: torch.Tensor) -> int:
        """Multiply-adds of one forward pass that produced ``out`` (dense or low-rank module)."""
        raise NotImplementedError


class LinearKind(LayerKind):
    name, dense, low_rank = "linear", nn.Linear, LowRankLinear

    def why_dense(self, module):
        # nn.MultiheadAttention reads out_proj.weight itself instead of calling the module
        if type(module).__name__ == "NonDynamicallyQuantizableLinear":
            return KeepDense.READ_DIRECTLY
        return None

    def replace(self, module, u, v):
        return LowRankLinear.from_factors(u, v, module.bias)

    def entry(self, layer):
        return {"rank": layer.rank, "bias": layer.bias is not None,
                "in_features": layer.in_features, "out_features": layer.out_features}

    def _shape(self, entry, current) -> tuple[int, int]:
        n, m = need(entry, "in_features", int), need(entry, "out_features", int)
        if getattr(current, "in_features", None) != n or getattr(current, "out_features", None) != m:
            raise FormatError(f"layer {entry['name']!r}: saved as {m}x{n} but the model's module is "
                              f"{_describe(current)}")
        return m, n

    def rebuild(self, entry, current):
        m, n = self._shape(entry, current)
        return self.low_rank(n, m, need_rank(entry, (m, n)), bias=need(entry, "bias", bool),
                             device=current.weight.device, dtype=current.weight.dtype)

    def macs(self, module, out):
        rows = out.numel() // out.shape[-1] if out.dim() else 1
        if isinstance(module, LowRankLinear):
            return rows * module.rank * (module.in_features + module.out_features)
        return rows * module.in_features * module.out_features


class ProjectedKind(LinearKind):
    """Dynamic SVD training's layer: made by project_, saved and loaded like the others."""

    name, dense, low_rank = "projected", None, ProjectedLinear

    def entry(self, layer):
        return {**super().entry(layer), "options": layer.options()}

    def rebuild(self, entry, current):
        m, n = self._shape(entry, current)
        try:
            return ProjectedLinear(n, m, need_rank(entry, (m, n)), bias=need(entry, "bias", bool),
                                   **need(entry, "options", dict), device=current.weight.device,
                                   dtype=current.weight.dtype)
        except (TypeError, ValueError) as err:
            raise FormatError(f"layer {entry['name']!r}: invalid projection options: {err}") from None

    def macs(self, module, out):
        rows = out.numel() // out.shape[-1] if out.dim() else 1
        return rows * module.rank * (module.in_features + module.out_features)


class Int8LinearKind(LinearKind):
    """A low-rank Linear with int8 factors (``quantize_``): saved and loaded like the others,
    its int8 factors and float32 scales in the safetensors file."""

    name, dense, low_rank = "linear-int8", None, Int8LowRankLinear

    def rebuild(self, entry, current):
        m, n = self._shape(entry, current)
        return Int8LowRankLinear(n, m, need_rank(entry, (m, n)), bias=need(entry, "bias", bool),
                                 device=current.weight.device, dtype=current.weight.dtype)

    def macs(self, module, out):
        rows = out.numel() // out.shape[-1] if out.dim() else 1
        return rows * module.rank * (module.in_features + module.out_features)


class Conv2dKind(LayerKind):
    name, dense, low_rank, dims = "conv2d", nn.Conv2d, LowRankConv2d, 2

    def why_dense(self, module):
        return KeepDense.GROUPED_CONV if module.groups != 1 else None

    def inputs(self, module, x):
        # pad explicitly as the conv would (any padding mode, also padding="same"), then
        # unfold into the patches the weight matrix multiplies (1-D convs as 1 x k images)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        one = (1,) * (2 - self.dims)
        if self.dims == 1:
            x = x.unsqueeze(2)
        cols = F.unfold(x, one + tuple(module.kernel_size), dilation=one + tuple(module.dilation),
                        stride=one + tuple(module.stride))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def replace(self, module, u, v):
        return self.low_rank.from_factors(module, u, v)

    def entry(self, layer):
        return {"rank": layer.rank, "bias": layer.bias is not None,
                "in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
                "dilation": list(layer.dilation), "padding_mode": layer.padding_mode,
                "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding)}

    def rebuild(self, entry, current):
        cin, cout = need(entry, "in_channels", int), need(entry, "out_channels", int)
        if getattr(current, "in_channels", None) != cin or getattr(current, "out_channels", None) != cout:
            raise FormatError(f"layer {entry['name']!r}: saved as conv {cin}->{cout} channels but "
                              f"the model's module is {_describe(current)}")
        d = self.dims
        kernel = need_dims(entry, "kernel_size", d)
        padding = entry.get("padding", 0)
        if not (padding in ("same", "valid") or isinstance(padding, int) and padding >= 0 or
                isinstance(padding, list) and len(padding) == d and
                all(isinstance(p, int) and p >= 0 for p in padding)):
            raise FormatError(f"layer {entry['name']!r}: field 'padding' is invalid")
        mode = entry.get("padding_mode", "zeros")
        if mode not in ("zeros", "reflect", "replicate", "circular"):
            raise FormatError(f"layer {entry['name']!r}: field 'padding_mode' is invalid")
        rank = need_rank(entry, (cout, cin * math.prod(kernel)))
        return self.low_rank(cin, cout, kernel, rank, stride=need_dims(entry, "stride", d),
                             padding=padding, dilation=need_dims(entry, "dilation", d),
                             bias=need(entry, "bias", bool), padding_mode=mode,
                             device=current.weight.device, dtype=current.weight.dtype)

    def macs(self, module, out):
        positions = out.numel() // out.shape[1]
        if isinstance(module, self.low_rank):
            return positions * module.rank * (module.v[0].numel() + module.out_channels)
        return out.numel() * module.weight[0].numel()


class Conv1dKind(Conv2dKind):
    name, dense, low_rank, dims = "conv1d", nn.Conv1d, LowRankConv1d, 1


_KINDS: dict[str, LayerKind] = {}


def register_kind(kind: LayerKind) -> LayerKind:
    """Add a layer kind (an integration calls this when it is imported)."""
    if kind.name in _KINDS and type(_KINDS[kind.name]) is not type(kind):
        raise ValueError(f"a layer kind named {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


ENTRY_POINTS = "svdcompress.kinds"
_loaded_entry_points = False


def _load_entry_points() -> None:
    """Kinds that integrations declare as entry points (e.g. transformers' Conv1D), loaded
    on the first lookup: a user's GPT-2 compresses without importing the integration."""
    global _loaded_entry_points
    if not _loaded_entry_points:
        _loaded_entry_points = True
        for ep in entry_points(group=ENTRY_POINTS):
            register_kind(ep.load())


def _matches(declared, cls: type) -> bool:
    """A kind names its type as a class, or as "module.QualName" so that it need not
    import the library that defines it."""
    return declared is cls or declared == f"{cls.__module__}.{cls.__qualname__}"


def _by_type(module: nn.Module, attr: str) -> LayerKind | None:
    _load_entry_points()
    for cls in type(module).__mro__:  # the most specific registered type wins
        for kind in _KINDS.values():
            if _matches(getattr(kind, attr), cls):
                return kind
    return None


def low_rank_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a layer svdcompress put in (low-rank or projected), or None."""
    return _by_type(module, "low_rank")


def dense_kind(module: nn.Module) -> LayerKind | None:
    """The kind that compresses this dense module, or None (also for svdcompress's own layers)."""
    return None if low_rank_kind(module) is not None else _by_type(module, "dense")


def any_kind(module: nn.Module) -> LayerKind | None:
    return low_rank_kind(module) or dense_kind(module)


def kind_named(name) -> LayerKind:
    _load_entry_points()
    if not isinstance(name, str) or name not in _KINDS:
        raise FormatError(f"unknown kind {name!r} (known: {', '.join(sorted(_KINDS))})")
    return _KINDS[name]


for _kind in (LinearKind(), ProjectedKind(), Int8LinearKind(), Conv2dKind(), Conv1dKind()):
    register_kind(_kind)
