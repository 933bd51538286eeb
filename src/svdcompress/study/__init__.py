"""The study: MNIST-format data, the reference MLP, training, the experiments of the
SVD-compression study, its claims and its report. Built on the core; the figures need the
optional extra svdcompress[study] (matplotlib)."""

from .models import MLP, build_model

__all__ = ["MLP", "build_model"]
