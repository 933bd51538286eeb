"""Run-level workflows on run directories, what each CLI command calls: train a baseline,
continue training (fine-tuning or dynamic SVD training), compress, evaluate, sweep.

Each reads its source run, does one job and writes one run directory whose
svdcompress.json carries a ``RunInfo`` (data, source, config, history, metrics).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..core import dist
from ..core.compress import check_rank_fits, compress_
from ..core.config import SVDConfig
from ..core.files import write_json
from ..core.io import load, read_config, read_info, read_meta, save
from ..core.report import CompressionReport, model_size
from ..core.runinfo import DataInfo, RunInfo
from ..core.errors import ConfigError, DataError, FormatError
from ..core.files import RunExists, check_destination, check_output_file
from ..core.swap import project_, unproject_
from .data import Dataset, load_dataset
from .models import MLP
from ..core.checkpoint import locked, resume_point, save_trained, work_dir  # noqa: F401
from ..core.distill import Distill
from .train import CHECKPOINT, TrainConfig, evaluate, predict, train


def run_dataset(source: str | Path, data: str | None = None) -> Dataset:
    """The dataset a run was trained on (or ``data`` when given), with the same subset."""
    info = read_info(source).data
    if data is None and info is None:
        raise ConfigError(f"the run {source} does not record its dataset: pass --data")
    if data is not None:
        return load_dataset(data)
    return load_dataset(info.name, limit_train=info.limit_train)


def _matching(model: nn.Module, data: Dataset) -> Dataset:
    """The data, checked to fit the model's input size."""
    want = getattr(model, "in_features", None)
    if want is not None and want != data.in_features:
        raise DataError(f"dataset {data.name} has {data.in_features} features per sample "
                        f"(images of another size), the model takes {want}")
    return data


def _train_into(model: nn.Module, data: Dataset, cfg: TrainConfig, out: str | Path, *,
                resume: bool, overwrite: bool, progress: bool, desc: str, source=None,
                context: dict | None = None, **teach) -> list:
    """Train with checkpoints in OUT.partial, so the run at OUT stays whole (the old one, or
    none) until the new one replaces it (see checkpoint.resume_point)."""
    start, work = resume_point(out, resume=resume, overwrite=overwrite, source=source)
    with locked(work):
        return train(model, data, cfg, checkpoint_dir=work, resume=start, progress=progress,
                     desc=desc, context=context, **teach)


def _metrics(model: nn.Module, data: Dataset) -> dict:
    device = next(model.parameters()).device
    return {**evaluate(model, data.x_test.to(device), data.y_test.to(device)), **model_size(model)}


def train_baseline(data: Dataset, cfg: TrainConfig, hidden=(1024,) * 5, *, out=None,
                   resume=False, progress=True, limit_train=None,
                   overwrite=False) -> tuple[MLP, list]:
    """The reference MLP trained from a seeded initialisation; saved to ``out`` if given."""
    torch.manual_seed(cfg.seed)
    model = MLP(data.in_features, list(hidden), 10)
    if out is None:
        return model, train(model, data, cfg, progress=progress, desc="baseline")
    data_info = DataInfo(data.name, limit_train, data.mean, data.std)
    context = {"data": [data.name, limit_train], "hidden": list(hidden)}
    history = _train_into(model, data, cfg, out, resume=resume, overwrite=overwrite,
                          progress=progress, desc="baseline", context=context)
    info = RunInfo(data=data_info, train=cfg.__dict__.copy(), history=history,
                   metrics=_metrics(model, data))
    save_trained(model.cpu(), out, overwrite or resume, info=info)
    return model, history


def train_run(data: str, cfg: TrainConfig, out: str | Path, hidden=(1024,) * 5, *,
              limit_train: int | None = None, resume=False, overwrite=False,
              progress=True) -> list:
    """Train the reference MLP on a named dataset or MNIST directory into the run ``out``."""
    dataset = load_dataset(data, limit_train=limit_train)
    return train_baseline(dataset, cfg, hidden, out=out, resume=resume, progress=progress,
                          limit_train=limit_train, overwrite=overwrite)[1]


def continue_training(source: str | Path, cfg: TrainConfig, out: str | Path, *, data=None,
                      project_rank: int | None = None, projection: str = "subspace",
                      resume=False, overwrite=False, progress=True, distill: Distill | None = None,
                      teacher: str | Path | None = None) -> list:
    """Train a saved run further into ``out``: fine-tuning (a compressed run keeps its
    factors and its config), or with ``project_rank`` dynamic SVD training (the run then
    holds the final rank-D factors, its checkpoint the full W). With ``distill`` the run
    learns from ``teacher`` (default: the run it was compressed from)."""
    check_destination(out, overwrite=overwrite or resume, sources=[source])
    meta = read_meta(source)
    model = load(source)
    dataset = _matching(model, run_dataset(source, data))
    config = read_config(meta)
    if project_rank is not None:
        config = SVDConfig(rank=project_rank)
        check_rank_fits(model, config)
        project_(model, project_rank, method=projection)
    desc = "dynamic" if project_rank else ("finetune" if meta["layers"] else "train")
    context = {"data": [dataset.name, None if data else (read_info(source).data or DataInfo("")).limit_train],
               "source": str(Path(source).resolve()), "projection": [project_rank, projection]}
    teacher_model = None
    if distill is not None:
        teacher = teacher_of(source, teacher)
        teacher_model = load(teacher)
        _matching(teacher_model, dataset)
        context["distill"] = [str(teacher), distill.to_dict()]
        desc = "distill"
    history = _train_into(model, dataset, cfg, out, resume=resume, overwrite=overwrite,
                          progress=progress, desc=desc, source=source, context=context,
                          teacher=teacher_model, distill=distill)
    model.cpu()
    if project_rank is not None:
        unproject_(model)
    info = RunInfo(data=read_info(source).data if data is None else DataInfo(dataset.name),
                   source=str(Path(source).resolve()),
                   train=cfg.__dict__.copy(), history=history, metrics=_metrics(model, dataset),
                   projection={"rank": project_rank, "method": projection} if project_rank else None,
                   distill=None if distill is None else {"teacher": str(teacher), **distill.to_dict()})
    save_trained(model, out, overwrite or resume, config=config, info=info)
    return history


def teacher_of(source: str | Path, teacher: str | Path | None = None) -> Path:
    """The model to distil from: ``teacher``, or the dense run ``source`` was compressed from
    (followed back through fine-tuned and compressed runs)."""
    run = Path(source)
    for _ in range(32):
        if teacher is not None:
            break
        info = read_info(run)
        if info.distill and info.distill.get("teacher"):
            teacher = info.distill["teacher"]
        elif not info.source:
            raise ConfigError(f"{source} records no run it was compressed from: name the "
                              "teacher (--teacher DIR)")
        elif (Path(info.source) / "svdcompress.json").is_file() and \
                read_meta(info.source).get("layers") and Path(info.source).resolve() != run.resolve():
            run = Path(info.source)  # itself compressed: go on to the run it came from
        else:
            teacher = info.source
    teacher = Path(teacher)
    if not teacher.exists():
        raise ConfigError(f"the teacher {teacher} does not exist: name another with --teacher DIR")
    return teacher.resolve()


def calibration_batches(data: Dataset, n: int, batch_size: int = 128, seed: int = 0) -> list:
    """``n`` random batches of the training split (never the test split) for whitening."""
    if n < 1:
        raise ConfigError(f"calibration batches must be >= 1, got {n}")
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    return [data.x_train[order[i:i + batch_size]]
            for i in range(0, min(n * batch_size, len(order)), batch_size)]


def compress_run(source: str | Path, config: SVDConfig, out: str | Path, *, data=None,
                 calib_batches: int = 64, overwrite=False, progress=True,
                 device=None, profile=None) -> CompressionReport:
    """Load a run, compress it (calibrated on its training data for whitening), save to ``out``."""
    check_destination(out, overwrite=overwrite, sources=[source])
    dist.barrier()  # under torchrun: every process has checked OUT before rank 0 writes it
    model = load(source)
    check_rank_fits(model, config)
    dataset = None
    calib = None
    if config.needs_calibration or data is not None:
        dataset = _matching(model, run_dataset(source, data))
    if config.needs_calibration:
        calib = calibration_batches(dataset, calib_batches)
    report = compress_(model, config, calib, progress=progress, device=device, profile=profile)
    info = RunInfo(data=read_info(source).data if data is None else DataInfo(dataset.name),
                   source=str(Path(source).resolve()),
                   compression={**report.to_dict(), **({"profile": profile.to_dict()} if profile else {})},
                   metrics=model_size(model),
                   calibration=f"{calib_batches} training batches of 128" if calib else None)
    if dist.is_main():  # under torchrun, rank 0 writes
        save(model, out, config=config, info=info, overwrite=overwrite)
    dist.barrier()
    return report


def eval_run(run: str | Path, data: str | None = None) -> dict:
    """Test accuracy, loss, parameters and bytes of a run (on its own dataset by default)."""
    model = load(run)
    dataset = _matching(model, run_dataset(run, data))
    return {**_metrics(model, dataset), "data": dataset.name}


def sweep(base: nn.Module, data: Dataset, ranks, progress=True, method: str = "plain",
          calib_batches: int = 64, sequential: bool = True, correct: dict | None = None) -> list[dict]:
    """Accuracy and size of the base network truncated at each rank (None: uncompressed);
    ``correct``, when given, gets each rank's per-sample test correctness (for paired
    comparisons)."""
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
        if correct is not None:
            correct[row["rank"]] = predict(model, data.x_test) == data.y_test
        row["compression"] = dense["params"] / row["params"]
        row["method"] = method
        rows.append(row)
        if progress:
            print(f"  {method} D={row['rank']:>4}: accuracy {row['accuracy']:.4f}, "
                  f"{row['params']:,} parameters ({row['compression']:.1f}x smaller)")
    return rows


def sweep_run(run: str | Path, ranks, methods=("plain", "whiten"), *, data=None,
              calib_batches: int = 64, out: str | Path | None = None,
              overwrite: bool = False) -> tuple[dict, Path]:
    """Sweep a run's truncation rank for each method; the table goes to ``out`` (JSON)."""
    if not methods or any(m not in ("plain", "whiten") for m in methods):
        raise ConfigError(f"methods must be plain and/or whiten, got {list(methods)}")
    out = Path(out) if out is not None else Path(run) / "results.json"
    check_output_file(out, overwrite=overwrite, run=run)
    base = load(run)
    dataset = _matching(base, run_dataset(run, data))
    table = {m: sweep(base, dataset, ranks, progress=False, method=m, calib_batches=calib_batches)
             for m in methods}
    write_json(out, {"run": str(run), "data": dataset.name, "sweep": table.get("plain"),
                     "sweep_whiten": table.get("whiten")})
    return table, out
