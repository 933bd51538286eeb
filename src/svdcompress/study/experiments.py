"""The study's experiments as plain functions that return plain dicts: train a baseline,
sweep the truncation rank, fine-tune the factors; ``reproduce`` runs them all."""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..core.compress import compress_
from ..core.config import SVDConfig
from ..core.devices import machine
from ..core.files import write_json
from ..core.io import save
from ..core.report import model_size
from ..core.runinfo import DataInfo, RunInfo
from ..core.swap import project_, unproject_
from ..core.distill import Distill
from .claims import claims
from .data import Dataset, load_dataset, split_validation
from .report import write_report
from .runs import calibration_batches, sweep, train_baseline
from .train import TrainConfig, evaluate, train

STUDY_RANKS = (10, 20, 50, 100, 200, None)  # None: the full, uncompressed network


def spectra(model: nn.Module) -> dict[str, list[float]]:
    """Singular values of every dense Linear layer's weight (for the spectrum figure)."""
    return {name: torch.linalg.svdvals(m.weight.detach().float().cpu()).tolist()
            for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def finetune_factors(base: nn.Module, data: Dataset, rank: int, cfg: TrainConfig,
                     progress=True, method: str = "plain", calib=None,
                     distill: Distill | None = None, start: nn.Module | None = None) -> dict:
    """Compress ``base`` at ``rank`` (or take a copy of ``start``, ``base`` already
    compressed) and fine-tune the factors (the study's second experiment); with
    ``distill``, learning from ``base`` itself (KL on its logits mixed with the labels)."""
    model = copy.deepcopy(start if start is not None else base).cpu()
    if start is None:
        compress_(model, SVDConfig(rank=rank, method=method), calib)
    label = method if start is None else "given start"
    start = evaluate(model, data.x_test, data.y_test)["accuracy"]
    t0 = time.perf_counter()
    history = train(model, data, cfg, progress=progress,
                    desc=f"{'distill' if distill else 'finetune'} {label} D={rank} seed {cfg.seed}",
                    teacher=copy.deepcopy(base) if distill else None, distill=distill)
    return {"seed": cfg.seed, "method": method, "lr": cfg.lr, "start_accuracy": start,
            "history": history, "accuracy": history[-1]["test_accuracy"] if history else start,
            "seconds": time.perf_counter() - t0, "model": model,
            "distill": distill.to_dict() if distill else None}


def allocations(base: nn.Module, data: Dataset, ranks, calib, method: str = "whiten",
                objectives=None, keep: dict | None = None) -> list[dict]:
    """Uniform rank D against budgeted allocations of the same weight parameters;
    ``keep``, when given, gets each compressed model and its config by (rank, allocation)."""
    rows = []
    for rank in ranks:
        uniform = copy.deepcopy(base).cpu()
        rep_u = compress_(uniform, SVDConfig(rank=rank, method=method), calib)
        layers = rep_u.considered()
        weights = sum(r.shape[0] * r.shape[1] for r in layers)
        kept = sum(r.rank * sum(r.shape) if r.rank else r.shape[0] * r.shape[1] for r in layers)
        done = [("uniform", uniform, rep_u)]
        for allocation in objectives or ALLOCATIONS:
            model = copy.deepcopy(base).cpu()
            rep = compress_(model, SVDConfig(ratio=kept / weights, method=method, allocation=allocation), calib)
            done.append((allocation, model, rep))
        for name, model, rep in done:
            if keep is not None:
                keep[rank, name] = model, (SVDConfig(rank=rank, method=method) if name == "uniform" else
                                           SVDConfig(ratio=kept / weights, method=method, allocation=name))
            rows.append({"method": method, "rank": rank, "allocation": name, "weight_ratio": kept / weights,
                         **evaluate(model, data.x_test, data.y_test), **model_size(model),
                         "ranks": {r.name: r.rank for r in rep.considered()},
                         "chosen": (rep.allocation or {}).get("chosen")})
    return rows


def dynamic_training(base: nn.Module, data: Dataset, rank: int, cfg: TrainConfig,
                     method: str = "subspace", progress=True, checkpoint_dir=None,
                     resume=False) -> dict:
    """Dynamic SVD training from ``base``: train W with P_D(W) in every forward pass, then
    keep the final factors (the study's third experiment)."""
    model = copy.deepcopy(base).cpu()
    project_(model, rank, method=method)
    start = evaluate(model, data.x_test, data.y_test)["accuracy"]
    t0 = time.perf_counter()
    history = train(model, data, cfg, progress=progress, checkpoint_dir=checkpoint_dir,
                    resume=resume, desc=f"dynamic D={rank} seed {cfg.seed}")
    seconds = time.perf_counter() - t0
    unproject_(model.cpu())
    return {"seed": cfg.seed, "lr": cfg.lr, "start_accuracy": start, "history": history,
            "accuracy": evaluate(model, data.x_test, data.y_test)["accuracy"],
            "seconds": seconds, "model": model}


QUICK = {"limit_train": 10_000, "epochs": 3, "ft_epochs": 2, "grid_samples": 3_000, "grid_epochs": 1}
LR_GRID = (1e-4, 3e-4, 1e-3)  # each method's learning rate is chosen from these ...
GRID = {"grid_samples": 8_000, "grid_epochs": 2}  # ... on the validation split, training on a subset
ALLOC_RANKS = (10, 20)  # the study's allocation comparison (benchmarks/whitening.py adds D = 50)
ALLOCATIONS = ("truncation-loss", "loss-aware")  # and "global" in benchmarks/whitening.py
SEEDS = 3  # fine-tuning and dynamic training are repeated over seeds for a standard error
BASE_EPOCHS = 15  # the baseline's; every training of the study anneals its learning rate:
SCHEDULE = "cosine"  # final numbers are not one lucky or unlucky last epoch at a high rate


def paired(a: dict, b: dict) -> dict:
    """Per rank, the samples only ``a`` gets right, those only ``b`` does, and the standard
    error of the accuracy difference a - b over the same test samples (paired)."""
    out = {}
    for rank in a.keys() & b.keys():
        n = len(a[rank])
        only_a, only_b = int((a[rank] & ~b[rank]).sum()), int((b[rank] & ~a[rank]).sum())
        mean = (only_a - only_b) / n
        var = ((only_a + only_b) / n - mean ** 2) / max(1, n - 1)
        out[str(rank)] = {"only_first": only_a, "only_second": only_b, "difference": mean,
                          "se": max(0.0, var) ** 0.5}
    return out


def accuracy_at(run: dict, seconds: float) -> float:
    """Test accuracy of a run's last epoch finished within ``seconds`` of training."""
    acc, spent = run["start_accuracy"], 0.0
    for h in run["history"]:
        spent += h["seconds"]
        if spent > seconds:
            break
        acc = h["test_accuracy"]
    return acc


def choose_lr(run, grid=LR_GRID) -> tuple[float, dict]:
    """The learning rate whose run ends with the best validation accuracy (ties: the
    smaller rate), and every rate's score."""
    scores = {lr: run(lr)["accuracy"] for lr in grid}
    return max(grid, key=lambda lr: (scores[lr], -lr)), {str(lr): a for lr, a in scores.items()}


def reproduce(data_name: str, out: str | Path, *, quick=False, epochs=BASE_EPOCHS, lr=1e-3,
              ft_rank=20, ft_epochs=5, seed=0, ranks=STUDY_RANKS,
              hidden=(1024,) * 5, dynamic=True, calib_batches=16, device="auto",
              progress=True, val_fraction=0.1) -> dict:
    """The whole study into ``out``: results.json, report.md and figures; runs under out/runs.

    A validation split (``val_fraction`` of the training samples) is held out from
    everything that trains; fine-tuning, distillation and dynamic training each take the
    learning rate of LR_GRID with the best validation accuracy (short runs on a subset:
    GRID), then run ``ft_epochs`` on the rest of the training data over SEEDS seeds, and
    only their final numbers are read on the test split. Every training (baseline included)
    anneals its learning rate by SCHEDULE. Distillation starts from the library's best
    compression at D = ft_rank's parameters (whitened, loss-aware allocation), and is
    compared with fine-tuning on the labels from that same start."""
    with warnings.catch_warnings():  # 16 batches are 2 rows per input: known, and said in the report
        warnings.filterwarnings("ignore", message=".*rows per input feature")
        return _reproduce(data_name, out, quick=quick, epochs=epochs, lr=lr, ft_rank=ft_rank,
                          ft_epochs=ft_epochs, seed=seed, ranks=ranks, hidden=hidden, dynamic=dynamic,
                          calib_batches=calib_batches, device=device, progress=progress,
                          val_fraction=val_fraction)


def _reproduce(data_name, out, *, quick, epochs, lr, ft_rank, ft_epochs, seed, ranks, hidden,
               dynamic, calib_batches, device, progress, val_fraction) -> dict:
    out = Path(out)
    limit = QUICK["limit_train"] if quick else None
    grid = {k: QUICK[k] for k in GRID} if quick else dict(GRID)
    if quick:
        epochs, ft_epochs = min(epochs, QUICK["epochs"]), min(ft_epochs, QUICK["ft_epochs"])
    timings = {}
    t0 = time.perf_counter()
    data, val = split_validation(load_dataset(data_name, limit_train=limit), val_fraction, seed)
    timings["load_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, device=device, schedule=SCHEDULE)
    base, history = train_baseline(data, cfg, hidden, out=out / "runs" / "base", progress=progress,
                                   limit_train=limit, overwrite=True)
    base = base.cpu()
    timings["baseline"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    correct_p, correct_w = {}, {}
    rows = sweep(base, data, ranks, progress=progress, correct=correct_p)
    timings["sweep"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    calib = calibration_batches(data, calib_batches, seed=seed)
    rows_w = sweep(base, data, ranks, progress=progress, method="whiten",
                   calib_batches=calib_batches, correct=correct_w)
    alloc_ranks = [r for r in ranks if r in ALLOC_RANKS] if not quick else []
    compressed: dict = {}
    allocation = allocations(base, data, sorted({*alloc_ranks, ft_rank}), calib, keep=compressed)
    # the library's best start at D = ft_rank's parameters: whitened, loss-aware ranks
    budget_start, budget_config = compressed[ft_rank, "loss-aware"]
    del compressed
    timings["sweep_whiten_and_allocation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    g = torch.randperm(len(val.x_train), generator=torch.Generator().manual_seed(seed))[:grid["grid_samples"]]
    small = Dataset(val.name, val.x_train[g], val.y_train[g], val.x_test, val.y_test, val.mean, val.std)
    methods = {  # name -> run(data, cfg): each method of recovering accuracy at D = ft_rank
        "finetune": lambda d, c: finetune_factors(base, d, ft_rank, c, progress=progress),
        "distill": lambda d, c: finetune_factors(base, d, ft_rank, c, progress=progress, distill=Distill(),
                                                 start=budget_start),
        "dynamic": lambda d, c: dynamic_training(base, d, ft_rank, c, progress=progress),
    }
    if not dynamic:
        methods.pop("dynamic")
    chosen, grids = {}, {}
    for name, run in methods.items():
        chosen[name], grids[name] = choose_lr(
            lambda lr, run=run: run(small, TrainConfig(epochs=grid["grid_epochs"], lr=lr, seed=seed, device=device,
                                                       schedule=SCHEDULE)))
    timings["learning_rate_grid"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seeds = [seed + i for i in range(SEEDS)]

    def ft_cfg(name, s):
        return TrainConfig(epochs=ft_epochs, lr=chosen[name], seed=s, device=device, schedule=SCHEDULE)

    runs = {name: [run(data, ft_cfg(name, s)) for s in (seeds if name != "distill" else seeds[:1])]
            for name, run in methods.items()}
    ft_whiten = finetune_factors(base, data, ft_rank, ft_cfg("finetune", seed), progress=progress,
                                 method="whiten", calib=calib)
    ft_whiten.pop("model")
    ft_budget = finetune_factors(base, data, ft_rank, ft_cfg("finetune", seed), progress=progress,
                                 start=budget_start)
    ft_budget.pop("model")
    data_info = DataInfo(data.name, limit)
    for name, done in runs.items():
        for r in done:
            model = r.pop("model")
            if r["seed"] == seed:
                save(model, out / "runs" / f"d{ft_rank}-{name}",
                     config=budget_config if name == "distill" else SVDConfig(rank=ft_rank),
                     info=RunInfo(data=data_info, history=r["history"]), overwrite=True)
    timings["finetune_distill_dynamic"] = time.perf_counter() - t0

    equal_time = None
    if dynamic:  # each pair of seeds compared at the time the faster of the two took
        pairs = list(zip(runs["finetune"], runs["dynamic"]))
        budget = [min(sum(h["seconds"] for h in r["history"]) for r in pair) for pair in pairs]
        equal_time = {"seconds": budget,
                      "finetune": [accuracy_at(f, b) for (f, _), b in zip(pairs, budget)],
                      "dynamic": [accuracy_at(d, b) for (_, d), b in zip(pairs, budget)]}
    settings = {"rank": ft_rank, "epochs": ft_epochs}
    results = {
        "data": {"name": data.name, "train_samples": len(data.x_train), "validation_samples": len(val.x_test),
                 "test_samples": len(data.x_test), "limit_train": limit},
        "settings": {"quick": quick, "epochs": epochs, "lr": lr, "batch_size": cfg.batch_size,
                     "seed": seed, "ft_rank": ft_rank, "ft_epochs": ft_epochs, "lr_grid": list(LR_GRID),
                     "schedule": SCHEDULE,
                     **grid, "architecture": base.arch_spec(), "device": str(device),
                     "threads": torch.get_num_threads()},
        "baseline": {"history": history, **evaluate(base, data.x_test, data.y_test),
                     **model_size(base)},
        "sweep": rows,
        "sweep_whiten": rows_w,
        "sweep_paired": paired(correct_w, correct_p),
        "allocation": allocation,
        "calib_batches": calib_batches,
        "learning_rates": {"chosen": chosen, "validation_accuracy": grids},
        "finetune": {**settings, "lr": chosen["finetune"], "runs": runs["finetune"]},
        "finetune_whiten": {**settings, "lr": chosen["finetune"], "runs": [ft_whiten]},
        "distill": {**settings, "lr": chosen["distill"], "runs": runs["distill"],
                    **Distill().to_dict(), "start": "whitened, loss-aware ranks",
                    "finetune_same_start": ft_budget},
        "dynamic": {**settings, "lr": chosen["dynamic"], "runs": runs["dynamic"],
                    "method": "subspace"} if dynamic else None,
        "equal_time": equal_time,
        "seeds": seeds,
        "spectra": spectra(base),
        "timings": timings,
    }
    results["claims"] = claims(results)
    timings["total"] = sum(timings.values())
    results["provenance"] = {  # README and docs tables name the run they come from
        "command": "make demo" if data.name == "fashion-mnist" and not quick else
        f"svdcompress reproduce --data {data.name}{' --quick' if quick else ''}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine()}
    write_json(out / "results.json", results)
    write_report(results, out)
    return results
