"""Accuracy at a budget: fits chosen on held-out rows, loss-aware rank allocation."""

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import svdcompress as sc
from svdcompress.core.calibrate import Moments
from svdcompress.core.factorize import split, svd, whitened_svd
from svdcompress.core.fit import candidates, fit_layer, held_out_error, scores
from svdcompress.core.rank import allocate, saves_parameters


def teacher(seed=0, width=64):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                        nn.Linear(width, 8))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
    return net


def inputs(n, seed, width=64):
    """Features with a decaying spectrum, as real ones have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=torch.Generator().manual_seed(99))
    return (torch.randn(n, width, generator=g) * torch.logspace(0, -1.5, width)) @ mix


def output_error(net, compressed, x):
    with torch.no_grad():
        return float((compressed(x) - net(x)).square().mean())


def test_held_out_error_is_the_output_error_on_the_held_out_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 9, generator=g, dtype=torch.float64)
    x = torch.randn(40, 9, generator=g, dtype=torch.float64)  # original inputs
    x2 = x + 0.2 * torch.randn(40, 9, generator=g, dtype=torch.float64)  # compressed network's
    u, v = split(svd(w + 0.1), 3)
    direct = float(((x @ w.T - x2 @ (u @ v).T).square().sum(1)).mean() - (x @ w.T).square().sum(1).mean())
    held = (x2.T @ x2 / 40, x.T @ x2 / 40)
    assert held_out_error(w, u, v, held) == pytest.approx(direct, rel=1e-9)


def test_the_fit_chosen_has_the_least_held_out_error_and_is_refitted_on_all_rows():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 16, generator=g, dtype=torch.float64)
    m = Moments()
    for _ in range(3):
        x = torch.randn(20, 16, generator=g, dtype=torch.float64)
        m.add(x + 0.3 * torch.randn(20, 16, generator=g, dtype=torch.float64), x)
    stats = m.stats()
    dec, label = fit_layer(w, 4, stats, 1e-2)
    scores = {}
    for name, make in candidates(w, True, 1e-2).items():
        scores[name] = held_out_error(w, *split(make(*stats.fit), 4), stats.held)
    assert label == min(scores, key=scores.get)
    refit = candidates(w, True, 1e-2)[label](stats.gram, stats.cross)
    torch.testing.assert_close(dec.S, refit.S)
    # no selection: the compensated fit on all rows, as before
    assert fit_layer(w, 4, stats, 1e-2, select=False)[1].startswith("compensated")


def layer_stats(width, sequential, seed, rows=20, batches=3, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    m = Moments()
    for _ in range(batches):
        x = inputs(rows, seed=int(torch.randint(10**6, (1,), generator=g)), width=width).double()
        m.add(x + noise * torch.randn(rows, width, generator=g, dtype=torch.float64), x if sequential else None)
    return m.stats()


@pytest.mark.parametrize("shape", [(12, 16), (20, 9), (9, 9), (3, 16)])
@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("shared_basis", [False, True])
def test_fast_scores_equal_each_candidate_factorised_apart(shape, sequential, shared_basis):
    """The candidates' held-out errors from one shared eigendecomposition (or, for a wide
    layer whose input has none yet, from its output side) equal those of each candidate's
    own full SVD (the reference), tall and wide layers, every rank."""
    from svdcompress.core.fit import _basis
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    stats = layer_stats(shape[1], sequential, seed=sum(shape))
    if shared_basis:  # as when a square layer fed the same input was fitted first
        _basis(stats)
    reference = candidates(w, sequential, 1e-2)
    for rank in range(1, min(shape) + 1):
        fast = scores(w, rank, stats, 1e-2)
        assert fast.keys() == reference.keys()
        for label, make in reference.items():
            exact = held_out_error(w, *split(make(*stats.fit), rank), stats.held)
            assert fast[label] == pytest.approx(exact, rel=1e-9, abs=1e-12), (label, rank)


@pytest.mark.parametrize("seed", [*range(8), 18, 22, 30, "plain"])
def test_the_fit_chosen_is_the_reference_choice(seed):
    """On scarce and ample rows, parallel and sequential: the label fit_layer chooses is the
    one whose own factorisation has the least held-out error, and its factors are that
    candidate's refitted on all rows (float tolerance)."""
    if seed == "plain":  # the held-out rows are unlike the fit rows: only plain SVD holds up
        g = torch.Generator().manual_seed(5)
        sequential, w, m = False, teacher(5)[2].weight.detach().double(), Moments()
        for _ in range(4):
            m.add(torch.cat([torch.randn(15, 4, generator=g, dtype=torch.float64) @
                             torch.randn(4, 64, generator=g, dtype=torch.float64),
                             torch.randn(5, 64, generator=g, dtype=torch.float64)]))
        stats = m.stats()
    else:
        sequential, rows = seed % 2 == 0, (6, 40, 400)[seed % 3]
        w = teacher(seed)[2].weight.detach().double()
        stats = layer_stats(64, sequential, seed, rows=rows, batches=4, noise=0.05 * (seed % 4))
    fits = candidates(w, sequential, 1e-2)
    chosen = set()
    for rank in (4, 16, 40):
        exact = {k: held_out_error(w, *split(f(*stats.fit), rank), stats.held) for k, f in fits.items()}
        dec, label = fit_layer(w, rank, stats, 1e-2)
        assert label == min(exact, key=exact.get)
        u, v = split(dec, rank)
        ru, rv = split(fits[label](stats.gram, stats.cross), rank)
        torch.testing.assert_close(u @ v, ru @ rv)
        chosen.add(label)
    if seed == "plain":
        assert chosen == {"plain"}


@pytest.mark.parametrize("sequential", [True, False])
def test_whitened_default_does_not_lose_to_plain_with_few_or_many_rows(sequential):
    """With fewer calibration rows than the input width the default keeps at least plain
    SVD's accuracy on new inputs, and beats it with many rows; with few rows, the
    compensated fit without a held-out choice fits the sample and does worse."""
    test_x = inputs(2000, seed=7)
    few_rows = {True: 0.0, False: 0.0}
    for seed in range(3):
        net = teacher(seed)
        plain = copy.deepcopy(net)
        sc.compress_(plain, sc.SVDConfig(rank=6))
        e_plain = output_error(net, plain, test_x)
        for rows, batches in ((24, 2), (1024, 8)):  # 48 rows for 64 inputs; 8,192 rows
            calib = [inputs(rows, seed=100 * seed + i) for i in range(batches)]
            for select in (True, False):
                model = copy.deepcopy(net)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    sc.compress_(model, sc.SVDConfig(rank=6, method="whiten", sequential=sequential,
                                                     select_fit=select), calib)
                err = output_error(net, model, test_x)
                few = any("fewer than 4 rows per input feature" in str(w.message) for w in caught)
                assert few == (rows * batches < 4 * 64)
                if rows < 64:
                    few_rows[select] += err / e_plain
                if select:
                    assert err <= e_plain * 1.02, (rows, err, e_plain)
                    if rows > 64:
                        assert err < 0.9 * e_plain
    if sequential:
        assert few_rows[True] < 0.95 * few_rows[False]


def brute_force(curves, budget):
    options = []
    for loss, (m, n) in curves.values():
        opts = [(d * (m + n), float(loss[d - 1])) for d in range(1, min(m, n) + 1)
                if saves_parameters(d, (m, n))]
        options.append(opts + [(m * n, 0.0)])
    feasible = [sum(e for _, e in combo) for combo in itertools.product(*options)
                if sum(c for c, _ in combo) <= budget]
    return min(feasible)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_of_any_loss_curves_is_optimal_and_within_budget(seed):
    rng = np.random.default_rng(seed)
    curves = {}
    for i, shape in enumerate([(5, 7), (6, 4), (8, 8)]):
        s2 = np.sort(rng.gamma(0.5, size=min(shape)))[::-1]
        weight = rng.uniform(0.01, 100)  # a measured sensitivity
        tail = weight * (s2.sum() - np.cumsum(s2))
        curves[f"l{i}"] = (tail, shape)
    for budget in (40, 60, 90, 130):
        ranks = allocate(curves, budget)
        cost = sum(r * sum(shape) if r else shape[0] * shape[1]
                   for r, (_, shape) in zip(ranks.values(), curves.values()))
        assert cost <= budget
        loss = sum(float(tail[r - 1]) if r else 0.0 for r, (tail, _) in zip(ranks.values(), curves.values()))
        assert loss == pytest.approx(brute_force(curves, budget), abs=1e-9)


class Amplified(nn.Module):
    """Two layers of equal spectra; the output reads the second 30 times louder."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.head = nn.Linear(64, 4)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(32, 32, generator=g) / 6)
            self.b.weight.copy_(torch.randn(32, 32, generator=g) / 6)
            self.head.weight[:, 32:] *= 30

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


@pytest.mark.parametrize("seed", range(10))
def test_loss_aware_allocation_measures_sensitivity_and_beats_uniform(seed):
    torch.manual_seed(seed)  # the biases and the head: not left to whatever ran before
    net = Amplified()
    calib = [torch.randn(128, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    test_x = torch.randn(1000, 32, generator=torch.Generator().manual_seed(100 + seed))
    errs, reports = {}, {}
    for alloc in ("uniform", "global", "truncation-loss", "loss-aware"):
        model = copy.deepcopy(net)
        reports[alloc] = sc.compress_(model, sc.SVDConfig(ratio=0.3, method="whiten", allocation=alloc),
                                      calib)
        errs[alloc] = output_error(net, model, test_x)
        kept = sum(r.params_after - (r.params_before - r.shape[0] * r.shape[1]) for r in reports[alloc].considered())
        assert kept <= 0.3 * sum(r.shape[0] * r.shape[1] for r in reports[alloc].considered())
    rep = reports["loss-aware"]
    assert rep.allocation["chosen"] == "loss-aware"
    assert rep.allocation["sensitivity"]["b"] > 100 * rep.allocation["sensitivity"]["a"]
    ranks = {r.name: r.rank for r in rep.considered()}
    assert ranks["b"] > ranks["a"]
    # below every other allocation on every seed (0.52-0.94 of the best other on seeds 0-9;
    # an unseeded version of this test asserted 0.8, which whatever ran before could break)
    assert errs["loss-aware"] < min(errs["uniform"], errs["global"], errs["truncation-loss"])
    assert "allocation" in rep.to_dict() and "[whiten" in str(rep) or "[compensated" in str(rep) or "[plain" in str(rep)


def test_loss_aware_allocation_keeps_another_choice_when_it_measures_better(monkeypatch):
    """The allocation is checked against the truncation-loss, global, uniform and same-rank
    choices on the network's output, and the nearest is kept."""
    from svdcompress.core import compress as compress_module
    net = Amplified()
    calib = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    # a sensitivity that is badly wrong (the quiet layer 'a' looks 10^6 times more sensitive)
    monkeypatch.setattr(compress_module, "sensitivity",
                        lambda distance, name, trunc, trials: (1e6 if name == "a" else 1.0, []))
    model = copy.deepcopy(net)
    report = sc.compress_(model, sc.SVDConfig(ratio=0.3, allocation="loss-aware", method="whiten"), calib)
    measured = report.allocation["output_distance"]
    assert set(measured) >= {"loss-aware", "truncation-loss", "uniform"}
    chosen = report.allocation["chosen"]
    assert chosen != "loss-aware" and measured[chosen] == min(measured.values())
    assert measured[chosen] < measured["loss-aware"]
    # the ranks kept are the chosen allocation's own
    alloc = "uniform" if chosen in ("uniform", "same rank") else chosen
    other = sc.compress_(copy.deepcopy(net), sc.SVDConfig(ratio=0.3, method="whiten", allocation=alloc), calib)
    if chosen != "same rank":
        assert [r.rank for r in report.considered()] == [r.rank for r in other.considered()]


def test_plain_method_with_a_data_aware_allocation_needs_and_uses_calibration():
    net = Amplified()
    with pytest.raises(sc.ConfigError, match="needs calibration"):
        sc.compress_(copy.deepcopy(net), sc.SVDConfig(ratio=0.3, allocation="loss-aware"))
    with pytest.raises(ValueError, match="needs ratio"):
        sc.SVDConfig(rank=3, allocation="truncation-loss")
    calib = [torch.randn(64, 32) for _ in range(4)]
    report = sc.compress_(copy.deepcopy(net), sc.SVDConfig(ratio=0.3, allocation="loss-aware"), calib)
    assert all(r.fit == "plain" for r in report.compressed)
    ranks = {r.name: r.rank for r in report.considered()}
    assert ranks["b"] > ranks["a"]


def test_compression_does_not_depend_on_or_change_the_global_random_state():
    """Candidate fits are scored with a randomized SVD: its sketch comes from a fixed seed."""
    calib = [inputs(96, seed=i) for i in range(4)]
    states, net = [], teacher()
    for seed in (0, 12345):
        model = copy.deepcopy(net)
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        sc.compress_(model, sc.SVDConfig(ratio=0.3, method="whiten", allocation="loss-aware"), calib)
        assert torch.equal(before, torch.get_rng_state())  # the caller's generator is left as it was
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_a_small_rank_of_a_wide_layer_is_scored_by_a_randomized_svd_close_to_exact():
    """Layers SKETCH_FROM wide or more at a small rank: the candidates' scores from a
    randomized SVD (approximate, as the reference's were) are within 5e-3 of each one's
    exact error, and the choice is the same."""
    from svdcompress.core import fit as fit_module
    width = fit_module.SKETCH_FROM
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(width, width, generator=g, dtype=torch.float64) * torch.logspace(0, -2, width)) @ \
        torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))[0]
    stats = layer_stats(width, True, seed=4, rows=400, batches=4)
    rank = 8
    assert rank + 10 < width // 4  # the randomized branch
    fast = scores(w, rank, stats, 1e-2)
    exact = {k: held_out_error(w, *split(f(*stats.fit), rank), stats.held)
             for k, f in candidates(w, True, 1e-2).items()}
    for label in exact:
        assert fast[label] == pytest.approx(exact[label], rel=5e-3), label
    assert min(fast, key=fast.get) == min(exact, key=exact.get)


def test_sequential_per_layer_whitening_makes_no_unused_parallel_decompositions(monkeypatch):
    """With fixed ranks, the per-layer path's sequential fits collect their own statistics:
    no up-front parallel statistics or whitened SVDs are made (they were, and unused)."""
    from svdcompress.core import compress as compress_module

    def unused(*args, **kwargs):
        raise AssertionError("a parallel decomposition was made and never used")
    monkeypatch.setattr(compress_module, "_decompose", unused)
    model = teacher(0)
    sc.compress_(model, sc.SVDConfig(rank=6, method="whiten"), [inputs(64, seed=i) for i in range(4)])
    assert sum(type(m).__name__.startswith("LowRank") for m in model.modules()) == 2
