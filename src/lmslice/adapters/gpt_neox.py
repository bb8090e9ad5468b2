"""GPT-NeoX / Pythia: LayerNorm; two norms read the block input in parallel, or in sequence when
use_parallel_residual is False (a second adapter for the same architecture)."""

from collections.abc import Callable
from typing import Any

from lmslice.adapters.base import Attention, Mlp, ModelAdapter, Residual

ATTENTION = Residual(reads={"input_layernorm": ("attention.query_key_value",)}, writes=("attention.dense",))
MLP = Residual(reads={"post_attention_layernorm": ("mlp.dense_h_to_4h",)}, writes=("mlp.dense_4h_to_h",))


def _requires_parallel(parallel: bool) -> Callable[[Any], str | None]:
    def unsupported(config: Any) -> str | None:
        if bool(config.use_parallel_residual) == parallel:
            return None
        return f"use_parallel_residual={config.use_parallel_residual} is not this adapter's block type"
    return unsupported


def _adapter(family: str, residuals: tuple[Residual, ...], parallel: bool) -> ModelAdapter:
    return ModelAdapter(family=family, architectures=("GPTNeoXForCausalLM",), embeddings=("gpt_neox.embed_in",),
                        blocks="gpt_neox.layers", residuals=residuals, final_norm="gpt_neox.final_layer_norm",
                        head="lm_head", norm_kind="layer", unsupported=_requires_parallel(parallel),
                        mlp=Mlp(producers=("mlp.dense_h_to_4h",), consumer="mlp.dense_4h_to_h"),
                        # multi-head, query, key and value of each head side by side in one projection
                        attention=Attention(module="attention", queries="attention.query_key_value",
                                            output="attention.dense", fused=True, head_dim_attribute="head_size",
                                            groups_attribute=None))


GPT_NEOX = _adapter("gpt_neox", (Residual(reads={**ATTENTION.reads, **MLP.reads},
                                          writes=ATTENTION.writes + MLP.writes),), parallel=True)
GPT_NEOX_SEQUENTIAL = _adapter("gpt_neox_sequential", (ATTENTION, MLP), parallel=False)
