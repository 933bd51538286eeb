"""Real inference speed: the dense original against the compressed model, in one process.

Latency is the median over repeats after warm-up; the theoretical ratio counts the
multiply-adds of every Linear/Conv2d (dense or factorised) on the same input, measured with
forward hooks so any architecture counts right.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from .layers import LowRankConv2d, LowRankLinear
from .swap import densify_


def count_macs(model: nn.Module, inputs: dict) -> int:
    """Multiply-adds of the model's Linear, Conv2d and low-rank layers on ``inputs``."""
    total = 0

    def hook(module, args, out):
        nonlocal total
        rows = out.numel() // out.shape[-1] if out.dim() else 1
        if isinstance(module, nn.Linear):
            total += rows * module.in_features * module.out_features
        elif isinstance(module, LowRankLinear):
            total += rows * module.rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Conv2d):
            total += out.numel() * module.weight[0].numel()
        elif isinstance(module, LowRankConv2d):
            pixels = out.numel() // out.shape[1]
            total += pixels * module.rank * (module.v[0].numel() + module.out_channels)

    kinds = (nn.Linear, nn.Conv2d, LowRankLinear, LowRankConv2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def latency(model: nn.Module, inputs: dict, repeats: int = 30, warmup: int = 5) -> float:
    """Median seconds of one forward pass (inference mode; CUDA synchronised)."""
    cuda = any(t.is_cuda for t in inputs.values())
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**inputs)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def example_inputs(model: nn.Module, batch: int, device) -> dict:
    """Inputs for a built-in MLP (random features) or an HF encoder (generated sentences)."""
    if hasattr(model, "tokenize"):
        from .hf import synthetic_sentences
        return {k: v.to(device) for k, v in model.tokenize(synthetic_sentences(batch)).items()}
    return {"x": torch.randn(batch, model.in_features, device=device)}


def benchmark(model: nn.Module, batches=(1, 32, 256), threads: int | None = None,
              repeats: int = 30, devices=None) -> dict:
    """Latency and throughput of ``model`` and of its dense original at each batch size.

    The dense original is ``model`` with every low-rank layer multiplied back out: the same
    architecture and speed as the network before compression.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    dense = densify_(copy.deepcopy(model))
    rows = []
    for device in devices:
        fast, slow = model.to(device).eval(), dense.to(device).eval()
        for batch in batches:
            inputs = example_inputs(fast, batch, device)
            t_dense, t_fast = latency(slow, inputs, repeats), latency(fast, inputs, repeats)
            flop_ratio = count_macs(slow, inputs) / max(1, count_macs(fast, inputs))
            rows.append({"device": device, "batch": batch,
                         "dense_ms": 1000 * t_dense, "compressed_ms": 1000 * t_fast,
                         "speedup": t_dense / t_fast, "flop_ratio": flop_ratio,
                         "dense_per_second": batch / t_dense, "compressed_per_second": batch / t_fast})
    model.to("cpu")
    return {"threads": torch.get_num_threads(), "repeats": repeats, "torch": torch.__version__,
            "rows": rows}
