"""SmolLM3: Llama's layout; some layers apply no rope (config.no_rope_layers), which the attention decides by
itself (every block is given the same position embeddings). llama.cpp's smollm3 leaves rope out of every
fourth layer, whatever the config says: another pattern is refused for GGUF."""

from dataclasses import replace
from typing import Any

from lmslice.adapters.base import Gguf
from lmslice.adapters.llama import LLAMA

LLAMACPP_NO_ROPE_STEP = 4  # llama_model_smollm3::load_arch_hparams: n_no_rope_layer_step


def _rope_layers(config: Any) -> str | None:
    llamacpp = [int((index + 1) % LLAMACPP_NO_ROPE_STEP != 0) for index in range(config.num_hidden_layers)]
    if list(config.no_rope_layers) != llamacpp:
        return (f"llama.cpp's smollm3 applies rope in layers {llamacpp} (none in every {LLAMACPP_NO_ROPE_STEP}th), "
                f"this model in {list(config.no_rope_layers)}")
    return None


SMOLLM3 = replace(LLAMA, family="smollm3", architectures=("SmolLM3ForCausalLM",),
                  gguf=Gguf("smollm3", refuse=_rope_layers))
