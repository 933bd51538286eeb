"""Block-wise calibration in bounded memory: peak resident memory and time of whitened
compression of random-initialised GPT-2-small-shaped and Llama-shaped causal LMs.

Each measurement runs in a fresh process (its peak RSS is its own): the model alone, two
forward passes of the calibration data, plain-SVD compression, and whitened compression
(sequential, block-wise: the default). Prints and saves the figures:

    python benchmarks/blockwise.py [--seqs 128] [--tokens 256] [--ratio 0.5] [--device cpu]
        [--out benchmarks/results/blockwise.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

SHAPES = {
    "gpt2-small": dict(family="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                       n_positions=1024),
    "llama-8x1024-gqa": dict(family="llama", num_hidden_layers=8, hidden_size=1024,
                             intermediate_size=2816, num_attention_heads=16,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}


def build(name: str):
    import transformers

    from svdcompress.integrations.causal_lm import CausalLM
    spec = dict(SHAPES[name])
    family = spec.pop("family")
    torch.manual_seed(0)
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**spec))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec))
    return CausalLM(hf.eval(), 1024)


def calibration(model, seqs: int, tokens: int, batch: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.hf_config.vocab_size, (seqs, tokens), generator=g)
    return [{"input_ids": ids[i:i + batch], "attention_mask": torch.ones_like(ids[i:i + batch])}
            for i in range(0, seqs, batch)]


def worker(name: str, mode: str, seqs: int, tokens: int, ratio: float, device: str) -> dict:
    import svdcompress as sc

    torch.set_num_threads(torch.get_num_threads())
    model = build(name)
    data = calibration(model, seqs, tokens)
    out = {"params": sum(p.numel() for p in model.parameters()),
           "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    t0 = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            for _ in range(2):
                for b in data:
                    model(**b)
    elif mode in ("plain", "whiten"):
        report = sc.compress_(model, sc.SVDConfig(ratio=ratio, method=mode), data if mode == "whiten"
                              else None, device=device)
        out["params_after"] = sum(p.numel() for p in model.parameters())
        out["compressed_layers"] = len(report.compressed)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.startswith("cuda") and torch.cuda.is_available():
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
        out["device_name"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=128)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--modes", default="baseline,forward,plain,whiten",
                   help="measure only these; the others are kept from --out")
    p.add_argument("--out", default="benchmarks/results/blockwise.json")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.seqs, args.tokens, args.ratio, args.device)))
        return
    from svdcompress.core.files import write_json

    results = {}
    old = {}
    if Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text()).get("models", {})
    for name in args.models.split(","):
        rows = dict(old.get(name, {}).get("rows", {}))
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--worker", name, mode, "--seqs", str(args.seqs),
                   "--tokens", str(args.tokens), "--ratio", str(args.ratio), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{name} {mode}: {rows[mode]['seconds']:.1f} s, peak RSS "
                  f"{rows[mode]['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
        hidden = SHAPES[name].get("n_embd") or SHAPES[name]["hidden_size"]
        boundary = args.seqs * args.tokens * hidden * 4
        over = rows["whiten"]["peak_rss_bytes"] - rows["baseline"]["peak_rss_bytes"]
        budget = 3 * rows["plain"]["seconds"] + rows["forward"]["seconds"]  # forward = two passes
        results[name] = {
            "shape": SHAPES[name], "rows": rows, "model_bytes": rows["baseline"]["bytes"],
            "block_boundary_bytes": boundary,
            "whiten_peak_over_baseline_bytes": over,
            "whiten_peak_over_baseline_in_boundaries": over / boundary,
            "time_budget_seconds": budget,
            "whiten_seconds": rows["whiten"]["seconds"],
            "whiten_within_time_budget": rows["whiten"]["seconds"] <= budget,
        }
        r = results[name]
        print(f"{name}: whitened peak = baseline (model + runtime) + {over / 2**20:.0f} MiB = "
              f"{r['whiten_peak_over_baseline_in_boundaries']:.2f} block boundaries of "
              f"{boundary / 2**20:.0f} MiB; {r['whiten_seconds']:.0f} s against a budget of "
              f"{budget:.0f} s (3 x plain + 2 forward passes)", flush=True)
    results = {**{k: v for k, v in old.items() if k not in results}, **results}
    write_json(args.out, stamp({"benchmark": "blockwise", "seqs": args.seqs, "tokens": args.tokens,
                          "ratio": args.ratio, "device": args.device,
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "gpu": "not measured: no GPU was lent to this task", "models": results}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
