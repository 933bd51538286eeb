"""Real inference speed: the dense original against the compressed model, in one process.

Latency is the median over repeats after warm-up; the theoretical ratio counts the
multiply-adds of every Linear/Conv2d (dense or factorised) on the same input, measured with
forward hooks so any architecture counts right.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.files import check_output_file, write_json
from ..core.io import load
from ..core.kinds import any_kind
from ..core.swap import densify_
from .bench_lm import lm_benchmark
from .causal_lm import CausalLM


def count_macs(model: nn.Module, inputs: dict) -> int:
    """Multiply-adds of every layer of a registered kind (dense or low-rank) on ``inputs``."""
    total = 0

    def hook(module, args, out):
        nonlocal total
        total += any_kind(module).macs(module, out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if any_kind(m) is not None]
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


def example_inputs(model: nn.Module, batch: int, device="cpu") -> dict:
    """The model's own example inputs (``model.example_inputs(batch, device)``)."""
    if not hasattr(model, "example_inputs"):
        raise ConfigError(f"{type(model).__name__} has no example_inputs(batch, device): "
                          "cannot make inputs to benchmark it")
    return model.example_inputs(batch, device)


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


def bench_run(run: str | Path, batches=None, threads: int | None = None,
              repeats: int | None = None, out: str | Path | None = None,
              overwrite: bool = False, prompt_tokens: int = 512, new_tokens: int = 128) -> tuple[dict, Path]:
    """Benchmark a saved run against its dense original; the figures go to ``out`` (JSON).
    A causal language model is timed generating (bench_lm: prefill of ``prompt_tokens``,
    ``new_tokens`` decode steps; batches 1 and 8, 3 repeats by default); any other model
    on its example inputs (batches 1, 32 and 256, 30 repeats)."""
    if threads is not None and threads < 1:
        raise ConfigError("threads must be at least 1")
    out = Path(out) if out is not None else Path(run) / "bench.json"
    check_output_file(out, overwrite=overwrite, run=run)
    model = load(run)
    if isinstance(model, CausalLM):
        figures = lm_benchmark(model, batches or (1, 8), prompt_tokens, new_tokens,
                               repeats or 3, threads=threads)
    else:
        figures = benchmark(model, batches or (1, 32, 256), threads, repeats or 30)
    result = {"run": str(run), **figures}
    write_json(out, result)
    return result, out
