"""ONNX export of a (compressed) model, checked against PyTorch with onnxruntime.

Low-rank layers export as two MatMul/Gemm nodes, so the runtime gets the real saving.
Needs the optional extra ``svdcompress[onnx]`` (onnx, onnxruntime).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import SVDCompressError, require
from ..core.files import atomic_write, check_output_file
from ..core.io import load
from .bench import example_inputs


class ExportMismatch(SVDCompressError):
    """The exported graph does not compute what the PyTorch model computes."""

# float32 through a different kernel library: agreement to about 1e-5 relative is normal;
# the check fails beyond this.
ATOL, RTOL = 1e-4, 1e-3


def export_onnx(model: nn.Module, path: str | Path, batch: int = 2, check: bool = True) -> dict:
    """Write ``model`` as ONNX (dynamic batch axis) and, with ``check``, compare its output
    with PyTorch's on the same inputs. Returns the check's figures."""
    model = model.cpu().eval()
    inputs = example_inputs(model, batch, "cpu")
    names = list(inputs)
    axes = {n: {0: "batch", 1: "tokens"} if inputs[n].dim() == 2 and n != "x" else {0: "batch"}
            for n in names}
    axes["output"] = {0: "batch"}

    def write(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            # dynamo=False: the TorchScript-based exporter needs no onnxscript and handles
            # every layer here; the graph is the same two-matmul form either way.
            torch.onnx.export(model, tuple(inputs.values()), tmp, input_names=names,
                              output_names=["output"], dynamic_axes=axes, dynamo=False,
                              opset_version=17)
    atomic_write(path, write)
    return check_onnx(model, path, inputs) if check else {}


def check_onnx(model: nn.Module, path: str | Path, inputs: dict) -> dict:
    ort = require("onnxruntime", extra="onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    got = session.run(None, feed)[0]
    with torch.no_grad():
        want = model(**inputs).numpy()
    diff = float(np.abs(got - want).max())
    ok = bool(np.allclose(got, want, atol=ATOL, rtol=RTOL))
    if not ok:
        raise ExportMismatch(f"ONNX output differs from PyTorch by up to {diff:.2e} "
                         f"(tolerance atol {ATOL}, rtol {RTOL})")
    nodes = [n.op_type for n in _graph(path).node]
    return {"max_abs_diff": diff, "atol": ATOL, "rtol": RTOL, "matmul_nodes":
            sum(op in ("MatMul", "Gemm", "Conv") for op in nodes), "nodes": len(nodes)}


def _graph(path):
    return require("onnx", extra="onnx").load(str(path)).graph


def export_run(run: str | Path, path: str | Path, overwrite: bool = False) -> dict:
    """Export a saved run to ONNX at ``path`` and check it; returns the check's figures."""
    check_output_file(path, overwrite=overwrite, run=run)
    return export_onnx(load(run), path)
