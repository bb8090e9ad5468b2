"""The registry of model families. Adding one: write `adapters/<family>.py`, list it here.

One architecture may have several adapters (GPT-NeoX: parallel or sequential blocks); a model gets the
first one whose `unsupported(config)` accepts its config.
"""

from __future__ import annotations

from torch import nn

from lmslice.adapters.base import Attention, Gguf, Mlp, ModelAdapter, Residual
from lmslice.adapters.gemma import GEMMA
from lmslice.adapters.gemma2 import GEMMA2, GEMMA3
from lmslice.adapters.gpt_neox import GPT_NEOX, GPT_NEOX_SEQUENTIAL
from lmslice.adapters.granite import GRANITE
from lmslice.adapters.llama import LLAMA
from lmslice.adapters.mistral import MINISTRAL, MINISTRAL3, MISTRAL
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
                                      GEMMA2, GEMMA3, OLMO2, OPT, PHI, PHI3, GPT_NEOX, GPT_NEOX_SEQUENTIAL)


def supported_architectures() -> list[str]:
    return sorted({arch for adapter in ADAPTERS for arch in adapter.architectures})


def adapters_for_architecture(architecture: str) -> list[ModelAdapter]:
    candidates = [adapter for adapter in ADAPTERS if architecture in adapter.architectures]
    if not candidates:
        raise LmsliceError(
            f"unsupported architecture {architecture}; lmslice supports {', '.join(supported_architectures())}"
        )
    return candidates


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
    for adapter in adapters_for_architecture(architecture):
        reason = adapter.unsupported(model.config)
        if not reason:
            return adapter
        reasons.append(reason)
    raise LmsliceError(f"{'; '.join(reasons)} (architecture {architecture})")


__all__ = ["ADAPTERS", "Gguf", "Mlp", "ModelAdapter", "Residual", "adapter_for", "adapter_for_architecture",
           "adapter_of_family", "adapters_for_architecture",
           "find_adapter", "supported_architectures"]
