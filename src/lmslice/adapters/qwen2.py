"""Qwen2 / Qwen2.5: Llama's layout with q/k/v biases; layers may differ in attention type (refused)."""

from typing import Any

from lmslice.adapters.base import ModelAdapter, Residual


def _unsupported(config: Any) -> str | None:
    layer_types = set(getattr(config, "layer_types", None) or ())
    if len(layer_types) > 1:
        return ("Qwen2 models that mix attention types across layers (use_sliding_window with "
                f"max_window_layers < num_hidden_layers: {', '.join(sorted(layer_types))}) are not supported: "
                "calibration gives every block the first block's attention mask")
    return None


QWEN2 = ModelAdapter(
    family="qwen2",
    architectures=("Qwen2ForCausalLM",),
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
    unsupported=_unsupported,
)
