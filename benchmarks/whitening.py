"""Data-aware (whitened) SVD against plain SVD on the study's MLP, without fine-tuning.

For each dataset: the accuracy of plain truncation and of whitened truncation (parallel
and sequential calibration, two dampings) at every D of the sweep; global rank allocation
against uniform D = 20 at the same parameters; and the epochs that fine-tuning from plain
and from whitened D = 20 factors takes to reach the baseline minus 0.3 points.

    python benchmarks/whitening.py [--fashion-base report/runs/base] [--out FILE]

The base network is a saved run (--fashion-base / --mnist-base) or trained here with the
study's defaults (20 epochs, Adam 1e-3, batch 128, seed 0).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import svdcompress as sc
from svdcompress.core.files import write_json
from svdcompress.study.data import FASHION_DIR, load_dataset
from svdcompress.study.claims import epochs_to
from svdcompress.study.experiments import finetune_factors, global_vs_uniform
from svdcompress.study.runs import calibration_batches, train_baseline
from svdcompress.study.train import TrainConfig, evaluate

RANKS = (10, 20, 50, 100, 200)
VARIANTS = [  # (label, method, sequential, damping)
    ("plain", "plain", False, 0.0),
    ("whiten-parallel", "whiten", False, 1e-2),
    ("whiten-sequential", "whiten", True, 1e-2),  # the default
    ("whiten-sequential-d0.1", "whiten", True, 1e-1),
]


def accuracy_at(base, data, rank, method, sequential, damping, calib) -> float:
    model = copy.deepcopy(base)
    sc.compress_(model, sc.SVDConfig(rank=rank, method=method, sequential=sequential,
                                     damping=damping), calib if method == "whiten" else None)
    return evaluate(model, data.x_test, data.y_test)["accuracy"]


def run(name: str, base_dir: str | None, calib_batches: int, ft_epochs: int) -> dict:
    data = load_dataset(name)
    if base_dir:
        base = sc.load(base_dir)
    else:
        base, _ = train_baseline(data, TrainConfig(epochs=20, device="cpu"), progress=False)
    base = base.cpu()
    baseline = evaluate(base, data.x_test, data.y_test)["accuracy"]
    calib = calibration_batches(data, calib_batches)
    t0 = time.perf_counter()
    table = {label: {d: accuracy_at(base, data, d, m, seq, damp, calib) for d in RANKS}
             for label, m, seq, damp in VARIANTS}
    seconds = time.perf_counter() - t0
    for label, accs in table.items():
        print(f"{name} {label:>18}: " + "  ".join(f"D={d} {100 * a:.2f}" for d, a in accs.items()))
    alloc = global_vs_uniform(base, data, 20, calib)
    cfg = TrainConfig(epochs=ft_epochs, lr=1e-4, device="cpu")
    ft = {}
    for method in ("plain", "whiten"):
        r = finetune_factors(base, data, 20, cfg, progress=False, method=method, calib=calib)
        r.pop("model")
        ft[method] = {"start": r["start_accuracy"], "end": r["accuracy"],
                      "per_epoch": [h["test_accuracy"] for h in r["history"]],
                      "epochs_to_baseline_minus_0.3": epochs_to(r, baseline - 0.003)}
    return {"baseline": baseline, "base": base_dir or "trained here (20 epochs)",
            "truncation_accuracy": {k: {str(d): a for d, a in v.items()} for k, v in table.items()},
            "sweep_seconds_all_variants": seconds,
            "allocation_at_D20_params": [{k: r[k] for k in ("method", "allocation", "accuracy",
                                                             "params", "ranks")} for r in alloc],
            "finetune_from_D20": ft}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fashion-base", help="a saved Fashion-MNIST base run (default: train one)")
    p.add_argument("--mnist-base", help="a saved mnist-5k base run (default: train one)")
    p.add_argument("--calib-batches", type=int, default=64)
    p.add_argument("--ft-epochs", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "whitening.json"))
    args = p.parse_args()
    result = {"benchmark": "whitening", "device": "cpu", "threads": torch.get_num_threads(),
              "calib_batches": args.calib_batches, "ranks": list(RANKS), "datasets": {}}
    sets = [("mnist-5k", args.mnist_base)]
    if FASHION_DIR.is_dir():
        sets.insert(0, ("fashion-mnist", args.fashion_base))
    for name, base in sets:
        result["datasets"][name] = run(name, base, args.calib_batches, args.ft_epochs)
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
