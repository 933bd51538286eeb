"""The study's claims, each checked against one run's results: a verdict and its numbers."""

from __future__ import annotations

CLOSE = 0.005  # a comparison closer than 0.5 points is repeated over more seeds


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _verdict(holds: bool) -> str:
    return "supported" if holds else "not supported"


def mean_accuracy(runs: list[dict]) -> float:
    return sum(r["accuracy"] for r in runs) / len(runs)


def claims(results: dict) -> list[dict]:
    """Each claim of the study, whether this run supports it, and the numbers that say so."""
    rows = [r for r in results["sweep"]]
    acc = [r["accuracy"] for r in rows]
    falls = all(a <= b + 0.003 for a, b in zip(acc, acc[1:])) and acc[0] < acc[-1]
    out = [{"claim": "Accuracy falls as D falls (plain truncation, no fine-tuning)",
            "verdict": _verdict(falls),
            "evidence": ", ".join(f"D={r['rank']}: {_pct(r['accuracy'])}" for r in rows)}]
    ft = results["finetune"]
    trunc = next((r["accuracy"] for r in rows if r["rank"] == ft["rank"]), None)
    if trunc is not None:
        base = results["baseline"]["accuracy"]
        ft_acc = mean_accuracy(ft["runs"])
        recovered = (ft_acc - trunc) / max(1e-9, base - trunc)
        out.append({"claim": f"Fine-tuning the factors recovers accuracy (D={ft['rank']})",
                    "verdict": _verdict(ft_acc > trunc and recovered >= 0.5),
                    "evidence": f"truncated {_pct(trunc)} -> fine-tuned {_pct(ft_acc)} after "
                                f"{ft['epochs']} epochs (baseline {_pct(base)}; "
                                f"{100 * recovered:.0f}% of the gap recovered)"})
    dyn = results.get("dynamic")
    if dyn:
        d, f = mean_accuracy(dyn["runs"]), mean_accuracy(ft["runs"])
        n = len(dyn["runs"])
        diffs = [a["accuracy"] - b["accuracy"] for a, b in zip(dyn["runs"], ft["runs"])]
        verdict = _verdict(d > f)
        seeds = "one seed"
        if n > 1:  # repeated because close: a verdict only outside two standard errors
            mean = sum(diffs) / n
            se = (sum((x - mean) ** 2 for x in diffs) / (n - 1) / n) ** 0.5
            if abs(mean) < 2 * se:
                verdict = "inconclusive"
            seeds = (f"mean of {n} seeds, repeated because one seed was within "
                     f"{100 * CLOSE:.1f} points; difference {100 * mean:+.2f} ± {100 * se:.2f} points (1 s.e.)")
        out.append({"claim": f"Dynamic SVD training gains more than fine-tuning the factors "
                             f"(D={dyn['rank']}, {dyn['epochs']} epochs each)",
                    "verdict": verdict,
                    "evidence": f"dynamic {_pct(d)} vs fine-tuned {_pct(f)}, {seeds}; "
                                "per seed: dynamic " + ", ".join(_pct(r["accuracy"]) for r in dyn["runs"])
                                + "; fine-tuned " + ", ".join(_pct(r["accuracy"]) for r in ft["runs"])})
    return out + whitening_claims(results)


def epochs_to(run: dict, target: float) -> int | None:
    """First epoch whose test accuracy reached ``target`` (0: already at the start)."""
    if run["start_accuracy"] >= target:
        return 0
    return next((h["epoch"] for h in run["history"] if h["test_accuracy"] >= target), None)


def whitening_claims(results: dict) -> list[dict]:
    out = []
    plain = {r["rank"]: r["accuracy"] for r in results["sweep"] if r["rank"] != "full"}
    white = {r["rank"]: r["accuracy"] for r in results.get("sweep_whiten") or [] if r["rank"] != "full"}
    if white:
        worse = [d for d in plain if white.get(d, 1.0) < plain[d]]
        out.append({"claim": "Whitened (data-aware) truncation is at least as accurate as plain at every D",
                    "verdict": _verdict(not worse),
                    "evidence": ", ".join(f"D={d}: {_pct(white[d])} vs {_pct(plain[d])}" for d in plain)})
    for method in ("plain", "whiten"):
        rows = {r["allocation"]: r for r in results.get("allocation") or [] if r["method"] == method}
        if len(rows) == 2:
            u, g = rows["uniform"], rows["global"]
            out.append({"claim": f"Global rank allocation beats uniform D={results['finetune']['rank']} "
                                 f"at the same parameters ({method})",
                        "verdict": _verdict(g["accuracy"] > u["accuracy"]),
                        "evidence": f"global {_pct(g['accuracy'])} ({g['params']:,} params, ranks "
                                    f"{list(g['ranks'].values())}) vs uniform {_pct(u['accuracy'])} "
                                    f"({u['params']:,} params)"})
    fw = results.get("finetune_whiten")
    if fw:
        target = results["baseline"]["accuracy"] - 0.003
        w, p = fw["runs"][0], results["finetune"]["runs"][0]
        ew, ep = epochs_to(w, target), epochs_to(p, target)
        fmt = lambda e: "never" if e is None else f"epoch {e}"  # noqa: E731
        out.append({"claim": "Fine-tuning from whitened factors reaches the baseline minus 0.3 points "
                             "in no more epochs than from plain factors",
                    "verdict": _verdict(ew is not None and (ep is None or ew <= ep)),
                    "evidence": f"target {_pct(target)} within {fw['epochs']} epochs: whitened "
                                f"{fmt(ew)} ({_pct(w['start_accuracy'])} -> {_pct(w['accuracy'])}), "
                                f"plain {fmt(ep)} ({_pct(p['start_accuracy'])} -> {_pct(p['accuracy'])})"})
    return out
