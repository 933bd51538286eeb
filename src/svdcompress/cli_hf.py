"""The command line's language-model and encoder commands: eval-embeddings, eval-lm,
generate, finetune of a causal-LM run (recovery training), and quantize. cli.py holds the
parser and the rest."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .cli_types import UsageError, or_default, positive_int, seed
from .core.distill import Distill
from .core.files import check_destination
from .core.io import load, read_config, read_info, read_meta, save
from .core.report import model_size
from .core.swap import QUANTIZE, quantize_
from .integrations.causal_lm import generate_run
from .integrations.hf_runs import eval_embeddings_run, eval_lm_run
from .integrations.recover_lm import LMTrainConfig, recover_lm_run


def finetune_lm(args) -> None:
    """A causal LM: recovery training on --text, from the dense teacher with --distill (KL
    at T = 1 mixed half and half with the next-token loss), else on the next tokens alone."""
    if args.text is None:
        raise UsageError("a causal LM is fine-tuned on running text: --text FILE")
    distill = Distill(or_default(args.temperature, 1.0), or_default(args.alpha, 0.5)) if args.distill \
        else Distill(1.0, 0.0)
    cfg = LMTrainConfig(epochs=or_default(args.epochs, 1), lr=args.lr, batch_size=or_default(args.batch_size, 4),
                        accumulate=args.accumulate, seq_len=args.seq_len, seed=args.seed,
                        schedule=or_default(args.schedule, "cosine"), max_sequences=args.max_sequences,
                        train_also=args.train_also, factors=args.factors)
    history = recover_lm_run(args.run, args.out, cfg, distill, text=args.text, teacher=args.teacher,
                             resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    last = history[-1] if history else None
    print(f"saved {args.out}: held-out perplexity {last['held_out_perplexity']:.3f}, KL to the "
          f"teacher {last['held_out_kl']:.4f}" if last else f"saved {args.out}")


def print_lm_bench(result: dict, out) -> None:
    """`bench` on a causal LM: prefill and decode, dense -> compressed, per batch."""
    for r in result["rows"]:
        d, c = r["dense"], r["compressed"]
        print(f"{r['device']} batch {r['batch']:>3}: prefill {r['prompt_tokens']} tokens "
              f"{d['prefill_ms']:8.1f} -> {c['prefill_ms']:8.1f} ms ({r['prefill_speedup']:4.2f}x), "
              f"decode {d['decode_ms_per_token']:6.1f} -> {c['decode_ms_per_token']:6.1f} ms/token "
              f"({r['decode_speedup']:4.2f}x)")
    print(f"wrote {out}")


def cmd_eval_embeddings(args) -> None:
    print(json.dumps(eval_embeddings_run(args.run, args.reference, args.texts, args.sentences),
                     indent=2))


def cmd_eval_lm(args) -> None:
    m = eval_lm_run(args.run, args.reference, args.text, args.window, args.stride, args.max_tokens)
    for name in ("compressed", "reference"):
        r = m[name]
        print(f"{name:>10}: perplexity {r['perplexity']:.3f} on {r['tokens']:,} tokens, "
              f"{r['tokens_per_second']:.0f} tokens/s, {r['params']:,} parameters")
    print(json.dumps(m, indent=2))


def cmd_generate(args) -> None:
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("--prompt is not valid UTF-8 text") from None
    if not args.sample and (args.temperature != 1.0 or args.top_k is not None):
        raise UsageError("--temperature and --top-k shape sampling: add --sample (decoding is greedy without it)")
    g = generate_run(args.run, args.prompt, max_new_tokens=args.max_new_tokens, sample=args.sample,
                     seed=args.seed, temperature=args.temperature, top_k=args.top_k)
    if args.json:
        print(json.dumps({k: v for k, v in g.items() if k != "tokens"}, indent=2))
    else:
        print(g["text"])


def cmd_quantize(args) -> None:
    """A run whose low-rank Linear layers hold int8 factors: an ordinary run, beside the
    float one (its metrics are not carried over: they were measured on float factors)."""
    check_destination(args.out, overwrite=args.overwrite, sources=[args.run])  # never over its source
    model = load(args.run)
    before = model_size(model)["bytes"]
    layers = quantize_(model, args.scheme)
    info = replace(read_info(args.run), source=str(Path(args.run).resolve()), metrics=None, history=None)
    save(model, args.out, config=read_config(read_meta(args.run)), info=info, overwrite=args.overwrite)
    print(f"{layers} low-rank Linear layer(s) now hold {args.scheme} factors; the model's parameters "
          f"{before:,} -> {model_size(model)['bytes']:,} bytes; saved {args.out}")


def add_eval_commands(sub) -> None:
    s = sub.add_parser("quantize", help="store a compressed run's low-rank factors in int8 (a new run)")
    s.add_argument("run")
    s.add_argument("--scheme", choices=list(QUANTIZE), default="int8",
                   help="int8: symmetric, a float32 scale per row of each factor (default)")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("generate", help="continue a prompt with a causal-LM run (key-value cache)")
    s.add_argument("run", help="a compressed causal-LM run (or a Hugging Face directory)")
    s.add_argument("--prompt", required=True, help="the text to continue")
    s.add_argument("--max-new-tokens", type=positive_int,
                   help="default 64, or what the model's positions leave room for")
    s.add_argument("--sample", action="store_true", help="draw tokens (default: greedy)")
    s.add_argument("--seed", type=seed, default=0, help="the sampling seed (default 0)")
    s.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1)")
    s.add_argument("--top-k", type=positive_int, help="with --sample: only the k likeliest tokens")
    s.add_argument("--json", action="store_true", help="print the continuation, token count and "
                   "seconds as JSON")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("eval-embeddings", help="a compressed encoder against its reference, without labels")
    s.add_argument("run")
    s.add_argument("--reference", required=True, help="the uncompressed model directory")
    s.add_argument("--texts", help="a text file, one sentence per line (default: generated sentences)")
    s.add_argument("--sentences", type=positive_int, default=3000,
                   help="how many generated sentences (default 3000)")
    s.set_defaults(func=cmd_eval_embeddings)

    s = sub.add_parser("eval-lm", help="perplexity of a compressed causal LM and of its reference")
    s.add_argument("run")
    s.add_argument("--reference", required=True, help="the uncompressed model: a directory or a GGUF file")
    s.add_argument("--text", required=True, help="a UTF-8 text file to score")
    s.add_argument("--window", type=positive_int, help="tokens per window (default 512, or the "
                   "model's positions when it has fewer)")
    s.add_argument("--stride", type=positive_int, help="tokens the window moves by; each token is "
                   "scored once (default half the window; equal to --window: non-overlapping "
                   "windows, as SVD-LLM's and GPTQ's evaluations)")
    s.add_argument("--max-tokens", type=positive_int, help="score only the text's first N tokens")
    s.set_defaults(func=cmd_eval_lm)

