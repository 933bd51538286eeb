"""Fault injection: fuzz every file svdcompress reads, and kill it while it writes.

Each fuzzed input must end in an identical, correct result or in exit status 2 with one
line on stderr: never a traceback, never a silently different model. Each killed
`compress` or `train` must leave its output directory as the old complete run or the new
complete one. Prints and saves the counts (tests/test_faults.py runs a few of each in CI):

    python benchmarks/faults.py [--cases 300] [--hf-cases 100] [--kills 10] [--out benchmarks/results/faults.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import svdcompress as sc
from benchmarks import faults_hf
from svdcompress.cli import main
from svdcompress.core.files import write_json
from svdcompress.study.data import write_idx
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

TINY = ["--width", "24", "--depth", "2", "--quiet", "--batch-size", "32", "--device", "cpu"]
ODD_VALUES = [None, -1, 0, 1, 2.5, 10 ** 12, "", "x", "linear", [], [1, "a"], {}, {"name": 3}, True]


def cli(*argv) -> tuple[int | str, str]:
    """Run the CLI in this process: (exit status, or 'traceback'; stderr)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(a) for a in argv])
    except BaseException as exc:  # anything escaping main() is a traceback for the user
        return "traceback", f"{type(exc).__name__}: {exc}"
    return code, err.getvalue()


def outcome(code, err: str, same) -> str:
    """Classify one case: ok (identical result), refused (exit 2, one line), or a failure."""
    if code == "traceback":
        return "traceback"
    if code == 2:
        return "refused" if err.count("\n") == 1 and "Traceback" not in err else "messy error"
    if code == 0:
        return "ok" if same() else "silent change"
    return f"exit {code}"


def make_data(root: Path, n_train=120, n_test=40, side=6, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, side, side)))
        write_idx(root / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return root


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    raw = bytearray(raw)
    how = rng.choice(["flip", "flip", "zero", "truncate", "extend"])
    if how == "truncate":
        return bytes(raw[:rng.randrange(len(raw))])
    if how == "extend":
        return bytes(raw) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(raw))
        raw[i] = 0 if how == "zero" else raw[i] ^ (1 << rng.randrange(8))
    return bytes(raw)


def mutate_json(meta: dict, rng: random.Random) -> dict:
    """Delete or replace one value somewhere in the object, at any depth."""
    paths = []

    def walk(node, path):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            paths.append(path + [k])
            walk(v, path + [k])
    walk(meta, [])
    path = rng.choice(paths)
    parent = meta
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(ODD_VALUES)
    return meta


def fuzz_idx(work: Path, base: Path, cases: int, rng: random.Random) -> Counter:
    """Corrupt one IDX file of the run's data directory; `eval --data` reads it."""
    counts = Counter()
    data = make_data(work / "idx-clean")
    _, good = cli("eval", base, "--data", data)
    for _ in range(cases):
        d = work / "idx"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(data, d)
        f = d / rng.choice(sorted(p.name for p in d.iterdir()))
        f.write_bytes(mutate_bytes(f.read_bytes(), rng))
        code, err = cli("eval", base, "--data", d)
        # a file that still parses is valid data, only differently labelled: correct shapes
        # and labels are all the reader can promise, and eval then ran on them
        counts[outcome(code, err, lambda: True)] += 1
    return counts


def fuzz_meta(work: Path, run: Path, cases: int, rng: random.Random) -> Counter:
    counts = Counter()
    clean = json.loads((run / "svdcompress.json").read_text())
    state = sc.load(run).state_dict()
    for _ in range(cases):
        d = work / "meta"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(run, d)
        if rng.random() < 0.2:
            text = json.dumps(clean)
            (d / "svdcompress.json").write_bytes(mutate_bytes(text.encode(), rng))
        else:
            write_json(d / "svdcompress.json", mutate_json(json.loads(json.dumps(clean)), rng))
        code, err = cli("eval", d)
        counts[outcome(code, err, lambda: states_equal(sc.load(d).state_dict(), state))] += 1
    return counts


def fuzz_weights(work: Path, run: Path, cases: int, rng: random.Random) -> Counter:
    counts = Counter()
    state = sc.load(run).state_dict()
    for _ in range(cases):
        d = work / "weights"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(run, d)
        f = d / "model.safetensors"
        f.write_bytes(mutate_bytes(f.read_bytes(), rng))
        code, err = cli("eval", d)
        counts[outcome(code, err, lambda: states_equal(sc.load(d).state_dict(), state))] += 1
    return counts


def fuzz_checkpoint(work: Path, data: Path, cases: int, rng: random.Random) -> Counter:
    """Corrupt an interrupted run's checkpoint (OUT.partial); `train --resume` reads it."""
    counts = Counter()
    ref = work / "ckpt-ref"
    cli("train", "--data", data, "--epochs", 2, "--out", ref, *TINY)
    partial = work / "ckpt-one.partial"
    cli("train", "--data", data, "--epochs", 1, "--out", work / "ckpt-one", *TINY)
    shutil.copytree(work / "ckpt-one", partial)  # a checkpoint after epoch 1, as a kill leaves it
    for p in partial.iterdir():
        if p.name != "checkpoint.safetensors":
            p.unlink()
    want = sc.load(ref).state_dict()
    for _ in range(cases):
        out = work / "resume"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / "resume.partial", ignore_errors=True)
        shutil.copytree(partial, work / "resume.partial")
        f = work / "resume.partial" / "checkpoint.safetensors"
        f.write_bytes(mutate_bytes(f.read_bytes(), rng))
        code, err = cli("train", "--data", data, "--epochs", 2, "--out", out, "--resume", *TINY)
        counts[outcome(code, err, lambda: states_equal(sc.load(out).state_dict(), want))] += 1
    return counts


def _digest(run: Path) -> str | None:
    """The run's weights' hash if it is complete and loads (its files match their hashes);
    None otherwise. Training is deterministic, so a rerun gives the same weights."""
    try:
        meta = sc.read_meta(run)
        sc.load(run)
    except sc.SVDCompressError:
        return None
    return meta["files"]["model.safetensors"]["sha256"]


def kill_runs(work: Path, base: Path, data: Path, kills: int, rng: random.Random) -> Counter:
    """SIGKILL `compress` and `train` at random moments while they replace an existing run."""
    counts = Counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    jobs = {
        "compress": lambda out, r: ["compress", base, "--rank", r, "--out", out, "--overwrite"],
        "train": lambda out, r: ["train", "--data", data, "--epochs", 3, "--seed", r, "--out", out,
                                 "--overwrite", *TINY],
    }
    for job, argv in jobs.items():
        out = work / f"kill-{job}"
        old_cmd = [sys.executable, "-m", "svdcompress", *map(str, argv(out, 2))]
        new_cmd = [sys.executable, "-m", "svdcompress", *map(str, argv(out, 3))]
        subprocess.run(old_cmd, check=True, env=env, capture_output=True)
        old = _digest(out)
        t0 = time.perf_counter()
        subprocess.run(new_cmd, check=True, env=env, capture_output=True)
        duration = time.perf_counter() - t0
        new = _digest(out)
        now = new
        for _ in range(kills):
            if now != old:  # put the old run back
                subprocess.run(old_cmd, check=True, env=env, capture_output=True)
            proc = subprocess.Popen(new_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, duration))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            now = _digest(out) if out.exists() else None
            counts["old run" if now == old else "new run" if now == new else "half-written"] += 1
    return counts


def fuzz_hf(work: Path, cases: int, rng: random.Random) -> dict:
    """The Hugging Face source readers (faults_hf.py): config, tokenizer files, modules.json,
    safetensors headers, each read by `compress --hf`."""
    sources = faults_hf.make_sources(work / "hf")
    return {f"hf {t}": faults_hf.fuzz_source(work, sources, t, cases, rng, cli, outcome, mutate_bytes,
                                             mutate_json) for t in faults_hf.TARGETS}


def run(cases: int, kills: int, seed: int = 0, hf_cases: int | None = None) -> dict:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_data(work / "data")
        base, comp = work / "base", work / "d2"
        assert cli("train", "--data", data, "--epochs", 1, "--out", base, *TINY)[0] == 0
        assert cli("compress", base, "--rank", 2, "--out", comp)[0] == 0
        result = {
            "idx": fuzz_idx(work, base, cases, rng),
            "svdcompress.json": fuzz_meta(work, comp, cases, rng),
            "model.safetensors": fuzz_weights(work, comp, cases, rng),
            "checkpoint": fuzz_checkpoint(work, data, cases, rng),
        }
        if hf_cases != 0:
            result.update(fuzz_hf(work, cases if hf_cases is None else hf_cases, rng))
        if kills:
            result["kills"] = kill_runs(work, base, data, kills, rng)
    return {k: dict(v) for k, v in result.items()}


BAD = ("traceback", "silent change", "half-written", "messy error")


def failures(result: dict) -> int:
    return sum(n for counts in result.values() for k, n in counts.items()
               if k in BAD or k.startswith("exit"))


def cli_main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=300, help="fuzzed inputs per reader")
    p.add_argument("--hf-cases", type=int, default=100, help="fuzzed inputs per Hugging Face "
                   "source file (0: none)")
    p.add_argument("--kills", type=int, default=10, help="kills per command (compress, train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/faults.json")
    args = p.parse_args()
    t0 = time.perf_counter()
    result = run(args.cases, args.kills, args.seed, args.hf_cases)
    for reader, counts in result.items():
        print(f"{reader:>18}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    summary = {"cases_per_reader": args.cases, "cases_per_hf_file": args.hf_cases,
               "kills_per_command": args.kills, "seed": args.seed,
               "tried": sum(sum(c.values()) for c in result.values()),
               "tracebacks": sum(c.get("traceback", 0) for c in result.values()),
               "silent_changes": sum(c.get("silent change", 0) for c in result.values()),
               "half_written": sum(c.get("half-written", 0) for c in result.values()),
               "other_failures": failures(result) - sum(
                   c.get(k, 0) for c in result.values() for k in ("traceback", "silent change", "half-written")),
               "seconds": time.perf_counter() - t0, "results": result}
    write_json(args.out, stamp(summary))
    print(f"{summary['tried']} cases: {summary['tracebacks']} tracebacks, {summary['silent_changes']} "
          f"silent changes, {summary['half_written']} half-written directories; wrote {args.out}")


if __name__ == "__main__":
    cli_main()
