"""The standard format: a model sliced with one shared basis, written as its family's own architecture.

With one basis every shortcut is the identity, so the sliced model is the base architecture with
`hidden_size` D' (`slice_model(..., rotation="shared")`). What the family's config must then say:

* `head_dim`, explicitly: attention keeps its width while `hidden_size` shrinks;
* the norms: lmslice's weightless norm divides by the original D. An RMSNorm over D' features with
  epsilon ε·D/D' and scale √(D/D') computes the same thing, since x/√(|x|²/D + ε) =
  √(D/D')·x/√(|x|²/D' + ε·D/D'). The norm scales themselves stay folded into the readers;
* embedding multipliers that the family derives from `hidden_size` (Gemma's √hidden_size) change
  with it: the embedding weights are rescaled to compensate;
* the MLP width, read from the weights (it may have been changed elsewhere).

The result loads with plain `AutoModelForCausalLM.from_pretrained(dir)`: no remote code, no lmslice,
and every runtime that serves the family serves it (llama.cpp after its own `convert_hf_to_gguf.py`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from lmslice.adapters import ModelAdapter, find_adapter
from lmslice.errors import LmsliceError
from lmslice.layout import STANDARD, Layout, layout_of
from lmslice.modeling import ShortcutLinear, get_module, set_module
from lmslice.walk import InMemory, Run, walk_blocks

# Whether a source with tied embeddings keeps them tied in the standard format when not told.
TIE_BY_DEFAULT = False


def check_family(adapter: ModelAdapter) -> None:
    """Refuses, before any work, the families whose own architecture cannot hold a shared-basis slice."""
    reason = adapter.cannot_slice()
    if reason:
        raise LmsliceError(reason)
    if adapter.norm_kind == "layer":
        raise LmsliceError(f"{adapter.family} cannot be written in the standard format: its LayerNorm would "
                           "subtract a mean the rotated stream does not have, and its config ties the attention "
                           "width to hidden_size; use --format sliced")


def check_standard_source(layout: Layout | None) -> None:
    """Refuses, before any work, a source whose pruned blocks the family's own config cannot describe
    (one MLP width and one head count for every block)."""
    if layout is None or layout.standard:
        return
    if layout.attention_heads is not None:
        raise LmsliceError("the standard format has one head count for every block, and this model's query heads "
                           "were pruned per block: use --format sliced, or start from the dense model")
    if layout.mlp_widths is not None and len(set(layout.mlp_widths)) > 1:
        raise LmsliceError(f"the standard format has one MLP width for every block, but this model's blocks have "
                           f"{min(layout.mlp_widths)}-{max(layout.mlp_widths)}: use --format sliced, or start "
                           "from the dense model")


def _check_exportable(model: nn.Module, adapter: ModelAdapter, layout: Layout) -> None:
    check_family(adapter)
    check_standard_source(layout.replace(stream=None))
    stream = layout.stream
    if stream is None or stream.rotation != "shared":
        raise LmsliceError("the standard format needs one basis for the whole stream: slice with "
                           "rotation='shared' (--format standard does)")
    if stream.added_biases:
        raise LmsliceError(f"the standard format cannot express the biases folded norms added: "
                           f"{', '.join(stream.added_biases)}")


def _check_shortcuts(block: nn.Module, prefix: str) -> None:
    for name, module in block.named_modules():
        if isinstance(module, ShortcutLinear) and module.shortcut_minus_identity.abs().max() > 1e-5:
            raise LmsliceError(f"{prefix}{name} carries a shortcut that is not the identity; the standard format has "
                               "none")


def _uniform(values: list[int], what: str) -> int:
    if len(set(values)) != 1:
        raise LmsliceError(f"the standard format has one {what} for every block, but the blocks have "
                           f"{sorted(set(values))}")
    return values[0]


def standard_config(model: nn.Module, adapter: ModelAdapter, tie_embeddings: bool) -> Any:
    """The family's config for the sliced widths, with the lmslice record marked as standard."""
    layout = layout_of(model.config)
    hidden, width = layout.hidden_size, layout.stream.width
    config = copy.deepcopy(model.config)
    if not hasattr(config, "rms_norm_eps"):
        raise LmsliceError(f"{type(config).__name__} has no rms_norm_eps; the standard format cannot set its norms")
    blocks = get_module(model, adapter.blocks)
    attention_width = _uniform([get_module(block, adapter.residuals[0].writes[0]).in_features for block in blocks],
                               "attention width")
    config.head_dim = getattr(config, "head_dim", None) or attention_width // config.num_attention_heads
    if hasattr(config, "intermediate_size"):
        config.intermediate_size = _uniform(
            [get_module(block, adapter.residuals[-1].writes[0]).in_features for block in blocks], "MLP width")
    config.hidden_size = width
    config.rms_norm_eps = layout.stream.eps * hidden / width
    config.tie_word_embeddings = tie_embeddings
    if hasattr(config, "auto_map"):
        del config.auto_map
    config.lmslice = layout.replace(export=STANDARD, mlp_widths=None,
                                    stream=replace(layout.stream, tied_embeddings=tie_embeddings)).to_json()
    return config


@torch.no_grad()
def fit_tied_scale(embedding: torch.Tensor, head: torch.Tensor, head_input: torch.Tensor | None) -> torch.Tensor:
    """The per-feature scale w that makes the tied head `embedding · diag(w)` closest to `head` in logits:
    argmin E‖(E diag(w) − H) h‖² over head inputs h with second moment C, i.e. (EᵀE ∘ C) w = diag(EᵀH C).
    The source's final norm scale is what keeps tying from being exact after the rotation."""
    e, h = embedding.double(), head.double()
    c = head_input.double() if head_input is not None else torch.eye(e.shape[1], dtype=torch.float64)
    return torch.linalg.solve((e.T @ e) * c, torch.diagonal(e.T @ h @ c))


@torch.no_grad()
def standard_model(model: nn.Module, *, tie_embeddings: bool = False, head_input: torch.Tensor | None = None,
                   run: Run | None = None) -> nn.Module:
    """The family's own model (hidden size D') computing what `model`, sliced with a shared basis, does.

    `tie_embeddings` shares the embedding with the head, which is then only approximate: the final norm
    takes the scale `fit_tied_scale` finds from `head_input`, the head's input second moment in the kept
    coordinates (`SliceResult.head_input`; identity if None). Untied, the result is exact.

    The new model is built weightless and filled block by block in one walk over the blocks, each sliced
    block brought from where `run` places it and the new one handed back in its place.
    """
    layout = layout_of(model.config)
    if layout is None or layout.stream is None:
        raise LmsliceError("the standard format writes sliced models; slice the model first")
    if tie_embeddings and not layout.stream.tied_embeddings:
        raise LmsliceError("the source model's embeddings were not tied to its head: nothing to tie")
    adapter = find_adapter(model)
    run = run or Run(0, InMemory(model.get_input_embeddings().weight.device))
    _check_exportable(model, adapter, layout)
    config = standard_config(model, adapter, tie_embeddings)
    base = getattr(transformers, layout.base_architecture)
    dtype = model.get_input_embeddings().weight.dtype
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies, embedding scales) are computed
        standard = base(config).to(dtype).eval()
    scale = torch.full((config.hidden_size,), math.sqrt(layout.hidden_size / config.hidden_size),
                       dtype=torch.float64)

    standard_blocks = get_module(standard, adapter.blocks)

    def convert(index: int, sliced: nn.Module) -> nn.Module:
        _check_shortcuts(sliced, f"{adapter.blocks}.{index}.")
        state = {name: tensor for name, tensor in sliced.state_dict().items()
                 if not name.endswith("shortcut_minus_identity")}
        for residual in adapter.residuals:
            for norm in residual.reads:
                state[f"{norm}.weight"] = _norm_weight(scale, adapter.norm_kind, dtype)
        _fill(standard_blocks[index], state, run.device, f"{base.__name__} block {index}")
        return standard_blocks[index].to(run.device)  # its buffers  # the placement keeps it in the sliced block's place

    rest = {name: tensor for name, tensor in model.state_dict().items()
            if not name.startswith(f"{adapter.blocks}.")}
    walk_blocks(model, run, convert, "standard format")
    for path in adapter.embeddings:
        source_scale = getattr(get_module(model, path), "embed_scale", None)
        target_scale = getattr(get_module(standard, path), "embed_scale", None)
        if source_scale is not None and target_scale is not None:
            rest[f"{path}.weight"] = rest[f"{path}.weight"] * (float(source_scale) / float(target_scale))
    head_key, embedding_key = f"{adapter.head}.weight", f"{adapter.embeddings[0]}.weight"
    final_scale = scale
    if tie_embeddings:
        final_scale = scale * fit_tied_scale(rest[embedding_key], rest[head_key], head_input)
        del rest[head_key]
    rest[f"{adapter.final_norm}.weight"] = _norm_weight(final_scale, adapter.norm_kind, dtype)
    set_module(standard, adapter.blocks, nn.ModuleList())  # the blocks are filled: only the rest is left
    try:
        _fill(standard, rest, run.device, base.__name__, tied=[head_key] if tie_embeddings else [])
        if tie_embeddings:
            get_module(standard, adapter.head).weight = get_module(standard, adapter.embeddings[0]).weight
        standard.to(run.device)  # the buffers
    finally:
        set_module(standard, adapter.blocks, standard_blocks)
    return standard


def _fill(module: nn.Module, state: dict[str, torch.Tensor], device: torch.device, what: str,
          tied: list[str] = ()) -> None:
    """Gives the weightless `module` (its buffers computed) the tensors of `state` on `device`, which must
    match its own one to one but for the `tied` ones, which the caller ties."""
    expected = set(module.state_dict()) - set(tied)
    if set(state) != expected:
        raise LmsliceError(f"cannot map the sliced weights onto {what}: missing {sorted(expected - set(state))[:3]}, "
                           f"unexpected {sorted(set(state) - expected)[:3]}")
    module.load_state_dict({name: tensor.to(device) for name, tensor in state.items()}, strict=False, assign=True)


def _norm_weight(scale: torch.Tensor, norm_kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The stored norm weight giving the elementwise `scale` (Gemma stores scale - 1)."""
    return (scale - 1 if norm_kind == "rms_plus_one" else scale).to(dtype, copy=True)
