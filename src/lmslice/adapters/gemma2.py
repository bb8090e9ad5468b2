"""Gemma 2 and Gemma 3 (text): Gemma's norms (scale 1 + weight) before each sublayer and after it, on what it
writes, soft-capped logits (Gemma 2: the attention scores too), sliding-window layers among global ones
(Gemma 3 with a rope base of their own), and Gemma 3's RMSNorm on each query and key head (head_dim wide,
shared by the heads). Pruning applies; slicing does not (`ModelAdapter.cannot_slice`). Calibration gives each
block its own mask and position embeddings."""

from dataclasses import replace
from typing import Any

from lmslice.adapters.base import Gguf, ModelAdapter, Residual
from lmslice.adapters.llama import LLAMA


def _rope_theta(config: Any, layer_type: str) -> float:
    parameters = config.rope_parameters
    return float(parameters.get(layer_type, parameters)["rope_theta"])


def _attention_scale(config: Any) -> str | None:
    """llama.cpp scales the queries by 1/sqrt(head_dim), or for its "27B" type (46 layers in Gemma 2, 62 in
    Gemma 3) by 1/sqrt(hidden / heads); HF by 1/sqrt(query_pre_attn_scalar)."""
    expected = config.hidden_size // config.num_attention_heads if config.num_hidden_layers in (46, 62) \
        else config.head_dim
    if config.query_pre_attn_scalar != expected:
        return (f"llama.cpp scales a {config.num_hidden_layers}-layer Gemma's queries by 1/sqrt({expected}), this "
                f"model by 1/sqrt(query_pre_attn_scalar = {config.query_pre_attn_scalar})")
    return None


def _windows(config: Any) -> dict[str, Any]:
    return {"attention.sliding_window": int(config.sliding_window),
            "attention.sliding_window_pattern": [kind == "sliding_attention" for kind in config.layer_types]}


def _gemma2_metadata(config: Any) -> dict[str, Any]:
    return {"attn_logit_softcapping": float(config.attn_logit_softcapping or 0.0),
            "final_logit_softcapping": float(config.final_logit_softcapping or 0.0), **_windows(config)}


def _gemma2_refusal(config: Any) -> str | None:
    if not config.attn_logit_softcapping or not config.final_logit_softcapping:
        return "llama.cpp's gemma2 always soft-caps the attention scores and the logits; this model does not"
    if "sliding_attention" not in config.layer_types:
        return "llama.cpp's gemma2 needs a sliding-window layer (it asserts one); every layer of this model is global"
    return _attention_scale(config)


def _gemma3_metadata(config: Any) -> dict[str, Any]:
    metadata = {**_windows(config), "rope.freq_base_swa": _rope_theta(config, "sliding_attention")}
    if config.final_logit_softcapping:
        metadata["final_logit_softcapping"] = float(config.final_logit_softcapping)
    return metadata


def _gemma3_refusal(config: Any) -> str | None:
    if config.attn_logit_softcapping:
        return "llama.cpp's gemma3 does not soft-cap the attention scores; this model does"
    sliding = config.rope_parameters.get("sliding_attention", {})
    if sliding.get("rope_type", "default") != "default":
        return f"llama.cpp's gemma3 has no rope scaling for sliding-window layers ({sliding['rope_type']})"
    return _attention_scale(config)


def _gemma2_adapter(family: str, architecture: str, gguf: Gguf) -> ModelAdapter:
    attention, mlp = LLAMA.residuals
    return replace(
        LLAMA, family=family, architectures=(architecture,), norm_kind="rms_plus_one",
        residuals=(replace(attention, output_norms=("post_attention_layernorm",)),
                   Residual(reads={"pre_feedforward_layernorm": mlp.reads["post_attention_layernorm"]},
                            writes=mlp.writes, output_norms=("post_feedforward_layernorm",))),
        mlp=replace(LLAMA.mlp, writes_stream=False), gguf=gguf)


GEMMA2 = _gemma2_adapter("gemma2", "Gemma2ForCausalLM", Gguf("gemma2", norm_shift=1.0, tied_head=True,
                                                             metadata=_gemma2_metadata, refuse=_gemma2_refusal))
GEMMA3 = _gemma2_adapter("gemma3", "Gemma3ForCausalLM", Gguf("gemma3", norm_shift=1.0, tied_head=True,
                                                             metadata=_gemma3_metadata, refuse=_gemma3_refusal))
