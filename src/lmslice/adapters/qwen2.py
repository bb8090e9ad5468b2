"""Qwen2 / Qwen2.5: Llama's layout with q/k/v biases; layers may differ in attention type (refused)."""

from dataclasses import replace
from typing import Any

from lmslice.adapters.llama import LLAMA


def _unsupported(config: Any) -> str | None:
    layer_types = set(getattr(config, "layer_types", None) or ())
    if len(layer_types) > 1:
        return ("Qwen2 models that mix attention types across layers (use_sliding_window with "
                f"max_window_layers < num_hidden_layers: {', '.join(sorted(layer_types))}) are not supported: "
                "calibration gives every block the first block's attention mask")
    return None


QWEN2 = replace(LLAMA, family="qwen2", architectures=("Qwen2ForCausalLM",), unsupported=_unsupported)
