"""Int8 factors: quantize_, dequantize_, their save/load, and the quantize command."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import svdcompress as sc
from svdcompress.core.layers import quantize_rows
from svdcompress.core.report import model_size
from svdcompress.study.models import MLP
from tests.test_guarantees import one_line_exit_2


def compressed_mlp(rank=32):
    torch.manual_seed(0)
    net = MLP(40, [256, 192], 10)
    sc.compress_(net, sc.SVDConfig(rank=rank))
    return net


def test_rows_are_quantized_symmetrically_within_half_a_step():
    t = torch.randn(30, 17) * torch.logspace(-3, 2, 30)[:, None]
    t[3] = 0
    q, scale = quantize_rows(t)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.dtype == torch.float32
    assert (q.abs().amax(1)[torch.arange(30) != 3] == 127).all()  # each row uses the whole range
    assert ((q.float() * scale[:, None] - t).abs() <= scale[:, None] / 2 + 1e-6 * t.abs()).all()
    assert scale[3] == 1 and (q[3] == 0).all()


def test_int8_factors_stay_close_to_the_float_ones_and_take_a_quarter_of_the_bytes():
    net = compressed_mlp()
    x = torch.randn(256, 40, generator=torch.Generator().manual_seed(1))
    q = copy.deepcopy(net)
    assert sc.quantize_(q) == 2  # the hidden layers (the output layer stays dense)
    with torch.no_grad():
        ref, got = net(x), q(x)
    # stated tolerance: 2% of the output's norm (per-row int8: about 0.5% per factor)
    assert float((got - ref).norm() / ref.norm()) < 0.02
    float_bytes = sum(m.u.numel() + m.v.numel() for m in net.modules() if isinstance(m, sc.LowRankLinear)) * 4
    int8 = [m for m in q.modules() if isinstance(m, sc.Int8LowRankLinear)]
    int8_bytes = sum(m.u_int8.numel() + m.v_int8.numel() + 4 * (m.u_scale.numel() + m.v_scale.numel())
                     for m in int8)
    assert int8_bytes < 0.3 * float_bytes
    assert model_size(q)["bytes"] < model_size(net)["bytes"]  # the int8 factors count as bytes held
    assert not any(p.requires_grad for m in int8 for p in m.parameters())


def test_an_int8_layers_weight_stand_in_answers_without_dequantizing(monkeypatch):
    """Model code may read ``layer.weight.dtype`` in every forward pass: for int8 factors
    that must not dequantize a factor."""
    q = copy.deepcopy(compressed_mlp())
    sc.quantize_(q)
    layer = next(m for m in q.modules() if isinstance(m, sc.Int8LowRankLinear))
    monkeypatch.setattr(sc.Int8LowRankLinear, "u", property(lambda self: pytest.fail("dequantized u")))
    w = layer.weight
    assert (w.dtype, w.device, w.is_cuda, w.requires_grad) == (torch.float32, torch.device("cpu"), False, False)
    assert w.shape == (layer.out_features, layer.in_features)


def test_int8_run_saves_and_loads_bit_exactly(tmp_path):
    q = compressed_mlp()
    sc.quantize_(q)
    sc.save(q, tmp_path / "run")
    with safe_open(str(tmp_path / "run" / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["hidden.0.u_int8"] == "I8" and dtypes["hidden.0.u_scale"] == "F32"
    loaded = sc.load(tmp_path / "run")
    for key, value in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(8, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert {e["kind"] for e in sc.read_meta(tmp_path / "run")["layers"]} == {"linear-int8"}


def test_dequantize_gives_the_float_factors_the_int8_ones_stand_for():
    q = compressed_mlp()
    sc.quantize_(q)
    back = sc.dequantize_(copy.deepcopy(q))
    layer, int8 = back.hidden[0], q.hidden[0]
    assert type(layer) is sc.LowRankLinear and layer.u.requires_grad
    assert torch.equal(layer.u.detach(), int8.u) and torch.equal(layer.v.detach(), int8.v)
    requant = copy.deepcopy(back)
    sc.quantize_(requant)
    assert torch.equal(requant.hidden[0].u_int8, int8.u_int8)  # quantizing twice changes nothing
    x = torch.randn(4, 40)
    with torch.no_grad():
        torch.testing.assert_close(back(x), q(x), rtol=1e-5, atol=1e-6)


def test_quantize_refuses_what_it_cannot_do():
    with pytest.raises(sc.ConfigError, match="nothing to quantize: the model has no low-rank layer"):
        sc.quantize_(nn.Sequential(nn.Linear(4, 4)))
    q = compressed_mlp()
    sc.quantize_(q)
    with pytest.raises(sc.ConfigError, match="int8 already"):
        sc.quantize_(q)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 2))
    sc.compress_(conv, sc.SVDConfig(rank=2, target_modules=["0"]))
    with pytest.raises(sc.ConfigError, match="LowRankLinear layers only, the model's low-rank layers are 1 x"):
        sc.quantize_(conv)
    with pytest.raises(sc.ConfigError, match="low-rank already"):
        sc.compress_(q, sc.SVDConfig(rank=2))
    with pytest.raises(sc.ConfigError, match="quantize must be one of"):
        sc.quantize_(compressed_mlp(), "int4")


def test_quantize_command_makes_an_int8_run_of_a_causal_lm_that_generates(runs, tmp_path, capsys):
    from svdcompress.cli import main
    src, run = runs
    out = tmp_path / "int8"
    assert main(["quantize", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "21 low-rank Linear layer(s) now hold int8 factors" in printed
    model = sc.load(out)
    assert sum(isinstance(m, sc.Int8LowRankLinear) for m in model.modules()) == 21
    assert main(["generate", str(out), "--prompt", "the quick model reads", "--max-new-tokens", "6",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 6
    one_line_exit_2(capsys, "quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "x"),
                    message="missing")
    one_line_exit_2(capsys, "quantize", str(src), "--out", str(tmp_path / "y"), message="")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # never over (or inside) its own source, even with --overwrite (a probe's finding: the
    # float run was replaced by its int8 copy)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    one_line_exit_2(capsys, "quantize", str(run), "--out", str(run), "--overwrite", message="source")
    one_line_exit_2(capsys, "quantize", str(run), "--out", str(run / "sub"), message="source")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert sc.read_info(out).source == str(run.resolve())  # absolute: valid from anywhere


from tests.test_generate import runs  # noqa: E402,F401  (fixture: a rank-4 Llama and its run)
