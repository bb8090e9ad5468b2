"""Llama (Llama-2/3, SmolLM2, TinyLlama): RMSNorm, sequential attention then gated MLP."""

from lmslice.adapters.base import Attention, Gguf, Mlp, ModelAdapter, Residual

LLAMA = ModelAdapter(
    family="llama",
    architectures=("LlamaForCausalLM",),
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
    mlp=Mlp(producers=("mlp.gate_proj", "mlp.up_proj"), consumer="mlp.down_proj"),
    attention=Attention(module="self_attn", queries="self_attn.q_proj", output="self_attn.o_proj",
                        keys="self_attn.k_proj", values="self_attn.v_proj"),
    gguf=Gguf("llama", per_block=True),
)
