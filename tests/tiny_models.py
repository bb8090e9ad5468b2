"""Tiny randomly initialised models of every supported family, built from configs (no downloads).

Norm scales and shifts and all biases are randomised so that fusing them is really exercised.
Add a family: add a factory to FACTORIES.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from torch import nn

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128)


def llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **COMMON, intermediate_size=112, num_key_value_heads=2, tie_word_embeddings=True))


def opt() -> nn.Module:
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    ffn_dim=112, max_position_embeddings=128, word_embed_proj_dim=64,
                                    dropout=0.0, attention_dropout=0.0)
    return transformers.OPTForCausalLM(config)


def mistral() -> nn.Module:
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        **COMMON, intermediate_size=112, num_key_value_heads=2, sliding_window=8))


def qwen2() -> nn.Module:
    # layer 0 global, layers 1-2 within a window of 8 (max_window_layers): blocks get different masks
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **COMMON, intermediate_size=112, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=8, max_window_layers=1))


def gemma() -> nn.Module:
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(
        **COMMON, intermediate_size=112, num_key_value_heads=1, head_dim=16))


def phi() -> nn.Module:
    return transformers.PhiForCausalLM(transformers.PhiConfig(**COMMON, intermediate_size=112))


def phi3() -> nn.Module:
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **COMMON, intermediate_size=112, num_key_value_heads=2, pad_token_id=0, eos_token_id=1))


def qwen3() -> nn.Module:
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **COMMON, intermediate_size=112, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True))


def smollm3() -> nn.Module:
    # rope left out of every second layer (layer 1 of 3): llama.cpp's own pattern is every fourth
    return transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
        **COMMON, intermediate_size=112, num_key_value_heads=2, no_rope_layer_interval=2, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def granite() -> nn.Module:
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(
        **COMMON, intermediate_size=112, num_key_value_heads=2, tie_word_embeddings=True, embedding_multiplier=6.0,
        residual_multiplier=0.4, attention_multiplier=0.3, logits_scaling=4.0))


def ministral() -> nn.Module:
    return transformers.MinistralForCausalLM(transformers.MinistralConfig(
        **COMMON, intermediate_size=112, num_key_value_heads=2, head_dim=16, sliding_window=8))


def ministral3() -> nn.Module:
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}
    return transformers.Ministral3ForCausalLM(transformers.Ministral3Config(
        **COMMON, intermediate_size=112, num_key_value_heads=2, head_dim=16, rope_parameters=rope))


def gemma2() -> nn.Module:
    # Gemma 2's own alternation (sliding, global, sliding), the window 8 over the tests' 20-24 tokens
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **COMMON, intermediate_size=112, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8))


def gemma3() -> nn.Module:
    # sliding layers before a global one, as Gemma 3's 5:1, with their own rope base (10000, the global 1e6)
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **COMMON, intermediate_size=112, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"]))


def olmo2() -> nn.Module:
    return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        **COMMON, intermediate_size=112, num_key_value_heads=2, pad_token_id=0, eos_token_id=1))


def gpt_neox(parallel: bool = True) -> nn.Module:
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        **COMMON, intermediate_size=112, use_parallel_residual=parallel))


FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "gemma": gemma,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "qwen3": qwen3,
    "smollm3": smollm3,
    "granite": granite,
    "ministral": ministral,
    "ministral3": ministral3,
    "olmo2": olmo2,
    "opt": opt,
    "phi": phi,
    "phi3": phi3,
    "gpt_neox": gpt_neox,
    "gpt_neox_sequential": lambda: gpt_neox(parallel=False),
}


MOE = dict(num_experts_per_tok=2, num_key_value_heads=2)


def eager_experts(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """transformers' default experts forward (grouped_mm) has no float64 kernel on the CPU: the loop over
    the experts has."""
    config._experts_implementation = "eager"
    return config


def qwen3_moe() -> nn.Module:
    # block 1 keeps a dense MLP (mlp_only_layers), as Qwen3-MoE configs may
    return transformers.Qwen3MoeForCausalLM(eager_experts(transformers.Qwen3MoeConfig(
        **COMMON, **MOE, num_experts=4, moe_intermediate_size=48, intermediate_size=112, mlp_only_layers=[1],
        head_dim=16, norm_topk_prob=True)))


def mixtral() -> nn.Module:
    return transformers.MixtralForCausalLM(eager_experts(transformers.MixtralConfig(
        **COMMON, **MOE, num_local_experts=4, intermediate_size=48)))


def olmoe() -> nn.Module:
    return transformers.OlmoeForCausalLM(eager_experts(transformers.OlmoeConfig(
        **COMMON, **MOE, num_experts=4, intermediate_size=48, pad_token_id=0, eos_token_id=1)))


# Mixtures of experts: kept apart from FACTORIES, whose tests slice (refused for them) and check dense MLPs;
# tests/test_moe.py covers them.
MOE_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "qwen3_moe": qwen3_moe,
    "mixtral": mixtral,
    "olmoe": olmoe,
}


def build(family: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    return randomised({**FACTORIES, **MOE_FACTORIES}[family], dtype, seed)


@torch.no_grad()
def randomised(factory: Callable[[], nn.Module], dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """The factory's model with random weights, its norm scales and shifts and biases randomised too."""
    torch.manual_seed(seed)
    model = factory().to(dtype).eval()
    for name, parameter in model.named_parameters():
        if parameter.dim() == 1:  # norm scales, norm shifts and biases
            base = 1.0 if name.endswith("weight") else 0.0
            parameter.copy_(base + 0.2 * torch.randn_like(parameter))
        else:
            parameter.normal_(0, 0.08)
    return model


def random_batches(count: int = 3, batch_size: int = 2, seqlen: int = 24, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (batch_size, seqlen), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def padded_inputs(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of two rows, the second left-padded by five tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask
