"""How fast a compressed causal LM reads and writes text, against its dense original.

Two phases, as a user of ``generate`` meets them:

- prefill: one forward pass over a prompt of ``prompt_tokens`` tokens that fills the
  key-value cache and gives the next token's logits (only the last position's, as
  ``generate`` asks for them), reported in prompt tokens per second;
- decode: ``new_tokens`` greedy steps of one token each through the key-value cache, after
  the same prompt, reported in milliseconds per step and new tokens per second.

The dense original is the run with its low-rank layers multiplied back out (the network's
shape before compression). Both models are timed in the same process, shape by shape and
alternately (dense, compressed, dense, ...), so that drift of a shared machine falls on both;
the figure is the median over ``repeats`` after ``warmup``. Peak memory is what the phase
adds to the process: resident memory sampled every 10 ms on CPU, the allocator's peak on
CUDA.
"""

from __future__ import annotations

import copy
import inspect
import os
import platform
import statistics
import threading
import time

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.swap import densify_
from .causal_lm import CausalLM
from .hf_load import check_positions


class PeakRSS:
    """The process's largest resident set size (bytes) while the block runs."""

    def __init__(self, every: float = 0.01) -> None:
        self.every = every

    def __enter__(self):
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    """The process's resident set size in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _last_logits_only(hf: nn.Module) -> dict:
    """``generate``'s prefill computes the last position's logits only (transformers >= 4.45
    names the argument ``logits_to_keep``, earlier ``num_logits_to_keep``)."""
    params = inspect.signature(hf.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _cache_argument(hf: nn.Module) -> str:
    """The key-value cache's name in the forward's arguments and outputs (transformers 5
    renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


@torch.inference_mode()
def prefill_seconds(hf: nn.Module, ids: torch.Tensor) -> float:
    """Seconds of one cached forward pass over ``ids`` (the prompt)."""
    device = str(ids.device)
    _sync(device)
    t0 = time.perf_counter()
    hf(input_ids=ids, use_cache=True, **_last_logits_only(hf))
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_seconds(hf: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds of ``new_tokens`` greedy one-token steps through the cache after the prompt
    ``ids`` (its prefill, which gives the first token, is not timed), and the tokens."""
    device = str(ids.device)
    name = _cache_argument(hf)
    out = hf(input_ids=ids, use_cache=True, **_last_logits_only(hf))
    nxt = out.logits[:, -1:].argmax(-1)
    tokens = [nxt]
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = hf(input_ids=nxt, use_cache=True, **{name: getattr(out, name)})
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    _sync(device)
    return time.perf_counter() - t0, torch.cat(tokens, 1)


class PhasePeak:
    """What a phase adds to the peak memory (``.added``, bytes): the allocator's peak on CUDA,
    the sampled resident set size on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.device = device

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.watch = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.added = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.watch.__exit__(*exc)
            self.added = self.watch.peak - self.watch.start


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def measure(models: dict, vocab: int, batches=(1, 8), prompt_tokens: int = 512, new_tokens: int = 128,
            repeats: int = 3, warmup: int = 1, device: str = "cpu", seed: int = 0) -> list[dict]:
    """Prefill and decode figures of each Hugging Face causal LM in ``models`` (name: model),
    per batch size: the models take turns within every repeat, so drift falls on all alike."""
    for m in models.values():
        m.to(device).eval()
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(seed + batch)
        ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=g).to(device)
        times = {(k, p): [] for k in models for p in ("prefill", "decode")}
        added, made = {k: 0 for k in models}, {}
        for i in range(warmup + repeats):
            for name, hf in models.items():
                with PhasePeak(device) as mem:
                    t_pre = prefill_seconds(hf, ids)
                    t_dec, made[name] = decode_seconds(hf, ids, new_tokens)
                added[name] = max(added[name], mem.added)
                if i >= warmup:
                    times[name, "prefill"].append(t_pre)
                    times[name, "decode"].append(t_dec)
        row = {"device": device, "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
               "tokens": {k: v.tolist() for k, v in made.items()}}
        for name in models:
            pre = statistics.median(times[name, "prefill"])
            dec = statistics.median(times[name, "decode"])
            row[name] = {"prefill_ms": 1000 * pre, "prefill_tokens_per_second": batch * prompt_tokens / pre,
                         "decode_ms_per_token": 1000 * dec / new_tokens,
                         "decode_tokens_per_second": batch * new_tokens / dec,
                         "peak_added_bytes": added[name]}
        rows.append(row)
    for m in models.values():
        m.to("cpu")
    return rows


def speedups(row: dict, name: str, dense: str = "dense") -> dict:
    """The measured speed-ups of model ``name`` over ``dense`` in one row of ``measure``."""
    return {"prefill_speedup": row[dense]["prefill_ms"] / row[name]["prefill_ms"],
            "decode_speedup": row[dense]["decode_ms_per_token"] / row[name]["decode_ms_per_token"],
            "same_tokens": row["tokens"][dense] == row["tokens"][name]}


def lm_benchmark(model: nn.Module, batches=(1, 8), prompt_tokens: int = 512, new_tokens: int = 128,
                 repeats: int = 3, warmup: int = 1, threads: int | None = None, devices=None,
                 dense: nn.Module | None = None, seed: int = 0) -> dict:
    """Prefill and decode speed of the causal LM ``model`` (a ``CausalLM``) and of its dense
    original (``dense``, default: ``model`` multiplied back out) at each batch size."""
    if not isinstance(model, CausalLM):
        raise ConfigError(f"{type(model).__name__} is not a causal language model")
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("prompt tokens, new tokens and repeats must be at least 1, warm-up at least 0")
    check_positions(model.hf_config, prompt_tokens + new_tokens + 1,
                    f"--prompt-tokens ({prompt_tokens}) plus --new-tokens ({new_tokens}) plus one, in all")
    if threads is not None:
        torch.set_num_threads(threads)
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    dense = dense if dense is not None else densify_(copy.deepcopy(model))
    models = {"dense": dense.model, "compressed": model.model}
    rows = []
    for device in devices:
        for row in measure(models, model.hf_config.vocab_size, batches, prompt_tokens, new_tokens,
                           repeats, warmup, device, seed):
            rows.append({**{k: v for k, v in row.items() if k != "tokens"},
                         **speedups(row, "compressed")})
    return {"kind": "causal-lm", "threads": torch.get_num_threads(), "repeats": repeats,
            "warmup": warmup, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if "cuda" in devices else _cpu_name(),
            "weight_bytes": {"dense": weight_bytes(dense), "compressed": weight_bytes(model)},
            "rows": rows}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
