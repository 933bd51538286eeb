"""Cost of dynamic SVD training against plain training, measured as ratios in one run.

On the reference MLP (784 -> 1024 x5 -> 10) and the default data (Fashion-MNIST when
installed, else mnist-5k): a base network is trained for one epoch, then three copies are
trained for the same steps, batches and seed:

* plain     -- ordinary training of the dense network (then truncated to rank D to test);
* exact     -- dynamic training, P_D(W) from a full SVD every step (the reference);
* subspace  -- dynamic training with the warm-started subspace tracker (the default).

plain and subspace steps are interleaved one by one so that both see the same machine
load; exact is run after them (it is ~30x slower). Prints and saves JSON: time per step,
ratios to plain, the rank-D test accuracy of each, and the tracker's projection error
against the exact projection along the run.

    python benchmarks/dynamic_overhead.py [--steps 200] [--rank 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import svdcompress as sc
from svdcompress.study import MLP
from svdcompress.core.files import write_json
from svdcompress.study.data import FASHION_DIR, load_dataset
from svdcompress.core.projection import ProjectedLinear
from svdcompress.core.projection import projection_error
from svdcompress.study.train import TrainConfig, evaluate, make_optimizer, train
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402


def make_stepper(model, data, lr, batch, seed):
    opt = make_optimizer(model.parameters(), lr)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    state = {"i": 0}

    def step(inspect=None) -> float:
        """One training step; ``inspect()`` runs after the forward pass, untimed."""
        i = state["i"] * batch % (len(order) - batch)
        idx = order[i:i + batch]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        if inspect is not None:
            t1 = time.perf_counter()
            inspect()
            t0 += time.perf_counter() - t1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["i"] += 1
        return time.perf_counter() - t0
    return step


def tracker_errors(model, rank) -> list[float]:
    """Each projected layer's training projection (this step's) against the exact one."""
    return [projection_error(*m._cache, m.weight, rank)
            for m in model.modules() if isinstance(m, ProjectedLinear)]


def rank_d_accuracy(model, data, rank) -> float:
    model = copy.deepcopy(model).eval()
    if any(isinstance(m, ProjectedLinear) for m in model.modules()):
        sc.unproject_(model)
    else:
        sc.compress_(model, sc.SVDConfig(rank=rank))
    return evaluate(model, data.x_test, data.y_test)["accuracy"]


def summary(times: list[float]) -> dict:
    return {"median_ms": 1000 * statistics.median(times), "mean_ms": 1000 * statistics.fmean(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="fashion-mnist" if FASHION_DIR.is_dir() else "mnist-5k")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "dynamic_overhead.json"))
    args = p.parse_args()

    data = load_dataset(args.data)
    torch.manual_seed(args.seed)
    base = MLP(data.in_features, [1024] * 5, 10)
    t0 = time.perf_counter()
    train(base, data, TrainConfig(epochs=1, seed=args.seed, device="cpu"), progress=False)
    print(f"base: 1 epoch in {time.perf_counter() - t0:.0f} s, "
          f"accuracy {evaluate(base, data.x_test, data.y_test)['accuracy']:.4f}")

    models = {"plain": copy.deepcopy(base), "subspace": copy.deepcopy(base),
              "exact": copy.deepcopy(base)}
    sc.project_(models["subspace"], args.rank, method="subspace")
    sc.project_(models["exact"], args.rank, method="exact")
    steppers = {k: make_stepper(m, data, args.lr, args.batch, args.seed) for k, m in models.items()}
    times = {k: [] for k in models}
    errors, iters = [], []
    for k in ("plain", "subspace"):
        steppers[k]()  # step 0: warm-up; the tracker's first step is an exact SVD
    layers = [m for m in models["subspace"].modules() if isinstance(m, ProjectedLinear)]

    def record_error(step):
        errs = tracker_errors(models["subspace"], args.rank)
        errors.append({"step": step, "max": max(errs), "per_layer": errs})

    for s in range(1, args.steps):
        check = s % 25 == 0 or s == args.steps - 1
        times["plain"].append(steppers["plain"]())  # interleaved: the same machine load
        times["subspace"].append(steppers["subspace"](
            (lambda: record_error(s)) if check else None))
        iters.append(statistics.fmean(m.last_iters for m in layers))
        if check:
            print(f"step {s}: plain {1000 * times['plain'][-1]:.1f} ms, subspace "
                  f"{1000 * times['subspace'][-1]:.1f} ms, max projection error {errors[-1]['max']:.2e}")
    steppers["exact"]()
    for s in range(1, args.steps):
        times["exact"].append(steppers["exact"]())
    print(f"exact: {1000 * statistics.median(times['exact']):.0f} ms per step")

    # The tracker's exact refresh (every refresh_every steps) amortised over its period.
    layer = layers[0]
    refresh_share = statistics.median(times["exact"]) / layer.refresh_every

    plain = statistics.median(times["plain"])
    result = {
        "benchmark": "dynamic_overhead",
        "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "gpu": "not measured: no GPU was lent to this task",
        "data": data.name, "steps": args.steps, "rank": args.rank, "lr": args.lr,
        "batch": args.batch, "seed": args.seed,
        "time_per_step": {k: summary(v) for k, v in times.items()},
        "ratio_to_plain": {k: statistics.median(v) / plain for k, v in times.items()},
        "subspace_ratio_with_refresh_amortised":
            (statistics.median(times["subspace"]) + refresh_share) / plain,
        "subspace_mean_iterations_per_step": statistics.fmean(iters),
        "rank_d_accuracy": {k: rank_d_accuracy(m, data, args.rank) for k, m in models.items()},
        "subspace_projection_error": errors,
        "subspace_settings": layer.options(),
    }
    acc = result["rank_d_accuracy"]
    result["subspace_minus_exact_accuracy_points"] = 100 * (acc["subspace"] - acc["exact"])
    out = Path(args.out)
    write_json(out, stamp(result))
    print(json.dumps({k: result[k] for k in ("ratio_to_plain", "subspace_ratio_with_refresh_amortised",
                                             "rank_d_accuracy")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
