"""The study's experiments as plain functions that return plain dicts: train a baseline,
sweep the truncation rank, fine-tune the factors; ``reproduce`` runs them all."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from .claims import CLOSE, mean_accuracy
from .compress import compress_
from .config import SVDConfig
from .data import Dataset, load_dataset
from .io import load, read_meta, save, write_json
from .models import MLP
from .swap import candidate_modules, output_layer_name, project_, unproject_
from .train import TrainConfig, evaluate, train

STUDY_RANKS = (10, 20, 50, 100, 200, None)  # None: the full, uncompressed network


def model_size(model: nn.Module) -> dict:
    """Parameters and bytes of every tensor the model holds (what a checkpoint stores)."""
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": params, "bytes": nbytes}


def check_rank_fits(model: nn.Module, config: SVDConfig) -> None:
    """A fixed rank above every target layer's size is a user error, not a silent clamp."""
    if config.rank is None:
        return
    output = output_layer_name(model) if config.skip_output_layer else None
    sizes = [min(m.weight.shape[0], m.weight[0].numel())
             for name, m in candidate_modules(model, config.target_modules, config.exclude_modules)
             if name != output]
    if not sizes:
        raise ValueError("no layer of the model matches the target modules")
    if config.rank > max(sizes):
        raise ValueError(f"rank {config.rank} is above every target layer's size "
                         f"(the largest allows {max(sizes)})")


def run_dataset(meta: dict, data: str | None = None) -> Dataset:
    """The dataset a run was trained on (or ``data`` when given), with the same subset."""
    info = meta.get("data") or {}
    name = data or info.get("name")
    if not name:
        raise ValueError("the run does not record its dataset: pass --data")
    return load_dataset(name, limit_train=info.get("limit_train") if not data else None)


def train_baseline(data: Dataset, cfg: TrainConfig, hidden=(1024,) * 5, *, out=None,
                   resume=False, progress=True, limit_train=None) -> tuple[MLP, list]:
    """The reference MLP trained from a seeded initialisation; saved to ``out`` if given."""
    torch.manual_seed(cfg.seed)
    model = MLP(data.in_features, list(hidden), 10)
    history = train(model, data, cfg, checkpoint_dir=out, resume=resume, progress=progress,
                    desc="baseline")
    if out is not None:
        save(model.cpu(), out, extra=run_extra(data, cfg, history, model, limit_train))
    return model, history


def run_extra(data: Dataset, cfg: TrainConfig, history: list, model: nn.Module,
              limit_train=None) -> dict:
    metrics = evaluate(model, data.x_test.to(next(model.parameters()).device),
                       data.y_test.to(next(model.parameters()).device))
    return {"data": {"name": data.name, "limit_train": limit_train, "mean": data.mean,
                     "std": data.std},
            "train": {**cfg.__dict__}, "history": history, "metrics": {**metrics, **model_size(model)}}


def continue_training(init: str | Path, cfg: TrainConfig, out: str | Path, *, data=None,
                      project_rank: int | None = None, projection: str = "subspace",
                      resume=False, progress=True) -> list:
    """Train a saved run further into ``out``; with ``project_rank``, as dynamic SVD training
    (the run then holds the final rank-D factors, its checkpoint the full W)."""
    meta = read_meta(init)
    model = load(init)
    dataset = run_dataset(meta, data)
    if project_rank is not None:
        check_rank_fits(model, SVDConfig(rank=project_rank))
        project_(model, project_rank, method=projection)
    history = train(model, dataset, cfg, checkpoint_dir=out, resume=resume, progress=progress,
                    desc="dynamic" if project_rank else "train")
    model.cpu()
    if project_rank is not None:
        unproject_(model)
    metrics = {**evaluate(model, dataset.x_test, dataset.y_test), **model_size(model)}
    save(model, out, config=SVDConfig(rank=project_rank) if project_rank else None,
         extra={"data": meta.get("data"), "source": str(init), "history": history,
                "train": cfg.__dict__, "metrics": metrics,
                "projection": {"rank": project_rank, "method": projection} if project_rank else None})
    return history


def calibration_batches(data: Dataset, n: int, batch_size: int = 128, seed: int = 0) -> list:
    """``n`` random batches of the training split (never the test split) for whitening."""
    if n < 1:
        raise ValueError(f"calibration batches must be >= 1, got {n}")
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    return [data.x_train[order[i:i + batch_size]]
            for i in range(0, min(n * batch_size, len(order)), batch_size)]


def sweep(base: nn.Module, data: Dataset, ranks=STUDY_RANKS, progress=True,
          method: str = "plain", calib_batches: int = 64, sequential: bool = True) -> list[dict]:
    """Accuracy and size of the base network truncated at each rank (None: uncompressed)."""
    base = base.cpu()
    dense = model_size(base)
    calib = calibration_batches(data, calib_batches) if method == "whiten" else None
    rows = []
    for rank in ranks:
        model = copy.deepcopy(base)
        if rank is not None:
            compress_(model, SVDConfig(rank=rank, method=method, sequential=sequential), calib)
        row = {"rank": rank if rank is not None else "full", **evaluate(model, data.x_test, data.y_test),
               **model_size(model)}
        row["compression"] = dense["params"] / row["params"]
        row["method"] = method
        rows.append(row)
        if progress:
            print(f"  {method} D={row['rank']:>4}: accuracy {row['accuracy']:.4f}, "
                  f"{row['params']:,} parameters ({row['compression']:.1f}x smaller)")
    return rows


def spectra(model: nn.Module) -> dict[str, list[float]]:
    """Singular values of every dense Linear layer's weight (for the spectrum figure)."""
    return {name: torch.linalg.svdvals(m.weight.detach().float().cpu()).tolist()
            for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def finetune_factors(base: nn.Module, data: Dataset, rank: int, cfg: TrainConfig,
                     progress=True, method: str = "plain", calib=None) -> dict:
    """Compress ``base`` at ``rank`` and fine-tune the factors (the study's second experiment)."""
    model = copy.deepcopy(base).cpu()
    compress_(model, SVDConfig(rank=rank, method=method), calib)
    start = evaluate(model, data.x_test, data.y_test)["accuracy"]
    t0 = time.perf_counter()
    history = train(model, data, cfg, progress=progress,
                    desc=f"finetune {method} D={rank} seed {cfg.seed}")
    return {"seed": cfg.seed, "method": method, "start_accuracy": start, "history": history,
            "accuracy": history[-1]["test_accuracy"] if history else start,
            "seconds": time.perf_counter() - t0, "model": model}


def global_vs_uniform(base: nn.Module, data: Dataset, rank: int, calib) -> list[dict]:
    """Uniform rank D against global allocation of the same parameters, plain and whitened."""
    rows = []
    for method in ("plain", "whiten"):
        uniform = copy.deepcopy(base).cpu()
        rep_u = compress_(uniform, SVDConfig(rank=rank, method=method), calib)
        layers = [r for r in rep_u.layers if r.note not in ("output layer", "grouped conv")]
        weights = sum(r.shape[0] * r.shape[1] for r in layers)
        kept = sum(r.rank * sum(r.shape) if r.rank else r.shape[0] * r.shape[1] for r in layers)
        glob = copy.deepcopy(base).cpu()  # the same share of weights, placed where it helps most
        rep_g = compress_(glob, SVDConfig(ratio=kept / weights, method=method, allocation="global"), calib)
        for name, model, rep in (("uniform", uniform, rep_u), ("global", glob, rep_g)):
            rows.append({"method": method, "allocation": name, "weight_ratio": kept / weights,
                         **evaluate(model, data.x_test, data.y_test), **model_size(model),
                         "ranks": {r.name: r.rank for r in rep.layers if r.note != "output layer"}})
    return rows


def dynamic_training(base: nn.Module, data: Dataset, rank: int, cfg: TrainConfig,
                     method: str = "subspace", progress=True, checkpoint_dir=None,
                     resume=False) -> dict:
    """Dynamic SVD training from ``base``: train W with P_D(W) in every forward pass, then
    keep the final factors (the study's third experiment)."""
    model = copy.deepcopy(base).cpu()
    project_(model, rank, method=method)
    t0 = time.perf_counter()
    history = train(model, data, cfg, progress=progress, checkpoint_dir=checkpoint_dir,
                    resume=resume, desc=f"dynamic D={rank} seed {cfg.seed}")
    seconds = time.perf_counter() - t0
    unproject_(model.cpu())
    return {"seed": cfg.seed, "history": history,
            "accuracy": evaluate(model, data.x_test, data.y_test)["accuracy"],
            "seconds": seconds, "model": model}


QUICK = {"limit_train": 10_000, "epochs": 3, "ft_epochs": 2}


def reproduce(data_name: str, out: str | Path, *, quick=False, epochs=20, lr=1e-3,
              ft_rank=20, ft_epochs=5, ft_lr=1e-4, seed=0, ranks=STUDY_RANKS,
              hidden=(1024,) * 5, dynamic=True, calib_batches=64, device="auto",
              progress=True) -> dict:
    """The whole study into ``out``: results.json, report.md and figures; runs under out/runs."""
    from .claims import claims
    from .report import write_report

    out = Path(out)
    limit = QUICK["limit_train"] if quick else None
    if quick:
        epochs, ft_epochs = min(epochs, QUICK["epochs"]), min(ft_epochs, QUICK["ft_epochs"])
    timings = {}
    t0 = time.perf_counter()
    data = load_dataset(data_name, limit_train=limit)
    timings["load_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, device=device)
    base, history = train_baseline(data, cfg, hidden, out=out / "runs" / "base", progress=progress,
                                   limit_train=limit)
    base = base.cpu()
    timings["baseline"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = sweep(base, data, ranks, progress=progress)
    timings["sweep"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    calib = calibration_batches(data, calib_batches, seed=seed)
    rows_w = sweep(base, data, ranks, progress=progress, method="whiten",
                   calib_batches=calib_batches)
    allocation = global_vs_uniform(base, data, ft_rank, calib)
    timings["sweep_whiten_and_allocation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seeds = [seed]

    def ft_cfg(s):
        return TrainConfig(epochs=ft_epochs, lr=ft_lr, seed=s, device=device)

    ft_runs = [finetune_factors(base, data, ft_rank, ft_cfg(seed), progress=progress)]
    ft_whiten = finetune_factors(base, data, ft_rank, ft_cfg(seed), progress=progress,
                                 method="whiten", calib=calib)
    ft_whiten.pop("model")
    dyn_runs = []
    if dynamic:
        dyn_runs.append(dynamic_training(base, data, ft_rank, ft_cfg(seed), progress=progress))
        if abs(mean_accuracy(dyn_runs) - mean_accuracy(ft_runs)) < CLOSE:  # too close for one seed to tell
            seeds += [seed + 1, seed + 2]
            for s in seeds[1:]:
                ft_runs.append(finetune_factors(base, data, ft_rank, ft_cfg(s), progress=progress))
                dyn_runs.append(dynamic_training(base, data, ft_rank, ft_cfg(s), progress=progress))
    extra = {"data": {"name": data.name, "limit_train": limit}}
    for name, runs in (("ft", ft_runs), ("dyn", dyn_runs)):
        for r in runs:
            model = r.pop("model")
            if r["seed"] == seed:
                save(model, out / "runs" / f"d{ft_rank}-{name}", config=SVDConfig(rank=ft_rank),
                     extra={**extra, "history": r["history"]})
    timings["finetune_and_dynamic"] = time.perf_counter() - t0

    results = {
        "data": {"name": data.name, "train_samples": len(data.x_train),
                 "test_samples": len(data.x_test), "limit_train": limit},
        "settings": {"quick": quick, "epochs": epochs, "lr": lr, "batch_size": cfg.batch_size,
                     "seed": seed, "ft_rank": ft_rank, "ft_epochs": ft_epochs, "ft_lr": ft_lr,
                     "architecture": base.arch_spec(), "device": str(device),
                     "threads": torch.get_num_threads()},
        "baseline": {"history": history, **evaluate(base, data.x_test, data.y_test),
                     **model_size(base)},
        "sweep": rows,
        "sweep_whiten": rows_w,
        "allocation": allocation,
        "calib_batches": calib_batches,
        "finetune": {"rank": ft_rank, "epochs": ft_epochs, "lr": ft_lr, "runs": ft_runs},
        "finetune_whiten": {"rank": ft_rank, "epochs": ft_epochs, "lr": ft_lr, "runs": [ft_whiten]},
        "dynamic": {"rank": ft_rank, "epochs": ft_epochs, "lr": ft_lr, "runs": dyn_runs,
                    "method": "subspace"} if dynamic else None,
        "seeds": seeds,
        "spectra": spectra(base),
        "timings": timings,
    }
    results["claims"] = claims(results)
    timings["total"] = sum(timings.values())
    write_json(out / "results.json", results)
    write_report(results, out)
    return results
