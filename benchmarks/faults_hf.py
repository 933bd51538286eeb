"""The Hugging Face readers of benchmarks/faults.py: fuzzed files of a source directory,
read by `svdcompress compress --hf`.

A fuzzed directory must be refused in one line (exit 2), or compress with every tensor of
the model taken from its safetensors file: "silent change" here means the model that was
compressed held a tensor the file does not (a random initialisation) or lost one it does.
A fuzzed config that still describes the same tensors (another epsilon, another token id)
is a valid model, differently configured: all a reader can promise is that it is the
file's weights. Tiny models built offline; no downloads.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

WORDS = ("the a river city market school island station museum harbour village engineer teacher "
         "farmer doctor pilot painter built found moved watched wrote quiet busy old young").split()


def _texts(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]


def make_sources(root: Path) -> dict[str, Path]:
    """A tiny Llama (tokenizer.json) and a tiny sentence-transformers BERT (modules.json)."""
    import tokenizers
    import transformers
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    llama = root / "llama"
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(llama))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(_texts(), tokenizers.trainers.WordLevelTrainer(vocab_size=64, special_tokens=["[UNK]"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(llama))
    bert = root / "bert"
    bert.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + sorted(set(WORDS))
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(str(bert))
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(bert))
    (bert / "1_Pooling").mkdir()
    (bert / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (bert / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (root / "calib.txt").write_text("\n".join(_texts(200, seed=1)))
    return {"llama": llama, "bert": bert, "calib": root / "calib.txt"}


def weights_from_file(source: Path) -> bool:
    """Every tensor of the model loaded from ``source`` is the file's (or tied to one)."""
    from svdcompress.integrations.hf_runs import load_hf
    model = load_hf(source)
    file = {}
    for f in sorted(source.glob("*.safetensors")):
        file.update(load_file(str(f)))
    state = model.state_dict()
    prefix = "encoder." if "encoder.embeddings.word_embeddings.weight" in state else "model."
    mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    stored = {id(mine[k].untyped_storage()) for k in file if k in mine}
    for key, t in mine.items():
        if key in file:
            if not torch.equal(t, file[key].to(t.dtype)):
                return False
        elif id(t.untyped_storage()) not in stored and "rotary" not in key and "position_ids" not in key:
            return False  # a tensor that no file tensor filled: random
    return True


def _safetensors_header(raw: bytes, rng: random.Random, mutate_bytes) -> bytes:
    """Fuzz only the JSON header of a safetensors file (its first 8 + n bytes)."""
    n = struct.unpack("<Q", raw[:8])[0]
    return mutate_bytes(raw[:8 + n], rng) + raw[8 + n:] if rng.random() < 0.8 else \
        mutate_bytes(raw[:8], rng) + raw[8:]


def fuzz_source(work: Path, sources: dict, target: str, cases: int, rng: random.Random,
                cli, outcome, mutate_bytes, mutate_json) -> Counter:
    """Fuzz one file of a source directory; `compress --hf` reads it."""
    model, name = target.split("/", 1)
    counts = Counter()
    for _ in range(cases):
        d = work / f"src-{model}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(sources[model], d)
        f = d / name
        raw = f.read_bytes()
        if name.endswith(".safetensors"):
            f.write_bytes(_safetensors_header(raw, rng, mutate_bytes))
        elif name.endswith(".json") and rng.random() < 0.7:
            try:
                f.write_text(json.dumps(mutate_json(json.loads(raw), rng)))
            except (ValueError, IndexError):  # (an empty object or list: nothing to mutate)
                f.write_bytes(mutate_bytes(raw, rng))
        else:
            f.write_bytes(mutate_bytes(raw, rng))
        out = work / "hf-out"
        shutil.rmtree(out, ignore_errors=True)
        code, err = cli("compress", "--hf", d, "--ratio", "0.5", "--method", "whiten", "--calib",
                        sources["calib"], "--seq-len", "16", "--calib-seqs", "8", "--out", out)
        counts[outcome(code, err, lambda: weights_from_file(d) and _loads(out))] += 1
    return counts


def _loads(run: Path) -> bool:
    import svdcompress as sc
    sc.load(run)
    return True


TARGETS = ("llama/config.json", "llama/tokenizer.json", "llama/tokenizer_config.json",
           "llama/model.safetensors", "bert/modules.json", "bert/vocab.txt", "bert/config.json")
