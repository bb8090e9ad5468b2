"""Step 3 of the method: rotate each weight matrix into its principal basis and delete the tail.

A basis here is a D x D' matrix with orthonormal columns, the leading principal components (Q with its
trailing columns deleted). Rotating and slicing in one product: matrices that read the residual stream
become W Q (input columns deleted), matrices that write it become Qᵀ W (output rows deleted), and a
residual connection from basis Q_in to basis Q_out carries S = Q_inᵀ Q_out.
"""

from __future__ import annotations

import torch
from torch import nn

from lmslice.adapters import ModelAdapter
from lmslice.errors import LmsliceError
from lmslice.modeling import ShortcutLinear, get_module, install_block


@torch.no_grad()
def rotate_reader(linear: nn.Module, basis: torch.Tensor) -> None:
    weight = linear.weight
    linear.weight = nn.Parameter((weight.double() @ basis.double()).to(weight.dtype), weight.requires_grad)
    linear.in_features = basis.shape[1]


@torch.no_grad()
def rotate_writer(module: nn.Module, basis: torch.Tensor) -> None:
    """Embeddings (vocab x D rows) and linear layers (D x in, with bias) writing to the stream."""
    weight = module.weight
    if isinstance(module, nn.Embedding):
        module.weight = nn.Parameter((weight.double() @ basis.double()).to(weight.dtype), weight.requires_grad)
        module.embedding_dim = basis.shape[1]
        return
    module.weight = nn.Parameter((basis.double().T @ weight.double()).to(weight.dtype), weight.requires_grad)
    if module.bias is not None:
        bias = module.bias
        module.bias = nn.Parameter((bias.double() @ basis.double()).to(bias.dtype), bias.requires_grad)
    module.out_features = basis.shape[1]


def rotate_block(block: nn.Module, adapter: ModelAdapter, bases: list[torch.Tensor], hidden: int,
                 eps: float) -> None:
    """Rotates and slices one block. `bases[k]` is the basis entering connection k; the last leaves it."""
    for residual, basis_in, basis_out in zip(adapter.residuals, bases, bases[1:]):
        for readers in residual.reads.values():
            for path in readers:
                rotate_reader(get_module(block, path), basis_in)
        for path in residual.writes:
            rotate_writer(get_module(block, path), basis_out)
    width, out_width = bases[0].shape[1], bases[-1].shape[1]
    install_block(block, adapter.modules(), width, out_width, hidden, eps)
    for residual, basis_in, basis_out in zip(adapter.residuals, bases, bases[1:]):
        projection = get_module(block, residual.writes[0])
        if not isinstance(projection, ShortcutLinear):
            raise LmsliceError(f"{type(block).__name__}.{residual.writes[0]} is not a shortcut projection after "
                               f"slicing: the {adapter.family} adapter's module paths do not match this model")
        projection.set_shortcut(basis_in.double().T @ basis_out.double())
