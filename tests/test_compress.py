import pytest
import torch
from torch import nn

import svdcompress as sc
from svdcompress.core.rank import truncation_error


def rows(report):
    return {r.name: r for r in report.layers}


def test_default_compresses_everything_but_output_and_grouped(toy):
    report = sc.compress_(toy, sc.SVDConfig(rank=2))
    r = rows(report)
    assert isinstance(toy.block.conv, sc.LowRankConv2d)
    assert isinstance(toy.block.proj, sc.LowRankLinear)
    assert all(isinstance(m, sc.LowRankLinear) for m in toy.mlp)
    assert type(toy.head[1]) is nn.Linear and r["head.1"].reason is sc.KeepDense.OUTPUT_LAYER
    assert type(toy.block.dw) is nn.Conv2d and r["block.dw"].reason is sc.KeepDense.GROUPED_CONV


def test_exact_parameter_counts(toy):
    report = sc.compress_(toy, sc.SVDConfig(rank=2))
    r = rows(report)
    assert (r["block.proj"].params_before, r["block.proj"].params_after) == (128 * 32 + 32, 2 * (128 + 32) + 32)
    assert (r["block.conv"].params_before, r["block.conv"].params_after) == (8 * 27 + 8, 2 * (8 + 27) + 8)
    assert (r["mlp.0"].params_before, r["mlp.0"].params_after) == (32 * 24 + 24, 2 * 56 + 24)
    assert r["head.1"].params_before == r["head.1"].params_after == 24 * 5 + 5
    assert report.params_before == sum(x.params_before for x in report.layers)
    # the model's real parameter count agrees with the report
    assert sum(p.numel() for p in toy.parameters()) == report.params_after
    assert "total:" in str(report) and "output layer" in str(report)


def test_report_error_matches_layer(toy):
    w = toy.mlp[0].weight.detach().clone()
    report = sc.compress_(toy, sc.SVDConfig(rank=3))
    err = torch.linalg.norm(w - toy.mlp[0].dense_weight().detach()) / torch.linalg.norm(w)
    assert rows(report)["mlp.0"].rel_error == pytest.approx(float(err), rel=1e-4)
    assert rows(report)["mlp.0"].rel_error == pytest.approx(truncation_error(torch.linalg.svdvals(w), 3))


def test_layer_that_would_not_save_stays_dense(toy):
    report = sc.compress_(toy, sc.SVDConfig(rank=20))  # mlp.1 is 24x24: 20*48 >= 576
    assert type(toy.mlp[1]) is nn.Linear
    assert rows(report)["mlp.1"].reason is sc.KeepDense.NO_SAVING
    assert rows(report)["mlp.1"].note.endswith("saves no parameters")


@pytest.mark.parametrize("target,exclude,expected", [
    (r"mlp\.\d", None, {"mlp.0", "mlp.1"}),
    (["proj"], None, {"block.proj"}),
    (None, ["conv", "mlp.1"], {"block.proj", "mlp.0"}),
    (r"block\..*", r".*conv", {"block.proj"}),
])
def test_name_filters(toy, target, exclude, expected):
    report = sc.compress_(toy, sc.SVDConfig(rank=2, target_modules=target, exclude_modules=exclude))
    assert {r.name for r in report.compressed} == expected


def test_output_layer_can_be_compressed_when_asked(toy):
    sc.compress_(toy, sc.SVDConfig(rank=2, skip_output_layer=False))
    assert isinstance(toy.head[1], sc.LowRankLinear)


def test_gradients_reach_factors_and_model_trains(toy, toy_input):
    sc.compress_(toy, sc.SVDConfig(rank=2))
    opt = torch.optim.Adam(toy.parameters(), lr=1e-2)
    target = torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(toy(toy_input), target)
        opt.zero_grad()
        loss.backward()
        assert toy.mlp[0].u.grad is not None and toy.block.conv.v.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_full_rank_keeps_outputs(toy, toy_input):
    toy.double()
    before = toy(toy_input.double())
    sc.compress_(toy, sc.SVDConfig(energy=1.0, exclude_modules=["mlp.1", "block.conv"]))
    torch.testing.assert_close(toy(toy_input.double()), before)


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        sc.SVDConfig()
    with pytest.raises(ValueError, match="exactly one"):
        sc.SVDConfig(rank=2, ratio=0.5)
    with pytest.raises(ValueError, match="energy"):
        sc.SVDConfig(energy=2.0)
    with pytest.raises(ValueError, match="target_modules"):
        sc.SVDConfig(rank=2, target_modules="(")
    with pytest.raises(ValueError, match="exclude_modules"):
        sc.SVDConfig(rank=2, exclude_modules=[1])
    cfg = sc.SVDConfig(ratio=0.3, target_modules=["a", "b"])
    assert sc.SVDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        sc.SVDConfig.from_dict({"rank": 2, "bogus": 1})


def test_config_takes_numpy_scalars_as_numbers():
    np = pytest.importorskip("numpy")
    cfg = sc.SVDConfig(ratio=np.float32(0.5), damping=np.float64(0.1), round_to=np.int64(8))
    assert (cfg.ratio, cfg.damping, cfg.round_to) == (0.5, 0.1, 8)
    assert {type(cfg.ratio), type(cfg.damping), type(cfg.round_to)} == {float, int}
    assert sc.SVDConfig(rank=np.int64(4)).rank == 4
    with pytest.raises(ValueError, match="rank must be an integer"):
        sc.SVDConfig(rank=np.bool_(True))


def test_densify_undoes(toy, toy_input):
    sc.compress_(toy, sc.SVDConfig(rank=2))
    out = toy(toy_input)
    sc.densify_(toy)
    assert not any(isinstance(m, (sc.LowRankLinear, sc.LowRankConv2d)) for m in toy.modules())
    torch.testing.assert_close(toy(toy_input), out, atol=1e-5, rtol=1e-5)
