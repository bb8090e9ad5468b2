"""Mistral: Llama's layout; its sliding window is the same for every layer, so one mask serves all blocks."""

from lmslice.adapters.base import ModelAdapter, Residual

MISTRAL = ModelAdapter(
    family="mistral",
    architectures=("MistralForCausalLM",),
    embeddings=("model.embed_tokens",),
    blocks="model.layers",
    residuals=(
        Residual(
            reads={"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
            writes=("self_attn.o_proj",),
        ),
        Residual(
            reads={"post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")},
            writes=("mlp.down_proj",),
        ),
    ),
    final_norm="model.norm",
    head="lm_head",
)
