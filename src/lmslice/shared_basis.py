"""The rotation plan of the standard format: one orthogonal basis for the whole residual stream.

With one basis Q, every residual connection maps Q to Q (its shortcut is the identity) and the head
reads the same sliced stream, so the sliced model is its family's own architecture with a smaller
hidden size. Q comes from one dense pass: the second moment of the stream at every norm input, summed.

Each token is first scaled to unit RMS (what the norm that reads it does), because the stream's RMS
grows along the depth and the deep blocks would otherwise choose the basis alone. Measured on
SmolLM2-135M at 25% (width 432; pydoc calibration 32x256, perplexity on the pydoc test split, 40 windows
of 256, ratio to dense): unit-RMS 2.04, unscaled ("raw") 3.06, unit-RMS weighted by the readers' gain
("reader-gain") 2.28, the head's input weighted like all blocks together (30x) 2.15; without centring
the embeddings 2.04 as well (`benchmarks/standard_format.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmslice.adapters import ModelAdapter
from lmslice.calibration import Covariance, ModelBatch, StopForward, run_model
from lmslice.errors import LmsliceError
from lmslice.fuse import norm_affine
from lmslice.modeling import get_module

WEIGHTINGS = ("unit-rms", "raw", "reader-gain")


@dataclass
class SharedBasis:
    """Eigenvalues (descending) and eigenvectors of the summed signal, and the final norm's own second
    moment (unit-RMS tokens, original coordinates), which fitting a tied head needs."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    head_input: torch.Tensor


def stream_norms(model: nn.Module, adapter: ModelAdapter) -> list[tuple[nn.Module, list[nn.Module]]]:
    """Every norm that reads the residual stream, each with the linear layers reading its output."""
    norms = []
    for block in get_module(model, adapter.blocks):
        for residual in adapter.residuals:
            for norm_path, readers in residual.reads.items():
                norms.append((get_module(block, norm_path), [get_module(block, path) for path in readers]))
    norms.append((get_module(model, adapter.final_norm), [get_module(model, adapter.head)]))
    return norms


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
def shared_basis(model: nn.Module, adapter: ModelAdapter, batches: Iterable[dict[str, torch.Tensor]],
                 weighting: str = "unit-rms") -> SharedBasis:
    """One dense pass over `batches`: the weighted sum over every norm input of Σ xᵀx (padding masked).

    `weighting`: "unit-rms" scales each token to unit RMS; "raw" takes the stream as it is; "reader-gain"
    also weights each norm's tokens by `reader_gain` of the layers that read it. Run it on the model
    before its blocks are fused (the stream is the same; the norms still hold their scales).
    """
    if weighting not in WEIGHTINGS:
        raise LmsliceError(f"unknown basis weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    norms = stream_norms(model, adapter)
    embedding = get_module(model, adapter.embeddings[0]).weight
    hidden, device = embedding.shape[1], embedding.device
    final_norm = norms[-1][0]
    total = Covariance(hidden, device, "norm inputs (shared basis)")
    head_input = Covariance(hidden, device, "input of the final norm")
    gains = {norm: reader_gain(norm, readers, adapter.norm_kind) if weighting == "reader-gain" else 1.0
             for norm, readers in norms}
    mean_gain = sum(gains.values()) / len(gains)

    def accumulate(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: ModelBatch) -> None:
        x = args[0].double()
        unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))
        signal = x if weighting == "raw" else unit * (gains[module] / mean_gain) ** 0.5
        total.add(signal, batch.mask)
        if module is final_norm:
            head_input.add(unit, batch.mask)
            raise StopForward

    run_model(model, batches, [(norm, accumulate) for norm, _ in norms])
    total.tokens = head_input.tokens  # per token, not per token and norm: only the scale of the spectrum
    eigenvalues, eigenvectors = total.principal_components()
    return SharedBasis(eigenvalues, eigenvectors, head_input.matrix / max(head_input.tokens, 1))
