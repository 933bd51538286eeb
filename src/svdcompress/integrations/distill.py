"""Label-free distillation of a compressed sentence encoder from the model it came from.

The student (a compressed encoder run) learns to give each sentence of the calibration
text the embedding the teacher (the uncompressed Hugging Face model) gives it: cosine or
MSE loss, no labels. Each epoch shuffles the sentences with a seeded generator, writes a
sealed checkpoint into OUT.partial, and scores the mean cosine to the teacher on held-out
sentences (never trained on); resuming ends with the same weights as an uninterrupted run.
Dropout stays off while distilling: the student is fitted to the teacher's deterministic
function (with it on, on a small encoder, the dropout noise outweighs what compression
changed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.checkpoint import (check_finite, check_schedule, load_checkpoint, locked,
                               make_optimizer, resume_point, save_checkpoint, save_trained,
                               set_lr)
from ..core.distill import Distill, embedding_loss
from ..core.errors import ConfigError
from ..core.io import dense_origin, load, read_config, read_meta
from ..core.runinfo import RunInfo
from .hf import SentenceEncoder, calibration_sentences, load_encoder, read_texts
from .hf_load import check_reference

HELD_OUT = 10  # every 10th sentence scores the student, and is never trained on


@dataclass(frozen=True)
class EncoderTrainConfig:
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    schedule: str = "constant"  # or "cosine" (core.checkpoint.set_lr)

    def __post_init__(self) -> None:
        check_schedule(self)


@torch.no_grad()
def _embed(model: SentenceEncoder, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    return model.encode(texts, batch_size)


def distill_encoder(student: SentenceEncoder, teacher: SentenceEncoder, texts: list[str],
                    cfg: EncoderTrainConfig, distill: Distill, *, checkpoint_dir=None,
                    resume=False, progress=True, context: dict | None = None,
                    on_epoch=None) -> list[dict]:
    """Train ``student`` toward ``teacher``'s embeddings of ``texts``; one history row per
    epoch (train loss, held-out mean cosine, seconds, and what ``on_epoch(student)``, if
    given, returns: a benchmark's own scores)."""
    held = texts[::HELD_OUT]
    train_texts = [t for i, t in enumerate(texts) if i % HELD_OUT]
    if not train_texts or not held:
        raise ConfigError(f"distillation needs at least {HELD_OUT} sentences, got {len(texts)}")
    targets = _embed(teacher, train_texts)
    held_targets = _embed(teacher, held)
    opt = make_optimizer([p for p in student.parameters() if p.requires_grad], cfg.lr)
    start, history = 0, []
    if resume:
        start, history = load_checkpoint(Path(resume), student, opt, cfg, context)
    n = len(train_texts)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        student.eval()  # dropout off: the student fits the teacher's function, not a noisy one
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        total = 0.0
        bar = tqdm(range(0, n, cfg.batch_size), desc=f"distill {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False, mininterval=0.5)
        for step, i in enumerate(bar):
            set_lr(opt, cfg, epoch, step, len(bar))
            idx = perm[i:i + cfg.batch_size]
            emb = student(**student.tokenize([train_texts[j] for j in idx]))
            loss = embedding_loss(emb, targets[idx], distill)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        check_finite(student, total / n, epoch + 1, checkpoint_dir, history)
        cosine = float(torch.nn.functional.cosine_similarity(_embed(student, held), held_targets).mean())
        history.append({"epoch": epoch + 1, "train_loss": total / n, "held_out_cosine": cosine,
                        "seconds": time.perf_counter() - t0, **(on_epoch(student) if on_epoch else {})})
        if progress:
            tqdm.write(f"distill epoch {epoch + 1}/{cfg.epochs}: loss {total / n:.5f}, "
                       f"held-out cosine {cosine:.4f}")
        if checkpoint_dir is not None:
            save_checkpoint(Path(checkpoint_dir), student, opt, epoch + 1, history, cfg, context)
    student.eval()
    return history


def distill_encoder_run(run: str | Path, out: str | Path, cfg: EncoderTrainConfig,
                        distill: Distill, *, teacher: str | Path | None = None,
                        texts: str | Path | None = None, sentences: int = 512,
                        resume=False, overwrite=False, progress=True) -> list[dict]:
    """Distil the compressed encoder run ``run`` from ``teacher`` (default: the model it was
    compressed from) on the text file ``texts`` (one sentence a line) or on ``sentences``
    generated calibration sentences, into the run ``out``."""
    start, work = resume_point(out, resume=resume, overwrite=overwrite, source=run)
    student = load(run)
    if not isinstance(student, SentenceEncoder):
        raise ConfigError(f"{run} is not a sentence encoder run")
    teacher = Path(teacher or dense_origin(run) or "")
    if not (teacher / "config.json").is_file():
        raise ConfigError(f"the teacher {teacher} is not a Hugging Face model directory: name it "
                          "with --teacher DIR")
    text = read_texts(texts) if texts else calibration_sentences(sentences)
    context = {"source": str(Path(run).resolve()), "teacher": str(teacher.resolve()),
               "texts": str(texts) if texts else f"{sentences} generated", "distill": distill.to_dict()}
    teacher_model = load_encoder(teacher)
    check_reference(student, teacher_model, text, run, teacher)
    with locked(work):
        history = distill_encoder(student, teacher_model, text, cfg, distill,
                                  checkpoint_dir=work, resume=start, progress=progress,
                                  context=context)
    save_trained(student, out, overwrite or resume, config=read_config(read_meta(run)), info=RunInfo(
        source=str(Path(run).resolve()), train=cfg.__dict__.copy(), history=history,
        calibration=context["texts"], distill={"teacher": str(teacher.resolve()), **distill.to_dict()}))
    return history
