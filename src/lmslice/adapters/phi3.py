"""Phi-3: Llama's layout with fused qkv_proj and gate_up_proj, which are ordinary readers. Its heads are
not prunable per block: the forward splits qkv_proj at the config's num_attention_heads, shared by every
block."""

from lmslice.adapters.base import Mlp, ModelAdapter, Residual

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
)
