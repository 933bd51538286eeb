"""Scaling out with torchrun on this machine: training and calibration throughput with 1 and
2 processes (4 where the machine has the cores), measured in one run, each process with
an equal share of the CPU threads (so 2 processes do not simply get twice the cores).

    python benchmarks/scaling.py [--out benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from svdcompress.core.files import write_json
from svdcompress.study.data import write_idx
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

TRAIN = ["--epochs", "1", "--width", "1024", "--depth", "5", "--batch-size", "128", "--quiet",
         "--device", "cpu"]


def make_data(root: Path, n_train=6000, n_test=500) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return root


def launch(procs: int, args: list[str]) -> float:
    threads = max(1, (os.cpu_count() or 1) // procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = ([sys.executable, "-m", "svdcompress"] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(procs), "-m", "svdcompress"])
    t0 = time.perf_counter()
    subprocess.run([*cmd, *map(str, args)], check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/scaling.json")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    counts = [n for n in (1, 2, 4) if n <= max(2, cores)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp / "data")
        launch(1, ["train", "--data", data, "--out", tmp / "base", *TRAIN])
        for n in counts:
            t_train = launch(n, ["train", "--data", data, "--out", tmp / f"t{n}", *TRAIN])
            t_cal = launch(n, ["compress", tmp / "base", "--rank", 20, "--method", "whiten",
                               "--calib-batches", 32, "--out", tmp / f"c{n}"])
            rows.append({"processes": n, "threads_per_process": max(1, cores // n),
                         "train_seconds": t_train, "train_samples_per_second": 6000 / t_train,
                         "compress_whiten_seconds": t_cal})
            print(f"{n} process(es): train 1 epoch {t_train:.1f} s ({6000 / t_train:.0f} samples/s), "
                  f"whitened compression {t_cal:.1f} s", flush=True)
    for r in rows:
        r["train_speedup"] = rows[0]["train_seconds"] / r["train_seconds"]
        r["compress_speedup"] = rows[0]["compress_whiten_seconds"] / r["compress_whiten_seconds"]
    write_json(args.out, stamp({"benchmark": "scaling", "cores": cores, "torch": torch.__version__,
                          "note": "wall time of the whole command, process start-up included; "
                                  "the cores are shared, so more processes cannot add compute here",
                          "gpu": "not measured: no GPU was lent to this task", "rows": rows}, threads=1))
    print(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
