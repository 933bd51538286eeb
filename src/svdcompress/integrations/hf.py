"""Hugging Face encoders (BERT-like, sentence-transformers) as sentence-embedding models.

Needs the optional extra ``svdcompress[hf]`` (transformers). Everything loads from local
directories, offline, strictly (hf_load.py): no hub access, no remote code, every weight from
safetensors.
A sentence-transformers directory (modules.json) gives its pooling and normalisation; a
plain Hugging Face model directory is mean-pooled.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ..core.archs import Architecture
from ..core.errors import ConfigError, FormatError
from .hf_load import (check_positions, custom_code, from_config, load_config, load_pretrained, load_tokenizer,
                      one_line, positions, read_hf_config, read_json_object, transformers_lib)

# Files that describe the model and its tokenizer (copied next to the compressed weights).
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "vocab.txt", "special_tokens_map.json", "added_tokens.json", "merges.txt",
                "vocab.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")
# What transformers' loaders may read from a directory besides those (a run must list them).
HF_READS = CONFIG_FILES + ("*.py", "chat_template.*", "preprocessor_config.json",
                           "processor_config.json", "*.safetensors.index.json")


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder with pooling: token ids -> one embedding per sentence."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean", normalize: bool = True,
                 max_length: int = 256) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder, self.pooling, self.normalize, self.max_length = encoder, pooling, normalize, max_length
        self.tokenizer = None  # set by load_encoder; not a module, not saved in the state

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if getattr(self.encoder.config, "is_decoder", False):  # no key-value cache: one pass each
            kwargs["use_cache"] = False
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(out, dim=-1) if self.normalize else out

    @property
    def hf_config(self):
        return self.encoder.config

    def arch_spec(self) -> dict:
        return {"name": "hf-encoder", "pooling": self.pooling, "normalize": self.normalize,
                "max_length": self.max_length}

    def example_inputs(self, batch: int, device="cpu") -> dict:
        """Keyword inputs for ``batch`` generated sentences (benchmarks, ONNX export)."""
        return {k: v.to(device) for k, v in self.tokenize(synthetic_sentences(batch)).items()}

    def tokenize(self, texts: list[str]) -> dict:
        return dict(self.tokenizer(texts, padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt"))

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        was = self.training
        self.eval()
        out = [self(**self.tokenize(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0)


def _pooling_of(path: Path) -> tuple[str, bool, Path, int | None]:
    """(pooling, normalize, transformer dir, max length or None) of a sentence-transformers
    directory."""
    modules = read_json_list(path / "modules.json")
    pooling, normalize, base = "mean", False, path
    for m in modules:
        kind, sub = m.get("type"), m.get("path", "")
        if not isinstance(kind, str) or not isinstance(sub, str) or ".." in Path(sub).parts:
            raise FormatError(f"{path / 'modules.json'}: each module needs a string 'type' and a "
                              "relative 'path'")
        if kind.endswith("Transformer"):
            base = path / sub
        elif kind.endswith("Pooling"):
            cfg = read_json_object(path / sub / "config.json")
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not cfg.get("pooling_mode_mean_tokens", True):
                raise FormatError(f"{path}: only mean or CLS pooling is supported")
        elif kind.endswith("Normalize"):
            normalize = True
    max_length = None
    sbert = base / "sentence_bert_config.json"
    if sbert.is_file():
        max_length = read_json_object(sbert).get("max_seq_length")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise FormatError(f"{sbert}: max_seq_length must be a positive integer")
    return pooling, normalize, base, max_length


def read_json_list(path: Path) -> list[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FormatError(f"{path} is not valid JSON: {one_line(err)}") from None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise FormatError(f"{path} must hold a list of objects")
    return value


def load_encoder(path: str | Path) -> SentenceEncoder:
    """A pretrained encoder from a local sentence-transformers or Hugging Face directory."""
    path = Path(path)
    if (path / "modules.json").is_file() and not (path / "svdcompress.json").is_file():
        pooling, normalize, base, max_length = _pooling_of(path)
    else:
        pooling, normalize, base, max_length = "mean", False, path, None
    config = read_hf_config(base)
    encoder = load_pretrained(transformers_lib().AutoModel, base, "Hugging Face model")
    tokenizer = load_tokenizer(base, encoder.config, required=True)
    if max_length is None:  # not set by the directory: 256 tokens, or fewer if the model has fewer
        max_length = min(256, (positions(encoder.config) or (256, ""))[0])
    check_positions(encoder.config, max_length, "max_seq_length")
    custom_code(base, config)
    model = SentenceEncoder(encoder, pooling, normalize, max_length).eval()
    model.tokenizer = tokenizer
    model.source_dir = base
    return model


def build_encoder(directory: str | Path, spec: dict) -> SentenceEncoder:
    """An empty encoder of a saved run's architecture (its config.json), tokenizer included."""
    raw = read_hf_config(directory, run=True)
    config = load_config(directory)
    encoder = from_config(transformers_lib().AutoModel, config, directory)
    model = SentenceEncoder(encoder, spec.get("pooling", "mean"), bool(spec.get("normalize", True)),
                            int(spec.get("max_length", 256))).eval()
    model.tokenizer = load_tokenizer(directory, config, required=True)
    custom_code(directory, raw)
    return model


def copy_config(model: nn.Module, out: str | Path) -> None:
    """Put the model's config and tokenizer files beside the compressed weights: copied from
    the directory it was loaded from, or written from the objects in memory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = getattr(model, "source_dir", None)
    if src is not None and (Path(src) / "config.json").is_file():
        for name in CONFIG_FILES:
            if (Path(src) / name).is_file():
                shutil.copyfile(Path(src) / name, out / name)
    else:
        model.hf_config.to_json_file(str(out / "config.json"))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(out))


def text_batches(model: SentenceEncoder, texts: list[str], batch_size: int = 32) -> list[dict]:
    """Tokenised calibration batches (dicts of keyword inputs) for compress_."""
    return [model.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def file_size(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def compare_embeddings(model: SentenceEncoder, reference, texts: list[str],
                       queries: int = 500) -> dict:
    """Label-free quality of ``model`` against ``reference`` on ``texts``.

    Mean cosine similarity between the two embeddings of each sentence, and nearest-neighbour
    retrieval agreement: for the first ``queries`` sentences as queries over all the others,
    how often the top-1 neighbour is the same, and the mean overlap of the top-10 sets.
    ``reference`` is the reference model or its embeddings of ``texts``.
    """
    if len(texts) < 12:
        raise ConfigError(f"comparing embeddings needs at least 12 sentences (each query's 10 "
                          f"nearest neighbours besides itself), got {len(texts)}")
    t0 = time.perf_counter()
    emb = model.encode(texts)
    seconds = time.perf_counter() - t0
    ref = reference if isinstance(reference, torch.Tensor) else reference.encode(texts)
    cos = nn.functional.cosine_similarity(emb, ref, dim=-1)
    q = min(queries, len(texts) - 11)

    def neighbours(e):
        e = nn.functional.normalize(e, dim=-1)
        sims = e[:q] @ e.T
        sims[torch.arange(q), torch.arange(q)] = -float("inf")  # not itself
        return sims.topk(10, dim=1).indices

    a, b = neighbours(emb), neighbours(ref)
    top10 = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (10 * q)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "top1_agreement": float((a[:, 0] == b[:, 0]).float().mean()), "top10_overlap": top10,
            "sentences_per_second": len(texts) / seconds, "sentences": len(texts), "queries": q}


_WORDS = {
    "adj": "quiet busy old young bright tired careful curious small large green silent famous "
           "local remote ancient modern happy nervous clever patient".split(),
    "noun": "engineer teacher farmer doctor pilot painter student baker nurse writer chef "
            "lawyer driver sailor musician scientist child gardener mechanic librarian".split(),
    "verb": "repaired painted studied visited sold cleaned designed measured photographed "
            "carried described opened tested ordered built found moved watched wrote borrowed".split(),
    "obj": "bridge house boat letter garden engine report song table window bicycle map "
           "camera painting recipe telescope violin contract basket ladder".split(),
    "place": "near the river|in the city|at the market|behind the school|on the island|"
             "in the mountains|at the station|inside the museum|by the harbour|in the village".split("|"),
    "time": "this morning|last winter|after lunch|every Sunday|before sunrise|late at night|"
            "during the storm|in the spring|yesterday|on Friday".split("|"),
}


def synthetic_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct, deterministic English sentences (evaluation or calibration text)."""
    rng = random.Random(seed)
    w = _WORDS
    templates = (
        "The {adj} {noun} {verb} the {obj} {place} {time}.",
        "{Time}, a {adj} {noun} {verb} an {adj2} {obj} {place}.",
        "Why did the {noun} say the {obj} {place} was so {adj}?",
        "Nobody expected the {adj} {noun} to have {verb} the {obj} {time}.",
        "The {obj} that the {noun} {verb} {place} looked {adj} {time}.",
    )
    out, seen = [], set()
    while len(out) < n:
        t = rng.choice(templates)
        time_phrase = rng.choice(w["time"])
        s = t.format(adj=rng.choice(w["adj"]), adj2=rng.choice(w["adj"]), noun=rng.choice(w["noun"]),
                     verb=rng.choice(w["verb"]), obj=rng.choice(w["obj"]), place=rng.choice(w["place"]),
                     time=time_phrase, Time=time_phrase[0].upper() + time_phrase[1:])
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


EVAL_SENTENCES = 10_000  # generated sentences 0..9,999 are evaluation text, never calibration


def calibration_sentences(n: int) -> list[str]:
    """Generated calibration text, disjoint from the evaluation sentences."""
    return synthetic_sentences(EVAL_SENTENCES + n, seed=0)[EVAL_SENTENCES:]


def read_texts(path: str | Path) -> list[str]:
    """One sentence per non-empty line of a UTF-8 text file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read text file {path}: {err}") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ConfigError(f"text file {path} has no sentences")
    return texts


def _build(spec: dict, directory: Path) -> SentenceEncoder:
    return build_encoder(directory, spec)


# Found by svdcompress.load through the entry point "hf-encoder" in pyproject.toml.
ARCHITECTURE = Architecture("hf-encoder", _build, copy_config, reads=HF_READS)
