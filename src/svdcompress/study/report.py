"""The study's report: report.md and PNG figures, made from a results dict (results.json)."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import require
from ..core.files import atomic_write


def subplots(figsize=(6, 4)):
    """A figure and its axes, drawn straight to PNG: no pyplot, no GUI backend, no global
    backend switch (matplotlib is the optional extra svdcompress[study])."""
    figure = require("matplotlib.figure", extra="study").Figure(figsize=figsize)
    require("matplotlib.backends.backend_agg", extra="study").FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    """Label, grid and legend every figure the same way, then write it atomically."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    _save(fig, path)


def _sweep_points(results: dict, key: str = "sweep"):
    rows = [r for r in results.get(key, []) if r["rank"] != "full"]
    return [r["rank"] for r in rows], [100 * r["accuracy"] for r in rows], [r["params"] for r in rows]


def fig_accuracy_vs_rank(results: dict, path: Path) -> None:
    fig, ax = subplots()
    ranks, acc, _ = _sweep_points(results)
    ax.plot(ranks, acc, "o-", label="plain truncation")
    if results.get("sweep_whiten"):
        r2, a2, _ = _sweep_points(results, "sweep_whiten")
        ax.plot(r2, a2, "s-", label="whitened truncation")
    ft = results.get("finetune")
    if ft:
        mean = sum(r["accuracy"] for r in ft["runs"]) / len(ft["runs"])
        ax.plot([ft["rank"]], [100 * mean], "*", ms=14, label=f"fine-tuned factors ({ft['epochs']} ep.)")
    dyn = results.get("dynamic")
    if dyn:
        mean = sum(r["accuracy"] for r in dyn["runs"]) / len(dyn["runs"])
        ax.plot([dyn["rank"]], [100 * mean], "P", ms=12, label=f"dynamic training ({dyn['epochs']} ep.)")
    ax.axhline(100 * results["baseline"]["accuracy"], color="gray", ls="--", label="uncompressed")
    ax.set_xscale("log")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    finish(fig, ax, path, "rank D of every layer but the last", "test accuracy (%)",
           f"Accuracy vs rank ({results['data']['name']})")


def fig_accuracy_vs_params(results: dict, path: Path) -> None:
    fig, ax = subplots()
    ranks, acc, params = _sweep_points(results)
    ax.plot(params, acc, "o-", label="plain truncation")
    for r, a, p in zip(ranks, acc, params):
        ax.annotate(f"D={r}", (p, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
    base = results["baseline"]
    ax.axhline(100 * base["accuracy"], color="gray", ls="--",
               label=f"uncompressed ({base['params']:,} params)")
    ax.set_xscale("log")
    finish(fig, ax, path, "parameters of the whole network", "test accuracy (%)",
           "Accuracy vs parameters")


def fig_spectra(results: dict, path: Path) -> None:
    fig, ax = subplots()
    for name, s in results["spectra"].items():
        ax.plot(range(1, len(s) + 1), s, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    finish(fig, ax, path, "index i", "singular value s_i",
           "Singular-value spectrum of each layer (trained baseline)", legend_size=7)


def fig_training_curves(results: dict, path: Path) -> None:
    fig, ax = subplots()
    h = results["baseline"]["history"]
    ax.plot([r["epoch"] for r in h], [100 * r["test_accuracy"] for r in h], "o-", label="baseline")
    n = len(h)
    for key, label in (("finetune", "fine-tune factors"), ("distill", "distil"), ("dynamic", "dynamic training")):
        if results.get(key):
            for run in results[key]["runs"]:
                hh = run["history"]
                ax.plot([n + r["epoch"] for r in hh], [100 * r["test_accuracy"] for r in hh],
                        ".-", alpha=0.8, label=f"{label} D={results[key]['rank']} (seed {run['seed']})")
    finish(fig, ax, path, "epoch (fine-tuning continues after the baseline)", "test accuracy (%)",
           "Training curves", legend_size=7)


FIGURES = {
    "accuracy_vs_rank.png": fig_accuracy_vs_rank,
    "accuracy_vs_params.png": fig_accuracy_vs_params,
    "spectra.png": fig_spectra,
    "training_curves.png": fig_training_curves,
}


def headline_table(results: dict) -> str:
    lines = ["| D | accuracy | parameters | bytes (float32) | smaller by |",
             "|---|---:|---:|---:|---:|"]
    for r in results["sweep"]:
        lines.append(f"| {r['rank']} | {_pct(r['accuracy'])} | {r['params']:,} | "
                     f"{r['bytes']:,} | {r['compression']:.1f}x |")
    return "\n".join(lines)


def whitening_section(results: dict) -> list[str]:
    white = results.get("sweep_whiten")
    if not white:
        return []
    lines = ["## Data-aware (whitened) truncation, no fine-tuning", "",
             f"Each layer's SVD is taken of W L, with L L^T the second moment of its inputs over "
             f"{results.get('calib_batches', '?')} training batches of 128 (damping 0.01 of the mean "
             "diagonal), so truncation minimises the error of the layer's outputs rather than of its "
             "weights; layers are factorised in order, each fitted to the original layer's outputs "
             "from the inputs the compressed layers before it produce (sequential calibration). "
             "That is few rows for 1,024-wide layers, so each layer's fit (plain, whitened, or "
             "compensated with a shrunk correction) is the one with the smallest output error on "
             "held-out rows, the last quarter of every batch, refitted on all rows.", "", "| D | plain | whitened | parameters |", "|---|---:|---:|---:|"]
    for p, w in zip(results["sweep"], white):
        lines.append(f"| {p['rank']} | {_pct(p['accuracy'])} | {_pct(w['accuracy'])} | {p['params']:,} |")
    alloc = results.get("allocation") or []
    if alloc:
        lines += ["", "Uniform rank D against per-layer ranks under the same weight-parameter budget "
                  "(whitened): `global` minimises the summed relative truncation error, "
                  "`truncation-loss` the summed absolute output error of the layers (SVD-LLM V2), "
                  "`loss-aware` that error weighted by each layer's measured sensitivity, then checked: "
                  "the loss-aware, truncation-loss, global, uniform and same-rank choices each "
                  "compress a copy on three quarters of the calibration batches, and the one whose "
                  "output on the last quarter is nearest the original's is kept (`chosen`):", "",
                  "| D | allocation | accuracy | parameters | ranks |", "|---|---|---:|---:|---|"]
        for r in alloc:
            ranks = ", ".join(str(v) for v in r["ranks"].values())
            name = r["allocation"] + (f" (chosen: {r['chosen']})" if r.get("chosen") else "")
            lines.append(f"| {r.get('rank', '')} | {name} | {_pct(r['accuracy'])} | "
                         f"{r['params']:,} | {ranks} |")
    return lines + [""]


def recovery_section(results: dict) -> list[str]:
    lr = results.get("learning_rates")
    if not lr:
        return []
    s, d = results["settings"], results["data"]
    lines = ["## Recovering accuracy at D = " + str(results["finetune"]["rank"]), "",
             f"{d['validation_samples']:,} training samples are held out as a validation split; "
             "the baseline and every method train on the rest. Each method's Adam learning rate is "
             f"the one of {', '.join(map(str, s['lr_grid']))} with the best validation accuracy after "
             f"{s['grid_epochs']} epoch(s) on {s['grid_samples']:,} training samples (a shorter, "
             f"smaller run than the final one); the final runs take {s['ft_epochs']} epochs, and only "
             "they are scored on the test split."
             + (f" Every training, the baseline's included, anneals its learning rate ({s['schedule']})."
                if s.get("schedule", "constant") != "constant" else ""), "",
             "| method | learning rate (validation accuracy per rate) | seeds | test accuracy |",
             "|---|---|---:|---:|"]
    start = (results.get("distill") or {}).get("start", "whiten")
    for key, label in (("finetune", "fine-tune the plain factors (labels)"),
                       ("distill", f"distil from the dense network (KL + labels), {start} start"),
                       ("dynamic", "dynamic SVD training")):
        block = results.get(key)
        if not block:
            continue
        grid = ", ".join(f"{k}: {_pct(v)}" for k, v in lr["validation_accuracy"][key].items())
        accs = [r["accuracy"] for r in block["runs"]]
        lines.append(f"| {label} | **{block['lr']}** ({grid}) | {len(accs)} | "
                     f"{_pct(sum(accs) / len(accs))} |")
    same = (results.get("distill") or {}).get("finetune_same_start")
    for run, label in (((results.get("finetune_whiten") or {}).get("runs", [None])[0],
                        "fine-tune the whitened factors (labels)"),
                       (same, f"fine-tune (labels), {start} start")):
        if run:
            lines.append(f"| {label} | {run['lr']} (fine-tuning's) | 1 | {_pct(run['accuracy'])} |")
    eq = results.get("equal_time")
    if eq:
        lines += ["", "At equal wall-clock time (per seed, the time the faster method took): "
                  f"fine-tuning {_pct(sum(eq['finetune']) / len(eq['finetune']))}, dynamic training "
                  f"{_pct(sum(eq['dynamic']) / len(eq['dynamic']))} "
                  f"({', '.join(f'{t:.0f} s' for t in eq['seconds'])})."]
    return lines + [""]


def markdown(results: dict) -> str:
    s, d = results["settings"], results["data"]
    base = results["baseline"]
    parts = [
        "# SVD compression study",
        "",
        f"Dataset **{d['name']}** ({d['train_samples']:,} training / {d['test_samples']:,} test "
        f"samples); MLP {s['architecture']['in_features']} -> "
        f"{' -> '.join(map(str, s['architecture']['hidden']))} -> "
        f"{s['architecture']['num_classes']}, Adam lr {s['lr']}"
        f"{'' if s.get('schedule', 'constant') == 'constant' else ' (' + s['schedule'] + ')'}, batch {s['batch_size']}, "
        f"{s['epochs']} epochs, seed {s['seed']}, {s['threads']} CPU threads"
        + (" — **quick run** (subset and fewer epochs: a first look, not the study's numbers)"
           if s["quick"] else "") + ".",
        "",
        f"Uncompressed baseline: **{_pct(base['accuracy'])}** test accuracy, "
        f"{base['params']:,} parameters.",
        "",
        "## Plain truncation: every layer but the last at rank D",
        "",
        headline_table(results),
        "",
        "![accuracy vs rank](accuracy_vs_rank.png)",
        "",
        "![accuracy vs parameters](accuracy_vs_params.png)",
        "",
        *whitening_section(results),
        *recovery_section(results),
        "## Claims of the study, checked on this run",
        "",
        "| claim | this run | evidence |",
        "|---|---|---|",
    ]
    for c in results["claims"]:
        verdict = c["verdict"] if c["verdict"] == "supported" else f"**{c['verdict']}**"
        parts.append(f"| {c['claim']} | {verdict} | {c['evidence']} |")
    parts += ["", "## Spectra and training curves", "", "![spectra](spectra.png)", "",
              "![training curves](training_curves.png)", "", "## Timings (seconds)", "",
              "| phase | seconds |", "|---|---:|"]
    parts += [f"| {k} | {v:.1f} |" for k, v in results["timings"].items()]
    parts += ["", "Every number above comes from `results.json` in this folder, written by "
              "`svdcompress reproduce`; rerun it to check them."]
    return "\n".join(parts) + "\n"


def write_report(results: dict, out: str | Path) -> Path:
    out = Path(out)
    os.makedirs(out, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(results, out / name)
    text = markdown(results)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    return out / "report.md"
