"""Qwen2 / Qwen2.5: Llama's layout with q/k/v biases; with use_sliding_window, the layers from
max_window_layers on attend within a window (calibration gives each block its own mask)."""

from dataclasses import replace

from lmslice.adapters.base import Gguf
from lmslice.adapters.llama import LLAMA

QWEN2 = replace(LLAMA, family="qwen2", architectures=("Qwen2ForCausalLM",), gguf=Gguf("qwen2", per_block=True))
