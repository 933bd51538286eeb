"""Recovery training of a compressed causal LM: its factors learn the dense model's
next-token distributions (and, mixed in, the text's next tokens).

The loss per token is ``alpha T^2 KL(teacher || student) + (1 - alpha) CE(student, next
token)`` (core.distill.logit_loss), the teacher's logits computed on the fly for each
micro-batch and never stored. Sequences of ``seq_len`` tokens are cut from the text; every
10th is held out and scores the student after each epoch (mean KL to the teacher per
token, and perplexity), never trained on. Gradients of ``accumulate`` micro-batches of
``batch_size`` sequences make one optimiser step (a large effective batch in the memory of
a small one); the learning rate follows the schedule per optimiser step. Only the low-rank
factors train, and the parameters ``train_also`` names (a regex on the full name); the
embeddings, norms and dense layers stay frozen. Each epoch ends with a sealed checkpoint
in OUT.partial, and resuming ends with the same weights as an uninterrupted run. Dropout
stays off: the student fits the teacher's deterministic function.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.checkpoint import (check_finite, check_schedule, load_checkpoint, locked,
                               make_optimizer, resume_point, save_checkpoint, save_trained,
                               set_lr)
from ..core.distill import Distill, logit_loss
from ..core.errors import ConfigError
from ..core.io import dense_origin, load, read_config, read_meta
from ..core.kinds import low_rank_kind
from ..core.runinfo import RunInfo
from .causal_lm import CausalLM, ids_of, load_causal_lm, read_text
from .hf_load import check_positions, check_reference

HELD_OUT = 10  # every 10th sequence scores the student, and is never trained on
# "both": u and v train together at every step; "alternate": SVD-LLM's sequential update, the
# output factors u (v frozen) for the first half of the optimiser steps, then v (u frozen)
FACTORS = ("both", "alternate")


@dataclass(frozen=True)
class LMTrainConfig:
    """epochs over the training sequences; ``batch_size`` sequences per micro-batch and
    ``accumulate`` micro-batches per optimiser step; at most ``max_sequences`` training
    sequences (None: all the text gives)."""

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 4
    accumulate: int = 4
    seq_len: int = 256
    seed: int = 0
    schedule: str = "cosine"
    max_sequences: int | None = None
    train_also: str | None = None
    factors: str = "both"

    def __post_init__(self) -> None:
        check_schedule(self)
        if self.factors not in FACTORS:
            raise ConfigError(f"factors must be one of {', '.join(FACTORS)}, got {self.factors!r}")
        for name in ("batch_size", "accumulate", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ConfigError("seq_len must be at least 2 (one token predicts the next)")
        if self.max_sequences is not None and (not isinstance(self.max_sequences, int) or self.max_sequences < 1):
            raise ConfigError(f"max_sequences must be a positive integer, got {self.max_sequences!r}")
        if self.train_also is not None:
            try:
                re.compile(self.train_also)
            except re.error as err:
                raise ConfigError(f"train_also is not a valid regex: {err}") from None


def trainable(model: torch.nn.Module, train_also: str | None) -> list[torch.nn.Parameter]:
    """Freeze every parameter but the low-rank layers' and those ``train_also`` names."""
    factors = {id(p) for m in model.modules() if low_rank_kind(m) is not None for p in m.parameters()}
    chosen = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in factors or bool(train_also and re.fullmatch(train_also, name)))
        if p.requires_grad:
            chosen.append(p)
    if not chosen:
        raise ConfigError("nothing to train: the model has no low-rank layers and --train-also "
                          "names no parameter")
    return chosen


def _factor_phases(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The low-rank layers' output factors (u) and input factors (v)."""
    us, vs = [], []
    for m in model.modules():
        if low_rank_kind(m) is not None:
            us.append(m.u)
            vs.append(m.v)
    return us, vs


def split_sequences(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) sequences of ``seq_len`` consecutive tokens."""
    n = len(ids) // seq_len
    if n < HELD_OUT:
        raise ConfigError(f"the text gives {n} sequences of {seq_len} tokens: recovery training "
                          f"needs at least {HELD_OUT} (every {HELD_OUT}th is held out)")
    seqs = ids[:n * seq_len].reshape(n, seq_len)
    keep = torch.arange(n) % HELD_OUT != 0
    return seqs[keep], seqs[~keep]


def _loss(student: CausalLM, teacher: CausalLM, x: torch.Tensor, distill: Distill) -> torch.Tensor:
    """The summed per-token loss of the batch ``x`` (tokens 1.. are the targets)."""
    with torch.no_grad():
        target = teacher(x)[:, :-1].float() if distill.alpha > 0 else None
    logits = student(x)[:, :-1].float()
    labels = x[:, 1:].reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    if target is None:
        return torch.nn.functional.cross_entropy(flat, labels, reduction="sum")
    return logit_loss(flat, target.reshape(-1, target.shape[-1]), labels, distill, reduction="sum")


@torch.no_grad()
def held_out_scores(student: CausalLM, teacher: CausalLM, held: torch.Tensor,
                    batch_size: int) -> dict:
    """Mean KL(teacher || student) per predicted token (T = 1) and the student's perplexity."""
    kl = nll = 0.0
    count = 0
    for i in range(0, len(held), batch_size):
        x = held[i:i + batch_size]
        s = torch.log_softmax(student(x)[:, :-1].float(), -1)
        t = torch.log_softmax(teacher(x)[:, :-1].float(), -1)
        kl += float((t.exp() * (t - s)).sum())
        nll += float(torch.nn.functional.nll_loss(s.reshape(-1, s.shape[-1]), x[:, 1:].reshape(-1),
                                                  reduction="sum"))
        count += x[:, 1:].numel()
    return {"held_out_kl": kl / count, "held_out_perplexity": math.exp(nll / count)}


def recover_lm(student: CausalLM, teacher: CausalLM, ids: torch.Tensor, cfg: LMTrainConfig,
               distill: Distill, *, checkpoint_dir=None, resume=False, progress=True,
               context: dict | None = None) -> list[dict]:
    """Train ``student``'s factors toward ``teacher`` on the token stream ``ids``; one
    history row per epoch (train loss per token, held-out KL and perplexity, seconds)."""
    train, held = split_sequences(ids, cfg.seq_len)
    if cfg.max_sequences is not None and cfg.max_sequences < len(train):
        train = train[:cfg.max_sequences]  # and one held-out sequence per nine trained on:
        held = held[:math.ceil(len(train) / (HELD_OUT - 1))]  # scoring costs no more than that
    teacher.eval()
    params = trainable(student, cfg.train_also)
    opt = make_optimizer(params, cfg.lr)
    start, history = 0, []
    if resume:
        start, history = load_checkpoint(Path(resume), student, opt, cfg, context)
    per_step = cfg.batch_size * cfg.accumulate
    steps = math.ceil(len(train) / per_step)
    us, vs = _factor_phases(student) if cfg.factors == "alternate" else ([], [])
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        student.eval()  # dropout off
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        total, tokens = 0.0, 0
        bar = tqdm(range(steps), desc=f"recover {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False, mininterval=1.0)
        for step in bar:
            set_lr(opt, cfg, epoch, step, steps)
            if us:  # SVD-LLM's order: u first, then v, by position (a resumed run matches)
                second = 2 * (epoch * steps + step) >= cfg.epochs * steps
                for p in us:
                    p.requires_grad_(not second)
                for p in vs:
                    p.requires_grad_(second)
            rows = perm[step * per_step:(step + 1) * per_step]
            n_tokens = rows.numel() * (cfg.seq_len - 1)
            opt.zero_grad(set_to_none=True)
            for i in range(0, len(rows), cfg.batch_size):
                loss = _loss(student, teacher, train[rows[i:i + cfg.batch_size]], distill)
                (loss / n_tokens).backward()
                total += float(loss.detach())
            opt.step()
            tokens += n_tokens
            bar.set_postfix(loss=f"{total / tokens:.4f}", refresh=False)
        check_finite(student, total / tokens, epoch + 1, checkpoint_dir, history)
        scores = held_out_scores(student, teacher, held, cfg.batch_size)
        history.append({"epoch": epoch + 1, "train_loss": total / tokens, **scores,
                        "train_tokens": tokens, "seconds": time.perf_counter() - t0})
        if progress:
            tqdm.write(f"recover epoch {epoch + 1}/{cfg.epochs}: loss {total / tokens:.4f}, held-out "
                       f"KL {scores['held_out_kl']:.4f}, perplexity {scores['held_out_perplexity']:.2f}")
        if checkpoint_dir is not None:
            save_checkpoint(Path(checkpoint_dir), student, opt, epoch + 1, history, cfg, context)
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    return history


def recover_lm_run(run: str | Path, out: str | Path, cfg: LMTrainConfig, distill: Distill, *,
                   text: str | Path, teacher: str | Path | None = None, resume=False,
                   overwrite=False, progress=True) -> list[dict]:
    """Recovery training of the compressed causal-LM run ``run`` on the text file ``text``,
    learning from ``teacher`` (default: the model it was compressed from), into ``out``."""
    start, work = resume_point(out, resume=resume, overwrite=overwrite, source=run)
    student = load(run)
    if not isinstance(student, CausalLM):
        raise ConfigError(f"{run} is not a causal language model run")
    if student.tokenizer is None:
        raise ConfigError(f"{run} has no tokenizer: it cannot read --text")
    check_positions(student.hf_config, cfg.seq_len, "--seq-len")
    teacher_path = Path(teacher or dense_origin(run) or "")
    if not teacher_path.exists():
        raise ConfigError(f"the teacher {teacher_path} does not exist: name the dense model "
                          "with --teacher")
    teacher_model = load_causal_lm(teacher_path)
    teacher_model.to(next(student.parameters()).dtype)
    raw = read_text(text)  # read once
    check_reference(student, teacher_model, raw[:20_000], run, teacher_path)
    ids = ids_of(student, raw)
    context = {"source": str(Path(run).resolve()), "teacher": str(teacher_path.resolve()),
               "text": str(Path(text).resolve()), "text_tokens": len(ids), "distill": distill.to_dict(),
               "settings": {k: getattr(cfg, k) for k in ("accumulate", "seq_len", "max_sequences",
                                                         "train_also")}}
    with locked(work):
        history = recover_lm(student, teacher_model, ids, cfg, distill, checkpoint_dir=work,
                             resume=start, progress=progress, context=context)
    save_trained(student, out, overwrite or resume, config=read_config(read_meta(run)), info=RunInfo(
        source=str(Path(run).resolve()), train=cfg.__dict__.copy(), history=history,
        calibration=context["text"], distill={"teacher": context["teacher"], **distill.to_dict()}))
    return history
