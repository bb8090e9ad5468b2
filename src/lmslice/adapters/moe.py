"""Mixtures of experts whose experts are one module of 3-D weights (transformers 5.x): Qwen3-MoE, Mixtral,
OLMoE. The block is Llama's with the MLP replaced by a top-k router (`mlp.gate`, a weight [experts,
hidden]) and the experts (`mlp.experts`: gate_up_proj [experts, 2 x width, hidden], gate and up stacked,
and down_proj [experts, hidden, width]). Qwen3-MoE (which has no shared expert) keeps a dense MLP in the
blocks its mlp_only_layers and decoder_sparse_step say; OLMoE's q/k norms span the whole projection, as
OLMo 2's.

Pruning applies: every expert of a block keeps the same number of channels (the 3-D weights, and
llama.cpp's MoE builders, hold one expert width per block), each choosing its own on the tokens routed to
it. Slicing does not (`ModelAdapter.cannot_slice`: the 3-D weights and the router are not rotated), nor
does GGUF."""

from dataclasses import replace

from lmslice.adapters.base import Attention, Experts, Mlp, ModelAdapter, Residual

EXPERTS = Experts(module="mlp.experts", router="mlp.gate")
ATTENTION = Attention(module="self_attn", queries="self_attn.q_proj", output="self_attn.o_proj",
                      keys="self_attn.k_proj", values="self_attn.v_proj")

QWEN3_MOE = ModelAdapter(
    family="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    embeddings=("model.embed_tokens",),
    blocks="model.layers",
    residuals=(
        Residual(
            reads={"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
            writes=("self_attn.o_proj",),
        ),
        # what reads and writes the stream in a block of experts: slicing, which would rotate them, is refused
        Residual(reads={"post_attention_layernorm": (EXPERTS.router, EXPERTS.module)}, writes=(EXPERTS.module,)),
    ),
    final_norm="model.norm",
    head="lm_head",
    mlp=Mlp(producers=("mlp.gate_proj", "mlp.up_proj"), consumer="mlp.down_proj", experts=EXPERTS),
    attention=ATTENTION,
)

# every block of Mixtral and OLMoE holds experts, whose width is the config's intermediate_size
EXPERTS_ONLY = replace(QWEN3_MOE.mlp, experts=replace(EXPERTS, width_config="intermediate_size"))

MIXTRAL = replace(QWEN3_MOE, family="mixtral", architectures=("MixtralForCausalLM",), mlp=EXPERTS_ONLY)

OLMOE = replace(QWEN3_MOE, family="olmoe", architectures=("OlmoeForCausalLM",), mlp=EXPERTS_ONLY,
                attention=replace(ATTENTION, query_norm="self_attn.q_norm", key_norm="self_attn.k_norm"))
