"""Mistral: Llama's layout with a sliding window. Ministral (MinistralForCausalLM) is the same block with a
window per layer type (calibration gives each block its own mask). llama.cpp runs both as `llama`, whose
attention has no window (the GGUF's context is capped at it)."""

from dataclasses import replace

from lmslice.adapters.llama import LLAMA

MISTRAL = replace(LLAMA, family="mistral", architectures=("MistralForCausalLM",))
MINISTRAL = replace(MISTRAL, family="ministral", architectures=("MinistralForCausalLM",))
# Ministral 3 (text): the same block; its attention also scales the queries by position
# (llama_4_scaling_beta), inside the attention, which slicing and pruning leave as it is. llama.cpp runs it
# as `mistral3` (that temperature and its YaRN parameters), which lmslice does not write: not `llama`.
MINISTRAL3 = replace(MISTRAL, family="ministral3", architectures=("Ministral3ForCausalLM",), gguf=None)
