"""The typed run metadata that svdcompress.json carries beside the format fields.

Every workflow (train, compress, fine-tune, dynamic training, Hugging Face compression)
describes its run with one ``RunInfo``; reading one back checks each field's type, so a
hand-edited file fails with one clear line rather than somewhere downstream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import FormatError


@dataclass(frozen=True)
class DataInfo:
    """Which data a run was trained on: a named dataset or a directory, maybe a subset."""

    name: str
    limit_train: int | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class RunInfo:
    data: DataInfo | None = None
    source: str | None = None  # the run or model directory this run was made from
    train: dict | None = None  # the TrainConfig, as a dict
    history: list | None = None  # one row per epoch
    metrics: dict | None = None  # accuracy, loss, params, bytes...
    compression: dict | None = None  # CompressionReport.to_dict()
    projection: dict | None = None  # dynamic training: {"rank", "method"}
    calibration: str | None = None  # what calibrated a data-aware compression
    seconds: float | None = None  # how long the run's main step took
    distill: dict | None = None  # distillation: {"teacher", "temperature", "alpha", ...}

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.__dict__.copy() if isinstance(value, DataInfo) else value
        return out

    @classmethod
    def from_dict(cls, meta: dict) -> "RunInfo":
        """The RunInfo fields of a svdcompress.json object (other keys are ignored)."""
        values = {}
        for f in fields(cls):
            value = meta.get(f.name)
            if value is None:
                continue
            if f.name == "data":
                value = _data_info(value)
            elif not isinstance(value, _TYPES[f.name]) or isinstance(value, bool):
                raise FormatError(f"svdcompress.json: field {f.name!r} has the wrong type "
                                  f"({type(value).__name__})")
            values[f.name] = value
        return cls(**values)


_TYPES = {"source": str, "train": dict, "history": list, "metrics": dict, "compression": dict,
          "projection": dict, "calibration": str, "seconds": (int, float),
          "distill": dict}


def _data_info(value) -> DataInfo:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise FormatError("svdcompress.json: field 'data' must be an object with a dataset name")
    limit = value.get("limit_train")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise FormatError(f"svdcompress.json: data.limit_train must be a positive integer, got {limit!r}")
    stats = {}
    for key in ("mean", "std"):
        x = value.get(key)
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or
                              not math.isfinite(x)):
            raise FormatError(f"svdcompress.json: data.{key} must be a finite number, got {x!r}")
        stats[key] = x
    return DataInfo(value["name"], limit, **stats)
