"""OPT: LayerNorm before attention and MLP, learned position embeddings."""

from typing import Any

from lmslice.adapters.base import Attention, Mlp, ModelAdapter, Residual


def _unsupported(config: Any) -> str | None:
    if not config.do_layer_norm_before:
        return "OPT variants that normalise after each block (OPT-350m) are not supported"
    if config.word_embed_proj_dim != config.hidden_size:
        return "OPT variants that project the embeddings (OPT-350m) are not supported"
    if getattr(config, "_remove_final_layer_norm", False):
        return "OPT variants without a final LayerNorm are not supported"
    return None


OPT = ModelAdapter(
    family="opt",
    architectures=("OPTForCausalLM",),
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    blocks="model.decoder.layers",
    residuals=(
        Residual(
            reads={"self_attn_layer_norm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
            writes=("self_attn.out_proj",),
        ),
        Residual(reads={"final_layer_norm": ("fc1",)}, writes=("fc2",)),
    ),
    final_norm="model.decoder.final_layer_norm",
    head="lm_head",
    norm_kind="layer",
    unsupported=_unsupported,
    mlp=Mlp(producers=("fc1",), consumer="fc2", width_config="ffn_dim"),
    # multi-head: every head its own key/value group; the forward reshapes by the module's num_heads
    attention=Attention(module="self_attn", queries="self_attn.q_proj", output="self_attn.out_proj",
                        keys="self_attn.k_proj", values="self_attn.v_proj", heads_attribute="num_heads",
                        groups_attribute=None),
)
