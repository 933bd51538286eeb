"""The study's claims, each checked against one run's results: a verdict and its numbers."""

from __future__ import annotations



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
        out.append(dynamic_claim(results, dyn, ft))
    dis = results.get("distill")
    if dis:
        base = results["baseline"]["accuracy"]
        acc = mean_accuracy(dis["runs"])
        same = dis.get("finetune_same_start")
        out.append({"claim": f"Distillation from the dense network brings D={dis['rank']} within 0.3 "
                             f"points of the baseline in {dis['epochs']} epochs",
                    "verdict": _verdict(acc >= base - 0.003),
                    "evidence": f"distilled {_pct(acc)} (from {dis.get('start', 'whitened')} factors at "
                                f"{_pct(dis['runs'][0]['start_accuracy'])}; lr {dis['lr']}, T "
                                f"{dis['temperature']}, alpha {dis['alpha']}) vs baseline {_pct(base)}; "
                                + (f"fine-tuned on labels from the same start {_pct(same['accuracy'])}, "
                                   if same else "")
                                + f"from plain factors {_pct(mean_accuracy(ft['runs']))}"})
    return out + whitening_claims(results)


def _se(diffs: list[float]) -> tuple[float, float]:
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    return mean, (sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5


def dynamic_claim(results: dict, dyn: dict, ft: dict) -> dict:
    """Dynamic training against fine-tuning, each at its own learning rate, over seeds: a
    verdict only outside two standard errors of the paired difference."""
    diffs = [a["accuracy"] - b["accuracy"] for a, b in zip(dyn["runs"], ft["runs"])]
    mean, se = _se(diffs)
    verdict = _verdict(mean > 0) if len(diffs) > 1 and abs(mean) >= 2 * se else "inconclusive"
    evidence = (f"dynamic {_pct(mean_accuracy(dyn['runs']))} (lr {dyn['lr']}) vs fine-tuned "
                f"{_pct(mean_accuracy(ft['runs']))} (lr {ft['lr']}), each learning rate chosen on the "
                f"validation split; mean of {len(diffs)} seeds, difference {100 * mean:+.2f} ± "
                f"{100 * se:.2f} points (1 s.e.)")
    eq = results.get("equal_time")
    if eq:
        m2, se2 = _se([d - f for d, f in zip(eq["dynamic"], eq["finetune"])])
        evidence += (f"; at equal wall-clock ({sum(eq['seconds']) / len(eq['seconds']):.0f} s, the faster "
                     f"method's time): dynamic {_pct(sum(eq['dynamic']) / len(eq['dynamic']))} vs "
                     f"fine-tuned {_pct(sum(eq['finetune']) / len(eq['finetune']))}, "
                     f"{100 * m2:+.2f} ± {100 * se2:.2f} points")
    return {"claim": f"Dynamic SVD training gains more than fine-tuning the factors "
                     f"(D={dyn['rank']}, {dyn['epochs']} epochs each)",
            "verdict": verdict, "evidence": evidence}


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
        pairs = results.get("sweep_paired") or {}

        def diff(d) -> str:  # the paired difference on the same test samples, when recorded
            p = pairs.get(str(d))
            return f" ({100 * p['difference']:+.2f} ± {100 * p['se']:.2f} points, 1 s.e.)" if p else ""
        noise = [d for d in worse if str(d) in pairs and
                 -pairs[str(d)]["difference"] < 2 * pairs[str(d)]["se"]]
        out.append({"claim": "Whitened (data-aware) truncation is at least as accurate as plain at every D",
                    "verdict": _verdict(not worse),
                    "evidence": ", ".join(f"D={d}: {_pct(white[d])} vs {_pct(plain[d])}{diff(d)}" for d in plain)
                    + (f"; where whitened is below plain (D={', '.join(map(str, worse))}), "
                       + ("the shortfall is within 2 s.e." if noise == worse else
                          "the shortfall is more than 2 s.e. at D=" +
                          ", ".join(str(d) for d in worse if d not in noise)) if worse and pairs else "")})
    by_rank: dict = {}
    for r in results.get("allocation") or []:
        by_rank.setdefault(r.get("rank", results["finetune"]["rank"]), {})[r["allocation"]] = r
    if by_rank and all("loss-aware" in rows for rows in by_rank.values()):
        losing = [d for d, rows in by_rank.items()
                  if rows["loss-aware"]["accuracy"] < max(rows["uniform"]["accuracy"],
                                                          rows.get("truncation-loss", rows["uniform"])["accuracy"])]
        out.append({"claim": "Loss-aware rank allocation is at least as accurate as uniform ranks and as "
                             "the truncation-loss allocation at the same parameters",
                    "verdict": _verdict(not losing),
                    "evidence": "; ".join(
                        f"D={d}: " + ", ".join(f"{k} {_pct(v['accuracy'])}" for k, v in rows.items())
                        for d, rows in by_rank.items())})
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
