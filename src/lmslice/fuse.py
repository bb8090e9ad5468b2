"""Step 1 of the method: make the network computationally invariant to rotations of its residual stream.

Untie the embeddings from the head (they will get different rotations), fold each norm's scale and
shift into the linear layers that read it, and, for LayerNorm families, mean-centre everything written
to the residual stream so each LayerNorm becomes an RMSNorm. The model computes the same function
afterwards; `tests/test_invariance.py` holds it to that.
"""

from __future__ import annotations

import torch
from torch import nn

from lmslice.adapters import ModelAdapter
from lmslice.modeling import SlicedRMSNorm, get_module, set_module


def untie_embeddings(model: nn.Module, adapter: ModelAdapter) -> None:
    head = get_module(model, adapter.head)
    for path in adapter.embeddings:
        if get_module(model, path).weight is head.weight:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False


def norm_eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise TypeError(f"cannot find the epsilon of {type(norm).__name__}")


def norm_affine(norm: nn.Module, norm_kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The norm's elementwise scale and shift (None where the norm has none)."""
    scale = getattr(norm, "weight", None)
    shift = getattr(norm, "bias", None)
    if scale is not None and norm_kind == "rms_plus_one":
        scale = 1 + scale
    return scale, shift


@torch.no_grad()
def absorb_affine(linear: nn.Linear, scale: torch.Tensor | None, shift: torch.Tensor | None) -> bool:
    """Rewrites `linear(norm(x) * scale + shift)` as `linear'(norm(x))`. Returns True if a bias was added."""
    weight = linear.weight.data.double()
    added_bias = False
    if shift is not None:
        bias_update = weight @ shift.double()
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros_like(bias_update, dtype=linear.weight.dtype))
            added_bias = True
        linear.bias.data = (linear.bias.data.double() + bias_update).to(linear.bias.dtype)
    if scale is not None:
        linear.weight.data = (weight * scale.double()).to(linear.weight.dtype)
    return added_bias


@torch.no_grad()
def scale_output(linear: nn.Linear, scale: float) -> None:
    linear.weight.data = (linear.weight.data.double() * scale).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.double() * scale).to(linear.bias.dtype)


@torch.no_grad()
def centre_output(module: nn.Module) -> None:
    """Makes the module's contribution to the residual stream zero-mean over the hidden dimension."""
    if isinstance(module, nn.Embedding):
        weight = module.weight.data.double()
        module.weight.data = (weight - weight.mean(dim=1, keepdim=True)).to(module.weight.dtype)
        return
    weight = module.weight.data.double()
    module.weight.data = (weight - weight.mean(dim=0, keepdim=True)).to(module.weight.dtype)
    if module.bias is not None:
        bias = module.bias.data.double()
        module.bias.data = (bias - bias.mean()).to(module.bias.dtype)


def fuse_embeddings(model: nn.Module, adapter: ModelAdapter, centre: bool = False) -> None:
    """Unties the head and mean-centres what the embeddings write: always for LayerNorm families (exact),
    for RMSNorm families when `centre` (not exact: RMSNorm sees the mean)."""
    untie_embeddings(model, adapter)
    if adapter.residual_scale is not None:  # folded into every block's writers by `fuse_block`
        setattr(model.config, adapter.residual_scale, 1.0)
    if centre or adapter.norm_kind == "layer":
        for path in adapter.embeddings:
            centre_output(get_module(model, path))


def fold_norm(root: nn.Module, norm_path: str, readers: tuple[str, ...], norm_kind: str) -> list[str]:
    """Folds one norm into the layers reading it and replaces it by a weightless RMSNorm of the same
    width. Returns the readers that gained a bias (a LayerNorm shift read by a bias-free layer)."""
    norm = get_module(root, norm_path)
    scale, shift = norm_affine(norm, norm_kind)
    added = [reader for reader in readers if absorb_affine(get_module(root, reader), scale, shift)]
    width = get_module(root, readers[0]).in_features
    set_module(root, norm_path, SlicedRMSNorm(width, norm_eps(norm), width))
    return added


def fuse_block(block: nn.Module, adapter: ModelAdapter) -> list[str]:
    """Folds the block's norms into its readers (and mean-centres its writers for LayerNorm families).
    Returns the block-relative paths of readers that gained a bias. A scale on what the block writes
    (`adapter.residual_scale`) is folded into its writers and set to 1."""
    added: list[str] = []
    if adapter.residual_scale is not None:
        scale = float(getattr(block, adapter.residual_scale))
        for path in (path for residual in adapter.residuals for path in residual.writes):
            scale_output(get_module(block, path), scale)
        setattr(block, adapter.residual_scale, 1.0)
    for residual in adapter.residuals:
        if adapter.norm_kind == "layer":
            for path in residual.writes:
                centre_output(get_module(block, path))
        for norm_path, readers in residual.reads.items():
            added += fold_norm(block, norm_path, readers, adapter.norm_kind)
    return added


def fuse_head(model: nn.Module, adapter: ModelAdapter) -> list[str]:
    """Folds the final norm into the head."""
    return fold_norm(model, adapter.final_norm, (adapter.head,), adapter.norm_kind)


def fuse_norms(model: nn.Module, adapter: ModelAdapter) -> tuple[float, list[str]]:
    """All of the above on a whole model: it then computes the same function with weightless norms.

    Returns the norm epsilon and the paths of linear layers that gained a bias, which a reloaded
    model must recreate.
    """
    eps = norm_eps(get_module(model, adapter.final_norm))
    fuse_embeddings(model, adapter)
    added_biases = []
    for index, block in enumerate(get_module(model, adapter.blocks)):
        added_biases += [f"{adapter.blocks}.{index}.{path}" for path in fuse_block(block, adapter)]
    return eps, added_biases + fuse_head(model, adapter)
