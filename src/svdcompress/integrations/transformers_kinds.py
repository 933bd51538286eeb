"""The layer kind of transformers' ``Conv1D`` (GPT-2, GPT-J's ancestors, ...): a Linear
whose weight is stored transposed, (in, out). Its matrix view is W^T and its low-rank form
is a LowRankLinear. Declared as an entry point (svdcompress.kinds), so a user's GPT-2
compresses without importing anything but svdcompress; transformers itself is imported
only to rebuild a dense Conv1D."""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import FormatError, require
from ..core.kinds import LinearKind, _describe, need
from ..core.layers import LowRankLinear

CONV1D = "transformers.pytorch_utils.Conv1D"


class LowRankConv1D(LowRankLinear):
    """A transformers Conv1D of rank D: ``x -> u (v x) + b`` (what Conv1D computes as x W + b)."""

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        dense = require("transformers.pytorch_utils", extra="hf").Conv1D(self.out_features,
                                                                       self.in_features)
        dense.to(device=self.u.device, dtype=self.u.dtype)
        dense.weight.copy_(self.dense_weight().T)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        else:
            dense.bias = None
        return dense


class Conv1DKind(LinearKind):
    name, dense, low_rank = "hf-conv1d", CONV1D, LowRankConv1D

    def matrix(self, module):
        return module.weight.T  # (out, in): what the SVD factorises

    def replace(self, module, u, v):
        return LowRankConv1D.from_factors(u, v, module.bias)

    def _shape(self, entry, current):
        n, m = need(entry, "in_features", int), need(entry, "out_features", int)
        w = getattr(current, "weight", None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (n, m):
            raise FormatError(f"layer {entry['name']!r}: saved as a Conv1D {n}->{m} but the "
                              f"model's module is {_describe(current)}")
        return m, n

    def macs(self, module, out):
        rows = out.numel() // out.shape[-1] if out.dim() else 1
        if isinstance(module, LowRankLinear):
            return rows * module.rank * (module.in_features + module.out_features)
        return rows * module.weight.numel()


KIND = Conv1DKind()
