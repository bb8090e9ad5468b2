"""The registry of model families. Adding one: write `adapters/<family>.py`, list it here."""

from __future__ import annotations

from torch import nn

from lmslice.adapters.base import ModelAdapter, Residual
from lmslice.adapters.llama import LLAMA
from lmslice.adapters.opt import OPT
from lmslice.errors import LmsliceError

ADAPTERS: tuple[ModelAdapter, ...] = (LLAMA, OPT)


def supported_architectures() -> list[str]:
    return sorted(arch for adapter in ADAPTERS for arch in adapter.architectures)


def adapter_for_architecture(architecture: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if architecture in adapter.architectures:
            return adapter
    raise LmsliceError(
        f"unsupported architecture {architecture}; lmslice supports {', '.join(supported_architectures())}"
    )


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a loaded model, checked against its config (some variants of a family differ)."""
    adapter = adapter_for_architecture(type(model).__name__)
    reason = adapter.unsupported(model.config)
    if reason:
        raise LmsliceError(f"{reason} (architecture {type(model).__name__})")
    return adapter


__all__ = ["ADAPTERS", "ModelAdapter", "Residual", "adapter_for_architecture", "find_adapter",
           "supported_architectures"]
