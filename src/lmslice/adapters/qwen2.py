"""Qwen2 / Qwen2.5: Llama's layout with q/k/v biases; layers may differ in attention type (refused)."""

from dataclasses import replace

from lmslice.adapters.base import Gguf, mixed_attention
from lmslice.adapters.llama import LLAMA

QWEN2 = replace(LLAMA, family="qwen2", architectures=("Qwen2ForCausalLM",), unsupported=mixed_attention,
                gguf=Gguf("qwen2", per_block=True))
