"""Training and evaluation loops: Adam, seeded shuffles, a tqdm bar, atomic checkpoints.

A checkpoint is one safetensors file (model and optimiser tensors) whose metadata holds the
rest as JSON (epoch, history, optimiser settings): one atomic write, no pickle, and resuming
from it ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ConfigError, FormatError
from ..core.files import atomic_write
from ..core.io import load_state, unique_tensors
from .data import Dataset

CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but CUDA is not available here")
    return torch.device(name)


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


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam; the fused kernel where it exists (CPU and CUDA floats): ~30% faster steps on CPU."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    epoch: int, history: list, cfg: TrainConfig) -> None:
    tensors, tied = unique_tensors({f"model.{k}": v for k, v in model.state_dict().items()})
    state = opt.state_dict()
    scalars = {}
    for idx, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    info = {"epoch": epoch, "history": history, "param_groups": groups, "scalars": scalars,
            "tied": tied, "train_config": asdict(cfg)}
    atomic_write(Path(directory) / CHECKPOINT,
                 lambda tmp: save_file(tensors, tmp, metadata={"svdcompress": json.dumps(info)}))


def load_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    cfg: TrainConfig) -> tuple[int, list]:
    """Restore model and optimiser; returns (epochs done, history so far)."""
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        raise FormatError(f"no checkpoint to resume from: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {})["svdcompress"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise FormatError(f"corrupt checkpoint {path}: {err}") from None
    saved = info.get("train_config", {})
    for key in ("lr", "batch_size", "seed"):
        if saved.get(key) != getattr(cfg, key):
            raise ConfigError(f"checkpoint {path} was made with {key}={saved.get(key)}, "
                             f"not {getattr(cfg, key)}: resume with the same settings")
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    tied = {a[len("model."):]: t[len("model."):] for a, t in info.get("tied", {}).items()}
    load_state(model, model_state, tied)
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for key, value in info["scalars"].items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in info["param_groups"]]
    try:
        opt.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise FormatError(f"checkpoint {path} does not match this optimiser: {err}") from None
    return int(info["epoch"]), list(info["history"])


# ---------------------------------------------------------------- the loop

def train(model: nn.Module, data: Dataset, cfg: TrainConfig, *,
          checkpoint_dir: str | Path | None = None, resume: bool = False,
          progress: bool = True, desc: str = "train") -> list[dict]:
    """Train ``model`` with Adam on ``data``; one history row per epoch.

    Each epoch's shuffle is seeded by (seed, epoch), so a resumed run sees the same batches
    as an uninterrupted one. With ``checkpoint_dir`` a checkpoint is written after each epoch.
    """
    device = resolve_device(cfg.device)
    model.to(device)
    data = data.to(device)
    opt = make_optimizer(model.parameters(), cfg.lr)
    start, history = 0, []
    if resume:
        if checkpoint_dir is None:
            raise ConfigError("resume needs a checkpoint directory")
        start, history = load_checkpoint(Path(checkpoint_dir), model, opt, cfg)
    n = len(data.x_train)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(0, n, cfg.batch_size), desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False, mininterval=0.5)
        for step, i in enumerate(bar):
            idx = perm[i:i + cfg.batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (out.detach().argmax(1) == yb).sum()
            if progress and step % 50 == 0:
                seen = min(n, i + len(idx))
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}",
                                acc=f"{int(correct) / seen:.4f}")
        test = evaluate(model, data.x_test, data.y_test)
        history.append({"epoch": epoch + 1, "train_loss": float(loss_sum) / n,
                        "train_accuracy": int(correct) / n, "test_loss": test["loss"],
                        "test_accuracy": test["accuracy"],
                        "seconds": time.perf_counter() - t0})
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{cfg.epochs}: train loss "
                       f"{history[-1]['train_loss']:.4f}, test accuracy {test['accuracy']:.4f}")
        if checkpoint_dir is not None:
            save_checkpoint(Path(checkpoint_dir), model, opt, epoch + 1, history, cfg)
    return history
