"""Real inference speed-ups of the reference MLP (784 -> 1024 x5 -> 10) at each rank.

For D in {10, 20, 50, 100, 200} and batch 1, 32 and 256, in one process: the median latency
of the dense network and of its rank-D factorisation (every layer but the last), the
measured speed-up beside the theoretical multiply-add ratio, and the weight file's size on
disk against parameters x 4 bytes. Saves JSON and a figure.

    python benchmarks/inference.py [--threads N] [--repeats 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

import svdcompress as sc
from svdcompress.study import MLP
from svdcompress.integrations.bench import benchmark
from svdcompress.core.files import write_json
from svdcompress.study.report import finish, subplots
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

RANKS = (10, 20, 50, 100, 200)
BATCHES = (1, 32, 256)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int)
    p.add_argument("--repeats", type=int, default=30)
    here = Path(__file__).parent / "results"
    p.add_argument("--out", default=str(here / "inference.json"))
    p.add_argument("--figure", default=str(here / "inference.png"))
    args = p.parse_args()
    torch.manual_seed(0)
    base = MLP()  # speed does not depend on the weights' values
    rows = []
    for rank in RANKS:
        model = copy.deepcopy(base)
        sc.compress_(model, sc.SVDConfig(rank=rank))
        result = benchmark(model, BATCHES, args.threads, args.repeats, devices=["cpu"])
        params = sum(q.numel() for q in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            sc.save(model, tmp)
            nbytes = (Path(tmp) / "model.safetensors").stat().st_size
        for r in result["rows"]:
            rows.append({"rank": rank, **r, "params": params, "file_bytes": nbytes,
                         "file_over_params_x4": nbytes / (4 * params)})
            print(f"D={rank:>3} batch {r['batch']:>3}: speed-up {r['speedup']:6.2f}x "
                  f"(multiply-adds {r['flop_ratio']:5.1f}x), file {nbytes:,} bytes "
                  f"({nbytes / (4 * params):.4f} of params x 4)", flush=True)
    dense_bytes = 4 * sum(q.numel() for q in base.parameters())
    write_json(args.out, stamp({"benchmark": "inference", "device": "cpu", "threads": torch.get_num_threads(),
                          "repeats": args.repeats, "torch": torch.__version__,
                          "gpu": "not measured: no GPU was lent to this task",
                          "dense_param_bytes": dense_bytes, "rows": rows}))
    fig, ax = subplots()
    for batch in BATCHES:
        sel = [r for r in rows if r["batch"] == batch]
        ax.plot([r["rank"] for r in sel], [r["speedup"] for r in sel], "o-", label=f"measured, batch {batch}")
    sel = [r for r in rows if r["batch"] == BATCHES[0]]
    ax.plot([r["rank"] for r in sel], [r["flop_ratio"] for r in sel], "k--", label="multiply-add ratio")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(RANKS, [str(r) for r in RANKS])
    finish(fig, ax, Path(args.figure), "rank D", "speed-up over the dense network",
           f"Reference MLP inference on CPU ({torch.get_num_threads()} threads)")
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
