"""The command line: argument parsing, one library call per command, and printing.

Errors a user can cause (svdcompress's SVDCompressError and its subclasses, unreadable or
unwritable files) end with one line on stderr and exit status 2; ``--debug`` shows the
traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import sys
import traceback
import warnings

from . import __version__
from .core import dist
from .core.checkpoint import SCHEDULES
from .core.config import ALLOCATIONS, SVDConfig
from .core.distill import Distill
from .core.errors import ConfigError, SVDCompressError
from .core.profile import Profile
from .core.io import load, read_meta
from .integrations.bench import bench_run
from .integrations.distill import EncoderTrainConfig, distill_encoder_run
from .integrations.export import export_run
from .integrations.hf_load import DTYPES
from .integrations.hf_runs import compress_hf
from .study.experiments import BASE_EPOCHS, STUDY_RANKS, reproduce
from .study.runs import compress_run, continue_training, eval_run, sweep_run, train_run
from .study.train import TrainConfig
from .cli_hf import add_eval_commands, finetune_lm, print_lm_bench
from .cli_types import (Parser, UsageError, or_default, device, fraction, positive_float, positive_int,  # noqa: F401
                        closed_pipe, rank_list, seed, suffixes_or_regex)


def cmd_info(args) -> None:
    meta = read_meta(args.run)  # checks every file against its hash
    if meta.get("architecture") is not None:
        load(args.run)  # and every tensor against the recorded shapes
    print(f"run: {args.run}  (format_version {meta['format_version']})")
    if meta.get("architecture"):
        print(f"architecture: {meta['architecture']}")
    if meta.get("config"):
        print(f"config: {meta['config']}")
    for e in meta["layers"]:
        print(f"  {e['name']:<28} {str(e.get('kind', '?')):<8} rank {e.get('rank')}")
    if not meta["layers"]:
        print("  (no low-rank layers: a dense model)")


def train_config(args, epochs: int = 20, batch_size: int = 128) -> TrainConfig:
    """The training settings of the command line, with these defaults where it has none."""
    return TrainConfig(epochs=or_default(args.epochs, epochs), lr=args.lr,
                       batch_size=or_default(args.batch_size, batch_size), seed=args.seed,
                       device=args.device, schedule=or_default(args.schedule, "constant"))



def cmd_train(args) -> None:
    if args.init is None:
        if args.project_rank is not None:
            raise UsageError("--project-rank needs --init RUN (the network to start from)")
        if args.data is None:
            raise UsageError("the following arguments are required: --data (or --init RUN)")
        history = train_run(args.data, train_config(args), args.out, [args.width] * args.depth,
                            limit_train=args.limit_train, resume=args.resume,
                            overwrite=args.overwrite, progress=not args.quiet)
    else:
        history = continue_training(args.init, train_config(args), args.out, data=args.data,
                                    project_rank=args.project_rank, projection=args.projection,
                                    resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print(f"saved {args.out}: test accuracy {history[-1]['test_accuracy']:.4f}" if history
          else f"saved {args.out}")


def cmd_finetune(args) -> None:
    arch = (read_meta(args.run).get("architecture") or {}).get("name")
    if arch == "hf-causal-lm":
        return finetune_lm(args)
    distill = Distill(or_default(args.temperature, 2.0), or_default(args.alpha, 0.5),
                      args.embedding_loss) if args.distill else None
    batch_size = or_default(args.batch_size, 128)
    if arch == "hf-encoder":
        if distill is None:
            raise ConfigError("a sentence encoder is fine-tuned by distillation: add --distill")
        history = distill_encoder_run(
            args.run, args.out, EncoderTrainConfig(or_default(args.epochs, 5), args.lr, batch_size, args.seed,
                                                or_default(args.schedule, "constant")),
            distill, teacher=args.teacher, texts=args.calib, sentences=args.calib_sentences,
            resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
        print(f"saved {args.out}: held-out cosine to the teacher "
              f"{history[-1]['held_out_cosine']:.4f}" if history else f"saved {args.out}")
        return
    history = continue_training(args.run, train_config(args, epochs=5, batch_size=128), args.out,
                                data=args.data, resume=args.resume, overwrite=args.overwrite,
                                progress=not args.quiet, distill=distill, teacher=args.teacher)
    print(f"saved {args.out}: test accuracy {history[-1]['test_accuracy']:.4f}" if history
          else f"saved {args.out}")


def cmd_sweep(args) -> None:
    table, out = sweep_run(args.run, args.ranks, args.methods, data=args.data,
                           calib_batches=args.calib_batches, out=args.out, overwrite=args.overwrite)
    first = table[args.methods[0]]
    print(f"{'D':>5} " + " ".join(f"{m + ' acc.':>12}" for m in args.methods)
          + f" {'parameters':>12} {'bytes':>12} {'smaller':>8}")
    for i, r in enumerate(first):
        accs = " ".join(f"{table[m][i]['accuracy']:>12.4f}" for m in args.methods)
        print(f"{r['rank']:>5} {accs} {r['params']:>12,} {r['bytes']:>12,} {r['compression']:>7.1f}x")
    print(f"wrote {out}")


def svd_config(args) -> SVDConfig:
    return SVDConfig(rank=args.rank, energy=args.energy, ratio=args.ratio,
                     target_modules=args.target, exclude_modules=args.exclude,
                     method=args.method, sequential=args.calibration == "sequential",
                     damping=args.damping, allocation=args.allocation, round_to=args.round_to,
                     min_speedup=args.min_speedup, speed_for=args.speed_for)


def cmd_compress(args) -> None:
    if (args.run is None) == (args.hf is None):
        raise UsageError("give exactly one of RUN or --hf PATH")
    profile = Profile() if args.profile else None
    if args.hf is not None:
        report, seconds = compress_hf(args.hf, svd_config(args), args.out, calib=args.calib,
                                      calib_sentences=args.calib_sentences, overwrite=args.overwrite,
                                      seq_len=args.seq_len, calib_seqs=args.calib_seqs,
                                      device=args.device, dtype=args.dtype, profile=profile)
        print(report)
        saved = f"saved {args.out} in {seconds:.1f} s"
    else:
        print(compress_run(args.run, svd_config(args), args.out, data=args.data,
                           calib_batches=args.calib_batches, overwrite=args.overwrite,
                           device=args.device, profile=profile))
        saved = f"saved {args.out}"
    if profile is not None:
        print(f"where the time went:\n{profile}")
    print(saved)


def cmd_eval(args) -> None:
    m = eval_run(args.run, args.data)
    print(f"{args.run}: accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f}, "
          f"{m['params']:,} parameters, {m['bytes']:,} bytes ({m['data']} test split)")


def cmd_bench(args) -> None:
    result, out = bench_run(args.run, args.batch, args.threads, args.repeats, args.out,
                            args.overwrite, args.prompt_tokens, args.new_tokens)
    if result.get("kind") == "causal-lm":
        return print_lm_bench(result, out)
    for r in result["rows"]:
        print(f"{r['device']} batch {r['batch']:>4}: dense {r['dense_ms']:8.3f} ms, compressed "
              f"{r['compressed_ms']:8.3f} ms, speed-up {r['speedup']:5.2f}x "
              f"(multiply-adds {r['flop_ratio']:5.2f}x fewer)")
    print(f"wrote {out}")


def cmd_export(args) -> None:
    print(f"wrote {args.onnx}: {json.dumps(export_run(args.run, args.onnx, args.overwrite))}")


def cmd_reproduce(args) -> None:
    results = reproduce(args.data, args.out, quick=args.quick, epochs=args.epochs,
                        seed=args.seed, device=args.device, progress=not args.quiet,
                        hidden=[args.width] * args.depth, ranks=args.ranks,
                        ft_rank=args.ft_rank, ft_epochs=args.ft_epochs)
    print(f"wrote {args.out}/report.md and {args.out}/results.json")
    for c in results["claims"]:
        print(f"  [{c['verdict']}] {c['claim']}: {c['evidence']}")


def add_train_args(s, epochs: str, lr: float, batch: str = "128", schedule: str = "constant") -> None:
    """The training options; their defaults are the command's (None here: one per path)."""
    s.add_argument("--epochs", type=int, help=f"default {epochs}")
    s.add_argument("--lr", type=positive_float, default=lr, help=f"Adam learning rate (default {lr})")
    s.add_argument("--schedule", choices=SCHEDULES, help="learning rate: constant, or cosine (annealed to 0 "
                   f"over the epochs; default {schedule})")
    s.add_argument("--batch-size", type=positive_int, help=f"default {batch}")
    s.add_argument("--seed", type=seed, default=0)
    s.add_argument("--device", type=device, default="auto", help="auto (CUDA when present), cpu or cuda")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run (its "
                   "checkpoint in OUT.partial) or a finished one (OUT/checkpoint.safetensors)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> Parser:
    p = Parser(prog="svdcompress", description="Low-rank (truncated SVD) compression of "
               "PyTorch models: compress, fine-tune, train with projected weights, report.")
    p.add_argument("--version", action="version", version=f"svdcompress {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    s = sub.add_parser("info", help="describe a saved run directory (and check its files)")
    s.add_argument("run", help="run directory (model.safetensors + svdcompress.json)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("train", help="train the reference MLP, or continue a run "
                       "(with --project-rank: dynamic SVD training)")
    s.add_argument("--data", help="fashion-mnist, mnist-5k, or a directory of MNIST IDX files "
                   "(default with --init: the run's)")
    s.add_argument("--init", help="start from this run directory instead of a fresh network")
    s.add_argument("--project-rank", type=positive_int, help="dynamic SVD training: every forward "
                   "pass uses the rank-D projection of W, the gradient goes straight to W")
    s.add_argument("--projection", choices=["subspace", "exact"], default="subspace",
                   help="how P_D(W) is computed in training (default subspace: warm-started "
                   "subspace iteration; exact: a full SVD each step)")
    s.add_argument("--out", required=True, help="run directory to write")
    s.add_argument("--width", type=positive_int, default=1024, help="hidden width (default 1024)")
    s.add_argument("--depth", type=positive_int, default=5, help="hidden layers (default 5)")
    s.add_argument("--limit-train", type=positive_int, help="use only the first N training samples")
    add_train_args(s, epochs="20", lr=1e-3)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("sweep", help="accuracy and size of a run truncated at each rank")
    s.add_argument("run")
    s.add_argument("--ranks", type=rank_list, default=list(STUDY_RANKS),
                   help="comma-separated ranks, 'full' for the uncompressed run (default 10,20,50,100,200,full)")
    s.add_argument("--data", help="dataset (default: the run's)")
    s.add_argument("--methods", type=lambda t: [m for m in t.split(",") if m], default=["plain", "whiten"],
                   help="comma-separated: plain, whiten (default both, side by side)")
    s.add_argument("--calib-batches", type=positive_int, default=64,
                   help="training batches of 128 that calibrate whitening (default 64)")
    s.add_argument("--out", help="results JSON (default RUN/results.json)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("compress", help="factorise a run's (or a Hugging Face model's) layers and save the result")
    s.add_argument("run", nargs="?", help="run directory (or use --hf)")
    s.add_argument("--hf", help="a local Hugging Face or sentence-transformers model directory, "
                   "or a GGUF file (or a directory holding one)")
    s.add_argument("--dtype", choices=list(DTYPES), default="auto", help="with --hf: the "
                   "weights' dtype (default auto: as saved; a GGUF file is dequantised to float32)")
    s.add_argument("--calib", help="with --hf: a text file: calibration sentences, one a line, for "
                   "an encoder (default: generated sentences); running text for a causal LM")
    s.add_argument("--seq-len", type=positive_int, default=256,
                   help="with --hf and a causal LM: tokens per calibration sequence (default 256)")
    s.add_argument("--calib-seqs", type=positive_int, default=128,
                   help="with --hf and a causal LM: calibration sequences (default 128)")
    s.add_argument("--device", type=device, default="cpu", help="where the SVDs and block-wise "
                   "calibration run (cpu, cuda): one block at a time is moved there")
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=positive_int, help="fixed rank D")
    how.add_argument("--energy", type=fraction, help="keep this fraction of the spectrum's energy")
    how.add_argument("--ratio", type=fraction, help="keep this fraction of each layer's parameters")
    s.add_argument("--target", type=suffixes_or_regex, help="regex or comma-separated name suffixes")
    s.add_argument("--exclude", type=suffixes_or_regex, help="regex or comma-separated name suffixes")
    s.add_argument("--method", choices=["plain", "whiten"], default="plain",
                   help="plain SVD, or data-aware SVD whitened by the layer inputs' statistics")
    s.add_argument("--calib-batches", type=positive_int, default=64,
                   help="training batches of 128 that calibrate whitening (default 64)")
    s.add_argument("--calibration", choices=["sequential", "parallel"], default="sequential",
                   help="with --method whiten: sequential (default) fits each layer to the original "
                   "outputs from the inputs the compressed layers before it produce; parallel "
                   "calibrates every layer on the dense network (faster)")
    s.add_argument("--calib-sentences", type=positive_int, default=512,
                   help="with --hf and no --calib: generated calibration sentences (default 512)")
    s.add_argument("--damping", type=float, default=1e-2, help="whitening damping, relative to the mean "
                   "input energy (default 0.01)")
    s.add_argument("--allocation", choices=list(ALLOCATIONS), default="uniform",
                   help="with --ratio, per-layer ranks under one parameter budget: loss-aware "
                   "(measured, calibrated), fisher (loss-aware from one backward pass: for "
                   "language models), truncation-loss or global (relative error)")
    s.add_argument("--round-to", type=positive_int, help="round ranks up to a multiple of this (e.g. 8)")
    s.add_argument("--min-speedup", type=float, help="keep a layer dense unless its factorised form "
                   "needs this many times fewer multiply-adds (with --speed-for: is measured this "
                   "many times faster)")
    s.add_argument("--speed-for", choices=["decode", "prefill", "generate"], help="time each layer shape "
                   "here at 1 row (decode), 512 (prefill) or both (generate): slower factorised layers "
                   "stay dense, ranks round up")
    s.add_argument("--data", help="dataset for calibration (default: the run's)")
    s.add_argument("--profile", action="store_true", help="print (and record in the run) the "
                   "seconds of each phase: block passes, statistics, fits, allocation")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("finetune", help="train a compressed run's factors further")
    s.add_argument("run")
    s.add_argument("--out", required=True)
    s.add_argument("--data", help="dataset (default: the run's)")
    add_train_args(s, epochs="5; a causal LM 1", lr=1e-4, batch="128; a causal LM 4 sequences",
                   schedule="constant; a causal LM cosine")
    s.add_argument("--distill", action="store_true", help="learn from the dense model the run was "
                   "compressed from: KL on the logits mixed with the labels (a causal LM: with "
                   "the next tokens); an encoder: its embeddings, no labels")
    s.add_argument("--teacher", help="with --distill: the teacher run or model (default: the source)")
    s.add_argument("--temperature", type=positive_float, help="KL temperature (default 2; a causal LM 1)")
    s.add_argument("--alpha", type=float, help="share of the distillation loss (default 0.5)")
    s.add_argument("--text", help="a causal LM: the UTF-8 text file to train on (every 10th "
                   "sequence is held out and scores the run after each epoch)")
    s.add_argument("--seq-len", type=positive_int, default=256,
                   help="a causal LM: tokens per training sequence (default 256)")
    s.add_argument("--accumulate", type=positive_int, default=4, help="a causal LM: micro-batches "
                   "whose gradients make one optimiser step (default 4)")
    s.add_argument("--max-sequences", type=positive_int, help="a causal LM: train on at most N "
                   "sequences per epoch")
    s.add_argument("--train-also", help="a causal LM: a regex of more parameters to train "
                   "(default: only the low-rank factors)")
    s.add_argument("--factors", choices=["both", "alternate"], default="both", help="a causal LM: "
                   "u and v together (default), or SVD-LLM's order: u for half the steps, then v")
    s.add_argument("--embedding-loss", choices=["cosine", "mse"], default="cosine")
    s.add_argument("--calib", help="encoder: a text file to distil on, one sentence a line")
    s.add_argument("--calib-sentences", type=positive_int, default=512,
                   help="encoder without --calib: generated sentences (default 512)")
    s.set_defaults(func=cmd_finetune)

    add_eval_commands(sub)

    s = sub.add_parser("bench", help="latency and throughput: the dense original against the compressed run")
    s.add_argument("run")
    s.add_argument("--batch", type=lambda t: [positive_int(x) for x in t.split(",")],
                   help="comma-separated batch sizes (default 1,32,256; a causal LM 1,8)")
    s.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    s.add_argument("--repeats", type=positive_int, help="timed repeats after warm-up (default 30; "
                   "a causal LM 3)")
    s.add_argument("--prompt-tokens", type=positive_int, default=512, help="a causal LM: prefill length")
    s.add_argument("--new-tokens", type=positive_int, default=128, help="a causal LM: cached decode steps")
    s.add_argument("--out", help="JSON file (default RUN/bench.json)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("export", help="ONNX export of a run, checked against PyTorch with onnxruntime")
    s.add_argument("run")
    s.add_argument("--onnx", required=True, help="the .onnx file to write")
    s.add_argument("--overwrite", action="store_true", help="replace an existing file")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("eval", help="accuracy, loss, parameters and bytes of a run")
    s.add_argument("run")
    s.add_argument("--data", help="dataset (default: the run's)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("reproduce", help="the whole study: baseline, sweep, fine-tuning, report")
    s.add_argument("--data", default="fashion-mnist")
    s.add_argument("--out", default="report")
    s.add_argument("--quick", action="store_true", help="a first look in a few minutes (subset, fewer epochs)")
    s.add_argument("--epochs", type=positive_int, default=BASE_EPOCHS,
                   help=f"baseline epochs (default {BASE_EPOCHS})")
    s.add_argument("--ft-rank", type=positive_int, default=20, help="rank fine-tuned (default 20)")
    s.add_argument("--ft-epochs", type=positive_int, default=5, help="fine-tuning epochs (default 5)")
    s.add_argument("--ranks", type=rank_list, default=list(STUDY_RANKS),
                   help="ranks of the sweep (default 10,20,50,100,200,full)")
    s.add_argument("--width", type=positive_int, default=1024, help="hidden width (default 1024)")
    s.add_argument("--depth", type=positive_int, default=5, help="hidden layers (default 5)")
    s.add_argument("--seed", type=seed, default=0)
    s.add_argument("--device", type=device, default="auto")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        dist.setup(getattr(args, "device", "cpu"))  # under torchrun: join its process group
        if dist.active():
            signal.signal(signal.SIGTERM, _stopped)
        with contextlib.redirect_stdout(sys.stdout if dist.is_main() else io.StringIO()), \
                warnings.catch_warnings():
            if not getattr(args, "debug", False):  # a warning is one line, as an error is
                warnings.showwarning = _one_line
            args.func(args)
    except BrokenPipeError:  # the reader went away (`svdcompress info RUN | head`): not an error
        return closed_pipe()
    except (SVDCompressError, OSError) as err:  # user-caused: bad value, bad or missing file
        if getattr(args, "debug", False):
            traceback.print_exc()
        lines = [line for line in str(err).splitlines() if line.strip()]  # one line, always
        print(f"svdcompress: error: {lines[0] if lines else type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdcompress: interrupted", file=sys.stderr)
        return 130
    finally:
        dist.teardown()
    return 0


def _one_line(message, category, *rest, **kwargs) -> None:
    print(f"svdcompress: warning: {message}", file=sys.stderr)


def _stopped(signum, frame):
    """torchrun stops the other processes when one fails: say so, on every one."""
    raise dist.RankFailed(f"rank {dist.rank()}: stopped because another process of the job failed")


if __name__ == "__main__":
    sys.exit(main())
