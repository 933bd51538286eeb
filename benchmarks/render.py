"""Every results table in README.md and docs/, rendered from its results JSON.

A table lives between two markers in the Markdown:

    <!-- render:NAME -->
    ... (written by this script: the table, then where it came from) ...
    <!-- /render:NAME -->

`python benchmarks/render.py` rewrites every such block from the committed JSON;
`python benchmarks/render.py --check` changes nothing and exits 1 naming each block that
differs (tests/test_docs.py runs it). Each block ends with the command that wrote its JSON,
the machine (cores, threads) and the date, from the JSON's "provenance" (benchmarks stamp it
when they write: benchmarks/provenance.py), and how much its figures varied between runs
where that was measured.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' own table functions
MARKER = re.compile(r"<!-- render:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /render:(?P=name) -->", re.S)


def pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def source(data: dict, path: str) -> str:
    """The line under a table: command, results file, machine, date, variation."""
    p = data.get("provenance")
    if not p:
        raise SystemExit(f"{path} has no provenance: rerun its benchmark (benchmarks/provenance.py)")
    m = p["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    line = (f"<sub>From `{p['command']}` → `{path}`; {m['cores']} CPU cores, {m['threads']} "
            f"thread(s){gpu}, torch {m['torch']}; {p['date']}.")
    if p.get("variation"):
        line += f" Variation: {p['variation']}."
    return line + "</sub>"


def table(header: list[str], align: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ----- the study (report/results.json, written by `make demo`) -----

def study_sweep(d: dict) -> str:
    from svdcompress.study.report import headline_table
    return headline_table(d)


def study_recovery(d: dict) -> str:
    from svdcompress.study.report import recovery_section
    lines = recovery_section(d)
    table_lines = [line for line in lines if line.startswith("|")]
    after = [line for line in lines if line.startswith("At equal")]
    return "\n".join(table_lines + ([""] + after if after else []))


def study_claims(d: dict) -> str:
    rows = [[c["claim"], c["verdict"] if c["verdict"] == "supported" else f"**{c['verdict']}**",
             c["evidence"]] for c in d["claims"]]
    return table(["claim", "this run", "evidence"], ["---"] * 3, rows)


def study_source(d: dict, path: str) -> str:
    s, t = d["settings"], d["timings"]
    p = d.get("provenance", {})
    m = p.get("machine", {})
    minutes, seconds = divmod(round(t["total"]), 60)
    return (f"<sub>From `{p.get('command', 'make demo')}` → `{path}` (and `report/report.md`): "
            f"{d['data']['name']}, {m.get('cores', '?')} CPU cores, {s['threads']} threads, "
            f"{minutes} min {seconds} s in all; {p.get('date', '?')}."
            + (f" Variation: {p['variation']}." if p.get("variation") else "") + "</sub>")


# ----- dynamic training -----

def dynamic_overhead(d: dict) -> str:
    t, r, a = d["time_per_step"], d["ratio_to_plain"], d["rank_d_accuracy"]
    labels = {"plain": f"plain (dense; truncated to D = {d['rank']} to test)",
              "exact": "dynamic, exact SVD each step", "subspace": "dynamic, subspace tracker (default)"}
    rows = [[labels[k], f"{t[k]['median_ms']:.1f} ms", f"{r[k]:.2f}x", pct(a[k])]
            for k in ("plain", "exact", "subspace")]
    return table(["training", "median time per step", "vs plain", f"rank-{d['rank']} test accuracy after the run"],
                 ["---", "---:", "---:", "---:"], rows)


def tracker_settings(d: dict) -> str:
    rows = [[s["oversample"], f"{s['tol']:g}", f"{s['mean_iterations']:.2f}", f"{s['ratio_to_plain']:.2f}x",
             f"{s['max_projection_error']:.1e}"] for s in d["settings"]]
    return table(["oversample", "tol", "iterations per step", "vs plain", "largest projection error"],
                 ["---:"] * 5, rows)


# ----- data-aware compression (whitening.json) -----

def _whitening_sweep(d: dict, name: str) -> str:
    ds = d["datasets"][name]
    rows = []
    for b in d["calib_batches"]:
        acc = ds["calibration"][str(b)]["accuracy"]
        for method, by_rank in acc.items():
            rows.append([b, method] + [f"{100 * by_rank[str(k)]:.2f}" for k in d["ranks"]])
    return table(["calibration batches", "truncation"] + [f"D={k}" for k in d["ranks"]],
                 ["---:", "---"] + ["---:"] * len(d["ranks"]), rows)


def _whitening_alloc(d: dict, name: str) -> str:
    rows = []
    for r in d["datasets"][name]["allocation_16_batches"]:
        label = r["allocation"] + (f" (kept: {r['chosen']})" if r.get("chosen") else "")
        rows.append([r["rank"], label, f"{100 * r['accuracy']:.2f}", ", ".join(map(str, r["ranks"].values()))])
    return table(["D (parameters of)", "allocation", "accuracy", "ranks"], ["---:", "---", "---:", "---"], rows)


# ----- encoders -----

def minilm(d: dict) -> str:
    rows = [[r["ratio"], r["variant"], f"{r['mean_cosine']:.3f}", f"{r['top1_agreement']:.3f}",
             f"{r['top10_overlap']:.3f}", f"{r['file_bytes'] / 1e6:.1f}", f"{r['sentences_per_second']:.0f}",
             f"{r['compress_seconds']:.1f}"] for r in d["rows"]]
    return table(["linear params kept", "SVD", "mean cosine", "top-1 agreement", "top-10 overlap", "MB",
                  "sentences/s", "seconds to compress"], ["---:", "---"] + ["---:"] * 6, rows)


def minilm_budget(d: dict) -> str:
    by_ratio: dict = {}
    for r in d["rows"]:
        by_ratio.setdefault(r["ratio"], []).append(r)
    rows = []
    for ratio, rs in by_ratio.items():
        best = max(r["mean_cosine"] for r in rs)
        for r in rs:
            alloc = r["variant"].split("+")[1] if "+" in r["variant"] else "uniform"
            cos = f"{r['mean_cosine']:.4f}"
            rows.append([ratio, alloc, f"**{cos}**" if r["mean_cosine"] == best and alloc == "loss-aware" else cos,
                         f"{r['top1_agreement']:.3f}", f"{r['top10_overlap']:.3f}", f"{r['compress_seconds']:.1f}"])
    return table(["linear params kept", "allocation", "mean cosine", "top-1 agreement", "top-10 overlap",
                  "seconds to compress"], ["---:", "---"] + ["---:"] * 4, rows)


def distill_minilm(d: dict) -> str:
    rows = [[r["epoch"], f"{r['mean_cosine']:.4f}", f"{r['top1_agreement']:.3f}", f"{r['top10_overlap']:.3f}",
             f"{r['cpu_seconds']:.0f}", f"{r.get('wall_seconds', 0):.0f}"] for r in d["rows"]]
    return table(["epoch", "mean cosine", "top-1 agreement", "top-10 overlap", "CPU seconds", "wall seconds"],
                 ["---:"] * 6, rows)


# ----- language models -----

def blockwise(d: dict) -> str:
    rows = []
    for name, m in d["models"].items():
        r, mib = m["rows"], lambda b: f"{b / 2 ** 20:,.0f} MiB"  # noqa: E731
        over = m["whiten_peak_over_baseline_bytes"]
        rows.append([name, mib(m["model_bytes"]), mib(m["block_boundary_bytes"]),
                     mib(r["baseline"]["peak_rss_bytes"]), mib(r["whiten"]["peak_rss_bytes"]),
                     f"{mib(over)} ({m['whiten_peak_over_baseline_in_boundaries']:.1f} boundaries)",
                     f"{r['forward']['seconds']:.0f} s", f"{r['plain']['seconds']:.0f} s",
                     f"{r['whiten']['seconds']:.0f} s", f"{m['time_budget_seconds']:.0f} s"])
    return table(["model", "weights", "one block boundary", "peak RSS: model alone", "whitened",
                  "over the model alone", "two forward passes", "plain SVD", "whitened",
                  "budget (3 x plain + 2 passes)"], ["---"] + ["---:"] * 9, rows)


def gpt2_fortunes(d: dict) -> str:
    by: dict = {}
    for r in d["rows"]:
        by.setdefault(r["ratio"], {})[r["method"]] = r["perplexity"]
    rows = [[ratio, f"{m['plain']:.2f}", f"{m['whiten']:.2f}"] for ratio, m in by.items()]
    return table(["linear params kept", "plain SVD", "whitened (default)"], ["---:"] * 3, rows)


def llm(d: dict) -> str:
    from llm import table as llm_table
    return llm_table(d)


def recovery_design(d: dict) -> str:
    rows = [[r["setting"] + (" *" if r.get("note") else ""), f"{r['lr']:g}", r["factors"], f"{r['train_tokens']:,}",
             f"{r['seconds'] / 60:.1f} min",
             f"{r['perplexity_before']:.2f}", f"**{r['perplexity']:.2f}**", f"{r['held_out_kl']:.3f}"]
            for r in d["rows"]]
    return table(["setting", "lr", "factors", "tokens trained", "time", "perplexity before", "after",
                  "held-out KL to the teacher"], ["---", "---:", "---", "---:", "---:", "---:", "---:", "---:"], rows)


def int8_layers(d: dict) -> str:
    from int8_layers import table as int8_table
    return int8_table(d)


def int8_lm(d: dict) -> str:
    """benchmarks/int8_lm.py's results: one row per model (dense, float32 and int8 factors)."""
    by = {r["batch"]: r for r in d["speed"]}
    head = ["factors", "block linear bytes", "of dense", "perplexity", "vs float32 factors"] + \
        [f"decode batch {b}: ms per step" for b in by] + [f"prefill batch {b}: tokens/s" for b in by]
    rows = []
    for name in ("dense", "float32", "int8"):
        ppl = d["perplexity"].get(name)
        rel = "" if name == "dense" or ppl is None else f"{ppl / d['perplexity']['float32'] - 1:+.1%}"
        rows.append([name, f"{d['bytes'][name]:,}", f"{d['bytes'][name] / d['bytes']['dense']:.1%}",
                     "" if ppl is None else f"{ppl:.2f}", rel]
                    + [f"{by[b][name]['decode_ms_per_token']:.1f}" for b in by]
                    + [f"{by[b][name]['prefill_tokens_per_second']:,.0f}" for b in by])
    return table(head, ["---"] + ["---:"] * (len(head) - 1), rows) + "\n"


def calibration_speed(d: dict) -> str:
    from calibration_speed import table as speed_table
    return speed_table(d)


# ----- inference, scaling, guarantees -----

def inference(d: dict) -> str:
    by: dict = {}
    for r in d["rows"]:
        by.setdefault(r["rank"], []).append(r)
    batches = sorted({r["batch"] for r in d["rows"]})
    rows = []
    for rank, rs in by.items():
        sp = {r["batch"]: r["speedup"] for r in rs}
        rows.append([rank, f"{rs[0]['flop_ratio']:.1f}x"] + [f"{sp[b]:.2f}x" for b in batches]
                    + [f"{rs[0]['file_bytes']:,} B", f"{rs[0]['file_over_params_x4']:.4f}"])
    head = ["D", "multiply-adds fewer", f"speed-up batch {batches[0]}"] + [f"batch {b}" for b in batches[1:]]
    return table(head + ["weight file", "file / (params x 4)"], ["---:"] * (len(head) + 2), rows)


def lm_speed(d: dict) -> str:
    rows = []
    for r in d["rows"]:
        dn, c = r["dense"], r["compressed"]
        rows.append([r["label"], r["device"], r["batch"],
                     f"{dn['prefill_tokens_per_second']:,.0f} → {c['prefill_tokens_per_second']:,.0f}",
                     f"**{r['prefill_speedup']:.2f}x**",
                     f"{dn['decode_ms_per_token']:.1f} → {c['decode_ms_per_token']:.1f}",
                     f"**{r['decode_speedup']:.2f}x**",
                     f"{r['weight_mib']['dense']:,.0f} → {r['weight_mib']['compressed']:,.0f}"])
    return table(["run", "device", "batch", f"prefill {d['prompt_tokens']} tokens: tokens/s", "speed-up",
                  f"decode ({d['new_tokens']} steps): ms per step", "speed-up", "weights MiB"],
                 ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:"], rows)


def factor_layout(d: dict) -> str:
    """benchmarks/factor_layout.py's results: the same factors, u stored two ways."""
    rows = [[r["label"], r["batch"], f"{r['dense']['decode_ms_per_token']:.1f} → {r['compressed']['decode_ms_per_token']:.1f}",
             f"**{r['decode_speedup']:.2f}x**", f"{r['prefill_speedup']:.2f}x"] for r in d["rows"]]
    return table(["run", "batch", f"decode ({d['new_tokens']} steps): ms per step, dense → run", "decode speed-up",
                  f"prefill {d['prompt_tokens']} tokens speed-up"], ["---", "---:", "---:", "---:", "---:"], rows)


def scaling(d: dict) -> str:
    rows = [[r["processes"], r["threads_per_process"], f"{r['train_samples_per_second']:.0f}",
             f"{r['train_speedup']:.2f}x", f"{r['compress_whiten_seconds']:.1f} s", f"{r['compress_speedup']:.2f}x"]
            for r in d["rows"]]
    return table(["processes", "threads each", "train: samples/s", "speed-up", "whitened compression", "speed-up"],
                 ["---:"] * 6, rows)


def faults(d: dict) -> str:
    r = d["results"]
    rows = [[name, sum(v.values()), v.get("ok", 0), v.get("refused", 0)]
            for name, v in r.items() if name != "kills"]
    kills = r.get("kills", {})
    return (table(["input fuzzed", "cases", "accepted (harmless or identical)", "refused with one line"],
                  ["---", "---:", "---:", "---:"], rows)
            + f"\n\n{d['tried']:,} cases in all: {d['tracebacks']} tracebacks, {d['silent_changes']} silent "
              f"changes, {d['half_written']} half-written directories; kills of `compress` and `train` "
              f"mid-write: {kills.get('old run', 0)} left the old run, {kills.get('new run', 0)} the new one.")


def _load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def headline(_: dict | None = None) -> str:
    """The README's table: the best figure of each kind, each from its own results file."""
    rows, used = [], {}
    study = used["report/results.json"] = _load("report/results.json")
    d20 = next(r for r in study["sweep"] if r["rank"] == 20)
    tuned = (study.get("distill") or {}).get("finetune_same_start") or {}
    rows.append(["the study's MLP on Fashion-MNIST, every layer but the last at rank 20 "
                 f"({d20['compression']:.1f}x fewer parameters)",
                 f"accuracy {pct(d20['accuracy'])} truncated, {pct(tuned['accuracy'])} after 5 epochs of "
                 f"fine-tuning from whitened, loss-aware factors (dense {pct(study['baseline']['accuracy'])})"
                 if tuned else f"accuracy {pct(d20['accuracy'])} (dense {pct(study['baseline']['accuracy'])})",
                 "[study](docs/study.md)"])
    lm = used["benchmarks/results/llm.json"] = _load("benchmarks/results/llm.json")
    dense = next(r for r in lm["rows"] if r["method"] == "dense")["perplexity"]
    for ratio in sorted({r["ratio"] for r in lm["rows"] if r["method"] != "dense"}, reverse=True)[:2]:
        got = {r["method"]: r for r in lm["rows"] if r["ratio"] == ratio and r["method"] != "recovered"}
        if "default" not in got or "svd-llm" not in got:
            continue
        text = (f"perplexity on held-out Wikipedia {got['default']['perplexity']:.1f} (SVD-LLM's method on the same "
                f"data: {got['svd-llm']['perplexity']:.1f}; dense {dense:.2f})")
        if "loss-aware" in got:
            text += f", {got['loss-aware']['perplexity']:.1f} with loss-aware ranks (`--allocation fisher`)"
        recovered = [r for r in lm["rows"] if r["ratio"] == ratio and r["method"] == "recovered"]
        if recovered:
            r = min(recovered, key=lambda r: r["perplexity"])
            cores = lm.get("provenance", {}).get("machine", {}).get("cores", "?")
            text += (f"; {r['perplexity']:.1f} ({r['perplexity'] / dense:.1f}x dense) after "
                     f"{r['recovery_seconds'] / 60:.0f} minutes of recovery training on {cores} CPU cores")
        rows.append([f"SmolLM2-135M (pretrained), {ratio:g} of the block linear parameters kept", text,
                     "[transformers](docs/transformers.md)"])
    cal = ROOT / "benchmarks/results/calibration_speed.json"
    if cal.exists():  # the current code's SmolLM2 rows: the whitened default against SVD-LLM's algorithm
        cs = json.loads(cal.read_text())
        # the current code's rows: the last run recorded that measured SmolLM2
        run = [r for r in cs["runs"].values() if any(x["part"] == "smollm2" for x in r["rows"])][-1]
        got = {(r["calibration_sequences"], r["method"]): r for r in run["rows"] if r["part"] == "smollm2"}
        parts = []
        for seqs in sorted({s for s, _ in got}):
            ours, theirs = got.get((seqs, "whitened default")), got.get((seqs, "parallel whitening (SVD-LLM)"))
            if ours and theirs:
                parts.append(f"{seqs} x 512 tokens: {ours['seconds']:.0f} s for perplexity {ours['perplexity']:.1f}, "
                             f"SVD-LLM's algorithm {theirs['seconds']:.0f} s for {theirs['perplexity']:.1f} "
                             f"({ours['seconds'] / theirs['seconds']:.1f}x the time)")
        # the 7B-shaped block: the current code's row, else the last run that measured one
        block = ([r for r in run["rows"] if r["part"] == "block7b"] or
                 [r for rs in cs["runs"].values() for r in rs["rows"] if r["part"] == "block7b"] or [None])[-1]
        if parts and block:
            parts.append(f"one LLaMA-7B-shaped block (bfloat16, 32 x 512 tokens): {block['seconds']:,.0f} s, "
                         f"about {32 * block['seconds'] / 3600:.0f} hours for a 7B model's 32 blocks on this CPU "
                         "(SVD-LLM's paper: 10 minutes on one A100), peak memory "
                         f"{block['peak_rss_bytes'] / 2 ** 30:.1f} GiB")
        if parts:
            used["benchmarks/results/calibration_speed.json"] = cs
            rows.append(["SmolLM2-135M, data-aware compression to 0.6 kept, 2 CPU threads",
                         "the whitened default, " + "; ".join(parts),
                         "[transformers](docs/transformers.md#how-long-data-aware-compression-takes)"])
    mini = used["benchmarks/results/minilm.json"] = _load("benchmarks/results/minilm.json")
    got = {r["variant"]: r for r in mini["rows"] if r["ratio"] == 0.5}
    if got:
        rows.append(["all-MiniLM-L6-v2 (pretrained), half the linear parameters",
                     f"embeddings' mean cosine to the original {got['whiten-sequential']['mean_cosine']:.3f} "
                     f"(plain SVD: {got['plain']['mean_cosine']:.3f})", "[transformers](docs/transformers.md)"])
    inf = used["benchmarks/results/inference.json"] = _load("benchmarks/results/inference.json")
    r = next(r for r in inf["rows"] if r["rank"] == 20 and r["batch"] == max(x["batch"] for x in inf["rows"]))
    rows.append([f"the study's MLP at rank 20, batch {r['batch']}, CPU",
                 f"{r['speedup']:.1f}x faster than dense ({r['flop_ratio']:.1f}x fewer multiply-adds)",
                 "[inference](docs/inference.md)"])
    speed = ROOT / "benchmarks/results/lm_speed.json"
    if speed.exists():
        sp = used["benchmarks/results/lm_speed.json"] = json.loads(speed.read_text())
        plain = [r for r in sp["rows"] if r["batch"] == 1 and not r.get("speed_for")]
        for r in sorted({id(x): x for x in (min(plain, key=lambda r: r["kept"]),
                                             max(plain, key=lambda r: r["kept"]))}.values(),
                        key=lambda r: r["kept"]) if plain else []:
            rows.append([f"SmolLM2-135M at {r['kept']:g} kept, batch 1, {r['device'].upper()}",
                         f"decoding {r['decode_speedup']:.2f}x the dense model's tokens per second, "
                         f"prefill of {sp['prompt_tokens']} tokens {r['prefill_speedup']:.2f}x",
                         "[inference](docs/inference.md)"])
    int8 = ROOT / "benchmarks/results/int8_lm.json"
    if int8.exists():
        q = used["benchmarks/results/int8_lm.json"] = json.loads(int8.read_text())
        b1 = next(r for r in q["speed"] if r["batch"] == 1)
        rows.append([f"SmolLM2-135M at {q['ratio']:g} kept, int8 factors (`quantize`)",
                     f"block linear weights {q['bytes']['int8'] / q['bytes']['dense']:.1%} of the dense float32 "
                     f"bytes, perplexity {q['perplexity']['int8']:.1f} (float32 factors "
                     f"{q['perplexity']['float32']:.1f}), decoding at batch 1 "
                     f"{b1['int8_over_float32']['decode_speedup']:.2f}x the float32 factors' speed",
                     "[inference](docs/inference.md#int8-factors)"])
    out = table(["model, setting", "result", "more"], ["---", "---", "---"], rows)
    notes = []
    for path, data in used.items():
        p = data.get("provenance", {})
        m = p.get("machine", {})
        notes.append(f"`{path}`: `{p.get('command', '?')}`, {m.get('cores', '?')} cores, "
                     f"{m.get('threads', '?')} threads, {p.get('date', '?')}")
    return out + "\n\n<sub>From " + "; ".join(notes) + ".</sub>\n"


TABLES = {  # name: (results file, renderer)
    "headline": (None, headline),
    "study-sweep": ("report/results.json", study_sweep),
    "study-recovery": ("report/results.json", study_recovery),
    "study-claims": ("report/results.json", study_claims),
    "dynamic-overhead": ("benchmarks/results/dynamic_overhead.json", dynamic_overhead),
    "tracker-settings": ("benchmarks/results/tracker_settings.json", tracker_settings),
    "whitening-fashion": ("benchmarks/results/whitening.json", lambda d: _whitening_sweep(d, "fashion-mnist")),
    "whitening-fashion-alloc": ("benchmarks/results/whitening.json", lambda d: _whitening_alloc(d, "fashion-mnist")),
    "whitening-mnist": ("benchmarks/results/whitening.json", lambda d: _whitening_sweep(d, "mnist-5k")),
    "whitening-mnist-alloc": ("benchmarks/results/whitening.json", lambda d: _whitening_alloc(d, "mnist-5k")),
    "minilm": ("benchmarks/results/minilm.json", minilm),
    "minilm-budget": ("benchmarks/results/minilm_budget.json", minilm_budget),
    "distill-minilm": ("benchmarks/results/distill_minilm.json", distill_minilm),
    "blockwise": ("benchmarks/results/blockwise.json", blockwise),
    "gpt2-fortunes": ("benchmarks/results/gpt2_fortunes.json", gpt2_fortunes),
    "llm": ("benchmarks/results/llm.json", llm),
    "recovery-design": ("benchmarks/results/recovery_design.json", recovery_design),
    "calibration-speed": ("benchmarks/results/calibration_speed.json", calibration_speed),
    "inference": ("benchmarks/results/inference.json", inference),
    "lm-speed": ("benchmarks/results/lm_speed.json", lm_speed),
    "factor-layout": ("benchmarks/results/factor_layout.json", factor_layout),
    "int8-layers": ("benchmarks/results/int8_layers.json", int8_layers),
    "int8-lm": ("benchmarks/results/int8_lm.json", int8_lm),
    "scaling": ("benchmarks/results/scaling.json", scaling),
    "faults": ("benchmarks/results/faults.json", faults),
}


def render(name: str) -> str:
    """The block of the table ``name``: the table, then where it came from."""
    if name not in TABLES:
        raise SystemExit(f"unknown table {name!r} in a render marker: one of {', '.join(TABLES)}")
    path, fn = TABLES[name]
    if path is None:  # a table of several results files, each named in it
        return fn(None)
    data = json.loads((ROOT / path).read_text())
    below = study_source(data, path) if path == "report/results.json" else source(data, path)
    return f"{fn(data)}\n\n{below}\n"


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def rendered(text: str) -> str:
    return MARKER.sub(lambda m: f"<!-- render:{m['name']} -->\n{render(m['name'])}<!-- /render:{m['name']} -->", text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = p.parse_args(argv)
    stale = []
    for doc in documents():
        text = doc.read_text()
        new = rendered(text)
        if new != text:
            stale.append(str(doc.relative_to(ROOT)))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print("tables differ from their results JSON (run python benchmarks/render.py): " + ", ".join(stale))
        return 1
    print(("rewrote " + ", ".join(stale)) if stale and not args.check else "every table matches its results JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
