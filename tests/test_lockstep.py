"""Sequential block-wise calibration in one pass of each block per batch (blockwise._Lockstep)."""

import copy
import threading

import greenlet
import pytest
import torch
from torch import nn

import svdcompress as sc
from svdcompress.core import blockwise, lockstep
from svdcompress.core.profile import Profile


class Block(nn.Module):
    def __init__(self, width=12, swap_on_negative=False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), nn.Linear(width, width)
        self.swap_on_negative = swap_on_negative

    def forward(self, x):
        if self.swap_on_negative and float(x.mean()) < 0:  # data-dependent order: c before a
            return x + self.b(torch.tanh(self.a(self.c(x))))
        return self.c(x + self.b(torch.tanh(self.a(x))))


class Net(nn.Module):
    def __init__(self, n=3, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(**kw) for _ in range(n))
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def data(n=4, rows=64, sign=None):
    g = torch.Generator().manual_seed(3)
    out = [torch.randn(rows, 12, generator=g) for _ in range(n)]
    if sign is not None:
        out = [x.abs() * (1 if i % 2 == 0 else -1) for i, x in enumerate(out)]
    return out


def compressed(net, batches, lockstep, monkeypatch, profile=None):
    monkeypatch.setattr(blockwise, "LOCKSTEP", lockstep)
    net = copy.deepcopy(net)
    report = sc.compress_(net, sc.SVDConfig(rank=4, method="whiten"), batches, profile=profile)
    return net, report


def test_one_pass_per_batch_gives_the_factors_of_partial_passes(monkeypatch):
    """The lockstep pass fits every layer to the same inputs as group-by-group partial
    passes (same factors to float tolerance, same fits chosen), with one pass of each
    block per batch on the compressed stream."""
    net, batches = Net(), data()
    prof = Profile()
    fast, fast_report = compressed(net, batches, True, monkeypatch, prof)
    slow, slow_report = compressed(net, batches, False, monkeypatch)
    assert [r.fit for r in fast_report.compressed] == [r.fit for r in slow_report.compressed]
    assert len(fast_report.compressed) == 9
    for name, layer in fast.named_modules():
        if isinstance(layer, sc.LowRankLinear):
            torch.testing.assert_close(layer.dense_weight(), slow.get_submodule(name).dense_weight(),
                                       rtol=1e-4, atol=1e-5)
    # each block: 3 gates and the end, a step each
    assert prof.calls["block passes (compressed stream)"] == 3 * 4
    assert not any(isinstance(m, lockstep._Gate) for m in fast.modules())


def test_passes_out_of_step_fall_back_to_partial_passes(monkeypatch):
    """Control flow that depends on the data (batches reach the layers in other orders):
    the block is finished from partial passes, as before, with the same factors."""
    net, batches = Net(swap_on_negative=True), data(sign=True)
    before = threading.active_count()
    partial, real = [], blockwise.group_rows
    monkeypatch.setattr(blockwise, "group_rows", lambda *a, **k: partial.append(k.get("stop", True))
                        or real(*a, **k))
    fast, fast_report = compressed(net, batches, True, monkeypatch)
    assert True in partial  # the partial passes ran
    slow, _ = compressed(net, batches, False, monkeypatch)
    assert len(fast_report.compressed) == 9
    for name, layer in fast.named_modules():
        if isinstance(layer, sc.LowRankLinear):
            torch.testing.assert_close(layer.dense_weight(), slow.get_submodule(name).dense_weight(),
                                       rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, lockstep._Gate) for m in fast.modules())
    assert threading.active_count() == before


def test_an_error_in_a_pass_reaches_the_caller_and_ends_every_pass(monkeypatch):
    net, batches = copy.deepcopy(Net()), data()
    seen = {"n": 0}

    def boom(module, args):  # the third batch's compressed-stream pass of block 1 fails
        if greenlet.getcurrent().parent is not None:  # a compressed-stream pass
            seen["n"] += 1
            if seen["n"] == 3:
                raise ValueError("bad rows")
    before = threading.active_count()
    net.blocks[1].register_forward_pre_hook(boom)
    monkeypatch.setattr(blockwise, "LOCKSTEP", True)
    with pytest.raises(ValueError, match="bad rows"):
        sc.compress_(net, sc.SVDConfig(rank=4, method="whiten"), batches)
    assert seen["n"] == 3
    assert threading.active_count() == before
    assert not any(isinstance(m, lockstep._Gate) for m in net.modules())


def test_blocks_after_the_last_one_with_target_layers_are_not_run(monkeypatch):
    net, batches = copy.deepcopy(Net()), data()
    runs = [0, 0, 0]
    for i, b in enumerate(net.blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: runs.__setitem__(i, runs[i] + 1))
    report = sc.compress_(net, sc.SVDConfig(rank=4, method="whiten", target_modules=r"blocks\.0\..*"), batches)
    assert [r.name for r in report.compressed] == ["blocks.0.a", "blocks.0.b", "blocks.0.c"]
    assert runs[2] == runs[1] <= 1  # at most the capture's check that the blocks are chained
    assert runs[0] > len(batches)


class AutocastBlock(nn.Module):
    """A block that runs under its own autocast (mixed precision in the model's code)."""

    def __init__(self, width=12):
        super().__init__()
        self.a, self.b = nn.Linear(width, 3 * width), nn.Linear(3 * width, width)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (x + self.b(torch.tanh(self.a(x)))).float()


def test_a_pass_parked_inside_its_autocast_leaks_it_to_no_fit_and_no_caller(monkeypatch):
    """The passes share the caller's thread: what one leaves set while parked (here the
    block's autocast) is its own. The fits run in full precision, the compression gives the
    factors of partial passes, and the caller's autocast and grad mode are as they were."""
    from svdcompress.core import compress as compress_module
    net = Net()
    net.blocks = nn.ModuleList(AutocastBlock() for _ in range(3))
    batches = data()
    during = []
    real = compress_module.fit_layer
    monkeypatch.setattr(compress_module, "fit_layer",
                        lambda *a, **k: during.append(torch.is_autocast_enabled("cpu")) or real(*a, **k))
    fast, fast_report = compressed(net, batches, True, monkeypatch)
    assert not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
    assert during == [False] * 6
    slow, slow_report = compressed(net, batches, False, monkeypatch)
    assert [r.fit for r in fast_report.compressed] == [r.fit for r in slow_report.compressed]
    for name, layer in fast.named_modules():
        if isinstance(layer, sc.LowRankLinear):
            torch.testing.assert_close(layer.dense_weight(), slow.get_submodule(name).dense_weight(),
                                       rtol=1e-4, atol=1e-5)


def test_the_callers_grad_mode_survives_the_passes():
    """Each pass runs without gradients; the caller's grad mode is its own again after
    every step."""
    block = nn.Linear(4, 4)

    def run():  # a pass parked at gate 0 between two layers
        y = block(torch.randn(2, 4))
        lock.arrive(0, y)
        return block(y)
    lock = lockstep._Lockstep([run, run])
    assert torch.is_grad_enabled()
    rows = lock.step(0)
    assert torch.is_grad_enabled() and not any(r.requires_grad for r in rows)
    lock.step("done")
    assert torch.is_grad_enabled()
    assert not any(out.requires_grad for out in lock.out)
