"""Data-aware (whitened) SVD against plain SVD on the study's MLP, without fine-tuning, and
the budgeted rank allocations against uniform ranks.

For each dataset and 4, 16 and 64 calibration batches of 128: the test accuracy of plain
truncation, of the whitened default (each layer's fit chosen on held-out calibration rows)
and of the previous default (the compensated fit on all rows, select_fit=False) at every D
of the sweep. Then, on 16 batches (the study's), uniform rank D against the global,
truncation-loss and loss-aware allocations of the same weight parameters, at D = 10, 20, 50.

    python benchmarks/whitening.py [--fashion-base report/runs/base] [--out FILE]

The base network is a saved run (--fashion-base / --mnist-base) or trained here with the
study's defaults (15 epochs, Adam 1e-3 annealed by a cosine, batch 128, seed 0). Where the
whitened default is below plain, the paired difference on the same test samples and its
standard error say whether that is more than noise.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import torch

import svdcompress as sc
from svdcompress.core.files import write_json
from svdcompress.study.data import FASHION_DIR, load_dataset
from svdcompress.study.experiments import BASE_EPOCHS, SCHEDULE, allocations, paired
from svdcompress.study.runs import calibration_batches, train_baseline
from svdcompress.study.train import TrainConfig, evaluate, predict
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

RANKS = (10, 20, 50, 100, 200)
CALIB = (4, 16, 64)
VARIANTS = {"plain": dict(method="plain"),
            "whiten (default: fit chosen on held-out rows)": dict(method="whiten"),
            "whiten, compensated on all rows (previous default)": dict(method="whiten", select_fit=False)}
QUICK_VARIANTS = ("plain", "whiten (default: fit chosen on held-out rows)")


def accuracy_at(base, data, rank, kw, calib) -> tuple[float, list, torch.Tensor]:
    model = copy.deepcopy(base)
    report = sc.compress_(model, sc.SVDConfig(rank=rank, **kw), calib if kw["method"] == "whiten" else None)
    return (evaluate(model, data.x_test, data.y_test)["accuracy"], [r.fit for r in report.compressed],
            predict(model, data.x_test) == data.y_test)


def run(name: str, base_dir: str | None, variants: dict, alloc_ranks) -> dict:
    data = load_dataset(name)
    base = sc.load(base_dir) if base_dir else \
        train_baseline(data, TrainConfig(epochs=BASE_EPOCHS, device="cpu", schedule=SCHEDULE), progress=False)[0]
    base = base.cpu()
    baseline = evaluate(base, data.x_test, data.y_test)["accuracy"]
    out = {"baseline": baseline, "base": base_dir or f"trained here ({BASE_EPOCHS} epochs, {SCHEDULE})",
           "calibration": {}}
    for n in CALIB:
        calib = calibration_batches(data, n)
        t0 = time.perf_counter()
        table, fits, correct = {}, {}, {}
        for label, kw in variants.items():
            table[label], fits[label], correct[label] = {}, {}, {}
            for d in RANKS:
                table[label][str(d)], fits[label][str(d)], correct[label][d] = accuracy_at(base, data, d, kw, calib)
        label = "whiten (default: fit chosen on held-out rows)"
        plain, default = table["plain"], table[label]
        out["calibration"][str(n)] = {
            "accuracy": table, "fits_chosen": fits[label],
            "default_at_least_plain_at_every_D": all(default[d] >= plain[d] for d in plain),
            "default_minus_plain_paired": paired(correct[label], correct["plain"]),
            "seconds": time.perf_counter() - t0}
        for label, accs in table.items():
            print(f"{name} {n:>2} batches {label[:24]:>24}: " +
                  "  ".join(f"D={d} {100 * a:.2f}" for d, a in accs.items()), flush=True)
    t0 = time.perf_counter()
    rows = allocations(base, data, alloc_ranks, calibration_batches(data, 16),
                       objectives=("global", "truncation-loss", "loss-aware"))
    out["allocation_16_batches"] = [{k: r[k] for k in ("rank", "allocation", "accuracy", "params", "ranks", "chosen")}
                                    for r in rows]
    out["allocation_seconds"] = time.perf_counter() - t0
    for r in rows:
        print(f"{name} D={r['rank']} {r['allocation']:>16}: {100 * r['accuracy']:.2f}% "
              f"ranks {list(r['ranks'].values())} {r['chosen'] or ''}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fashion-base", help="a saved Fashion-MNIST base run (default: train one)")
    p.add_argument("--mnist-base", help="a saved mnist-5k base run (default: train one)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "whitening.json"))
    p.add_argument("--quick", action="store_true", help="without the previous default's column")
    p.add_argument("--alloc-ranks", default="10,20,50", help="D of the allocation comparison")
    p.add_argument("--fashion-alloc-ranks", help="for Fashion-MNIST only (default: --alloc-ranks)")
    args = p.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if not args.quick or k in QUICK_VARIANTS}
    ranks = lambda text: [int(r) for r in text.split(",") if r]  # noqa: E731
    warnings.filterwarnings("ignore", message=".*rows per input feature")  # 4 and 16 batches are few
    result = {"benchmark": "whitening", "device": "cpu", "threads": torch.get_num_threads(),
              "calib_batches": list(CALIB), "ranks": list(RANKS), "datasets": {}}
    sets = [("mnist-5k", args.mnist_base)]
    if FASHION_DIR.is_dir():
        sets.insert(0, ("fashion-mnist", args.fashion_base))
    for name, base in sets:
        alloc = args.fashion_alloc_ranks if name == "fashion-mnist" and args.fashion_alloc_ranks else args.alloc_ranks
        result["datasets"][name] = run(name, base, variants, ranks(alloc))
    out = Path(args.out)
    write_json(out, stamp(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
