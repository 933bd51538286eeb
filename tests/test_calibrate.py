import itertools

import pytest
import torch
from torch import nn

import svdcompress as sc
from svdcompress.core.calibrate import collect, layer_inputs
from svdcompress.core.factorize import split, svd, whitened_svd
from svdcompress.core.rank import allocate_ranks, saves_parameters


def output_error(w, u, v, x):
    return float(torch.linalg.norm((w - u @ v) @ x.T))


@pytest.mark.parametrize("seed", range(6))
def test_whitened_output_error_never_above_plain(seed):
    g = torch.Generator().manual_seed(seed)
    m, n = int(torch.randint(5, 30, (1,), generator=g)), int(torch.randint(5, 30, (1,), generator=g))
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.randn(200, n, generator=g, dtype=torch.float64) @ mix + torch.randn(n, generator=g, dtype=torch.float64)
    gram = x.T @ x / len(x)
    for d in range(1, min(m, n)):
        for damping in (0.0, 1e-2):
            ew = output_error(w, *split(whitened_svd(w, gram, damping), d), x)
            ep = output_error(w, *split(svd(w), d), x)
            assert ew <= ep * (1 + 1e-9), (d, damping)


def test_white_inputs_give_plain_truncation():
    w = torch.randn(12, 9, dtype=torch.float64)
    for scale in (1.0, 7.5):
        uw, vw = split(whitened_svd(w, scale * torch.eye(9, dtype=torch.float64), 0.3), 4)
        up, vp = split(svd(w), 4)
        torch.testing.assert_close(uw @ vw, up @ vp)


def test_singular_second_moment_is_handled():
    w = torch.randn(10, 8, dtype=torch.float64)
    basis = torch.randn(3, 8, dtype=torch.float64)  # inputs live in a 3-dim subspace
    x = torch.randn(100, 3, dtype=torch.float64) @ basis
    gram = x.T @ x / 100
    dec = whitened_svd(w, gram, damping=0.0)  # Cholesky fails: eigendecomposition path
    u, v = split(dec, 3)
    assert torch.isfinite(v).all()
    # rank 3 reproduces every output on that subspace exactly
    torch.testing.assert_close((u @ v) @ x.T, w @ x.T)
    zero = whitened_svd(w, torch.zeros(8, 8, dtype=torch.float64))  # no input energy at all
    assert torch.isfinite(split(zero, 2)[1]).all()


def test_conv_layer_inputs_are_the_patches_its_weight_multiplies():
    torch.manual_seed(0)
    for kw in (dict(padding=1), dict(padding="same", padding_mode="reflect"), dict(stride=2, dilation=2)):
        conv = nn.Conv2d(3, 5, 3, bias=False, **kw).double()
        x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
        rows = layer_inputs(conv, x)
        y = conv(x)
        expect = y.permute(0, 2, 3, 1).reshape(-1, 5)
        torch.testing.assert_close(rows @ conv.weight.reshape(5, -1).T, expect)


def test_collect_streams_mean_second_moment():
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    batches = [torch.randn(10, 4) for _ in range(3)]
    stats = collect(model, {"0": lin}, batches)["0"]
    x = torch.cat(batches).double()
    torch.testing.assert_close(stats.gram, x.T @ x / 30)
    # the last quarter of each batch's rows (2 of 10) are held out, the rest fit
    held = torch.cat([b[8:] for b in batches]).double()
    fit = torch.cat([b[:8] for b in batches]).double()
    assert stats.rows == 30 and stats.cross is None
    torch.testing.assert_close(stats.held[0], held.T @ held / 6)
    torch.testing.assert_close(stats.fit[0], fit.T @ fit / 24)
    with pytest.raises(ValueError, match="no calibration inputs"):
        collect(model, {"0": lin}, [])


def test_compress_whiten_on_toy_model_beats_plain_on_outputs(toy, toy_input):
    import copy
    batches = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    ref = toy(toy_input).detach()
    errs = {}
    for method, seq in (("plain", False), ("whiten", False), ("whiten", True)):
        model = copy.deepcopy(toy)
        report = sc.compress_(model, sc.SVDConfig(rank=2, method=method, sequential=seq), batches)
        assert isinstance(model.block.conv, sc.LowRankConv2d) and isinstance(model.mlp[0], sc.LowRankLinear)
        with torch.no_grad():
            errs[(method, seq)] = float(torch.linalg.norm(model(toy_input) - ref))
        if method == "plain":  # the report's error is the layer's real relative weight error
            for r in report.compressed:
                w = toy.get_submodule(r.name).weight.detach().reshape(r.shape)
                approx = model.get_submodule(r.name).dense_weight().detach().reshape(r.shape)
                assert r.rel_error == pytest.approx(float(torch.linalg.norm(w - approx) /
                                                          torch.linalg.norm(w)), rel=1e-4)
    assert errs[("whiten", False)] < errs[("plain", False)]
    assert errs[("whiten", True)] < errs[("plain", False)]
    with pytest.raises(ValueError, match="calibration"):
        sc.compress_(copy.deepcopy(toy), sc.SVDConfig(rank=2, method="whiten"))


def test_global_allocation_respects_budget_and_reports_ranks(toy):
    batches = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    report = sc.compress_(toy, sc.SVDConfig(ratio=0.3, allocation="global", method="whiten"), batches)
    eligible = report.considered()
    budget = 0.3 * sum(r.shape[0] * r.shape[1] for r in eligible)
    kept = sum(r.rank * (r.shape[0] + r.shape[1]) if r.rank else r.shape[0] * r.shape[1] for r in eligible)
    assert kept <= budget
    assert report.compressed and all(str(r.rank) in str(report) for r in report.compressed)


def brute_force(layers, budget):
    names = list(layers)
    options = []
    for name in names:
        s, (m, n) = layers[name]
        e = s.double().square()
        opts = [(d * (m + n), float(e[d:].sum() / e.sum()), d) for d in range(1, min(m, n) + 1)
                if saves_parameters(d, (m, n))]
        options.append(opts + [(m * n, 0.0, None)])
    best = None
    for combo in itertools.product(*options):
        cost = sum(c for c, _, _ in combo)
        if cost <= budget:
            err = sum(e for _, e, _ in combo)
            if best is None or err < best[0] - 1e-12:
                best = (err, combo)
    return best[0]


@pytest.mark.parametrize("seed", range(8))
def test_allocation_is_optimal_on_small_cases(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(3, 9, (1,), generator=g)))
              for _ in range(3)]
    layers = {f"l{i}": (torch.linalg.svdvals(torch.randn(*shape, generator=g) *
                                             torch.rand(shape[1], generator=g)), shape)
              for i, shape in enumerate(shapes)}
    total = sum(m * n for m, n in shapes)
    for frac in (0.4, 0.6, 0.9):
        budget = int(frac * total)
        try:
            ranks = allocate_ranks(layers, budget)
        except ValueError:
            continue
        cost = sum(r * (m + n) if r else m * n for r, (_, (m, n)) in zip(ranks.values(), layers.values()))
        assert cost <= budget
        err = 0.0
        for name, r in ranks.items():
            s = layers[name][0].double().square()
            err += 0.0 if r is None else float(s[r:].sum() / s.sum())
        assert err <= brute_force(layers, budget) + 1e-9


def test_allocation_budget_too_small():
    layers = {"a": (torch.ones(4), (4, 4))}
    with pytest.raises(ValueError, match="ratio too small"):
        allocate_ranks(layers, 7)


@pytest.mark.parametrize("kw,field", [
    ({"rank": 2, "method": "svd"}, "method"), ({"rank": 2, "damping": -1}, "damping"),
    ({"rank": 2, "allocation": "global"}, "needs ratio"), ({"rank": 2, "sequential": 1}, "sequential"),
    ({"ratio": 0.5, "allocation": "best"}, "allocation"),
])
def test_config_validation_of_new_fields(kw, field):
    with pytest.raises(ValueError, match=field):
        sc.SVDConfig(**kw)


def test_compensated_truncation_fits_original_outputs_best():
    """min ||W X - W_D X'|| over rank D: at most what whitening W alone in the X' metric gives."""
    from svdcompress.core.factorize import compensated_svd
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 16, generator=g, dtype=torch.float64)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    x2 = x + 0.3 * torch.randn(300, 16, generator=g, dtype=torch.float64)  # perturbed inputs
    gram, cross = x2.T @ x2 / 300, x.T @ x2 / 300
    for d in (2, 5, 9):
        u, v = split(compensated_svd(w, gram, cross, damping=0.0), d)
        comp = float(torch.linalg.norm(w @ x.T - (u @ v) @ x2.T))
        u2, v2 = split(whitened_svd(w, gram, 0.0), d)
        white = float(torch.linalg.norm(w @ x.T - (u2 @ v2) @ x2.T))
        assert comp <= white * (1 + 1e-9)


def test_paired_statistics_match_direct_computation():
    from svdcompress.core.calibrate import collect_paired, record_inputs
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    compressed = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    batches = [torch.randn(7, 6) for _ in range(3)]
    run = lambda m, b: m(b)  # noqa: E731
    rows = record_inputs(original, {"2": original[2]}, batches, run)["2"]
    stats = collect_paired(compressed, "2", batches, run, rows)
    gram, cross = stats.gram, stats.cross
    x = torch.cat([torch.relu(original[0](b)) for b in batches]).double().detach()
    y = torch.cat([torch.relu(compressed[0](b)) for b in batches]).double().detach()
    torch.testing.assert_close(gram, y.T @ y / 21)
    torch.testing.assert_close(cross, x.T @ y / 21, rtol=1e-5, atol=1e-6)


def test_the_chain_check_runs_on_one_sample_of_a_uniform_batch():
    from svdcompress.core.blockwise import _one_row
    ids, mask = torch.zeros(4, 7, dtype=torch.long), torch.ones(4, 7)
    one = _one_row({"input_ids": ids, "attention_mask": mask})
    assert one["input_ids"].shape == (1, 7) and one["attention_mask"].shape == (1, 7)
    assert _one_row((ids, mask))[0].shape == (1, 7) and _one_row(ids).shape == (1, 7)
    odd = {"input_ids": ids, "extra": torch.zeros(3)}  # not one batch size: used whole
    assert _one_row(odd) is odd
    assert _one_row({"input_ids": ids, "flag": True})["input_ids"].shape == (4, 7)
    single = torch.zeros(1, 5)
    assert _one_row(single) is single


def test_moments_keep_each_statistic_once():
    """Split rows: the Stats own the two parts (the sums divided in place, no copy) and form
    the totals on demand; the parts are folded into the totals in place once the last layer
    fed them has chosen its fit, freeing the held-out part; moments turn into Stats once."""
    from svdcompress.core.calibrate import Moments
    g = torch.Generator().manual_seed(0)
    ys = [torch.randn(16, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    xs = [y + 0.1 * torch.randn(16, 5, generator=g, dtype=torch.float64) for y in ys]
    m = Moments()
    for x, y in zip(xs, ys):
        m.add(y, x)
    stats = m.stats("layer")
    y, x = torch.cat(ys), torch.cat(xs)
    torch.testing.assert_close(stats.gram, y.T @ y / 48, rtol=1e-13, atol=0)
    torch.testing.assert_close(stats.cross, x.T @ y / 48, rtol=1e-13, atol=0)
    assert stats.rows == 48 and stats.fit is not None and stats.held is not None
    with pytest.raises(RuntimeError, match="already"):
        m.stats("layer")
    with pytest.raises(RuntimeError, match="already"):
        m.add(y, x)
    gram, cross = stats.gram.clone(), stats.cross.clone()
    fit_storage = stats.fit[0].data_ptr()
    stats.consumers = 2
    stats.scored()  # one of two layers fed these inputs has chosen
    assert stats.fit is not None and stats.held is not None
    stats.scored()  # the last: folded in place
    assert stats.fit is None and stats.held is None
    assert stats.gram.data_ptr() == fit_storage and stats.gram is stats.gram  # stored, not re-formed
    torch.testing.assert_close(stats.gram, gram, rtol=1e-13, atol=0)
    torch.testing.assert_close(stats.cross, cross, rtol=1e-13, atol=0)
    uncounted = Moments()
    uncounted.add(y)
    kept = uncounted.stats()
    kept.scored()  # not counted (consumers None): the parts stay
    assert kept.fit is not None and kept.cross is None


def test_a_padding_mask_applies_only_to_rows_laid_out_as_it_is():
    from svdcompress.core.padding import mask_for, row_mask
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    keep = row_mask({"input_ids": ids, "attention_mask": mask})
    assert keep.tolist() == (mask != 0).tolist()
    assert row_mask({"input_ids": ids, "attention_mask": mask.float()}).tolist() == keep.tolist()  # any dtype
    assert row_mask({"input_ids": ids, "attention_mask": torch.ones(2, 5)}) is None  # nothing masked
    assert row_mask({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids}) is None  # encoder's
    assert mask_for(torch.randn(2, 5, 8), keep).numel() == 10  # (B, T, d)
    assert mask_for(torch.randn(10, 8), keep).numel() == 10  # flattened batch-major (OPT's MLP)
    assert mask_for(torch.randn(5, 2, 8), keep) is None  # sequence-first: every row kept
    assert mask_for(torch.randn(2, 8, 5, 5), keep) is None  # an image
    square = row_mask({"attention_mask": torch.tensor([[1, 0], [1, 1]])})
    assert mask_for(torch.randn(2, 2, 8), square) is None  # B = T: the layout cannot be told


def test_blockwise_masks_only_the_rows_laid_out_batch_major(monkeypatch):
    """A block whose MLP runs sequence-first: its rows are kept whole (not masked by count),
    as the per-layer path keeps them; the batch-major layer's padded rows are dropped."""
    from torch import nn
    from svdcompress.core import calibrate

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, h):
            h = h + self.a(h)  # batch-major (B, T, d)
            return h + self.b(h.transpose(0, 1)).transpose(0, 1)  # sequence-first (T, B, d)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.blocks = nn.Embedding(20, 8), nn.ModuleList([Block(), Block()])

        def forward(self, input_ids, attention_mask):
            h = self.emb(input_ids)
            for b in self.blocks:
                h = b(h)
            return h
    seen = {}
    real = calibrate.Moments.add

    def add(self, y, x=None):
        seen.setdefault(id(self), []).append(y.shape[0])
        return real(self, y, x)
    monkeypatch.setattr(calibrate.Moments, "add", add)
    torch.manual_seed(0)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[:, 5:] = 0
    data = [{"input_ids": torch.randint(0, 20, (3, 7)), "attention_mask": mask} for _ in range(2)]
    for blockwise in (True, False):
        seen.clear()
        sc.compress_(Net(), sc.SVDConfig(rank=2, method="whiten", blockwise=blockwise), data)
        assert sorted(sum(v) for v in seen.values()) == [30, 30, 42], (blockwise, seen)  # (the last b: output layer)


def test_blocks_given_a_namedtuple_argument_calibrate_block_wise():
    # (position embeddings as a namedtuple: rebuilding it from a generator raised TypeError)
    import collections
    from torch import nn
    Pos = collections.namedtuple("Pos", "cos sin")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, h, pos):
            return h + self.a(h) * pos.cos + pos.sin

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.out = nn.ModuleList([Block(), Block()]), nn.Linear(8, 2)

        def forward(self, x):
            pos = Pos(torch.ones(1, x.shape[1], 1), torch.zeros(1, x.shape[1], 1))
            for b in self.blocks:
                x = b(x, pos)
            return self.out(x)
    torch.manual_seed(0)
    data = [torch.randn(3, 5, 8) for _ in range(3)]
    factors = []
    for blockwise in (True, False):
        torch.manual_seed(1)
        model = Net()
        assert len(sc.compress_(model, sc.SVDConfig(rank=2, method="whiten", blockwise=blockwise), data).compressed) == 2
        factors.append([m.dense_weight() for m in model.modules() if isinstance(m, sc.LowRankLinear)])
    for a, b in zip(*factors):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("limit", [1 << 40, 3000, 1])
def test_small_batches_are_gathered_into_one_product_with_the_same_sums(monkeypatch, limit):
    """Rows of small batches are summed together (fit and held-out rows apart, each batch
    split as before): the same moments as batch by batch, whether all batches are gathered,
    some, or none; rows changed in place after they were added do not count; unchanged
    inputs keep cross moments equal to the second moments to the bit."""
    from svdcompress.core import calibrate
    monkeypatch.setattr(calibrate, "PENDING_BYTES", limit)
    g = torch.Generator().manual_seed(0)
    ys = [torch.randn(12, 600, generator=g) for _ in range(5)]
    xs = [y + 0.1 * torch.randn(12, 600, generator=g) for y in ys]
    m, same = calibrate.Moments(), calibrate.Moments()
    for x, y in zip(xs, ys):
        m.add(y, x)
        same.add(y, y.clone())
        x.mul_(7)  # (an activation the model changes after the hook saw it)
        y.mul_(7)
    stats, unchanged = m.stats("layer"), same.stats("layer")
    fit = torch.cat([y[:9] for y in ys]).double() / 7, torch.cat([x[:9] for x in xs]).double() / 7
    held = torch.cat([y[9:] for y in ys]).double() / 7, torch.cat([x[9:] for x in xs]).double() / 7
    torch.testing.assert_close(stats.fit[0], fit[0].T @ fit[0] / 45, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.fit[1], fit[1].T @ fit[0] / 45, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.held[0], held[0].T @ held[0] / 15, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.held[1], held[1].T @ held[0] / 15, rtol=1e-5, atol=1e-6)
    assert stats.rows == 60 and m.pending == [[], []]
    assert torch.equal(unchanged.fit[0], unchanged.fit[1]) and torch.equal(unchanged.held[0], unchanged.held[1])


def test_damped_shifts_the_diagonal_exactly():
    from svdcompress.core.factorize import damped
    c = torch.randn(6, 6, dtype=torch.float64)
    before = c.clone()
    out = damped(c, 0.37)
    assert torch.equal(out, c + 0.37 * torch.eye(6, dtype=torch.float64)) and torch.equal(c, before)


class UpDown(nn.Module):
    """A residual block of an up projection and a wide down projection (an MLP's)."""

    def __init__(self, width, inner, act):
        super().__init__()
        self.up, self.down, self.act = nn.Linear(width, inner), nn.Linear(inner, width), act

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class UpDownNet(nn.Module):
    """``blocks`` UpDown blocks, and an optional dense head of ``head`` outputs."""

    def __init__(self, width, inner, blocks, act, head=None):
        super().__init__()
        self.blocks = nn.ModuleList(UpDown(width, inner, act) for _ in range(blocks))
        self.head = None if head is None else nn.Linear(width, head)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x if self.head is None else self.head(x)


def test_blockwise_fit_of_a_wide_layer_holds_two_statistics(monkeypatch):
    """Sequential block-wise calibration: when a wide layer (an MLP's down projection) has
    chosen its fit, the only float64 statistic of its input width alive is its gram total;
    its cross moments are kept on the weight's side, W (E[x y^T] - E[y y^T]) (outputs x
    inputs), from the start (before: both n x n totals and four parts, and the moments' sums)."""
    import gc

    import svdcompress as sc
    from svdcompress.core import calibrate

    width, inner = 8, 40

    seen = []
    original = calibrate.Stats.scored

    def scored(self):
        original(self)
        if self.consumers == 0 and self.gram.shape == (inner, inner):
            assert self.weighted and self.cross.shape == (width, inner)
            gc.collect()
            seen.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)
                            and o.dtype == torch.float64 and tuple(o.shape) == (inner, inner)))

    monkeypatch.setattr(calibrate.Stats, "scored", scored)
    torch.manual_seed(0)
    net = UpDownNet(width, inner, 2, torch.relu, head=3)  # (the output layer stays dense)
    batches = [torch.randn(64, width) for _ in range(3)]
    sc.compress_(net, sc.SVDConfig(rank=3, method="whiten"), batches)
    assert seen == [1, 1]  # each block's down projection: its gram, nothing else


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wide_layer_whitened_from_its_output_side_matches_the_cholesky_reference(dtype):
    """A layer with fewer outputs than inputs is whitened from W (C + d I) W^T (m x m) alone:
    the same singular values and the same rank-D weight as the SVD of W L (L the Cholesky
    factor of C + d I), to float tolerance; so is the compensated fit that uses it."""
    from svdcompress.core.factorize import compensated_svd, damped
    g = torch.Generator().manual_seed(5)
    m, n = 7, 19
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(400, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    x2 = x + 0.2 * torch.randn(400, n, generator=g, dtype=torch.float64)
    gram, cross = x2.T @ x2 / 400, x.T @ x2 / 400

    def reference(target, d):  # the Cholesky route, with everything in float64
        chol = torch.linalg.cholesky(damped(gram, d * float(gram.diagonal().mean())))
        u, s, vh = torch.linalg.svd(target @ chol, full_matrices=False)
        return s, [u[:, :r] @ torch.linalg.solve_triangular(chol.T, (s[:r, None] * vh[:r]).T, upper=True).T
                   for r in range(1, m + 1)]

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for d in (1e-2, 1.0):
        dec = whitened_svd(w.to(dtype), gram, d)
        assert dec.shape == (m, n)
        s, truncated = reference(w, d)
        torch.testing.assert_close(dec.S.double(), s, **tol)
        for r, want in enumerate(truncated, 1):
            u, v = split(dec, r)
            torch.testing.assert_close((u.double() @ v.double()), want, **tol)
    for shrink in (1e-2, 0.1):
        scale = float(gram.diagonal().mean())
        target = w + torch.linalg.solve(damped(gram, shrink * scale), (cross - gram).T @ w.T).T
        dec = compensated_svd(w.to(dtype), gram, cross, 1e-2, shrink)
        s, truncated = reference(target, 1e-2)
        torch.testing.assert_close(dec.S.double(), s, **tol)
        for r in (2, 5):
            u, v = split(dec, r)
            torch.testing.assert_close(u.double() @ v.double(), truncated[r - 1], **tol)


def test_tall_whitened_svd_from_its_gram_matrix_matches_lapack(monkeypatch):
    """For a float32 result, a tall W L is decomposed through the float64 eigendecomposition
    of its Gram matrix (gram_svd): the singular values and every rank-D truncation of
    LAPACK's float64 SVD to float32 tolerance, U orthonormal (made in column blocks, here
    of 4 columns); with singular values far below the largest (a rank-deficient W) U comes
    from a QR decomposition and stays orthonormal; a wide matrix is left to the SVD. The
    data-aware fits' plain candidate (svd(gram=True)) takes the same route, tall or wide."""
    import svdcompress.core.factorize as factorize
    from svdcompress.core.factorize import GRAM_FLOOR, gram_svd
    monkeypatch.setattr(factorize, "COLUMNS", 4)  # U in blocks of 4 columns (the last one short)
    g = torch.Generator().manual_seed(11)
    m, n = 23, 9
    dtype, tol = torch.float32, dict(rtol=1e-5, atol=1e-5)
    spread = torch.logspace(0, -3, n, dtype=torch.float64)
    deficient = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64)
    for b in (torch.randn(m, n, generator=g, dtype=torch.float64) * spread, deficient):
        u, s, vh = gram_svd(b, dtype)
        assert u.dtype == s.dtype == vh.dtype == dtype
        ref_u, ref_s, ref_vh = torch.linalg.svd(b, full_matrices=False)
        torch.testing.assert_close(s.double(), ref_s, rtol=tol["rtol"], atol=tol["atol"] * float(ref_s[0]))
        torch.testing.assert_close(u.double().T @ u.double(), torch.eye(n, dtype=torch.float64), **tol)
        for r in range(1, 5):
            want = (ref_u[:, :r] * ref_s[:r]) @ ref_vh[:r]
            got = (u[:, :r].double() * s[:r].double()) @ vh[:r].double()
            torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * float(ref_s[0]))
    assert float(torch.linalg.svdvals(deficient)[-1]) < GRAM_FLOOR * float(torch.linalg.svdvals(deficient)[0])
    assert gram_svd(torch.randn(5, 8, dtype=torch.float64), dtype) is None
    assert gram_svd(torch.empty(8, 5, dtype=torch.float64, device="meta"), dtype) is None  # not on a CPU

    def no_lapack(*args, **kwargs):
        raise AssertionError("this SVD went to LAPACK's SVD")
    monkeypatch.setattr(factorize, "thin_svd", no_lapack)
    # the data-aware fits' plain candidate: a tall or a wide float32 weight
    for shape in ((m, n), (n, m)):
        w = torch.randn(*shape, generator=g)
        dec, ref = svd(w, gram=True), torch.linalg.svd(w.double(), full_matrices=False)
        torch.testing.assert_close(dec.S.double(), ref[1], **tol)
        for r in (1, 5):
            want = (ref[0][:, :r] * ref[1][:r]) @ ref[2][:r]
            torch.testing.assert_close((dec.U[:, :r] * dec.S[:r]).double() @ dec.Vh[:r].double(), want, **tol)
    # the whitened SVD of a tall float32 layer takes this route: the Cholesky reference's values
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(300, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    gram = x.T @ x / 300
    chol = torch.linalg.cholesky(gram + 1e-2 * float(gram.diagonal().mean()) * torch.eye(n, dtype=torch.float64))
    dec = whitened_svd(w.to(dtype), gram, 1e-2)
    torch.testing.assert_close(dec.S.double(), torch.linalg.svdvals(w @ chol), **tol)


def test_unchanged_wide_inputs_give_cross_moments_equal_to_the_second_moments_to_the_bit():
    """Inputs 512 or more wide have their second moments summed by blocks (_add_gram) and
    their cross moments by a whole product; where the inputs did not change (equal values,
    other tensors: the first block's two streams) the cross moments are summed the same way,
    so they equal the second moments to the last bit and the compensated candidates are
    known to be the whitened one (fit._changed); inputs that changed by a hair are not."""
    from svdcompress.core.calibrate import Moments
    from svdcompress.core.fit import _changed
    g = torch.Generator().manual_seed(4)
    y = torch.randn(4096, 600, generator=g)
    for x, changed in ((y.clone(), False), (y + 1e-6 * torch.randn(4096, 600, generator=g), True)):
        m = Moments()
        for rows in (slice(0, 2048), slice(2048, None)):
            m.add(y[rows], x[rows])
        stats = m.stats()
        assert _changed(stats) == changed
        if not changed:
            assert torch.equal(stats.fit[1], stats.fit[0]) and torch.equal(stats.held[1], stats.held[0])


def test_weighted_cross_moments_give_the_factors_and_fits_of_the_full_ones(monkeypatch):
    """A wide layer alone on its input keeps W (E[x y^T] - E[y y^T]) instead of E[x y^T]: the fits chosen
    and the factors are those of the n x n cross moments, to float tolerance."""
    import copy

    import svdcompress as sc
    from svdcompress.core import blockwise

    width, inner = 10, 36
    torch.manual_seed(1)
    net = UpDownNet(width, inner, 3, torch.tanh)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(48, width, generator=g) @ torch.randn(width, width, generator=g) for _ in range(4)]
    runs = {}
    for weighted in (True, False):
        if not weighted:
            monkeypatch.setattr(blockwise, "_wide_weight", lambda block, group: None)
        model = copy.deepcopy(net)
        report = sc.compress_(model, sc.SVDConfig(rank=4, method="whiten"), batches)
        runs[weighted] = model, [r.fit for r in report.compressed]
    assert runs[True][1] == runs[False][1]
    assert any(f.startswith("compensated") for f in runs[True][1])
    for name, layer in runs[True][0].named_modules():
        if isinstance(layer, sc.LowRankLinear):
            torch.testing.assert_close(layer.dense_weight(), runs[False][0].get_submodule(name).dense_weight(),
                                       rtol=1e-4, atol=1e-5)


def test_column_block_products_equal_the_whole_products(monkeypatch):
    """The products taken a column block at a time (factorize.times, and the moments' sums
    of wide inputs) equal the whole products."""
    from svdcompress.core import calibrate, factorize
    from svdcompress.core.calibrate import Moments
    monkeypatch.setattr(factorize, "COLUMNS", 4)
    monkeypatch.setattr(calibrate, "COLUMNS", 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, generator=g, dtype=torch.float64)
    big, other = (torch.randn(10, 10, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(factorize.times(x, big), x @ big)
    torch.testing.assert_close(factorize.times(x, big, minus=other), x @ (big - other))
    assert factorize.times(x, big, torch.float32).dtype == torch.float32
    y, x = torch.randn(40, 10, generator=g), torch.randn(40, 10, generator=g)
    m = Moments()
    m.add(y, x)
    stats = m.stats()
    y64, x64 = y.double(), x.double()
    torch.testing.assert_close(stats.gram, y64.T @ y64 / 40, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.cross, x64.T @ y64 / 40, rtol=1e-6, atol=1e-6)
    # second moments summed by the blocks on and above the diagonal (blocks of 256 and of
    # COLUMNS, a last block shorter): the whole product, exactly symmetric
    monkeypatch.setattr(calibrate, "GRAM_FROM", 8)
    for columns, width in ((4, 10), (2048, 600)):
        monkeypatch.setattr(calibrate, "COLUMNS", columns)
        y = torch.randn(50, width, generator=g)
        total = torch.zeros(width, width, dtype=torch.float64)
        calibrate._add_product(total, y, y)
        torch.testing.assert_close(total, y.double().T @ y.double(), rtol=1e-5, atol=1e-4)
        assert torch.equal(total, total.T)
