"""Hugging Face causal language models (GPT-2, Llama, Mistral, Qwen, Phi, ...): loading
offline, calibration text, sliding-window perplexity.

Needs the optional extra ``svdcompress[hf]``. Models load from local directories only, from
safetensors, with no remote code and no missing tensor (hf_load.py); a compressed run keeps the config and tokenizer beside
its weights, so ``svdcompress.load(run)`` rebuilds it offline.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from ..core.archs import Architecture
from ..core.errors import ConfigError
from ..core.io import META, load
from .hf import HF_READS, copy_config, file_size, read_texts
from .hf_load import (DTYPES, check_positions, check_reference, custom_code, from_config, gguf_source, load_gguf, load_config, load_pretrained,
                      load_tokenizer, positions, read_hf_config, transformers_lib)


class CausalLM(nn.Module):
    """A Hugging Face causal LM: token ids -> next-token logits (no cache)."""

    output_is_logits = True

    def __init__(self, model: nn.Module, max_length: int = 1024) -> None:
        super().__init__()
        self.model, self.max_length = model, max_length
        self.tokenizer = None  # set when loaded; not a module, not saved in the state

    @property
    def hf_config(self):
        return self.model.config

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def arch_spec(self) -> dict:
        return {"name": "hf-causal-lm", "max_length": self.max_length}

    def example_inputs(self, batch: int, device="cpu", tokens: int = 64) -> dict:
        """Random token ids (benchmarks, ONNX export)."""
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.hf_config.vocab_size, (batch, tokens), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def is_causal_lm(architectures) -> bool:
    """A config whose architectures end in ForCausalLM (or LMHeadModel, as GPT-2's)."""
    return isinstance(architectures, list) and any(
        isinstance(n, str) and n.endswith(("ForCausalLM", "LMHeadModel")) for n in architectures)


def load_causal_lm(path: str | Path, dtype: str = "auto") -> CausalLM:
    """A pretrained causal LM from a local Hugging Face directory (in its saved dtype, or
    ``dtype``), or from a GGUF file (dequantised to ``dtype``, float32 by default)."""
    path = Path(path)
    gguf = gguf_source(path)
    if gguf is not None:
        hf, tokenizer = load_gguf(*gguf, dtype)
        config = None
    else:
        config = read_hf_config(path)
        hf = load_pretrained(transformers_lib().AutoModelForCausalLM, path, "causal LM",
                             dtype=DTYPES[dtype])
        tokenizer = load_tokenizer(path, hf.config, required=False)  # None: token ids only
    model = CausalLM(hf, (positions(hf.config) or (1024, ""))[0]).eval()
    model.tokenizer = tokenizer
    model.source_dir = None if gguf else path  # a GGUF's config and tokenizer are written anew
    if config is not None:
        custom_code(path, config)
    return model


def build_causal_lm(spec: dict, directory: Path) -> CausalLM:
    """An empty causal LM of a saved run's architecture (its config.json)."""
    raw = read_hf_config(directory, run=True)
    config = load_config(directory)
    hf = from_config(transformers_lib().AutoModelForCausalLM, config, directory)
    model = CausalLM(hf, int(spec.get("max_length", 1024))).eval()
    model.tokenizer = load_tokenizer(directory, config, required=False)
    custom_code(directory, raw)
    return model


def token_ids(model: CausalLM, text_file: str | Path) -> torch.Tensor:
    """A UTF-8 text file as one stream of token ids (its lines joined by newlines)."""
    return ids_of(model, read_text(text_file))


def read_text(text_file: str | Path) -> str:
    """A UTF-8 text file's non-empty lines, joined by newlines (what token_ids reads)."""
    return "\n".join(read_texts(text_file))


def ids_of(model: CausalLM, text: str) -> torch.Tensor:
    if model.tokenizer is None:
        raise ConfigError("this model has no tokenizer: it cannot read text")
    return torch.tensor(model.tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)


def text_sequences(ids: torch.Tensor, seq_len: int, count: int | None = None,
                   batch_size: int = 8) -> list[dict]:
    """Calibration batches: consecutive sequences of ``seq_len`` tokens (at most ``count``)."""
    n = len(ids) // seq_len
    if n == 0:
        raise ConfigError(f"the calibration text has {len(ids)} tokens, fewer than one sequence "
                          f"of {seq_len}")
    n = min(n, count) if count else n
    seqs = ids[:n * seq_len].reshape(n, seq_len)
    return [{"input_ids": seqs[i:i + batch_size], "attention_mask": torch.ones_like(seqs[i:i + batch_size])}
            for i in range(0, n, batch_size)]


@torch.no_grad()
def perplexity(model: CausalLM, ids: torch.Tensor, window: int = 512, stride: int = 256) -> dict:
    """Sliding-window perplexity: each window scores only the tokens the previous window did
    not, with up to ``window - stride`` tokens of context before them. ``stride == window``
    is the field's evaluation (SVD-LLM's, GPTQ's): non-overlapping windows, each scoring its
    tokens after the first. ``nll`` is the mean negative log-likelihood per scored token."""
    if not 0 < stride <= window:
        raise ConfigError(f"stride must be in [1, window], got {stride} and {window}")
    model.eval()
    nll, count, prev_end = 0.0, 0, 0
    t0 = time.perf_counter()
    for begin in range(0, max(1, len(ids) - 1), stride):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end].unsqueeze(0)
        logits = model(chunk).float()
        targets = chunk[0, 1:].clone()
        first = max(prev_end, begin + 1) - (begin + 1)  # already-scored tokens are context only
        losses = nn.functional.cross_entropy(logits[0, :-1], targets, reduction="none")[first:]
        nll += float(losses.sum())
        count += losses.numel()
        prev_end = end
        if end == len(ids):
            break
    seconds = time.perf_counter() - t0
    if count == 0:
        raise ConfigError("the evaluation text is too short: it needs at least two tokens")
    return {"nll": nll / count, "perplexity": math.exp(nll / count), "tokens": count,
            "seconds": seconds, "tokens_per_second": count / seconds}


def eval_lm_run(run: str | Path, reference: str | Path, text: str | Path, window: int | None = None,
                stride: int | None = None, max_tokens: int | None = None) -> dict:
    """Perplexity, speed and size of a compressed causal LM against its reference, on the
    first ``max_tokens`` tokens of ``text`` (all of it by default)."""
    model = load(run)
    if not isinstance(model, CausalLM):
        raise ConfigError(f"{run} is not a causal language model run")
    if window is None:  # 512 tokens, or the model's positions when it has fewer
        window = min(512, (positions(model.hf_config) or (512, ""))[0])
    check_positions(model.hf_config, window, "--window")
    stride = max(1, window // 2) if stride is None else stride
    ref = load_causal_lm(reference)
    raw = read_text(text)  # read once: scored, and checked against the reference's tokenizer
    ids = ids_of(model, raw)
    check_reference(model, ref, raw, run, reference)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    out = {"window": window, "stride": stride, "text": str(text)}
    for name, m in (("compressed", model), ("reference", ref)):
        out[name] = {**perplexity(m, ids, window, stride),
                     "params": sum(p.numel() for p in m.parameters())}
    out["compressed"]["file_bytes"] = file_size(run)
    return out


@torch.no_grad()
def generate(model: CausalLM, prompt: str, max_new_tokens: int | None = None, sample: bool = False,
             seed: int = 0, temperature: float = 1.0, top_k: int | None = None) -> dict:
    """A continuation of ``prompt`` through the Hugging Face generation API with its
    key-value cache: greedy by default; ``sample`` draws tokens (seeded: the same seed gives
    the same text, whatever ran before); ``max_new_tokens`` defaults to 64, or fewer when
    the model's positions leave less room. Returns the text, the continuation alone, the new
    tokens' count and the seconds they took."""
    ids = ids_of(model, prompt)
    if ids.numel() == 0:
        raise ConfigError("the prompt is empty after tokenisation: give some text")
    if max_new_tokens is None:  # 64, or as many as the model's positions leave room for
        known = positions(model.hf_config)
        max_new_tokens = max(1, min(64, known[0] - ids.numel())) if known else 64
    check_positions(model.hf_config, ids.numel() + max_new_tokens,
                    f"the prompt ({ids.numel()} tokens) plus --max-new-tokens ({max_new_tokens}), in all")
    if sample and not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature}")
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    options = dict(do_sample=True, temperature=temperature, top_k=top_k or 0) if sample else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            t = time.perf_counter()
            out = model.model.generate(input_ids=ids[None].to(device), attention_mask=torch.ones_like(ids)[None].to(device),
                                       max_new_tokens=max_new_tokens, pad_token_id=pad, **options)
            seconds = time.perf_counter() - t
    finally:
        model.train(was)
    new = out[0, ids.numel():].cpu()
    return {"prompt": prompt, "continuation": tok.decode(new, skip_special_tokens=True),
            "text": tok.decode(out[0].cpu(), skip_special_tokens=True), "new_tokens": int(new.numel()),
            "tokens": new.tolist(), "seconds": seconds,
            "tokens_per_second": new.numel() / seconds if seconds > 0 else float("inf")}


def generate_run(run: str | Path, prompt: str, **options) -> dict:
    """``generate`` on a saved causal-LM run (svdcompress.load), or a Hugging Face directory."""
    model = load(run) if (Path(run) / META).is_file() else load_causal_lm(run)
    if not isinstance(model, CausalLM):
        raise ConfigError(f"{run} is not a causal language model run")
    return generate(model, prompt, **options)


# Found by svdcompress.load through the entry point "hf-causal-lm" in pyproject.toml.
ARCHITECTURE = Architecture("hf-causal-lm", lambda spec, directory: build_causal_lm(spec, directory),
                            copy_config, reads=HF_READS)
