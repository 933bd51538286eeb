"""Perplexity of a small GPT-2 after plain and whitened SVD compression, on real English.

The text is Debian's fortunes (apt-get install fortunes: /usr/share/games/fortunes), split
into fortunes, shuffled with a fixed seed: 90% train (and calibration), 10% held out. A
byte-level BPE tokenizer and a small GPT-2 are trained here from scratch for a fixed number
of steps (well under 10 CPU minutes), saved as a Hugging Face directory, then compressed at
each ratio of linear parameters kept with `compress_hf` (the CLI's `compress --hf`) and
scored with sliding-window perplexity on the held-out text:

    python benchmarks/gpt2_fortunes.py [--steps 500] [--out benchmarks/results/gpt2_fortunes.json]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

import svdcompress as sc
from svdcompress.core.files import write_json
from svdcompress.integrations.causal_lm import CausalLM, perplexity, token_ids
from svdcompress.integrations.hf_runs import compress_hf, load_hf
try:  # run as a script (benchmarks/ on the path) or imported as benchmarks.<name> (tests)
    from provenance import stamp  # noqa: E402
except ImportError:
    from benchmarks.provenance import stamp  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
RATIOS = (0.9, 0.7, 0.5)


def fortunes(seed: int = 0) -> tuple[list[str], list[str]]:
    if not FORTUNES.is_dir():
        raise SystemExit("needs Debian's fortunes: apt-get install fortunes")
    items = []
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or not path.is_file():  # the plain text files (not .dat, .u8)
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        items += [f.strip() for f in text.split("\n%\n") if f.strip()]
    random.Random(seed).shuffle(items)
    cut = int(0.9 * len(items))
    return items[:cut], items[cut:]


def make_model_dir(directory: Path, train_text: list[str], steps: int, seq: int, seed: int) -> dict:
    import tokenizers
    import transformers

    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(train_text, vocab_size=4096, min_frequency=2, special_tokens=["<|endoftext|>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
    ids = torch.tensor(fast("<|endoftext|>".join(train_text))["input_ids"])
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=seq, vocab_size=len(fast),
                                  bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (16,), generator=g)
        batch = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)
    model.eval().save_pretrained(str(directory))
    return {"train_tokens": len(ids), "steps": steps, "batch": 16, "seq": seq,
            "train_seconds": time.perf_counter() - t0, "final_loss": loss.item(),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--calib-seqs", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/gpt2_fortunes.json")
    args = p.parse_args()
    train_text, test_text = fortunes(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "gpt2-fortunes"
        training = make_model_dir(src, train_text, args.steps, args.seq, args.seed)
        print(f"trained in {training['train_seconds']:.0f} s, final loss {training['final_loss']:.3f}")
        (tmp / "calib.txt").write_text("\n".join(train_text[:3000]))
        (tmp / "test.txt").write_text("\n".join(test_text))
        ref = load_hf(src)
        assert isinstance(ref, CausalLM)
        test_ids = token_ids(ref, tmp / "test.txt")
        base = perplexity(ref, test_ids, window=args.seq, stride=args.seq // 2)
        print(f"uncompressed: perplexity {base['perplexity']:.2f} on {base['tokens']:,} tokens")
        for ratio in RATIOS:
            for method in ("plain", "whiten"):
                out = tmp / f"{method}-{ratio}"
                report, seconds = compress_hf(src, sc.SVDConfig(ratio=ratio, method=method), out,
                                              calib=str(tmp / "calib.txt"), seq_len=args.seq,
                                              calib_seqs=args.calib_seqs)
                m = perplexity(sc.load(out), test_ids, window=args.seq, stride=args.seq // 2)
                layers = report.considered()
                rows.append({"ratio": ratio, "method": method, "perplexity": m["perplexity"],
                             "compress_seconds": seconds,
                             "linear_params_kept": sum(r.params_after for r in layers) /
                             sum(r.params_before for r in layers),
                             "params": sum(q.numel() for q in sc.load(out).parameters())})
                print(f"ratio {ratio} {method:>6}: perplexity {m['perplexity']:.2f} "
                      f"(compressed in {seconds:.1f} s)", flush=True)
    write_json(args.out, stamp({"benchmark": "gpt2_fortunes", "data": str(FORTUNES),
                          "train_fortunes": len(train_text), "test_fortunes": len(test_text),
                          "training": training, "uncompressed": base, "rows": rows,
                          "calibration": f"{args.calib_seqs} sequences of {args.seq} tokens of training text",
                          "threads": torch.get_num_threads(), "torch": torch.__version__}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
