"""Running under torchrun: the process group from torchrun's environment, and the few
collective operations svdcompress needs (sums of statistics, agreement on results).

Nothing to configure: without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) every function here
is a no-op for one process. Under torchrun, ``setup()`` joins the group (gloo on CPU, nccl
when the process has a CUDA device) with a timeout, so a rank that dies ends the others
with an error instead of a hang.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

from .errors import SVDCompressError

TIMEOUT = timedelta(seconds=int(os.environ.get("SVDCOMPRESS_DIST_TIMEOUT", "120")))


class RankFailed(SVDCompressError):
    """Another process of the job failed or stopped answering."""


def setup(device: str = "cpu") -> None:
    """Join torchrun's process group, if this process was started by torchrun."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def _collective(fn, *args):
    with guard():
        return fn(*args)


_COMM = ("gloo", "nccl", "NCCL", "Connection", "connection", "timed out", "Timed out", "Socket")


@contextmanager
def guard():
    """Turn a communication failure (a peer died, a timeout) inside the block, also one
    raised by DistributedDataParallel during backward, into RankFailed."""
    try:
        yield
    except RuntimeError as err:
        if not active() or not (isinstance(err, dist.DistBackendError) or
                                any(s in str(err) for s in _COMM)):
            raise
        raise RankFailed(f"rank {rank()}: another process of the job failed or timed out "
                         f"({str(err).splitlines()[0][:160]})") from None


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place (a no-op for one process)."""
    if active():
        device = tensor.device
        t = tensor if _backend_takes(device) else tensor.cpu()
        _collective(dist.all_reduce, t)
        if t is not tensor:
            tensor.copy_(t.to(device))
    return tensor


def sum_int(value: int) -> int:
    if not active():
        return value
    return int(sum_(torch.tensor([value], dtype=torch.float64)).item())


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Every process gets rank ``src``'s ``tensor`` (in place)."""
    if active():
        t = tensor if _backend_takes(tensor.device) else tensor.cpu()
        _collective(dist.broadcast, t, src)
        if t is not tensor:
            tensor.copy_(t.to(tensor.device))
    return tensor


def barrier() -> None:
    if active():
        _collective(dist.barrier)


def _backend_takes(device: torch.device) -> bool:
    return (dist.get_backend() == "nccl") == (device.type == "cuda")


def share(items: list) -> list:
    """This process's share of ``items`` (every world-th one, from its rank)."""
    if not active():
        return items
    if len(items) < world():
        raise SVDCompressError(f"{len(items)} calibration batches cannot be shared by "
                               f"{world()} processes: give at least one each")
    return items[rank()::world()]


def check_same(tensors: Iterable[torch.Tensor], what: str) -> None:
    """Raise unless every process holds bit-for-bit the same ``tensors`` (a digest of their
    bytes is compared): data-parallel training must keep every replica identical."""
    if not active():
        return
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    mine = torch.tensor(list(h.digest()), dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    every = [torch.zeros_like(mine) for _ in range(world())]
    _collective(dist.all_gather, every, mine)
    if any(not torch.equal(e, every[0]) for e in every):
        raise RankFailed(f"the processes' {what} differ: the replicas are no longer identical")


def local_device(name: str) -> str:
    """Under torchrun with CUDA, each process takes the GPU of its LOCAL_RANK."""
    if active() and str(name) in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name
