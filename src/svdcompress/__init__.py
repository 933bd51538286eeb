"""svdcompress: compress PyTorch models by truncated-SVD (low-rank) factorisation.

This package's namespace is the core only: importing it loads neither the study (data,
training, report) nor any integration (Hugging Face, ONNX, benchmarks). Those live in
``svdcompress.study`` and ``svdcompress.integrations``.
"""

from .core.archs import Architecture, register_architecture
from .core.compress import compress_
from .core.config import SVDConfig
from .core.errors import ConfigError, DataError, FormatError, MissingDependency, SVDCompressError
from .core.factorize import svd, truncated_factors
from .core.io import load, read_info, read_meta, save
from .core.kinds import LayerKind, register_kind
from .core.layers import Int8LowRankLinear, LowRankConv1d, LowRankConv2d, LowRankLinear
from .core.projection import ProjectedLinear
from .core.rank import RankSpec, choose_rank
from .core.report import CompressionReport, KeepDense, LayerReport
from .core.runinfo import DataInfo, RunInfo
from .core.swap import densify_, dequantize_, project_, quantize_, unproject_

__version__ = "0.1.0"

__all__ = [
    "Architecture", "CompressionReport", "ConfigError", "DataError", "DataInfo", "FormatError",
    "Int8LowRankLinear", "KeepDense", "LayerKind", "LayerReport", "LowRankConv1d",
    "LowRankConv2d", "LowRankLinear", "MissingDependency", "ProjectedLinear", "RankSpec",
    "RunInfo", "SVDCompressError", "SVDConfig", "__version__", "choose_rank", "compress_",
    "densify_", "dequantize_", "load", "project_", "quantize_", "read_info", "read_meta",
    "register_architecture", "register_kind", "save", "svd", "truncated_factors", "unproject_",
]
