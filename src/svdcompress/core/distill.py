"""Distillation losses: a compressed network learns from the dense one it came from.

For a classifier, the KL divergence from the teacher's to the student's softened output
distribution at a temperature T (scaled by T^2, so its gradients keep their size as T
changes; Hinton et al., 2015), mixed with the cross-entropy on the labels where there are
labels. For a sentence encoder, 1 - cosine similarity (or the mean squared error) between
the student's and the teacher's embeddings: no labels at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError


@dataclass(frozen=True)
class Distill:
    """temperature: T > 0 of the softened distributions; alpha: the share of the
    distillation term in [0, 1] (1 - alpha goes to the label loss); embedding_loss: "cosine"
    or "mse" for encoders."""

    temperature: float = 2.0
    alpha: float = 0.5
    embedding_loss: str = "cosine"

    def __post_init__(self) -> None:
        ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not ok(self.temperature) or not 0 < self.temperature < float("inf"):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature!r}")
        if not ok(self.alpha) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.embedding_loss not in ("cosine", "mse"):
            raise ConfigError(f"embedding_loss must be cosine or mse, got {self.embedding_loss!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def logit_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
               cfg: Distill, reduction: str = "mean") -> torch.Tensor:
    """alpha T^2 KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) CE(student,
    labels), per sample summed or averaged (``reduction``)."""
    t = cfg.temperature
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher.detach() / t, -1),
                  reduction="none", log_target=True).sum(-1) * t * t
    loss = cfg.alpha * kl
    if labels is not None and cfg.alpha < 1:
        loss = loss + (1 - cfg.alpha) * F.cross_entropy(student, labels, reduction="none")
    return loss.sum() if reduction == "sum" else loss.mean()


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, cfg: Distill) -> torch.Tensor:
    """Mean 1 - cosine similarity, or mean squared error per embedding."""
    if cfg.embedding_loss == "cosine":
        return (1 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()
    return (student - teacher.detach()).square().sum(-1).mean()
