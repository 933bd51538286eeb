"""The two registries: layer kinds (compress_, save/load, calibration, bench ask it) and
architectures (load rebuilds a registered model from its JSON spec)."""

import pytest
import torch
from torch import nn

import svdcompress as sc
from svdcompress.core import archs, kinds
from svdcompress.core.kinds import LinearKind, dense_kind, kind_named, low_rank_kind
from svdcompress.integrations.bench import count_macs


class Scaled(nn.Module):
    """A user's layer type: y = 2 * x W^T. No built-in kind knows it."""

    def __init__(self, n, m):
        super().__init__()
        self.in_features, self.out_features = n, m
        self.weight = nn.Parameter(torch.randn(m, n))
        self.bias = None

    def forward(self, x):
        return 2 * x @ self.weight.T


class LowRankScaled(sc.LowRankLinear):
    def forward(self, x):
        return 2 * super().forward(x)


class ScaledKind(LinearKind):
    name, dense, low_rank = "scaled", Scaled, LowRankScaled

    def replace(self, module, u, v):
        return LowRankScaled.from_factors(u, v, None)

    def rebuild(self, entry, current):
        layer = super().rebuild(entry, current)
        return LowRankScaled(layer.in_features, layer.out_features, layer.rank, bias=False)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 12)
        self.conv1d = nn.Conv1d(12, 12, 3)
        self.bilinear = nn.Bilinear(12, 12, 12)
        self.norm = nn.LayerNorm(12)
        self.scaled = Scaled(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)
        h = self.norm(self.conv1d(h).mean(-1))
        return self.out(self.scaled(self.bilinear(h, h)))


def test_unsupported_module_types_are_reported_by_name_never_guessed():
    torch.manual_seed(0)
    net = Net()
    report = sc.compress_(net, sc.SVDConfig(rank=2))
    rows = {r.name: r for r in report.layers}
    for name, typename in (("bilinear", "Bilinear"), ("scaled", "Scaled")):
        assert rows[name].reason is sc.KeepDense.UNSUPPORTED and rows[name].kind == typename
        assert f"unsupported module type: {typename}" in str(report)
    assert type(net.bilinear) is nn.Bilinear and type(net.scaled) is Scaled  # left alone
    assert rows["emb"].reason is sc.KeepDense.EMBEDDING and rows["norm"].reason is sc.KeepDense.VECTOR
    assert isinstance(net.conv1d, sc.LowRankConv1d)  # a built-in kind


def test_a_model_with_nothing_to_compress_is_an_error_that_says_why():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with pytest.raises(sc.ConfigError, match="nothing to compress: every matching module stays "
                       r"dense \(1 x embedding.*1 x norm or vector parameters only, 1 x output layer\)"):
        sc.compress_(model, sc.SVDConfig(rank=2))
    with pytest.raises(sc.ConfigError, match="no module matches the target modules"):
        sc.compress_(model, sc.SVDConfig(rank=2, target_modules=["nope"]))


def test_a_registered_kind_is_used_by_compress_save_load_and_bench(tmp_path, monkeypatch):
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))  # registered for this test only
    sc.register_kind(ScaledKind())
    torch.manual_seed(0)
    net = Net()
    ids = torch.randint(0, 10, (4, 7))
    report = sc.compress_(net, sc.SVDConfig(rank=2, target_modules=["scaled"], skip_output_layer=False))
    assert [r.name for r in report.compressed] == ["scaled"] and report.compressed[0].kind == "scaled"
    assert isinstance(net.scaled, LowRankScaled) and low_rank_kind(net.scaled).name == "scaled"
    sc.save(net, tmp_path)
    torch.manual_seed(1)
    loaded = sc.load(tmp_path, model=Net())
    assert isinstance(loaded.scaled, LowRankScaled)
    assert torch.equal(loaded(ids), net(ids))
    # the factorised layer costs rank 2 * (12 + 12) multiply-adds per row instead of 12 * 12
    assert count_macs(Net(), {"ids": ids}) - count_macs(loaded, {"ids": ids}) == 4 * (144 - 2 * 24)


def test_kind_lookup_is_by_type_and_never_confuses_our_layers():
    assert dense_kind(nn.Linear(3, 3)).name == "linear"
    assert dense_kind(nn.Conv2d(3, 3, 1)).name == "conv2d"
    assert dense_kind(sc.LowRankLinear(3, 3, 1)) is None
    assert dense_kind(sc.ProjectedLinear(3, 3, 1)) is None  # a Linear subclass, but ours
    assert low_rank_kind(sc.ProjectedLinear(3, 3, 1)).name == "projected"
    assert dense_kind(nn.Embedding(3, 3)) is None
    with pytest.raises(sc.FormatError, match="unknown kind 'nope'"):
        kind_named("nope")


class Toy(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.width = width
        self.a = nn.Linear(width, width)

    def forward(self, x):
        return self.a(x)

    def arch_spec(self):
        return {"name": "toy-test", "width": self.width}


def test_a_registered_architecture_loads_without_code(tmp_path, monkeypatch):
    monkeypatch.setattr(archs, "_ARCHS", dict(archs._ARCHS))
    sc.register_architecture(sc.Architecture("toy-test", lambda spec, directory: Toy(spec["width"])))
    m = Toy(6)
    sc.save(m, tmp_path)
    loaded = sc.load(tmp_path)
    assert isinstance(loaded, Toy) and loaded.width == 6
    assert torch.equal(loaded.a.weight, m.a.weight)


def test_builtin_architectures_come_from_entry_points_and_unknown_ones_are_named(tmp_path):
    from svdcompress.core.archs import architecture
    assert architecture("mlp").name == "mlp" and architecture("hf-encoder").name == "hf-encoder"
    with pytest.raises(sc.FormatError, match="unknown architecture 'nope'.*mlp"):
        architecture("nope")
