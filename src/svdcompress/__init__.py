"""svdcompress: compress PyTorch models by truncated-SVD (low-rank) factorisation."""

from .compress import CompressionReport, LayerReport, compress_
from .config import SVDConfig
from .factorize import svd, truncated_factors
from .io import FormatError, load, save
from .layers import LowRankConv2d, LowRankLinear, ProjectedLinear
from .models import MLP, build_model
from .rank import RankSpec, choose_rank
from .swap import densify_, project_, unproject_

__version__ = "0.1.0"

__all__ = [
    "CompressionReport", "FormatError", "LayerReport", "LowRankConv2d", "LowRankLinear", "MLP",
    "ProjectedLinear", "RankSpec", "SVDConfig", "__version__", "build_model", "choose_rank",
    "compress_", "densify_", "load", "project_", "save", "svd", "truncated_factors", "unproject_",
]
