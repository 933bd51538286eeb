"""Sequential block-wise calibration in one pass of a block per batch (blockwise.py uses it).

Fitting a block's groups of layers one after another (q/k/v, then o, then the MLP's) needs
each group's inputs from the block whose earlier groups are already compressed. Partial
passes, one per group and batch, cost about two passes of the block per batch. Here every
batch's pass runs at once, as its own greenlet on the calling thread, and waits at each
group's first layer until all batches have reached it and the group is fitted: one pass
per batch, whose outputs are the compressed block's outputs.
"""

from __future__ import annotations

from typing import Callable

import greenlet
import torch
from torch import nn

from .padding import masked_rows
from .kinds import dense_kind
from .profile import Profile, phase


class _Abort(Exception):
    """Ends a parked pass (after another pass failed or went out of step)."""


class _Gate(nn.Module):
    """Stands in for a group's first layer during a lockstep pass (``_Lockstep``): records
    the rows it is fed, waits until the group is fitted, then calls whatever is in its place
    by then (the factorised layer). Attributes it lacks are the dense layer's (model code
    may read ``weight.dtype``)."""

    def __init__(self, inner: nn.Module, parent: nn.Module, child: str, k: int, lock: "_Lockstep"):
        super().__init__()
        self.inner = inner
        self.where, self.k, self.lock = (parent, child), k, lock

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, *args, **kwargs):
        self.lock.arrive(self.k, masked_rows(dense_kind(self.inner).inputs(self.inner, args[0]).detach(),
                                             args[0], self.lock.masks[self.lock.current]))
        parent, child = self.where
        return getattr(parent, child)(*args, **kwargs)


class _Lockstep:
    """One pass of a block per batch for all of its groups: each batch's pass runs as a
    greenlet (a coroutine on the calling thread), one at a time, and parks at the first
    layer of each group (a ``_Gate``) until every batch has reached it and the group is
    fitted; then each pass goes on through the fitted layers. The passes' outputs are the
    compressed block's outputs.

    Greenlets, not threads: every OS thread that runs a multi-threaded operator keeps its
    own OpenMP team alive, and with more OpenMP threads alive than cores, libgomp stops
    spinning between parallel regions; the fits (eigendecompositions made of many short
    parallel regions) then ran 3-7x slower while the parked passes' threads lived
    (SmolLM2-135M at 16 sequences: 180 s with threads, 90 s with partial passes)."""

    def __init__(self, passes: list[Callable[[], torch.Tensor]], masks: list | None = None) -> None:
        n = len(passes)
        self.masks = masks or [None] * n  # each pass's batch's real positions (padding.row_mask)
        self.current = 0  # the pass running now
        self.main = greenlet.getcurrent()
        self.at: list = [None] * n  # the gate each pass is parked at, or "done"
        self.out: list = [None] * n
        self.lets = [greenlet.greenlet(torch.no_grad()(f), parent=self.main) for f in passes]

    def arrive(self, k: int, rows: torch.Tensor) -> None:
        """Called in a pass: park it at gate ``k`` with the rows it brought (its thread-local
        torch state, which the other passes and the fits share the thread with, is kept
        aside and put back when it resumes)."""
        mine = _thread_state()
        try:
            self.main.switch((k, rows))
        finally:
            _set_thread_state(mine)

    def step(self, expect) -> list:
        """Let each pass run, in turn, to its next gate (``expect``: that gate's index, or
        "done"); the rows they brought."""
        rows = []
        for j, let in enumerate(self.lets):
            caller = _thread_state()
            self.current = j
            try:
                got = let.switch()
            except BaseException:
                _set_thread_state(caller)
                self.close()
                raise
            _set_thread_state(caller)  # (what a parked pass left set, a block's autocast say, is its own)
            if let.dead:
                self.at[j], self.out[j] = "done", got
                rows.append(None)
            else:
                self.at[j] = got[0]
                rows.append(got[1])
            if self.at[j] != expect:
                self.close()
                raise _OutOfStep(f"group {self.at[j]} where group {expect} was expected")
        return rows

    def close(self) -> None:
        """End every pass still parked (after an error): each unwinds from its gate."""
        caller = _thread_state()
        for let in self.lets:
            if let and not let.dead:
                try:
                    let.throw(_Abort)
                except _Abort:
                    pass
        _set_thread_state(caller)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _thread_state() -> tuple:
    """The thread-local torch state a block's forward pass may change and leave set while it
    is parked: grad mode, and autocast's switch and dtype per device type. Greenlets share
    their thread's, where the threads each pass once ran in had their own."""
    autocast = []
    for device in _AUTOCAST_DEVICES:
        try:
            autocast.append((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        except (AttributeError, RuntimeError, TypeError):  # (an older torch, or no such device)
            autocast.append(None)
    return torch.is_grad_enabled(), tuple(autocast)


def _set_thread_state(state: tuple) -> None:
    grad, autocast = state
    torch.set_grad_enabled(grad)
    for device, saved in zip(_AUTOCAST_DEVICES, autocast):
        if saved is not None:
            torch.set_autocast_enabled(device, saved[0])
            torch.set_autocast_dtype(device, saved[1])


class _OutOfStep(Exception):
    """A batch's pass reached the block's layers in another order than the first batch's."""


def lockstep_block(block: nn.Module, groups: list, original: list, compressed: list,
                    kept: list, fit_group: Callable, device, index: int, profile: Profile | None) -> int:
    """The compressed stream's pass through one block, fitting each group when every batch
    has reached it (``_Lockstep``): one pass of the block per batch, where fitting the
    groups one after another from partial passes took about two. ``compressed`` is updated
    to the block's outputs. Returns how many groups were fitted: all of them, or, when a
    batch reached the layers in another order (control flow that depends on the data),
    those fitted before (the caller fits the rest from partial passes)."""
    passes = [lambda j=j, s=s: s.run(block, device, compressed[j], index) for j, s in enumerate(original)]
    gates = []
    lock = _Lockstep(passes, [s.mask for s in original])
    fitted = 0
    try:
        for k, group in enumerate(groups):
            parent_name, _, child = group.names[0].rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            dense = getattr(parent, child)
            gates.append((parent, child, dense))
            setattr(parent, child, _Gate(dense, parent, child, k, lock))
        for k, group in enumerate(groups):
            with phase(profile, "block passes (compressed stream)"):
                rows = lock.step(k)
            parent, child, dense = gates[k]
            setattr(parent, child, dense)  # the dense layer back in place, for the fit to replace
            fit_group(k, group, [[y] for y in rows])
            fitted += 1
        with phase(profile, "block passes (compressed stream)"):
            lock.step("done")
    except _OutOfStep:
        return fitted
    except BaseException:
        lock.close()
        raise
    finally:
        for parent, child, dense in gates:
            if isinstance(getattr(parent, child), _Gate):
                setattr(parent, child, dense)
    for j, s in enumerate(original):
        compressed[j] = lock.out[j].to(s.hidden.device)
    return fitted
