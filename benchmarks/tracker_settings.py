"""How the subspace tracker's defaults were chosen: cost and projection error of settings.

For each setting (oversample, tol, max_iters), a copy of the same one-epoch base network
is trained with dynamic SVD training at rank D, its steps interleaved with plain training
steps on the same batches so both see the same machine load. Prints and saves JSON: the
median step-time ratio to plain, the mean tracker iterations per step, and the largest
projection error against the exact projection over the last half of the run.

    python benchmarks/tracker_settings.py [--steps 150] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import svdcompress as sc
from svdcompress.study import MLP
from svdcompress.core.files import write_json
from svdcompress.study.data import FASHION_DIR, load_dataset
from svdcompress.core.projection import ProjectedLinear
from svdcompress.study.train import TrainConfig, train

from dynamic_overhead import make_stepper, tracker_errors
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

SETTINGS = [
    {"oversample": 8, "tol": 1e-3, "max_iters": 2},
    {"oversample": 16, "tol": 1e-3, "max_iters": 2},
    {"oversample": 24, "tol": 1e-3, "max_iters": 2},
    {"oversample": 32, "tol": 1e-3, "max_iters": 2},
    {"oversample": 16, "tol": 5e-4, "max_iters": 2},
    {"oversample": 16, "tol": 0.0, "max_iters": 2},
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--data", default="fashion-mnist" if FASHION_DIR.is_dir() else "mnist-5k")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "tracker_settings.json"))
    args = p.parse_args()

    data = load_dataset(args.data)
    torch.manual_seed(0)
    base = MLP(data.in_features, [1024] * 5, 10)
    train(base, data, TrainConfig(epochs=1, device="cpu"), progress=False)
    rows = []
    for setting in SETTINGS:
        plain, dyn = copy.deepcopy(base), copy.deepcopy(base)
        sc.project_(dyn, args.rank, **setting)
        layers = [m for m in dyn.modules() if isinstance(m, ProjectedLinear)]
        step_plain = make_stepper(plain, data, 1e-4, 128, 0)
        step_dyn = make_stepper(dyn, data, 1e-4, 128, 0)
        step_plain(), step_dyn()  # warm-up; the tracker starts from an exact SVD
        tp, td, iters, errors = [], [], [], []
        for s in range(1, args.steps):
            check = s >= args.steps // 2 and s % 10 == 0
            tp.append(step_plain())
            td.append(step_dyn((lambda: errors.append(max(tracker_errors(dyn, args.rank))))
                               if check else None))
            iters.append(statistics.fmean(m.last_iters for m in layers))
        row = {**setting, "ratio_to_plain": statistics.median(td) / statistics.median(tp),
               "mean_iterations": statistics.fmean(iters), "max_projection_error": max(errors)}
        rows.append(row)
        print(json.dumps(row))
    out = Path(args.out)
    write_json(out, stamp({"benchmark": "tracker_settings", "device": "cpu",
                     "threads": torch.get_num_threads(), "data": data.name,
                     "rank": args.rank, "steps": args.steps, "time": time.ctime(),
                     "settings": rows}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
