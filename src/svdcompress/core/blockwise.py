"""Block-wise calibration (as SVD-LLM and GPTQ do): compress a model with repeated blocks
one block at a time, in memory bounded by two block boundaries, whatever its depth.

The inputs of the first block (and the other arguments the blocks get: attention masks,
position ids or embeddings, the same for every block or each block's own, as in models that
alternate sliding-window and global attention) are captured once. Then, for each block: the layers'
statistics come from the current block inputs, the block's layers are compressed in the
order they run (layers fed the same tensor, as q, k and v are, share one statistic),
and the block's outputs become the next block's inputs. With sequential (compensated)
calibration two streams run side by side: the original network's block inputs and the
compressed network's, so each layer is fitted to reproduce its original outputs from the
inputs the compressed layers before it produce, exactly as the per-layer path does.

A model whose blocks are not chained (a block's output is not the next's input) is left to the per-layer path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import Moments
from .padding import masked_rows, row_mask
from .kinds import dense_kind, low_rank_kind
from .lockstep import lockstep_block
from .profile import Profile, phase


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


LOCKSTEP = True  # sequential calibration: one pass of each block per batch (tests compare with False)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return _like(obj, [_to(o, device) for o in obj])
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _like(obj, items: list):  # a tuple or list of obj's type (a namedtuple takes them one by one)
    return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def find_blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of same-type blocks that holds the most of the target layers ``names``."""
    best, most = None, 0
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(b) for b in module}) != 1 or dense_kind(module[0]) or low_rank_kind(module[0]):
            continue
        inside = sum(n.startswith(prefix + ".") for n in names)
        if inside > most:
            best, most = (prefix, module), inside
    return best


@dataclass
class Stream:
    """One batch's block inputs: the hidden states, and the other positional and keyword
    arguments the blocks are called with: the same for every block (``args``, ``kwargs``),
    or each block's own (``per_block[i]`` = (args, kwargs) of block i), as in models that
    alternate sliding-window and global attention. They do not depend on the hidden states,
    so they are recorded once from the dense forward pass and replayed."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    per_block: list | None = None
    mask: torch.Tensor | None = None  # the batch's real positions (padding.row_mask), or None

    def run(self, block: nn.Module, device, hidden=None, index: int = 0) -> torch.Tensor:
        args, kwargs = (self.args, self.kwargs) if self.per_block is None else self.per_block[index]
        h = _to(self.hidden if hidden is None else hidden, device)
        return _first(block(h, *_to(args, device), **_to(kwargs, device)))

    def moved(self, hidden: torch.Tensor) -> "Stream":
        """The same arguments with other hidden states (the next block's inputs)."""
        return Stream(hidden, self.args, self.kwargs, self.per_block, self.mask)


@torch.no_grad()
def capture(model: nn.Module, blocks: nn.ModuleList, batches: list, forward: Callable) -> list[Stream] | None:
    """The first block's inputs for every batch, and the arguments every block gets; None
    when the blocks are not chained (a block's input is not the previous block's output),
    checked on the first batch. When all blocks get the same arguments, one partial forward
    pass per batch (to the first block); else one dense pass per batch records each block's."""
    chain = _chained(model, blocks, _one_row(batches[0]), forward)
    if chain is None:
        return None
    calls: list = [None] * len(blocks)
    last = 0 if chain == "same" else len(blocks) - 1

    def grab(i, args, kwargs):
        calls[i] = (args, kwargs)
        if i == last:
            raise _Stop

    handles = [block.register_forward_pre_hook(lambda m, a, k, i=i: grab(i, a, k), with_kwargs=True)
               for i, block in enumerate(blocks[:last + 1])]
    streams = []
    try:
        for batch in batches:
            calls[:] = [None] * len(blocks)
            try:
                forward(model, batch)
            except _Stop:
                pass
            if any(c is None or not c[0] for c in calls[:last + 1]):
                return None
            hidden = calls[0][0][0].detach()
            mask = row_mask(batch)  # padded positions: no statistics
            if chain == "same":
                streams.append(Stream(hidden, _replayable(tuple(calls[0][0][1:])),
                                      _replayable(dict(calls[0][1])), mask=mask))
            else:
                streams.append(Stream(hidden, per_block=[(_replayable(tuple(a[1:])), _replayable(dict(k)))
                                                         for a, k in calls], mask=mask))
    finally:
        for h in handles:
            h.remove()
    return streams


def _is_cache(obj) -> bool:
    """A key-value cache (a transformers ``Cache``: a model run with ``use_cache`` on, the
    default of Hugging Face causal LMs, hands one to every block): duck-typed, the core
    imports no integration."""
    return callable(getattr(obj, "update", None)) and callable(getattr(obj, "get_seq_length", None))


def _replayable(obj):
    """Recorded block arguments made safe to replay on every pass: a key-value cache is
    dropped (None) and ``use_cache`` turned off. Replayed, the cache a pass recorded would
    grow by each block call's keys and values and be attended to by the next."""
    if _is_cache(obj):
        return None
    if isinstance(obj, dict):
        return {k: False if k == "use_cache" and isinstance(v, bool) else _replayable(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return _like(obj, [_replayable(o) for o in obj])
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _one_row(batch):
    """The first sample of a batch whose inputs are all tensors of one batch size (a dict of
    input_ids and attention_mask): whether blocks are chained does not depend on the batch,
    and one sample is checked in a fraction of the time. Any other batch is used whole."""
    items = list(batch.values()) if isinstance(batch, dict) else \
        list(batch) if isinstance(batch, (tuple, list)) else [batch]
    if not items or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in items) or \
            len({t.shape[0] for t in items}) != 1 or items[0].shape[0] < 2:
        return batch
    if isinstance(batch, dict):
        return {k: t[:1] for k, t in batch.items()}
    return type(batch)(t[:1] for t in batch) if isinstance(batch, (tuple, list)) else batch[:1]


@torch.no_grad()
def _chained(model, blocks, batch, forward) -> str | None:
    """"same" when every block's input is the previous block's output and all get the same
    other arguments, "per-block" when they are chained but get arguments of their own,
    None when they are not chained."""
    calls: list = [None] * len(blocks)
    outs: list = [None] * len(blocks)
    handles = []

    def out_hook(i, o):
        outs[i] = _first(o)
        if i == len(blocks) - 1:
            raise _Stop  # nothing after the last block is needed (an LM head's logits are big)

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, i=i: calls.__setitem__(i, (a, k)), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: out_hook(i, o)))
    try:
        forward(model, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if any(c is None or not c[0] for c in calls):
        return None
    same = True
    for i in range(1, len(blocks)):
        args, kwargs = calls[i]
        if not isinstance(outs[i - 1], torch.Tensor) or not _same(args[0], outs[i - 1]):
            return None
        same = same and _same(args[1:], calls[0][0][1:]) and _same(kwargs, calls[0][1])
    return "same" if same else "per-block"


@dataclass
class Group:
    """Target layers of one block fed the same input tensor (q, k, v), in run order."""

    names: list[str]  # names inside the block
    calls: int  # how often the first of them runs per block forward


@torch.no_grad()
def discover(block: nn.Module, names: list[str], stream: Stream, device, index: int = 0
             ) -> tuple[list[Group], list[list[torch.Tensor]], torch.Tensor]:
    """Group the block's target layers by the tensor they are fed, in the order they run,
    from one whole pass of the (dense) block on ``stream``; that pass's rows for each group
    (as group_rows gives them) and the block's output come with the groups."""
    order: list[tuple[str, object]] = []
    keep = []  # hold the inputs so their ids stay unique during the pass
    rows: dict[str, list[torch.Tensor]] = {}

    def seen(module, args, name):
        order.append((name, id(args[0])))
        keep.append(args[0])
        rows.setdefault(name, []).append(masked_rows(dense_kind(module).inputs(module, args[0]).detach(),
                                                     args[0], stream.mask))

    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen(m, a, n)) for n in names]
    try:
        out = stream.run(block, device, index=index)
    finally:
        for h in handles:
            h.remove()
    groups: dict[object, Group] = {}
    first_input: dict[str, object] = {}
    for name, ident in order:
        if name in first_input:
            continue
        first_input[name] = ident
        groups.setdefault(ident, Group([], 0)).names.append(name)
    for g in groups.values():
        g.calls = sum(1 for n, _ in order if n == g.names[0])
    missing = set(names) - set(first_input)
    if missing:  # never run in this block: nothing to calibrate them on
        raise RuntimeError(f"layers {sorted(missing)} did not run in their block")
    found = list(groups.values())
    return found, [rows[g.names[0]] for g in found], out


@torch.no_grad()
def group_rows(block: nn.Module, groups: list[Group], stream: Stream, device, hidden=None,
               stop: bool = True, index: int = 0):
    """For each group, the rows its weight matrices multiply in each call of one batch's
    pass; with ``stop`` the pass ends once the last group's calls are all seen, without it
    the whole block runs and (rows, the block's output) is returned: one pass gives both."""
    rows: list[list[torch.Tensor]] = [[] for _ in groups]
    out = None
    handles = []
    for k, group in enumerate(groups):
        layer = block.get_submodule(group.names[0])

        def grab(module, args, k=k, kind=dense_kind(layer), calls=group.calls):
            rows[k].append(masked_rows(kind.inputs(module, args[0]).detach(), args[0], stream.mask))
            if stop and k == len(groups) - 1 and len(rows[k]) == calls:
                raise _Stop
        handles.append(layer.register_forward_pre_hook(grab))
    try:
        out = stream.run(block, device, hidden, index)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return rows if stop else (rows, out)


def _wide_weight(block: nn.Module, group: Group) -> torch.Tensor | None:
    """The weight matrix (float32, or float64 for a float64 layer) of a group's only layer
    when it has fewer outputs than inputs; else None."""
    if len(group.names) != 1:
        return None
    layer = block.get_submodule(group.names[0])
    w = dense_kind(layer).matrix(layer).detach()
    if w.shape[0] >= w.shape[1]:
        return None
    return w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)


@torch.no_grad()
def compress_blocks(blocks: nn.ModuleList, prefix: str, names: list[str], streams: list[Stream],
                    finish: Callable, sequential: bool, device=None, progress: bool = False,
                    profile: Profile | None = None) -> None:
    """Compress the target layers ``names`` (full names, all inside ``blocks``) block by block.

    ``finish(full_name, stats)`` factorises one layer and puts it in place. With
    sequential calibration the Stats' ``gram`` = E[x' x'^T] and ``cross`` = E[x x'^T], x the
    layer's inputs in the original network and x' in the compressed one; with parallel
    calibration ``gram`` = E[x x^T] and ``cross`` is None. ``streams`` (the first block's inputs) are
    consumed: each block's outputs replace its inputs.
    """
    device = torch.device(device or "cpu")
    original = list(streams)  # the original network's block inputs
    compressed = [s.hidden for s in streams] if sequential else None
    last = max((i for i in range(len(blocks)) if any(n.startswith(f"{prefix}.{i}.") for n in names)), default=-1)
    bar = tqdm(list(enumerate(blocks))[:last + 1], desc="calibrating blocks", disable=not progress, leave=False)
    for i, block in bar:  # (the blocks after the last with target layers need no pass)
        home = next(block.parameters()).device
        block.to(device).eval()
        here = f"{prefix}.{i}."
        inside = [n[len(here):] for n in names if n.startswith(here)]
        groups, first = [], None
        if inside:  # the groups, and the dense block's rows and output for the first batch
            with phase(profile, "block passes (original stream)"):
                groups, *first = discover(block, inside, original[0], device, i)
        if sequential:
            dense = copy.deepcopy(block)  # the original block, for the original stream
            # one pass of the original block per batch: every group's inputs (kept until the
            # group is fitted) and the block's outputs (the original stream's next inputs)
            kept = []
            for j, s in enumerate(original):
                with phase(profile, "block passes (original stream)"):
                    rows_of, out = first if j == 0 and first else \
                        group_rows(dense, groups, s, device, stop=False, index=i)
                first = None
                kept.append(rows_of)
                original[j] = s.moved(out.to(s.hidden.device))

            def fit_group(k, group, rows_by_batch):
                stats = Moments()
                # a wide layer alone on its input keeps its cross moments on its weight's
                # side, as W (A - G) = E[W (x - y) y^T] (m x n, not n x n: every fit of it
                # uses only that product; the difference taken on the rows, so it is exactly
                # zero where the inputs did not change)
                w = _wide_weight(block, group)
                with phase(profile, "statistics"):
                    for j, ys in enumerate(rows_by_batch):
                        for x, y in zip(kept[j][k], ys):  # call by call
                            stats.add(y, x if w is None else (x.to(w.dtype) - y.to(w.dtype)) @ w.T)
                        kept[j][k] = None
                    stats = stats.stats(here + group.names[0])
                stats.weighted = w is not None
                stats.consumers = len(group.names)  # (then its parts are folded, see Stats.scored)
                for name in group.names:
                    finish(here + name, stats)

            fitted = 0
            if groups and LOCKSTEP and all(g.calls == 1 for g in groups):  # one pass per batch
                fitted = lockstep_block(block, groups, original, compressed, kept, fit_group, device, i,
                                         profile)
            if fitted < len(groups):  # a layer called more than once per pass, or passes out of
                # step: partial passes, group by group, each fitted after those before it changed
                for k, group in list(enumerate(groups))[fitted:]:
                    rows = []
                    for j, s in enumerate(original):
                        with phase(profile, "block passes (compressed stream)"):
                            rows.append(group_rows(block, [group], s, device, compressed[j], index=i)[0])
                    fit_group(k, group, rows)
            if (fitted < len(groups) or not groups) and i + 1 < len(blocks):  # the outputs feed
                # the next block (after the last, none)
                with phase(profile, "block passes (compressed stream)"):
                    for j, s in enumerate(original):
                        compressed[j] = s.run(block, device, compressed[j], i).to(s.hidden.device)
            del dense, kept
        else:
            stats = [Moments() for _ in groups]
            for j, s in enumerate(original):  # every group's rows, and the block's outputs
                # (the next block's inputs), from one pass of the dense block
                with phase(profile, "block passes (original stream)"):
                    rows_of, out = first if j == 0 and first else \
                        group_rows(block, groups, s, device, stop=False, index=i)
                first = None
                original[j] = s.moved(out.to(s.hidden.device))
                with phase(profile, "statistics"):
                    for m, calls in zip(stats, rows_of):
                        for rows in calls:
                            m.add(rows)
            for group, m in zip(groups, stats):
                with phase(profile, "statistics"):
                    group_stats = m.stats(here + group.names[0])
                group_stats.consumers = len(group.names)
                for name in group.names:
                    finish(here + name, group_stats)
        block.to(home)
