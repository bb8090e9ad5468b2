"""OLMo 2: no norm before its sublayers, an RMSNorm after each (on what it writes), and an RMSNorm over the
whole query and the whole key projection (q_norm, k_norm: one weight per feature, all heads together).
Pruning applies: a pruned head's features leave the norms' weights too, but the norms then take their mean
square over the heads kept only, a per-token scale on every kept head's queries and keys (the output
projection's refit and the carried stream see it). Slicing does not (`ModelAdapter.cannot_slice`)."""

from lmslice.adapters.base import Attention, Gguf, Mlp, ModelAdapter, Residual

OLMO2 = ModelAdapter(
    family="olmo2",
    architectures=("Olmo2ForCausalLM",),
    embeddings=("model.embed_tokens",),
    blocks="model.layers",
    residuals=(
        Residual(reads={"": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}, writes=("self_attn.o_proj",),
                 output_norms=("post_attention_layernorm",)),
        Residual(reads={"": ("mlp.gate_proj", "mlp.up_proj")}, writes=("mlp.down_proj",),
                 output_norms=("post_feedforward_layernorm",)),
    ),
    final_norm="model.norm",
    head="lm_head",
    mlp=Mlp(producers=("mlp.gate_proj", "mlp.up_proj"), consumer="mlp.down_proj", writes_stream=False),
    attention=Attention(module="self_attn", queries="self_attn.q_proj", output="self_attn.o_proj",
                        keys="self_attn.k_proj", values="self_attn.v_proj", query_norm="self_attn.q_norm",
                        key_norm="self_attn.k_norm"),
    gguf=Gguf("olmo2"),
)
