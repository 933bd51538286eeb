"""How to run recovery training of a compressed causal LM: learning rate, and both factors at
once against SVD-LLM's alternating order (u with v frozen, then v with u frozen), at equal
tokens (and so about equal time), on SmolLM2-135M-Instruct compressed by the whitened default.

The compressed model is made once (16 sequences of 512 tokens of the Wikipedia calibration
text, as benchmarks/llm.py makes it) and cached in --cache; each setting then trains a fresh
copy of it on the recovery-training text (the same sequences for every setting) and is
scored on the first --eval-tokens test tokens (windows of 512, non-overlapping). One line of
results per setting, appended to --out:

    python benchmarks/recovery_design.py --ratio 0.8 lr=1e-4,seqs=64 lr=5e-4,seqs=64 \
        lr=5e-4,seqs=64,factors=alternate

A setting is comma-separated key=value: lr, seqs (training sequences), len (tokens each),
bs (batch), acc (micro-batches per step), alpha (share of the KL term), factors
(both | alternate).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import svdcompress as sc  # noqa: E402
from svdcompress.core.distill import Distill  # noqa: E402
from svdcompress.core.files import write_json  # noqa: E402
from svdcompress.integrations.causal_lm import perplexity, text_sequences  # noqa: E402
from svdcompress.integrations.recover_lm import LMTrainConfig, recover_lm  # noqa: E402
from llm import model_and_text  # noqa: E402
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

CALIB_SEQS, SEQ_LEN = 16, 512


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("settings", nargs="+")
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="/tmp/svdcompress-recovery-design")
    p.add_argument("--out", default="benchmarks/results/recovery_design.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, train_ids, test_ids = model_and_text(args.eval_tokens)
    calib = CALIB_SEQS * SEQ_LEN
    run = Path(args.cache) / f"default-{args.ratio:g}"
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {
        "benchmark": "recovery_design", "calibration": f"{CALIB_SEQS} sequences of {SEQ_LEN} tokens",
        "eval_tokens": args.eval_tokens, "rows": []}
    if not run.exists():
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        sc.compress_(model, sc.SVDConfig(ratio=args.ratio, method="whiten"),
                     text_sequences(train_ids[:calib], SEQ_LEN, CALIB_SEQS, batch_size=8))
        print(f"compressed in {time.perf_counter() - t:.0f} s", flush=True)
        sc.save(model, run)
    start = perplexity(sc.load(run), test_ids, window=512, stride=512)["perplexity"]
    for spec in args.settings:
        kw = dict(x.split("=") for x in spec.split(","))
        model = sc.load(run)
        cfg = LMTrainConfig(epochs=1, lr=float(kw.get("lr", 1e-4)), batch_size=int(kw.get("bs", 4)),
                            accumulate=int(kw.get("acc", 2)), seq_len=int(kw.get("len", 256)),
                            max_sequences=int(kw.get("seqs", 128)), factors=kw.get("factors", "both"))
        alpha = float(kw.get("alpha", 0.5))
        t = time.perf_counter()
        history = recover_lm(model, dense, train_ids[calib:], cfg, Distill(1.0, alpha), progress=False)
        seconds = time.perf_counter() - t
        ppl = perplexity(model, test_ids, window=512, stride=512)["perplexity"]
        row = {"ratio": args.ratio, "setting": spec, "lr": cfg.lr, "factors": cfg.factors, "alpha": alpha,
               "train_tokens": history[-1]["train_tokens"], "seconds": seconds,
               "perplexity_before": start, "perplexity": ppl, "held_out_kl": history[-1]["held_out_kl"]}
        result["rows"].append(row)
        write_json(out, stamp(result, args.threads))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
