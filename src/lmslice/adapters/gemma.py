"""Gemma (1): RMSNorm scale is 1 + weight; embeddings are scaled by sqrt(config.hidden_size), which stays D."""

from lmslice.adapters.base import ModelAdapter, Residual

GEMMA = ModelAdapter(
    family="gemma",
    architectures=("GemmaForCausalLM",),
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
    norm_kind="rms_plus_one",
)
