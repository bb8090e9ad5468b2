"""Perplexity on non-overlapping windows of a joined test text: exp(mean token NLL)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmslice.adapters import find_adapter
from lmslice.calibration import capture_block_inputs, run_block, window_loss
from lmslice.errors import LmsliceError
from lmslice.modeling import get_module
from lmslice.walk import InMemory, Placement, Run, RunProgress, walk_blocks


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
               max_windows: int | None = None, progress: bool = True,
               placement: Placement | None = None) -> Perplexity:
    """Splits `tokens` into whole windows of `seqlen` (the tail is dropped, as in the paper) and
    averages the next-token NLL over every predicted token. With blocks that are not in memory with the
    model (`placement` streamed or offloaded), one walk over the blocks carries every window."""
    if seqlen < 2 or batch_size < 1:
        raise LmsliceError(f"perplexity needs windows of at least 2 tokens and batches of at least 1 window, got "
                           f"{seqlen} and {batch_size}")
    windows = len(tokens) // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise LmsliceError(f"evaluation text has {len(tokens)} tokens, fewer than one window of {seqlen}")
    data = tokens[: windows * seqlen].view(windows, seqlen)
    if placement is not None and not isinstance(placement, InMemory):
        return _walked_perplexity(model, data, batch_size, placement, progress)
    device = model.get_input_embeddings().weight.device
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


def _walked_perplexity(model: nn.Module, data: torch.Tensor, batch_size: int, placement: Placement,
                       progress: bool) -> Perplexity:
    """`perplexity` of the windows `data` in one walk over blocks kept where `placement` says."""
    adapter = find_adapter(model)
    batches = [{"input_ids": data[start:start + batch_size]} for start in range(0, len(data), batch_size)]
    run = Run(0, placement, "cpu" if placement.device.type != "cpu" else None, RunProgress(progress))
    run.progress.expect(len(get_module(model, adapter.blocks)))
    streams = capture_block_inputs(model, adapter, batches, run.store())

    def forward(index: int, block: nn.Module) -> bool:
        for stream in streams:
            stream.hidden = run_block(block, stream, stream.hidden)
        return False

    try:
        walk_blocks(model, run, forward, "perplexity", streams=streams)
    finally:
        run.progress.close()
    total_nll = 0.0
    for stream in streams:
        hidden = stream.hidden
        for row in range(len(hidden)):
            total_nll += window_loss(model, adapter, stream.input_ids[row:row + 1], stream.mask[row:row + 1],
                                     hidden[row:row + 1]).item()
        stream.store.forget(stream.name)
    total_tokens = data[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return Perplexity(math.exp(mean_nll), mean_nll, total_tokens, data.shape[1], len(data))
