"""The registry of model families. Adding one: write `adapters/<family>.py`, list it here.

One architecture may have several adapters (GPT-NeoX: parallel or sequential blocks); a model gets the
first one whose `unsupported(config)` accepts its config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmslice.adapters.base import Attention, Experts, Gguf, Mlp, ModelAdapter, Residual
from lmslice.adapters.gemma import GEMMA
from lmslice.adapters.gemma2 import GEMMA2, GEMMA3
from lmslice.adapters.gpt_neox import GPT_NEOX, GPT_NEOX_SEQUENTIAL
from lmslice.adapters.granite import GRANITE
from lmslice.adapters.llama import LLAMA
from lmslice.adapters.mistral import MINISTRAL, MINISTRAL3, MISTRAL
from lmslice.adapters.moe import MIXTRAL, OLMOE, QWEN3_MOE
from lmslice.adapters.olmo2 import OLMO2
from lmslice.adapters.opt import OPT
from lmslice.adapters.phi import PHI
from lmslice.adapters.phi3 import PHI3
from lmslice.adapters.qwen2 import QWEN2
from lmslice.adapters.qwen3 import QWEN3
from lmslice.adapters.smollm3 import SMOLLM3
from lmslice.errors import LmsliceError
from lmslice.layout import Layout, LayoutError, layout_of

ADAPTERS: tuple[ModelAdapter, ...] = (LLAMA, MISTRAL, MINISTRAL, MINISTRAL3, QWEN2, QWEN3, SMOLLM3, GRANITE, GEMMA,
                                      GEMMA2, GEMMA3, OLMO2, OPT, PHI, PHI3, GPT_NEOX, GPT_NEOX_SEQUENTIAL,
                                      QWEN3_MOE, MIXTRAL, OLMOE)


def supported_architectures() -> list[str]:
    return sorted({arch for adapter in ADAPTERS for arch in adapter.architectures})


def adapters_for_architecture(architecture: str, model: nn.Module | None = None) -> list[ModelAdapter]:
    """The adapters of `architecture`; refuses another in one line naming the supported ones, and, where
    `model` (weightless will do) has the module layout of a supported family, that family."""
    candidates = [adapter for adapter in ADAPTERS if architecture in adapter.architectures]
    if not candidates:
        closest = None if model is None else closest_adapter(model)
        likeness = "" if closest is None else (
            f" (its blocks have the modules of {closest.architectures[0]}, lmslice's {closest.family}, but its forward "
            "was not checked against it)")
        raise LmsliceError(f"unsupported architecture {architecture}{likeness}; lmslice supports "
                           f"{', '.join(supported_architectures())}")
    return candidates


def closest_adapter(model: nn.Module) -> ModelAdapter | None:
    """The first adapter whose paths all exist in `model` and whose blocks hold exactly its linear layers
    and norms, or None."""
    for adapter in ADAPTERS:
        try:
            blocks = model.get_submodule(adapter.blocks)
            for path in (*adapter.embeddings, adapter.final_norm, adapter.head):
                model.get_submodule(path)
        except AttributeError:
            continue
        linears = {path for residual in adapter.residuals for path in (*residual.writes, *(
            reader for readers in residual.reads.values() for reader in readers))}
        norms = {norm for residual in adapter.residuals for norm in (*residual.reads, *residual.output_norms) if norm}
        if all({name for name, module in block.named_modules() if isinstance(module, nn.Linear)} == linears
               and {name for name, module in block.named_children() if "norm" in type(module).__name__.lower()} == norms
               for block in blocks):
            return adapter
    return None


def check_loadable(config: Any) -> None:
    """Refuses, from a model's config alone (before any weight is read), what lmslice cannot work on: an
    architecture it does not support, or a variant of one it does (`ModelAdapter.unsupported`)."""
    from transformers import AutoModelForCausalLM

    try:
        architecture = AutoModelForCausalLM._model_mapping[type(config)].__name__
    except KeyError:
        names = getattr(config, "architectures", None) or [type(config).__name__]
        raise LmsliceError(f"{names[0]} is not a causal language model transformers knows; lmslice supports "
                           f"{', '.join(supported_architectures())}") from None
    if architecture not in supported_architectures():
        with torch.device("meta"):  # weightless: only its module layout is compared
            adapters_for_architecture(architecture, AutoModelForCausalLM.from_config(config))
    reasons = [adapter.unsupported(config) for adapter in adapters_for_architecture(architecture)]
    if all(reasons):
        raise LmsliceError(f"{'; '.join(reasons)} (architecture {architecture})")


def adapter_for_architecture(architecture: str) -> ModelAdapter:
    return adapters_for_architecture(architecture)[0]


def adapter_of_family(family: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise LmsliceError(f"unknown family {family}; lmslice knows {', '.join(adapter.family for adapter in ADAPTERS)}")


def adapter_for(layout: Layout) -> ModelAdapter:
    """The adapter of the family an lmslice output records (its class is renamed on load)."""
    for adapter in ADAPTERS:
        if adapter.family == layout.family and layout.base_architecture in adapter.architectures:
            return adapter
    raise LmsliceError(f"this lmslice does not know the family {layout.family} ({layout.base_architecture}) the "
                       "model was written with; upgrade lmslice")


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a loaded model, checked against its config (some variants of a family differ); for
    an lmslice output, the one its layout records."""
    try:
        layout = layout_of(model.config)
    except LayoutError as error:
        raise LmsliceError(f"the model's lmslice record is damaged: {error}") from error
    if layout is not None and not layout.standard:
        return adapter_for(layout)
    architecture = type(model).__name__
    reasons = []
    for adapter in adapters_for_architecture(architecture, model):
        reason = adapter.unsupported(model.config)
        if not reason:
            return adapter
        reasons.append(reason)
    raise LmsliceError(f"{'; '.join(reasons)} (architecture {architecture})")


__all__ = ["ADAPTERS", "Experts", "Gguf", "Mlp", "ModelAdapter", "Residual", "adapter_for", "adapter_for_architecture",
           "adapter_of_family", "adapters_for_architecture", "check_loadable", "closest_adapter",
           "find_adapter", "supported_architectures"]
