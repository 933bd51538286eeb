"""compress_: replace a model's target layers by their truncated-SVD factorisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .config import SVDConfig
from .factorize import SVD, split, svd
from .layers import LowRankConv2d, LowRankLinear
from .rank import choose_rank, factorized_params, saves_parameters, truncation_error
from .swap import candidate_modules, output_layer_name, replace_module


@dataclass
class LayerReport:
    name: str
    kind: str  # "linear" or "conv2d"
    shape: tuple[int, int]  # the factorised matrix (out, in) or (out, in*kh*kw)
    rank: int | None  # None when kept dense
    params_before: int
    params_after: int
    rel_error: float  # ||W - W_D||_F / ||W||_F (0 when dense)
    note: str = ""  # why a layer stayed dense


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def compressed(self) -> list[LayerReport]:
        return [r for r in self.layers if r.rank is not None]

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers],
                "params_before": self.params_before, "params_after": self.params_after}

    def __str__(self) -> str:
        head = f"{'layer':<28} {'shape':>12} {'rank':>6} {'params':>10} {'->':>2} {'after':>10} {'rel.err':>8}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            rank = str(r.rank) if r.rank is not None else "dense"
            err = f"{r.rel_error:.4f}" if r.rank is not None else ""
            line = (f"{r.name:<28} {shape:>12} {rank:>6} {r.params_before:>10,} {'':>2} "
                    f"{r.params_after:>10,} {err:>8}")
            lines.append(line + (f"  ({r.note})" if r.note else ""))
        ratio = self.params_after / max(1, self.params_before)
        lines.append(f"total: {self.params_before:,} -> {self.params_after:,} parameters in "
                     f"these layers ({ratio:.1%} kept)")
        return "\n".join(lines)


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w[0].numel())


def _dense_report(name, module, kind, note) -> LayerReport:
    n = sum(p.numel() for p in module.parameters(recurse=False))
    return LayerReport(name, kind, _matrix_shape(module), None, n, n, 0.0, note)


def _factorise(module: nn.Module, dec: SVD, rank: int) -> nn.Module:
    u, v = split(dec, rank)
    u, v = u.to(module.weight.dtype), v.to(module.weight.dtype)
    if isinstance(module, nn.Linear):
        new = LowRankLinear.from_factors(u, v, module.bias)
    else:
        new = LowRankConv2d.from_factors(module, u, v)
    return new.train(module.training)


def compress_(model: nn.Module, config: SVDConfig) -> CompressionReport:
    """Factorise ``model``'s target Linear/Conv2d layers in place; report each layer.

    A layer stays dense (and the report says why) when it is the output layer and
    ``config.skip_output_layer`` is set, when it is a grouped convolution, or when its
    factorisation at the chosen rank would not save parameters (D * (m + n) >= m * n).
    """
    if not isinstance(config, SVDConfig):
        raise TypeError(f"config must be an SVDConfig, got {type(config).__name__}")
    output = output_layer_name(model) if config.skip_output_layer else None
    report = CompressionReport()
    targets = list(candidate_modules(model, config.target_modules, config.exclude_modules))
    for name, module in targets:
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        if name == output:
            report.layers.append(_dense_report(name, module, kind, "output layer"))
            continue
        if kind == "conv2d" and module.groups != 1:
            report.layers.append(_dense_report(name, module, kind, "grouped conv"))
            continue
        shape = _matrix_shape(module)
        dec = svd(module.weight.reshape(shape))
        rank = choose_rank(dec.S, config.spec, shape)
        if not saves_parameters(rank, shape):
            note = f"rank {rank} saves no parameters"
            report.layers.append(_dense_report(name, module, kind, note))
            continue
        new = _factorise(module, dec, rank)
        replace_module(model, name, new)
        bias = 0 if module.bias is None else module.bias.numel()
        report.layers.append(LayerReport(
            name, kind, shape, rank, module.weight.numel() + bias,
            factorized_params(rank, shape) + bias, truncation_error(dec.S, rank)))
    return report
