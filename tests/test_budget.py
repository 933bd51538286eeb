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
from svdcompress.core.fit import candidates, fit_layer, held_out_error, scores, strongly_damped
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
    for name, make in candidates(w, True, 1e-2, strong=strongly_damped(stats, w)).items():
        scores[name] = held_out_error(w, *split(make(*stats.fit), 4), stats.held)
    assert label == min(scores, key=scores.get)
    refit = candidates(w, True, 1e-2, strong=strongly_damped(stats, w))[label](stats.gram, stats.cross)
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
    reference = candidates(w, sequential, 1e-2, strong=strongly_damped(stats, w))
    for rank in range(1, min(shape) + 1):
        fast = scores(w, rank, stats, 1e-2)
        assert fast.keys() == reference.keys()
        for label, make in reference.items():
            exact = held_out_error(w, *split(make(*stats.fit), rank), stats.held)
            assert fast[label] == pytest.approx(exact, rel=1e-9, abs=1e-12), (label, rank)


@pytest.mark.parametrize("shape", [(20, 9), (9, 9), (3, 16)])
def test_unchanged_inputs_score_no_compensated_candidate_and_choose_as_the_reference(shape):
    """Sequential calibration where a layer's inputs did not change (the first block's): the
    compensated candidates are the whitened fit over again, so they are not scored (shared
    basis, output side, and weighted cross moments that are all zero), and the fit chosen is
    the reference's (whose tie between them goes to the whitened fit)."""
    from svdcompress.core.calibrate import Stats
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    stats = layer_stats(shape[1], True, seed=7, rows=40, noise=0.0)
    assert stats.paired
    fits = candidates(w, True, 1e-2, strong=strongly_damped(stats, w))
    assert any(k.startswith("compensated") for k in fits)
    for rank in range(1, min(shape)):
        found = scores(w, rank, stats, 1e-2)
        assert set(found) == {"plain", "whiten"}
        exact = {k: held_out_error(w, *split(f(*stats.fit), rank), stats.held) for k, f in fits.items()}
        assert fit_layer(w, rank, stats, 1e-2)[1] == min(exact, key=exact.get)
    if shape[0] < shape[1]:  # a wide layer alone on its input: W (A - G) = 0
        m, n = shape
        weighted = Stats(None, None, stats.rows, fit=(stats.fit[0], torch.zeros(m, n, dtype=torch.float64)),
                         held=(stats.held[0], torch.zeros(m, n, dtype=torch.float64)), weights=stats.weights)
        weighted.weighted = True
        found = scores(w, 2, weighted, 1e-2)
        assert set(found) == {"plain", "whiten"}
        assert found["whiten"] == pytest.approx(scores(w, 2, stats, 1e-2)["whiten"], rel=1e-9)


@pytest.mark.parametrize("shape", [(40, 48), (64, 32), (24, 96)])
@pytest.mark.parametrize("shared_basis", [False, True])
def test_float32_weights_are_scored_in_float32_close_to_the_float64_scores(shape, shared_basis):
    """A float32 layer's candidates are scored in float32 (eigendecompositions and products;
    the shared basis and the ridge solves stay float64): within 1e-4 of the output energy
    of the float64 scores, and the same candidate wins where the float64 scores are not
    within that of each other."""
    from svdcompress.core.fit import _basis
    g = torch.Generator().manual_seed(sum(shape))
    w64 = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, shape[1])
    stats = layer_stats(shape[1], True, seed=shape[0], rows=60, batches=4, noise=0.2)
    if shared_basis:
        _basis(stats)
    for rank in (2, min(shape) // 3, min(shape) - 1):
        exact = scores(w64, rank, stats, 1e-2)
        fast = scores(w64.float(), rank, stats, 1e-2)
        energy = abs(min(exact.values()))
        for label in exact:
            assert abs(fast[label] - exact[label]) <= 1e-4 * energy, (label, rank)
        ordered = sorted(exact.values())
        if ordered[1] - ordered[0] > 2e-4 * energy:
            assert min(fast, key=fast.get) == min(exact, key=exact.get)
        # the choice itself: close calls are redone in float64, so it is the exact scores' choice
        assert fit_layer(w64.float(), rank, stats, 1e-2)[1] == min(exact, key=exact.get)


def test_a_close_call_in_float32_is_decided_in_float64(monkeypatch):
    """Candidates whose float32 scores are within CLOSE_CALL of each other are scored again
    in float64: the label is the exact scores' choice."""
    from svdcompress.core import fit as fit_module
    w64 = torch.randn(40, 48, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    stats = layer_stats(48, True, seed=9, rows=60, batches=4)
    exact = scores(w64, 10, stats, 1e-2)
    calls = []
    real = fit_module.scores
    monkeypatch.setattr(fit_module, "scores", lambda w, *a: calls.append(w.dtype) or real(w, *a))
    monkeypatch.setattr(fit_module, "CLOSE_CALL", 1.0)  # every call is close
    assert fit_layer(w64.float(), 10, stats, 1e-2)[1] == min(exact, key=exact.get)
    assert calls == [torch.float32, torch.float64]
    calls.clear()
    monkeypatch.setattr(fit_module, "CLOSE_CALL", 0.0)  # none is
    fit_layer(w64.float(), 10, stats, 1e-2)
    assert calls == [torch.float32]


def test_a_close_call_rescores_only_the_candidates_close_to_the_best(monkeypatch):
    """The float64 rescoring covers just the candidates whose float32 scores lie within the
    window of the best (no other can be the exact best): the two nearest here, not all six."""
    from svdcompress.core import fit as fit_module
    w64 = torch.randn(40, 48, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    stats = layer_stats(48, True, seed=9, rows=60, batches=4)
    exact = scores(w64, 10, stats, 1e-2)
    f32 = scores(w64.float(), 10, stats, 1e-2)
    ordered = sorted(f32, key=f32.get)
    largest = max(abs(v) for v in f32.values())
    gap, next_gap = f32[ordered[1]] - f32[ordered[0]], f32[ordered[2]] - f32[ordered[0]]
    assert next_gap > gap  # (the data make the window hold exactly two)
    monkeypatch.setattr(fit_module, "CLOSE_CALL", (gap + next_gap) / 2 / largest)
    asked = []
    real = fit_module.scores
    monkeypatch.setattr(fit_module, "scores",
                        lambda w, *a: asked.append((w.dtype, a[3] if len(a) > 3 else None)) or real(w, *a))
    assert fit_layer(w64.float(), 10, stats, 1e-2)[1] == min(exact, key=exact.get)
    assert asked == [(torch.float32, None), (torch.float64, set(ordered[:2]))]


def test_a_close_call_on_the_output_side_reuses_its_float64_solves(monkeypatch):
    """A wide layer scored from its output side solves S = R (G + k s I)^-1 in float64 once
    per shrink: the float64 rescoring of a close call reuses those solves (no Cholesky
    factorisation again) and its scores are those of a float64 scoring from scratch."""
    from svdcompress.core import fit as fit_module
    w64 = torch.randn(24, 96, generator=torch.Generator().manual_seed(2)).double()  # float32 values
    stats = layer_stats(96, True, seed=2, rows=60, batches=4)
    exact = scores(w64, 6, stats, 1e-2)
    memo = {}
    scores(w64.float(), 6, stats, 1e-2, None, memo)
    assert scores(w64, 6, stats, 1e-2, None, memo) == exact
    factorised = []
    real = fit_module.damped_cholesky
    monkeypatch.setattr(fit_module, "damped_cholesky", lambda *a: factorised.append(1) or real(*a))
    monkeypatch.setattr(fit_module, "CLOSE_CALL", 1.0)  # every call is close
    assert fit_layer(w64.float(), 6, stats, 1e-2)[1] == min(exact, key=exact.get)
    assert len(factorised) == len(fit_module.SHRINK)


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
    fits = candidates(w, sequential, 1e-2, strong=strongly_damped(stats, w))
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
             for k, f in candidates(w, True, 1e-2, strong=strongly_damped(stats, w)).items()}
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


class LogitHead(nn.Module):
    """Inputs -> a hidden layer -> class logits (the model says its outputs are logits)."""

    output_is_logits = True

    def __init__(self, width=8, classes=5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(width, width, generator=g) / 3)
            self.head.weight.copy_(torch.randn(classes, width, generator=g))

    def forward(self, x):
        return self.head(self.hidden(x))


@pytest.mark.parametrize("chunk", [2 ** 24, 2 ** 10])
def test_fisher_sensitivity_of_logits_is_the_trace_of_the_fisher_information(chunk, monkeypatch):
    """At the logits z of a softmax, the Fisher information is diag(p) - p p^T, whose trace
    is 1 - sum p^2: the sensitivity (per logit, a mean over rows) is its mean over rows / C;
    one layer back, J^T F J with J the head's weight. The same when each batch is passed in
    slices of rows (a language model's logits: CHUNK_ELEMENTS at a time)."""
    from svdcompress.core import sensitivity as sensitivity_module
    from svdcompress.core.compress import _run_batch
    from svdcompress.core.sensitivity import fisher_sensitivities
    monkeypatch.setattr(sensitivity_module, "CHUNK_ELEMENTS", chunk)
    net = LogitHead()
    xs = [torch.randn(5000, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    found = fisher_sensitivities(net, {"hidden": net.hidden, "head": net.head}, xs, _run_batch)
    with torch.no_grad():
        p = torch.softmax(net(torch.cat(xs)).double(), -1)
        fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # per row, C x C
        w = net.head.weight.double()
        at_hidden = torch.einsum("ij,rjk,kl->ril", w.T, fisher, w)  # W^T F W per row
    assert found["head"] == pytest.approx(float((1 - p.square().sum(1)).mean()) / 5, rel=0.03)
    assert found["hidden"] == pytest.approx(
        float(torch.diagonal(at_hidden, dim1=1, dim2=2).sum(1).mean()) / 8, rel=0.03)


def test_fisher_sensitivity_of_other_outputs_is_the_squared_jacobian_norm():
    """An output that is not logits (an embedding): a Gaussian projection's gradient has
    E||J^T r||^2 = ||J||_F^2, so the hidden layer's sensitivity is ||W_head||_F^2 / width."""
    from svdcompress.core.compress import _run_batch
    from svdcompress.core.sensitivity import fisher_sensitivities
    net = LogitHead()
    net.output_is_logits = False
    xs = [torch.randn(5000, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    found = fisher_sensitivities(net, {"hidden": net.hidden, "head": net.head}, xs, _run_batch)
    assert found["head"] == pytest.approx(1.0, rel=0.03)
    assert found["hidden"] == pytest.approx(float(net.head.weight.detach().square().sum()) / 8, rel=0.03)


def test_fisher_sensitivities_leave_the_model_and_the_random_state_as_they_were():
    from svdcompress.core.compress import _run_batch
    from svdcompress.core.sensitivity import fisher_sensitivities
    net = LogitHead().train()
    net.hidden.weight.requires_grad_(False)  # a user's frozen layer stays frozen
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(16, 8)
    state = torch.get_rng_state()
    fisher_sensitivities(net, {"hidden": net.hidden}, [x], _run_batch)
    assert torch.equal(state, torch.get_rng_state())
    assert net.training and not net.hidden.weight.requires_grad and net.head.weight.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert not net.hidden._forward_hooks
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("seed", range(4))
def test_fisher_allocation_finds_the_loud_layer_without_trial_truncations(seed, monkeypatch):
    """allocation="fisher" weighs each layer as loss-aware does, from gradients: on a
    network whose output reads one layer 30 times louder, the sensitivities differ by about
    30^2 as the measured ones do, and the output error is below uniform ranks' and
    truncation-loss's; no layer is truncated alone and no trial compression runs."""
    from svdcompress.core import compress as compress_module
    monkeypatch.setattr(compress_module, "sensitivity", lambda *a, **k: pytest.fail("a trial truncation"))
    torch.manual_seed(seed)
    net = Amplified()
    calib = [torch.randn(128, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    test_x = torch.randn(1000, 32, generator=torch.Generator().manual_seed(100 + seed))
    errs = {}
    for alloc in ("uniform", "truncation-loss", "fisher"):
        model = copy.deepcopy(net)
        report = sc.compress_(model, sc.SVDConfig(ratio=0.3, method="whiten", allocation=alloc), calib)
        errs[alloc] = output_error(net, model, test_x)
    found = report.allocation
    assert found["objective"] == "fisher" and "trials" not in found
    assert found["chosen"] == "fisher" and found["output_distance"]["fisher"] == min(found["output_distance"].values())
    assert 300 < found["sensitivity"]["b"] / found["sensitivity"]["a"]
    ranks = {r.name: r.rank for r in report.considered()}
    assert ranks["b"] > ranks["a"]
    assert errs["fisher"] < min(errs["uniform"], errs["truncation-loss"])  # 0.60-0.94 of it, seeds 0-3


def test_fisher_allocation_on_a_causal_lm_keeps_the_budget_and_the_blockwise_path(monkeypatch):
    """A tiny Llama: sensitivities for every block linear layer, ranks under the budget,
    fitted block by block (no per-layer inputs recorded)."""
    transformers = pytest.importorskip("transformers")
    from svdcompress.core import compress as compress_module
    from tests.test_transformers import batches, llama
    monkeypatch.setattr(compress_module, "record_inputs", lambda *a, **k: pytest.fail("per-layer path"))
    model = llama()
    report = sc.compress_(model, sc.SVDConfig(ratio=0.5, method="whiten", allocation="fisher"), batches(4))
    found = report.allocation
    linear = [r for r in report.considered() if r.kind == "linear"]
    assert set(found["sensitivity"]) == {r.name for r in linear}
    assert all(v > 0 for v in found["sensitivity"].values())
    assert len(set(found["sensitivity"].values())) == len(linear)  # each measured, none floored alike
    kept = sum(r.rank * sum(r.shape) if r.rank else r.shape[0] * r.shape[1] for r in linear)
    assert kept <= 0.5 * sum(r.shape[0] * r.shape[1] for r in linear)
    assert found["chosen"] in found["output_distance"]
    with torch.no_grad():
        assert torch.isfinite(model(**batches(1)[0])).all()


@pytest.mark.parametrize("seed", range(4))
def test_allocation_by_price_is_within_the_budget_and_near_the_exact_optimum(seed, monkeypatch):
    """A language model's hundreds of layers make the exact program take minutes: above
    MAX_WORK steps a price per parameter chooses; on problems the exact program solves, it
    keeps the budget and loses at most a few percent more (0.0-2.9% on these)."""
    from svdcompress.core import rank as rank_module
    rng = np.random.default_rng(seed)
    curves = {}
    for i in range(24):
        m, n = int(rng.integers(8, 96)), int(rng.integers(8, 96))
        s2 = np.sort(rng.gamma(0.5, size=min(m, n)))[::-1]
        curves[f"l{i}"] = ((s2.sum() - np.cumsum(s2)) * rng.uniform(0.01, 100), (m, n))
    total = sum(m * n for _, (m, n) in curves.values())

    def outcome(ranks):
        loss = sum(float(curves[n][0][r - 1]) if r else 0.0 for n, r in ranks.items())
        cost = sum(r * sum(curves[n][1]) if r else curves[n][1][0] * curves[n][1][1] for n, r in ranks.items())
        return loss, cost

    for share in (0.2, 0.5, 0.8):
        budget = int(share * total)
        exact = outcome(allocate(curves, budget))
        monkeypatch.setattr(rank_module, "MAX_WORK", 0)
        priced = outcome(allocate(curves, budget))
        monkeypatch.undo()
        assert priced[1] <= budget
        assert exact[0] <= priced[0] <= 1.05 * exact[0]


def test_a_language_model_sized_allocation_takes_the_price_path(monkeypatch):
    from svdcompress.core import rank as rank_module
    called = []
    real = rank_module._allocate_by_price
    monkeypatch.setattr(rank_module, "_allocate_by_price", lambda *a: called.append(1) or real(*a))
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    rng = np.random.default_rng(0)
    curves = {}
    for i, (m, n) in enumerate(shapes):
        s2 = np.sort(rng.gamma(0.5, size=min(m, n)))[::-1]
        curves[f"l{i}"] = (s2.sum() - np.cumsum(s2), (m, n))
    budget = int(0.6 * sum(m * n for m, n in shapes))
    ranks = allocate(curves, budget)
    assert called and sum(r * (m + n) if r else m * n for r, (m, n) in zip(ranks.values(), shapes)) <= budget


def test_output_distance_of_logits_in_slices_equals_the_whole():
    from svdcompress.core import sensitivity as sensitivity_module
    from svdcompress.core.compress import _run_batch
    net = LogitHead()
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.head.weight.mul_(1.1)
    xs = [torch.randn(300, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    whole = sensitivity_module.OutputDistance(net, xs, _run_batch)(other)
    sensitivity_module.CHUNK_ELEMENTS, before = 35, sensitivity_module.CHUNK_ELEMENTS
    try:
        sliced = sensitivity_module.OutputDistance(net, xs, _run_batch)(other)
    finally:
        sensitivity_module.CHUNK_ELEMENTS = before
    assert whole > 0 and sliced == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("outputs", [24, 60])  # fewer outputs than inputs: the output side
def test_scores_of_some_candidates_equal_those_of_all(outputs):
    w = torch.randn(outputs, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    everything = scores(w, 6, layer_stats(48, True, seed=4, rows=60, batches=4), 1e-2)
    some = {"whiten", "compensated shrink=0.1"}
    picked = scores(w, 6, layer_stats(48, True, seed=4, rows=60, batches=4), 1e-2, some)
    assert picked.keys() == some
    for k in some:
        assert picked[k] == pytest.approx(everything[k], rel=1e-12)
