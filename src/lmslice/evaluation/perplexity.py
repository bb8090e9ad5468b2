"""Perplexity on non-overlapping windows of a joined test text: exp(mean token NLL)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmslice.errors import LmsliceError


@dataclass
class Perplexity:
    perplexity: float
    nll: float
    tokens: int
    seqlen: int
    windows: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, *, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True) -> Perplexity:
    """Splits `tokens` into whole windows of `seqlen` (the tail is dropped, as in the paper) and
    averages the next-token NLL over every predicted token."""
    if seqlen < 2 or batch_size < 1:
        raise LmsliceError(f"perplexity needs windows of at least 2 tokens and batches of at least 1 window, got "
                           f"{seqlen} and {batch_size}")
    windows = len(tokens) // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise LmsliceError(f"evaluation text has {len(tokens)} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    data = tokens[: windows * seqlen].view(windows, seqlen)
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = data[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return Perplexity(math.exp(mean_nll), mean_nll, total_tokens, seqlen, windows)
