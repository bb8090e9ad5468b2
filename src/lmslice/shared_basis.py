"""The rotation plan of the standard format: one orthogonal basis for the whole residual stream.

With one basis Q, every residual connection maps Q to Q (its shortcut is the identity) and the head
reads the same sliced stream, so the sliced model is its family's own architecture with a smaller
hidden size. Q comes from one dense pass: the second moment of the stream at every norm input, summed.

Each token is first scaled to unit RMS (what the norm that reads it does), because the stream's RMS
grows along the depth and the deep blocks would otherwise choose the basis alone; of the weightings
measured (`benchmarks/standard_format.py`, docs/method.md) unit RMS gave the lowest perplexity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmslice.adapters import ModelAdapter
from lmslice.calibration import BlockInput, Covariance, Hook, run_block, walk
from lmslice.errors import LmsliceError
from lmslice.fuse import norm_affine
from lmslice.modeling import get_module
from lmslice.walk import Run, walk_blocks

WEIGHTINGS = ("unit-rms", "raw", "reader-gain")


@dataclass
class SharedBasis:
    """Eigenvalues (descending) and eigenvectors of the summed signal, and the final norm's own second
    moment (unit-RMS tokens, original coordinates), which fitting a tied head needs."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    head_input: torch.Tensor


def block_norms(block: nn.Module, adapter: ModelAdapter) -> list[tuple[nn.Module, list[nn.Module]]]:
    """Every norm of the block that reads the residual stream, each with the linear layers reading its output."""
    return [(get_module(block, norm_path), [get_module(block, path) for path in readers])
            for residual in adapter.residuals for norm_path, readers in residual.reads.items()]


@torch.no_grad()
def reader_gain(norm: nn.Module, readers: list[nn.Module], norm_kind: str) -> float:
    """Mean squared output per unit-RMS isotropic input of the layers reading `norm`, its scale included:
    ||W diag(g)||²_F / rows over the readers stacked."""
    scale, _ = norm_affine(norm, norm_kind)
    weight = torch.cat([reader.weight.double() for reader in readers])
    if scale is not None:
        weight = weight * scale.double()
    return float(weight.pow(2).sum() / weight.shape[0])


@torch.no_grad()
def shared_basis(model: nn.Module, adapter: ModelAdapter, streams: list[BlockInput], weighting: str = "unit-rms",
                 run: Run | None = None) -> SharedBasis:
    """One walk over the dense blocks on the calibration `streams` (the first block's input): the weighted
    sum over every norm input of Σ xᵀx (padding masked). The streams end at the final norm's input.

    `weighting`: "unit-rms" scales each token to unit RMS; "raw" takes the stream as it is; "reader-gain"
    also weights each norm's tokens by `reader_gain` of the layers that read it (relative to the mean
    gain). Run it on the model before its blocks are fused (the stream is the same; the norms still hold
    their scales).
    """
    if weighting not in WEIGHTINGS:
        raise LmsliceError(f"unknown basis weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    embedding = get_module(model, adapter.embeddings[0]).weight
    hidden, device = embedding.shape[1], embedding.device
    total = Covariance(hidden, device, "norm inputs (shared basis)")
    head_input = Covariance(hidden, device, "input of the final norm")
    gains: list[float] = []

    def add(signal: torch.Tensor, mask: torch.Tensor, gain: float) -> torch.Tensor:
        """Adds one norm's input, weighted by `gain`; returns its tokens scaled to unit RMS."""
        x = signal.double()
        unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))
        total.add(x if weighting == "raw" else unit * gain ** 0.5, mask)
        return unit

    def measure_block(index: int, block: nn.Module) -> bool:
        hooks = []
        for norm, readers in block_norms(block, adapter):
            gain = reader_gain(norm, readers, adapter.norm_kind) if weighting == "reader-gain" else 1.0
            gains.append(gain)
            hooks.append((norm, _hook(add, gain)))

        def forward(stream: BlockInput) -> None:
            stream.hidden = run_block(block, stream, stream.hidden)

        walk(streams, forward, hooks)
        return False

    walk_blocks(model, run or Run(0), measure_block, "measuring the shared basis", streams=streams)
    final_norm = get_module(model, adapter.final_norm)
    gain = reader_gain(final_norm, [get_module(model, adapter.head)], adapter.norm_kind) \
        if weighting == "reader-gain" else 1.0
    gains.append(gain)
    for stream in streams:
        head_input.add(add(stream.hidden, stream.mask, gain), stream.mask)
        stream.store.forget(stream.name)
    # gains relative to their mean, and per token, not per token and norm: only the spectrum's scale
    total.matrix /= sum(gains) / len(gains)
    total.tokens = head_input.tokens
    eigenvalues, eigenvectors = total.principal_components()
    return SharedBasis(eigenvalues, eigenvectors, head_input.matrix / max(head_input.tokens, 1))


def _hook(add: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], gain: float) -> Hook:
    """A walk hook adding a norm's input, weighted by `gain`."""
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], stream: BlockInput) -> None:
        add(args[0], stream.mask, gain)
    return hook
