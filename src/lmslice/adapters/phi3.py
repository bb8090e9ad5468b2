"""Phi-3 and Phi-4 (which ships as Phi3ForCausalLM; Phi-4-mini adds a partial rotary factor and tied
embeddings): Llama's layout with fused qkv_proj and gate_up_proj, which are ordinary readers. qkv_proj holds
every query head, then every key head, then every value head; the forward splits it at its config's
num_attention_heads, so a block with fewer heads holds its own copy of the config."""

from typing import Any

from lmslice.adapters.base import Attention, Gguf, Mlp, ModelAdapter, Residual


def _attention_width(config: Any) -> str | None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.num_attention_heads * head_dim != config.hidden_size:
        return (f"llama.cpp's phi3 sizes the attention output hidden x hidden ({config.hidden_size}), this model's is "
                f"{config.num_attention_heads * head_dim} wide")
    return None


PHI3 = ModelAdapter(
    family="phi3",
    architectures=("Phi3ForCausalLM",),
    embeddings=("model.embed_tokens",),
    blocks="model.layers",
    residuals=(
        Residual(reads={"input_layernorm": ("self_attn.qkv_proj",)}, writes=("self_attn.o_proj",)),
        Residual(reads={"post_attention_layernorm": ("mlp.gate_up_proj",)}, writes=("mlp.down_proj",)),
    ),
    final_norm="model.norm",
    head="lm_head",
    mlp=Mlp(producers=("mlp.gate_up_proj",), consumer="mlp.down_proj", fused=2),
    attention=Attention(module="self_attn", queries="self_attn.qkv_proj", output="self_attn.o_proj", stacked=True,
                        heads_attribute="config.num_attention_heads", key_value_heads_attribute="num_key_value_heads"),
    gguf=Gguf("phi3", refuse=_attention_width),
)
