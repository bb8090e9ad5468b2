"""Mistral: Llama's layout; its sliding window is the same for every layer, so one mask serves all blocks."""

from dataclasses import replace

from lmslice.adapters.llama import LLAMA

MISTRAL = replace(LLAMA, family="mistral", architectures=("MistralForCausalLM",))
