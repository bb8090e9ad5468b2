"""Mixtures of experts whose experts are one module of 3-D weights (transformers 5.x): Qwen3-MoE, Mixtral,
OLMoE. The block is Llama's with the MLP replaced by a top-k router (`mlp.gate`, a weight [experts,
hidden]) and the experts (`mlp.experts`: gate_up_proj [experts, 2 x width, hidden], gate and up stacked,
and down_proj [experts, hidden, width]). Qwen3-MoE (which has no shared expert) keeps a dense MLP in the
blocks its mlp_only_layers and decoder_sparse_step say; OLMoE's q/k norms span the whole projection, as
OLMo 2's.

Pruning applies: every expert of a block keeps the same number of channels (the 3-D weights hold one
expert width per block), each choosing its own on the tokens routed to it, and whole experts leave with
their router rows. Slicing does not (`ModelAdapter.cannot_slice`: the 3-D weights and the router are not
rotated). GGUF is written where every block keeps the same experts' width and count (llama.cpp's MoE
builders read one of each for the whole model), as llama.cpp's converter writes the family: Mixtral as
`llama` with experts, `qwen3moe`, `olmoe`; each refuses the routing its builder does not compute."""

from dataclasses import replace

from typing import Any

from lmslice.adapters.base import Attention, Experts, Gguf, Mlp, ModelAdapter, Residual

EXPERTS = Experts(module="mlp.experts", router="mlp.gate")
ATTENTION = Attention(module="self_attn", queries="self_attn.q_proj", output="self_attn.o_proj",
                      keys="self_attn.k_proj", values="self_attn.v_proj")

def experts_metadata(config: Any) -> dict[str, Any]:
    """How many experts a block holds and how many each token is routed to, as llama.cpp reads them."""
    return {"expert_count": config.num_experts, "expert_used_count": config.num_experts_per_tok}


def qwen3moe_refusal(config: Any) -> str | None:
    """llama.cpp's qwen3moe builds experts in every block and renormalises each token's top-k weights."""
    if config.mlp_only_layers or config.decoder_sparse_step != 1:
        return "llama.cpp's qwen3moe has experts in every block, this model dense MLPs in some (mlp_only_layers)"
    if not config.norm_topk_prob:
        return "llama.cpp's qwen3moe renormalises each token's top-k routing weights, this model does not"
    return None


def olmoe_refusal(config: Any) -> str | None:
    """llama.cpp's olmoe weighs each token's top-k experts by their softmax probabilities as they are, and
    sizes its key norm to the hidden width (every key/value head its own query head's)."""
    if config.num_key_value_heads != config.num_attention_heads:
        return (f"llama.cpp's olmoe normalises keys over the hidden width, as many key as query heads, this model "
                f"has {config.num_key_value_heads} key/value heads for {config.num_attention_heads}")
    if config.norm_topk_prob:
        return "llama.cpp's olmoe does not renormalise the top-k routing weights, this model does (norm_topk_prob)"
    return None


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
    gguf=Gguf("qwen3moe", refuse=qwen3moe_refusal, metadata=lambda config: {
        **experts_metadata(config), "expert_feed_forward_length": config.moe_intermediate_size}),
)

# every block of Mixtral and OLMoE holds experts, whose width is the config's intermediate_size
EXPERTS_ONLY = replace(QWEN3_MOE.mlp, experts=replace(EXPERTS, width_config="intermediate_size"))

# llama.cpp's converter writes Mixtral as llama with experts (its feed_forward_length the experts' width); the
# router always renormalises the top-k weights, as llama.cpp's llama does
MIXTRAL = replace(QWEN3_MOE, family="mixtral", architectures=("MixtralForCausalLM",), mlp=EXPERTS_ONLY,
                  gguf=Gguf("llama", metadata=experts_metadata))

# OLMoE's config.json names the expert count num_experts (Qwen3-MoE's and Mixtral's: num_local_experts)
OLMOE = replace(QWEN3_MOE, family="olmoe", architectures=("OlmoeForCausalLM",),
                mlp=replace(EXPERTS_ONLY, experts=replace(EXPERTS, width_config="intermediate_size",
                                                          count_config="num_experts")),
                attention=replace(ATTENTION, query_norm="self_attn.q_norm", key_norm="self_attn.k_norm"),
                gguf=Gguf("olmoe", refuse=olmoe_refusal, metadata=experts_metadata))
