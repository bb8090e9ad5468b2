"""Gemma (1): RMSNorm scale is 1 + weight; embeddings are scaled by sqrt(config.hidden_size), which stays D."""

from dataclasses import replace

from lmslice.adapters.base import Gguf
from lmslice.adapters.llama import LLAMA

GEMMA = replace(LLAMA, family="gemma", architectures=("GemmaForCausalLM",), norm_kind="rms_plus_one",
                gguf=Gguf("gemma", norm_shift=1.0, tied_head=True))
