"""The study's headline figures and timings as JSON under benchmarks/results/.

Summarises a `svdcompress reproduce` run (by default the one `make demo` writes to
report/), or runs the study first with --run:

    python benchmarks/study.py [--report report] [--run] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from svdcompress.core.files import write_json
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def summarize(results: dict) -> dict:
    def accs(section):
        return [r["accuracy"] for r in (results.get(section) or {}).get("runs", [])]

    return {
        "benchmark": "study",
        "data": results["data"], "settings": results["settings"],
        "baseline_accuracy": results["baseline"]["accuracy"],
        "baseline_params": results["baseline"]["params"],
        "sweep": [{k: r[k] for k in ("rank", "accuracy", "params", "bytes", "compression")}
                  for r in results["sweep"]],
        "finetune_accuracy_per_seed": accs("finetune"),
        "dynamic_accuracy_per_seed": accs("dynamic"),
        "distill_accuracy_per_seed": accs("distill"),
        "learning_rates": results.get("learning_rates"),
        "equal_time": results.get("equal_time"),
        "sweep_whiten": [{k: r[k] for k in ("rank", "accuracy")} for r in results.get("sweep_whiten") or []],
        "allocation": [{k: r.get(k) for k in ("rank", "allocation", "accuracy", "params", "ranks", "chosen")}
                       for r in results.get("allocation") or []],
        "seeds": results.get("seeds"),
        "claims": results["claims"],
        "timings_seconds": results["timings"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", default=str(ROOT / "report"))
    p.add_argument("--run", action="store_true", help="run the full study into --report first")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "study.json"))
    args = p.parse_args()
    if args.run:
        from svdcompress.study.experiments import reproduce
        reproduce(args.data, args.report)
    results = json.loads((Path(args.report) / "results.json").read_text())
    if results["settings"]["quick"]:
        raise SystemExit("that report is a --quick run: summarize a default run")
    summary = summarize(results)
    write_json(args.out, stamp(summary))
    print(json.dumps({k: summary[k] for k in ("baseline_accuracy", "sweep", "timings_seconds")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
