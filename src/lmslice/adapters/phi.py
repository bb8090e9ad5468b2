"""Phi-1/1.5/2: one LayerNorm feeds attention and MLP in parallel; the head has a bias."""

from lmslice.adapters.base import Attention, Mlp, ModelAdapter, Residual

PHI = ModelAdapter(
    family="phi",
    architectures=("PhiForCausalLM",),
    embeddings=("model.embed_tokens",),
    blocks="model.layers",
    residuals=(
        # qk_layernorm (if enabled) normalises per-head queries and keys, not the residual stream: untouched.
        Residual(
            reads={"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")},
            writes=("self_attn.dense", "mlp.fc2"),
        ),
    ),
    final_norm="model.final_layernorm",
    head="lm_head",
    norm_kind="layer",
    mlp=Mlp(producers=("mlp.fc1",), consumer="mlp.fc2"),
    attention=Attention(module="self_attn", queries="self_attn.q_proj", output="self_attn.dense",
                        keys="self_attn.k_proj", values="self_attn.v_proj"),
)
