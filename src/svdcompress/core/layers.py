"""Low-rank layers: a weight W (m x n) held as two trainable factors, W = u @ v.

``u`` (m x D) is the output factor and carries the bias; ``v`` (D x n) is the input factor.
Both layers keep the device and dtype of the layer they replace and have a ``to_dense()``
inverse.
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


def _init_factors(u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> None:
    # Same scheme as nn.Linear for each factor; loaded or SVD-initialised layers overwrite it.
    nn.init.kaiming_uniform_(v, a=math.sqrt(5))
    nn.init.kaiming_uniform_(u, a=math.sqrt(5))
    if bias is not None:
        nn.init.zeros_(bias)


class LowRankLinear(nn.Module):
    """``x -> u (v x) + b``: a Linear layer of rank D as two matmuls."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        check_rank(rank)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        _init_factors(self.u, self.v, self.bias)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None) -> "LowRankLinear":
        layer = cls(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None,
                    device=u.device, dtype=u.dtype)
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

    def weight(self) -> torch.Tensor:
        """The dense (m x n) weight u @ v."""
        return self.u @ self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.u.device, dtype=self.u.dtype)
        return _fill(dense, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


def _pair(x) -> tuple[int, int]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class LowRankConv2d(nn.Module):
    """A Conv2d of rank D: a kh x kw conv to D channels, then a 1x1 conv to the outputs.

    The weight (out, in, kh, kw) is factorised as the matrix (out, in*kh*kw); the input
    factor keeps the original stride, padding, dilation and padding mode. Grouped
    convolutions are not supported (they stay dense when compressing).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int,
                 stride=1, padding=0, dilation=1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__()
        check_rank(rank)
        kw = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride, self.dilation = (
            _pair(kernel_size), _pair(stride), _pair(dilation))
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        # nn.Conv2d works out the explicit padding for non-zero padding modes (also for
        # padding="same"); borrow it from a shapeless conv on the meta device.
        probe = nn.Conv2d(1, 1, self.kernel_size, padding=self.padding, dilation=self.dilation,
                          padding_mode=padding_mode, device="meta")
        self._pad = tuple(probe._reversed_padding_repeated_twice)
        self.v = nn.Parameter(torch.empty(rank, in_channels, *self.kernel_size, **kw))
        self.u = nn.Parameter(torch.empty(out_channels, rank, 1, 1, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        _init_factors(self.u, self.v, self.bias)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, u: torch.Tensor, v: torch.Tensor) -> "LowRankConv2d":
        """Build from the matrix factors u (out x D), v (D x in*kh*kw) of ``conv``'s weight."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, u.shape[1],
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=u.device, dtype=u.dtype)
        with torch.no_grad():
            layer.u.copy_(u.reshape(layer.u.shape))
            layer.v.copy_(v.reshape(layer.v.shape))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, rank: int) -> "LowRankConv2d":
        """The best rank-D approximation of ``conv``'s (out, in*kh*kw) weight matrix."""
        check_rank(rank)
        if conv.groups != 1:
            raise ConfigError("grouped convolutions cannot be factorised (groups != 1)")
        w = conv.weight.reshape(conv.out_channels, -1)
        u, v = truncated_factors(w, min(rank, *w.shape))
        return cls.from_factors(conv, u, v)

    def weight(self) -> torch.Tensor:
        """The dense (out, in, kh, kw) weight."""
        w = self.u.reshape(self.out_channels, self.rank) @ self.v.reshape(self.rank, -1)
        return w.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            h = F.conv2d(x, self.v, None, self.stride, 0, self.dilation)
        else:
            h = F.conv2d(x, self.v, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.u, self.bias)

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                          stride=self.stride, padding=self.padding, dilation=self.dilation,
                          bias=self.bias is not None, padding_mode=self.padding_mode,
                          device=self.u.device, dtype=self.u.dtype)
        return _fill(dense, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"rank={self.rank}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, bias={self.bias is not None}")
