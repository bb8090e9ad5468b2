"""Qwen3: Llama's layout with an RMSNorm on each query and key head (q_norm, k_norm: one weight of head_dim,
shared by every head). They act inside the attention, after the projections that absorb the rotation, and a
pruned head leaves nothing of them behind. Layers may differ in attention type, as Qwen2's."""

from dataclasses import replace

from lmslice.adapters.base import Gguf
from lmslice.adapters.llama import LLAMA

QWEN3 = replace(LLAMA, family="qwen3", architectures=("Qwen3ForCausalLM",), gguf=Gguf("qwen3"))
