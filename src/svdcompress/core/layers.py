"""Low-rank layers: a weight W (m x n) held as two trainable factors, W = u @ v.

``u`` (m x D) is the output factor and carries the bias; ``v`` (D x n) is the input factor.
Both layers keep the device and dtype of the layer they replace and have a ``to_dense()``
inverse.

A Linear layer's factors are each stored with their long side contiguous in memory: ``v``
(D x n) row by row, ``u`` (m x D) column by column (a transposed view of a D x m tensor,
``out_major``). One token's product streams each factor from memory, and on a CPU the
matrix-vector kernels read a thin matrix stored the other way more slowly
(benchmarks/factor_layout.py measures the whole model): an SVD-compressed model decoded 1.40x faster
than its dense original with u stored row by row, 1.59x with u column by column. Many rows
at once (prefill, training) are indifferent to it. ``state_dict()`` holds u itself (it
shares memory with the parameter, as for any module), so code that needs contiguous tensors
(safetensors' ``save_file``) takes ``.contiguous()``; ``sc.save`` does, and files hold values
only. Torch utilities that view a parameter flat (``parameters_to_vector``, LBFGS,
unstructured pruning) do not take u as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .factorize import truncated_factors


def check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be an integer >= 1, got {rank!r}")


def _fill(dense: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


class FactoredWeight:
    """What ``layer.weight`` of a low-rank layer answers, so that model code written for the
    dense layer keeps working (a ViT reads its patch projection's ``weight.dtype`` in its
    forward pass): the dense weight's ``dtype``, ``device`` and ``shape`` without forming it.
    Called (``layer.weight()``, as before), handed to a torch function, or asked anything
    else, it is the dense product ``u @ v``, formed on demand. Read-only: the factors are
    the parameters."""

    __slots__ = ("_layer",)

    def __init__(self, layer: nn.Module) -> None:
        self._layer = layer

    dtype = property(lambda self: self._layer.factor_dtype)
    device = property(lambda self: self._layer.factor_device)
    shape = property(lambda self: self._layer.dense_shape)
    ndim = property(lambda self: len(self._layer.dense_shape))
    is_cuda = property(lambda self: self._layer.factor_device.type == "cuda")
    requires_grad = property(lambda self: self._layer.factor_requires_grad)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return math.prod(self.shape)

    def __call__(self) -> torch.Tensor:
        return self._layer.dense_weight()

    def __getattr__(self, name: str):
        return getattr(self._layer.dense_weight(), name)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"FactoredWeight(shape={tuple(self.shape)}, rank={self._layer.rank}, "
                f"dtype={self.dtype}, device={self.device})")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def dense(x):
            if isinstance(x, FactoredWeight):
                return x()
            if isinstance(x, (list, tuple)):
                return type(x)(dense(y) for y in x)
            return x
        return func(*dense(args), **{k: dense(v) for k, v in (kwargs or {}).items()})


def _dense_op(name: str):
    return lambda self, *args: getattr(self(), name)(*args)


for _op in ("__matmul__", "__rmatmul__", "__mul__", "__rmul__", "__add__", "__radd__", "__sub__",
            "__rsub__", "__truediv__", "__neg__", "__getitem__", "__eq__", "__ne__"):
    setattr(FactoredWeight, _op, _dense_op(_op))


def out_major(rows: int, cols: int, **kw) -> torch.Tensor:
    """An uninitialised (rows x cols) tensor stored column by column (its transpose is
    contiguous): the layout an output factor u (m x D, m >= D) is read fastest in."""
    return torch.empty(cols, rows, **kw).T


def _init_factors(u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> None:
    # Same scheme as nn.Linear for each factor; loaded or SVD-initialised layers overwrite it.
    nn.init.kaiming_uniform_(v, a=math.sqrt(5))
    nn.init.kaiming_uniform_(u, a=math.sqrt(5))
    if bias is not None:
        nn.init.zeros_(bias)


class _FactoredLinear(nn.Module):
    """What the two Linear layers of factors share: the dense weight's stand-in and shape,
    the dense product u @ v, and the dense layer it stands for."""

    in_features: int
    out_features: int
    rank: int

    @property
    def weight(self) -> FactoredWeight:
        """The dense weight's stand-in: dtype, device and shape, and ``weight()`` = u @ v."""
        return FactoredWeight(self)

    @property
    def dense_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    # what the factors compute in, where, and whether they train (the weight stand-in's
    # dtype, device, requires_grad), read without forming a factor
    factor_dtype = property(lambda self: self.u.dtype)
    factor_device = property(lambda self: self.u.device)
    factor_requires_grad = property(lambda self: self.u.requires_grad)

    def dense_weight(self) -> torch.Tensor:
        """The dense (m x n) weight u @ v."""
        return self.u @ self.v

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        u = self.u
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=u.device, dtype=u.dtype)
        return _fill(dense, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class LowRankLinear(_FactoredLinear):
    """``x -> u (v x) + b``: a Linear layer of rank D as two matmuls."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None, init: bool = True) -> None:
        super().__init__()
        check_rank(rank)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(out_major(out_features, rank, **kw))  # (see the module's docstring)
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        if init:  # (from_factors fills them: no random draw, the caller's generator is untouched)
            _init_factors(self.u, self.v, self.bias)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None) -> "LowRankLinear":
        layer = cls(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None,
                    device=u.device, dtype=u.dtype, init=False)
        with torch.no_grad():
            layer.u.copy_(u)
            layer.v.copy_(v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """The best rank-D approximation of ``linear`` (truncated SVD)."""
        check_rank(rank)
        rank = min(rank, *linear.weight.shape)
        u, v = truncated_factors(linear.weight, rank)
        return cls.from_factors(u, v, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)


def _tuple(x, dims: int) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * dims


class _LowRankConv(nn.Module):
    """A convolution of rank D: a conv with the original kernel to D channels, then a
    pointwise conv to the outputs. The weight (out, in, *kernel) is factorised as the matrix
    (out, in * prod(kernel)); the input factor keeps the original stride, padding, dilation
    and padding mode. Grouped convolutions are not supported (they stay dense)."""

    dims: int
    dense_type: type
    conv = None  # F.conv1d or F.conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int,
                 stride=1, padding=0, dilation=1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, init: bool = True) -> None:
        super().__init__()
        check_rank(rank)
        kw = {"device": device, "dtype": dtype}
        d = self.dims
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride, self.dilation = (
            _tuple(kernel_size, d), _tuple(stride, d), _tuple(dilation, d))
        self.padding = padding if isinstance(padding, str) else _tuple(padding, d)
        self.padding_mode = padding_mode
        # torch's conv works out the explicit padding for non-zero padding modes (also for
        # padding="same"); borrow it from a shapeless conv on the meta device.
        probe = self.dense_type(1, 1, self.kernel_size, padding=self.padding, dilation=self.dilation,
                                padding_mode=padding_mode, device="meta")
        self._pad = tuple(probe._reversed_padding_repeated_twice)
        self.v = nn.Parameter(torch.empty(rank, in_channels, *self.kernel_size, **kw))
        self.u = nn.Parameter(torch.empty(out_channels, rank, *(1,) * d, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        if init:
            _init_factors(self.u, self.v, self.bias)

    @classmethod
    def from_factors(cls, conv: nn.Module, u: torch.Tensor, v: torch.Tensor):
        """Build from the matrix factors u (out x D), v (D x in*prod(kernel)) of ``conv``'s weight."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, u.shape[1],
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=u.device, dtype=u.dtype, init=False)
        with torch.no_grad():
            layer.u.copy_(u.reshape(layer.u.shape))
            layer.v.copy_(v.reshape(layer.v.shape))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int):
        """The best rank-D approximation of ``conv``'s (out, in*prod(kernel)) weight matrix."""
        check_rank(rank)
        if conv.groups != 1:
            raise ConfigError("grouped convolutions cannot be factorised (groups != 1)")
        w = conv.weight.reshape(conv.out_channels, -1)
        u, v = truncated_factors(w, min(rank, *w.shape))
        return cls.from_factors(conv, u, v)

    @property
    def weight(self) -> FactoredWeight:
        """The dense weight's stand-in: dtype, device and shape, and ``weight()`` the product."""
        return FactoredWeight(self)

    @property
    def dense_shape(self) -> torch.Size:
        return torch.Size((self.out_channels, self.in_channels, *self.kernel_size))

    def dense_weight(self) -> torch.Tensor:
        """The dense (out, in, *kernel) weight."""
        w = self.u.reshape(self.out_channels, self.rank) @ self.v.reshape(self.rank, -1)
        return w.reshape(self.dense_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = type(self).conv
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            h = conv(x, self.v, None, self.stride, 0, self.dilation)
        else:
            h = conv(x, self.v, None, self.stride, self.padding, self.dilation)
        return conv(h, self.u, self.bias)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        dense = self.dense_type(self.in_channels, self.out_channels, self.kernel_size,
                                stride=self.stride, padding=self.padding, dilation=self.dilation,
                                bias=self.bias is not None, padding_mode=self.padding_mode,
                                device=self.u.device, dtype=self.u.dtype)
        return _fill(dense, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"rank={self.rank}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, bias={self.bias is not None}")


class LowRankConv2d(_LowRankConv):
    """A Conv2d of rank D: a kh x kw conv to D channels, then a 1x1 conv to the outputs."""

    dims, dense_type, conv = 2, nn.Conv2d, staticmethod(F.conv2d)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, rank: int) -> "LowRankConv2d":
        return cls.from_conv(conv, rank)


class LowRankConv1d(_LowRankConv):
    """A Conv1d of rank D: a conv of kernel k to D channels, then a pointwise conv."""

    dims, dense_type, conv = 1, nn.Conv1d, staticmethod(F.conv1d)

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d, rank: int) -> "LowRankConv1d":
        return cls.from_conv(conv, rank)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per row: t ~ q * scale[:, None], |q| <= 127
    (an all-zero row gets scale 1)."""
    t32 = t.detach().float()
    scale = t32.abs().amax(1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(t32 / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


class Int8LowRankLinear(_FactoredLinear):
    """A ``LowRankLinear`` whose factors are stored in int8 with a float32 scale per row of
    each (per output of u, per rank direction of v): a quarter of float32's bytes, in the
    run's file and in memory. ``x -> ((x v_q^T) * v_scale) u_q^T * u_scale + b``, each factor
    converted to the input's dtype as it is used: on CPUs without int8 dot-product
    instructions torch's int8 kernels are slower than that (docs/inference.md has the
    measurements). Not trainable: ``dequantize_`` gives float factors back."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        check_rank(rank)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.compute_dtype = dtype or torch.get_default_dtype()
        frozen = lambda t: nn.Parameter(t.zero_(), requires_grad=False)  # noqa: E731
        zeros = lambda *shape, dt: frozen(torch.empty(*shape, dtype=dt, device=device))  # noqa: E731
        # u_int8 in u's layout (converted as it is used, the float copy keeps it)
        self.u_int8 = frozen(out_major(out_features, rank, dtype=torch.int8, device=device))
        self.u_scale = zeros(out_features, dt=torch.float32)
        self.v_int8, self.v_scale = zeros(rank, in_features, dt=torch.int8), zeros(rank, dt=torch.float32)
        self.bias = zeros(out_features, dt=self.compute_dtype) if bias else None

    @classmethod
    def from_low_rank(cls, layer: LowRankLinear) -> "Int8LowRankLinear":
        out = cls(layer.in_features, layer.out_features, layer.rank, bias=layer.bias is not None,
                  device=layer.u.device, dtype=layer.u.dtype)
        with torch.no_grad():
            for name, factor in (("u", layer.u), ("v", layer.v)):
                q, scale = quantize_rows(factor)
                getattr(out, f"{name}_int8").copy_(q)
                getattr(out, f"{name}_scale").copy_(scale)
            if layer.bias is not None:
                out.bias.copy_(layer.bias)
        return out

    # the int8 factors' stand-in answers without dequantizing (model code may read
    # ``weight.dtype`` in every forward pass)
    factor_dtype = property(lambda self: self.compute_dtype)
    factor_device = property(lambda self: self.u_int8.device)
    factor_requires_grad = False

    @property
    def u(self) -> torch.Tensor:
        """The dequantized output factor (m x D), in the compute dtype."""
        return (self.u_int8.float() * self.u_scale[:, None]).to(self.compute_dtype)

    @property
    def v(self) -> torch.Tensor:
        return (self.v_int8.float() * self.v_scale[:, None]).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.v_int8.to(x.dtype)) * self.v_scale.to(x.dtype)
        y = F.linear(h, self.u_int8.to(x.dtype)) * self.u_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @torch.no_grad()
    def to_float(self) -> LowRankLinear:
        """The float factors these int8 ones stand for (exactly their dequantized values)."""
        return LowRankLinear.from_factors(self.u, self.v, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 factors"
