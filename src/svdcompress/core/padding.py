"""Padded positions in calibration batches: which rows of a layer's input are real tokens.

A dict batch's ``attention_mask`` says which positions are padding; the model computes their
rows but nothing uses them, so the statistics leave them out, in the layers whose inputs are
laid out as the mask is (batch-major), and nowhere the layout cannot be told.
"""

from __future__ import annotations

import torch


def row_mask(batch) -> torch.Tensor | None:
    """Which positions of a batch are real tokens: a dict batch's ``attention_mask`` (B x T,
    any dtype, nonzero = real) as a boolean (B, T) mask, where it masks some position; None
    when it masks none, there is none, or the batch is an encoder-decoder's (``decoder_*``
    inputs: the mask describes the encoder's positions only). Padded positions are computed
    by the model but never used: their rows are left out of the statistics."""
    if not isinstance(batch, dict) or any(str(k).startswith("decoder_") for k in batch):
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    keep = mask != 0
    return None if bool(keep.all()) else keep


def mask_for(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` flattened to the rows of a layer input ``x`` that is laid out as the mask is,
    batch-major: (B, T, ...), or already flattened to B * T rows (OPT's MLP input); None
    otherwise, and wherever the layout cannot be told (B = T: a sequence-first (T, B, ...)
    input has the same shape), so that every row is kept rather than the wrong ones."""
    if mask is None or mask.shape[0] == mask.shape[1]:
        return None
    if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape) or x.dim() == 2 and x.shape[0] == mask.numel():
        return mask.reshape(-1)
    return None


def masked_rows(rows: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer's input rows (from its input ``x``) without those of padded positions (all of
    them where ``x`` is not laid out as ``mask``, or gives another number of rows)."""
    keep = mask_for(x, mask)
    return rows if keep is None or rows.shape[0] != keep.numel() else rows[keep.to(rows.device)]
