"""Mistral: Llama's layout; its sliding window is the same for every layer, so one mask serves all blocks.
Ministral (MinistralForCausalLM) is the same block with a sliding window per layer type (layers that mix
attention types are refused); llama.cpp runs both as `llama`, whose attention has no window (the GGUF's
context is capped at it)."""

from dataclasses import replace

from lmslice.adapters.base import mixed_attention
from lmslice.adapters.llama import LLAMA

MISTRAL = replace(LLAMA, family="mistral", architectures=("MistralForCausalLM",), unsupported=mixed_attention)
MINISTRAL = replace(MISTRAL, family="ministral", architectures=("MinistralForCausalLM",))
# Ministral 3 (text): the same block; its attention also scales the queries by position
# (llama_4_scaling_beta), inside the attention, which slicing and pruning leave as it is.
MINISTRAL3 = replace(MISTRAL, family="ministral3", architectures=("Ministral3ForCausalLM",))
