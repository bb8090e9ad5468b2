"""Granite (3.x dense): Llama's layout with four scalars. The embedding, attention-score and logit multipliers
are rotation-invariant; the residual multiplier scales what each sublayer writes, so slicing folds it into
the writers (the shortcut rides inside the first writer and must not be scaled) and pruning carries the
stream by running the pruned block again."""

from dataclasses import replace
from typing import Any

from lmslice.adapters.base import Gguf
from lmslice.adapters.llama import LLAMA


def _scales(config: Any) -> dict[str, Any]:
    return {"attention.scale": float(config.attention_multiplier),
            "embedding_scale": float(config.embedding_multiplier),
            "residual_scale": float(config.residual_multiplier), "logit_scale": float(config.logits_scaling)}


GRANITE = replace(LLAMA, family="granite", architectures=("GraniteForCausalLM",), residual_scale="residual_multiplier",
                  mlp=replace(LLAMA.mlp, writes_stream=False), gguf=Gguf("granite", metadata=_scales))
