"""Run-level workflows for Hugging Face models: what `svdcompress compress --hf`,
`eval-embeddings` and `eval-lm` call. The kind of model is read from its directory:
a sentence-transformers directory (modules.json), a causal LM (its config's architectures
end in ForCausalLM or LMHeadModel), or any other encoder (AutoModel, mean-pooled)."""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from ..core.compress import compress_
from ..core.config import SVDConfig
from ..core.profile import Profile
from ..core import dist
from ..core.errors import ConfigError
from ..core.files import check_destination
from ..core.io import load, save
from ..core.report import CompressionReport, model_size
from ..core.runinfo import RunInfo
from .causal_lm import CausalLM, eval_lm_run, is_causal_lm, load_causal_lm, text_sequences, token_ids
from .hf import (EVAL_SENTENCES, SentenceEncoder, calibration_sentences, compare_embeddings,
                 file_size, load_encoder, read_texts, synthetic_sentences, text_batches)
from .hf_load import DTYPES, check_positions, check_reference, gguf_source, locate, read_json_object

__all__ = ["compress_hf", "eval_embeddings_run", "eval_lm_run", "load_hf"]


def load_hf(path: str | Path, dtype: str = "auto") -> nn.Module:
    """A local Hugging Face model directory as a SentenceEncoder or a CausalLM; a GGUF file
    (or a directory holding one) as a CausalLM. ``dtype`` casts a causal LM ("auto": as
    saved, float32 for GGUF)."""
    path = Path(path)
    if gguf_source(path) is not None:
        return load_causal_lm(path, dtype)
    if (path / "modules.json").is_file() and not (path / "svdcompress.json").is_file():
        encoder = load_encoder(path)
    else:
        config = read_json_object(locate(path) / "config.json")  # (the loader checks it whole)
        if is_causal_lm(config.get("architectures")):
            return load_causal_lm(path, dtype)
        encoder = load_encoder(path)
    return encoder if dtype == "auto" else encoder.to(DTYPES[dtype])


def compress_hf(path: str | Path, config: SVDConfig, out: str | Path, calib: str | None = None,
                calib_sentences: int = 512, overwrite: bool = False, seq_len: int = 256,
                calib_seqs: int = 128, device: str = "cpu", dtype: str = "auto",
                profile: Profile | None = None) -> tuple[CompressionReport, float]:
    """Load a local Hugging Face model (or a GGUF file), compress it and save it to ``out``;
    returns (report, seconds). Whitening calibrates an encoder on ``calib`` (one sentence a
    line) or on generated sentences, a causal LM on ``calib`` split into ``calib_seqs``
    sequences of ``seq_len`` tokens."""
    check_destination(out, overwrite=overwrite, sources=[path])
    dist.barrier()  # under torchrun: every process has checked OUT before rank 0 writes it
    t0 = time.perf_counter()
    model = load_hf(path, dtype)
    batches, what = None, None
    if config.needs_calibration:
        if isinstance(model, CausalLM):
            if calib is None:
                raise ConfigError("whitening or a data-aware allocation of a causal LM needs "
                                  "calibration text: --calib FILE")
            check_positions(model.hf_config, seq_len, "--seq-len")
            batches = text_sequences(token_ids(model, calib), seq_len, calib_seqs)
            what = f"{sum(len(b['input_ids']) for b in batches)} sequences of {seq_len} tokens from {calib}"
        else:
            texts = read_texts(calib) if calib else calibration_sentences(calib_sentences)
            batches = text_batches(model, texts)
            what = calib or f"{calib_sentences} generated sentences"
    report = compress_(model, config, batches, progress=True, device=device, profile=profile)
    seconds = time.perf_counter() - t0
    if dist.is_main():  # under torchrun, rank 0 writes
        save(model, out, config=config, overwrite=overwrite, info=RunInfo(
            source=str(Path(path).resolve()), seconds=seconds,
            compression={**report.to_dict(), **({"profile": profile.to_dict()} if profile else {})},
            metrics=model_size(model), calibration=what))
    dist.barrier()
    return report, seconds


def eval_embeddings_run(run: str | Path, reference: str | Path, texts: str | None = None,
                        sentences: int = 3000) -> dict:
    """A compressed encoder's embeddings against its uncompressed reference, without labels."""
    if sentences > EVAL_SENTENCES:
        raise ConfigError(f"sentences must be at most {EVAL_SENTENCES}")
    model = load(run)
    if not isinstance(model, SentenceEncoder):
        raise ConfigError(f"{run} is not a sentence encoder run")
    ref = load_encoder(reference)
    text = read_texts(texts) if texts else synthetic_sentences(sentences, seed=0)
    check_reference(model, ref, text, run, reference)
    m = compare_embeddings(model, ref, text)
    m["params"] = sum(p.numel() for p in model.parameters())
    m["reference_params"] = sum(p.numel() for p in ref.parameters())
    m["file_bytes"] = file_size(run)
    return m
