"""Training and evaluation loops: Adam, seeded shuffles, a tqdm bar, atomic checkpoints.

A checkpoint is one safetensors file (model and optimiser tensors) whose metadata holds the
rest as JSON (epoch, history, optimiser settings): one atomic write, no pickle, and resuming
from it ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..core import dist
from ..core.checkpoint import (CHECKPOINT, TrainingDiverged, _sealed, check_finite,  # noqa: F401
                               check_schedule, load_checkpoint, make_optimizer, set_lr,
                               read_checkpoint, save_checkpoint)
from ..core.devices import resolve_device  # noqa: F401 (study code imports it from here)
from ..core.distill import Distill, logit_loss
from ..core.errors import ConfigError
from .data import Dataset

@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    schedule: str = "constant"  # or "cosine": annealed to 0 over the epochs (core.checkpoint.set_lr)

    def __post_init__(self) -> None:
        check_schedule(self)
        if not isinstance(self.device, str) or (self.device not in ("auto", "cpu", "cuda")
                                                and not self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> dict:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        loss += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return {"loss": loss / len(x), "accuracy": correct / len(x)}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """The predicted class of every row of ``x``, in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


# ---------------------------------------------------------------- the loop

def train(model: nn.Module, data: Dataset, cfg: TrainConfig, *,
          checkpoint_dir: str | Path | None = None, resume: bool | str | Path = False,
          progress: bool = True, desc: str = "train", context: dict | None = None,
          teacher: nn.Module | None = None, distill: Distill | None = None) -> list[dict]:
    """Train ``model`` with Adam on ``data`` (learning rate by ``cfg.schedule``); one
    history row per epoch.

    With a ``teacher`` (the dense network a compressed one came from) the loss is the
    distillation loss (``distill``: KL on the logits at a temperature, mixed with the
    labels' cross-entropy).

    Each epoch's shuffle is seeded by (seed, epoch), so a resumed run sees the same batches
    as an uninterrupted one. With ``checkpoint_dir`` a checkpoint is written after each epoch.
    ``resume`` is True (the checkpoint in ``checkpoint_dir``) or a checkpoint file's path.
    An epoch whose loss or weights end non-finite raises TrainingDiverged and writes no
    checkpoint, so the last good one stays.

    Under torchrun it is data-parallel: each global batch of ``cfg.batch_size`` (the same
    seeded shuffle everywhere) is split across the processes, DistributedDataParallel sums
    the gradients, so every step is the single-process step on the same samples; metrics
    are summed, only rank 0 shows progress and writes checkpoints, and the replicas are
    checked to be bit-for-bit identical after every epoch.
    """
    device = resolve_device(cfg.device)
    model.to(device)
    data = data.to(device)
    opt = make_optimizer(model.parameters(), cfg.lr)
    start, history = 0, []
    if resume is True:
        if checkpoint_dir is None:
            raise ConfigError("resume needs a checkpoint directory")
        resume = Path(checkpoint_dir) / CHECKPOINT
    if resume:
        start, history = load_checkpoint(Path(resume), model, opt, cfg, context)
    if teacher is not None:
        teacher = teacher.to(device).eval()
        distill = distill or Distill()
    n = len(data.x_train)
    world, rank = dist.world(), dist.rank()
    # each process computes the same projections from the same W: no buffer broadcasts
    net = DistributedDataParallel(model, forward_sync_buffers=False) if world > 1 else model
    progress = progress and dist.is_main()
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(0, n, cfg.batch_size), desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False, mininterval=0.5)
        steps = len(bar)
        for step, i in enumerate(bar):
            set_lr(opt, cfg, epoch, step, steps)
            batch = perm[i:i + cfg.batch_size]
            idx = batch[rank::world] if world > 1 else batch
            xb, yb = data.x_train[idx], data.y_train[idx]
            out = net(xb)
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(xb)
                criterion = lambda o, y, reduction="mean": logit_loss(o, soft, y, distill, reduction)  # noqa: E731
            else:
                criterion = F.cross_entropy
            if world > 1:  # DDP averages over processes: sum / global batch, times world
                local = criterion(out, yb, reduction="sum")
                loss = local * world / len(batch)
                loss_sum += local.detach()
            else:
                loss = criterion(out, yb)
                loss_sum += loss.detach() * len(idx)
            opt.zero_grad(set_to_none=True)
            with dist.guard():  # DDP communicates during backward
                loss.backward()
            opt.step()
            correct += (out.detach().argmax(1) == yb).sum()
            if progress and step % 50 == 0:
                seen = min(n, i + len(idx))
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}",
                                acc=f"{int(correct) / seen:.4f}")
        if world > 1:
            dist.sum_(loss_sum)
            dist.sum_(correct)
            dist.check_same(model.state_dict().values(), "weights and projections")
        check_finite(model, float(loss_sum) / n, epoch + 1, checkpoint_dir, history)
        test = evaluate(model, data.x_test, data.y_test)
        history.append({"epoch": epoch + 1, "train_loss": float(loss_sum) / n,
                        "train_accuracy": int(correct) / n, "test_loss": test["loss"],
                        "test_accuracy": test["accuracy"],
                        "seconds": time.perf_counter() - t0})
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{cfg.epochs}: train loss "
                       f"{history[-1]['train_loss']:.4f}, test accuracy {test['accuracy']:.4f}")
        if checkpoint_dir is not None and dist.is_main():
            save_checkpoint(Path(checkpoint_dir), model, opt, epoch + 1, history, cfg, context)
    return history
