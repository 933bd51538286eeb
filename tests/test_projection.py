import pytest
import torch
from torch import nn

import svdcompress as sc
from svdcompress.study import MLP
from svdcompress.core.projection import ProjectedLinear
from svdcompress.core.projection import exact_factors, projection_error, subspace_iteration


def decaying(m, n, seed=0, decay=0.85):
    """A matrix with a trained-weight-like spectrum: a decaying head over a noise floor."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    k = min(m, n)
    s = 10 * decay ** torch.arange(k, dtype=torch.float64) + 0.05
    return (u[:, :k] * s) @ v[:, :k].T


def test_straight_through_gradient_equals_dense_gradient_at_projection():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9).double()
    proj = ProjectedLinear.from_linear(lin, 4)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)  # extra batch dim
    out = proj(x)
    u, v, _ = exact_factors(lin.weight, 4)
    dense = nn.Linear(12, 9).double()
    with torch.no_grad():
        dense.weight.copy_(u @ v)
        dense.bias.copy_(lin.bias)
    x2 = x.detach().clone().requires_grad_(True)
    ref = dense(x2)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(proj.weight.grad, dense.weight.grad)  # dL/dP handed to W
    torch.testing.assert_close(proj.bias.grad, dense.bias.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_subspace_tracking_matches_exact_along_drifting_matrices():
    torch.manual_seed(0)
    w = decaying(64, 48)
    layer = ProjectedLinear(48, 64, 8, dtype=torch.float64, max_iters=1)
    g = torch.Generator().manual_seed(1)
    errors = []
    for step in range(60):
        with torch.no_grad():
            layer.weight.copy_(w)
        u, v = layer.factors()
        errors.append(projection_error(u, v, w, 8))
        w = w + 2e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64)  # slow drift
    assert int(layer.steps) == 60 and layer.last_iters == 1  # tracked, not refreshed
    assert max(errors[5:]) < 1e-3, max(errors[5:])


def test_subspace_iteration_converges_from_a_random_start():
    w = decaying(40, 30, seed=3).float()
    basis = torch.linalg.qr(torch.randn(30, 12)).Q
    u, s, v = subspace_iteration(w, basis, iters=30)
    d = 5
    assert projection_error(u[:, :d], s[:d, None] * v[:, :d].T, w, d) < 1e-4


def test_eval_uses_exact_projection_cached_and_equals_unprojected():
    torch.manual_seed(0)
    model = MLP(20, [16, 16], 3)
    sc.project_(model, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 20)
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    layer = model.hidden[0]
    first = layer.factors()
    assert layer.factors() is first  # cached while W does not change
    y = model(x)
    sc.unproject_(model)
    assert isinstance(model.hidden[0], sc.LowRankLinear) and model.hidden[0].rank == 4
    torch.testing.assert_close(model(x), y)
    assert type(model.out) is nn.Linear


def test_cache_invalidated_when_weight_changes():
    layer = ProjectedLinear(6, 5, 2).eval()
    a = layer.factors()
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert layer.factors() is not a


def test_project_keeps_parameters_so_optimizer_stays_valid():
    model = MLP(10, [8], 2)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = sc.project_(model, 3)
    assert names == ["hidden.0"] and isinstance(model.hidden[0], ProjectedLinear)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    before = model.hidden[0].weight.detach().clone()
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.hidden[0].weight)


def test_exact_method_and_refresh():
    torch.manual_seed(0)
    layer = ProjectedLinear(30, 20, 5, method="exact")
    u, v = layer.factors()
    ue, ve, _ = exact_factors(layer.weight, 5)
    torch.testing.assert_close(u @ v, ue @ ve)
    tracked = ProjectedLinear(30, 20, 5, refresh_every=3)
    for _ in range(4):
        with torch.no_grad():
            tracked.weight.add_(0.01)
        tracked.factors()
    assert int(tracked.steps) == 4 and tracked.last_iters == 0  # step 3 was an exact refresh


def test_save_load_projected_and_unprojected(tmp_path):
    torch.manual_seed(0)
    model = MLP(20, [16, 16], 3)
    sc.project_(model, 4, oversample=2)
    x = torch.randn(5, 20)
    model(x)  # a training step initialises the tracker's buffers
    sc.save(model, tmp_path / "proj")
    loaded = sc.load(tmp_path / "proj")
    assert isinstance(loaded.hidden[0], ProjectedLinear) and loaded.hidden[0].oversample == 2
    assert torch.equal(loaded.hidden[0].basis, model.hidden[0].basis)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))
    sc.unproject_(model)
    sc.save(model, tmp_path / "lowrank")
    torch.testing.assert_close(sc.load(tmp_path / "lowrank")(x), model(x))


@pytest.mark.parametrize("rank", [0, -2, 2.5, "4", True])
def test_bad_ranks_rejected(rank):
    with pytest.raises(ValueError, match="rank"):
        sc.project_(MLP(10, [8], 2), rank)
    with pytest.raises(ValueError, match="rank"):
        ProjectedLinear(10, 8, rank)


def test_rank_above_layer_size_and_bad_options():
    with pytest.raises(ValueError, match="at most"):
        ProjectedLinear(10, 8, 9)
    with pytest.raises(ValueError, match="method"):
        ProjectedLinear(10, 8, 2, method="fast")
    with pytest.raises(ValueError, match="max_iters"):
        ProjectedLinear(10, 8, 2, max_iters=0)
    assert sc.project_(MLP(10, [8], 2), 50) == ["hidden.0"]  # clamped to the layer's size


@pytest.mark.parametrize("opt_kwargs", [{}, {"fused": True}, {"foreach": True}])
def test_training_follows_weight_under_every_optimizer_kernel(opt_kwargs):
    """Fused optimisers update W in place without bumping its version: the training
    projection must still follow W, and eval must not reuse a stale projection."""
    torch.manual_seed(0)
    model = MLP(24, [20, 20], 3).double()
    sc.project_(model, 4, max_iters=3, tol=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **opt_kwargs)
    x = torch.randn(16, 24, dtype=torch.float64)
    model.eval()
    stale = model(x)
    model.train()
    for _ in range(5):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer = model.hidden[1]
    u, v = layer.factors()  # a training step on the current W
    assert projection_error(u, v, layer.weight, 4) < 1e-3
    model.eval()
    fresh = model(x)
    assert not torch.allclose(fresh, stale)
    ue, ve, _ = exact_factors(layer.weight, 4)
    torch.testing.assert_close(layer.factors()[0] @ layer.factors()[1], (ue @ ve).to(torch.float64))
