"""lmslice's GGUF files run by llama.cpp itself: a tiny pruned model of every exportable family and
architecture, exported float32, gives llama.cpp's logits equal to lmslice's, on whole prompts (up to 40
tokens: past the original context of the rope-scaled cases) and decoding token by token through llama.cpp's
KV cache.

Needs a llama.cpp build (scripts/build-llamacpp; LMSLICE_LLAMACPP to point at another) and the binding of
the same sdist; skipped with the reason where there is none. Tolerance: the logits are O(1) (max |logit|
about 2-5), float32 on both sides and a float32 KV cache; llama.cpp sums in another order (and its
softmax and rope in float32 kernels): measured max |difference| 3.6e-7 (granite) to 2.7e-6 (qwen3 with
YaRN), TOLERANCE 2e-5. Gemma's GELU (gemma, gemma2, gemma3) is looked up in ggml's CPU backend in a
float16 table (GGML_GELU_FP16 in ggml-cpu/vec.h): measured 3.3e-3 to 4.6e-3, GELU_TOLERANCE 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tiny_models
import transformers
from lmslice.errors import LmsliceError
from lmslice.export import standard_model
from lmslice.export.gguf import export_gguf
from lmslice.llamacpp import binding
from lmslice.prune import WidthPlan, prune_model
from lmslice.slicing import slice_model

try:
    llama_cpp = binding()
except LmsliceError as error:
    pytest.skip(str(error), allow_module_level=True)

TOLERANCE = 2e-5
GELU_TOLERANCE = 1e-2


def tolerance(name: str) -> float:
    return GELU_TOLERANCE if name.startswith("gemma") else TOLERANCE
GGML_F32 = 0  # KV cache type: float32, so the cache itself rounds nothing
PER_BLOCK = WidthPlan(0.8, 1, 1, mlp_widths=[96, 64, 112], round_to=8, attention_heads=[4, 2, 1])
UNIFORM = WidthPlan(0.8, 1, 1, mlp_widths=[96, 96, 96], round_to=8)
ATTENTION_FREE = WidthPlan(0.8, 1, 1, mlp_widths=[96, 64, 112], round_to=8, attention_heads=[4, 0, 1])
# every block keeps 3 of its 4 experts, each 32 of its 48 channels: llama.cpp's MoE builders read one experts'
# width and count for the model
EXPERTS = WidthPlan(0.8, 1, 1, mlp_widths=[32, 32, 32], round_to=8, expert_counts=[3, 3, 3])
# block 1 keeps its attention but no MLP (written as one zero channel: deci skips an n_ff = 0 block's
# attention output), block 2 keeps nothing (the identity)
MLP_FREE = WidthPlan(0.8, 1, 1, mlp_widths=[96, 0, 0], round_to=8, attention_heads=[4, 2, 0])


# Llama 3.x's rope scaling with an original context of 32 tokens: the longest prompt (40 tokens) runs past it,
# and head_dim 16 puts the rope's frequencies in all three of its bands (kept, smoothed, divided by 8).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# Models unlike the tiny ones in what llama.cpp must be shown: llama.cpp's llama and qwen2 have no sliding
# window (the export caps the context at it: Ministral's window is the whole context), and its smollm3 leaves
# rope out of every fourth layer.
VARIANTS = {
    "phi4mini": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=2, partial_rotary_factor=0.75,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)),
    "llamalinear": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "qwen3yarn": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "attention_factor": 1.3})),
    "llama3rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters=LLAMA3_ROPE)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=2, sliding_window=None)),
    "ministral": lambda: transformers.MinistralForCausalLM(transformers.MinistralConfig(
        **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=2, head_dim=16, sliding_window=128)),
    # llama.cpp's qwen3moe has experts in every block (no mlp_only_layers) and renormalises the top-k weights
    "qwen3moe": lambda: transformers.Qwen3MoeForCausalLM(tiny_models.eager_experts(transformers.Qwen3MoeConfig(
        **tiny_models.COMMON, **tiny_models.MOE, num_experts=4, moe_intermediate_size=48, head_dim=16,
        norm_topk_prob=True))),
    # llama.cpp's olmoe sizes its key norm to the hidden width: no grouped key/value heads
    "olmoemha": lambda: transformers.OlmoeForCausalLM(tiny_models.eager_experts(transformers.OlmoeConfig(
        **tiny_models.COMMON, **{**tiny_models.MOE, "num_key_value_heads": 4}, num_experts=4, intermediate_size=48,
        pad_token_id=0, eos_token_id=1))),
    "smollm3": lambda: transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
        **{**tiny_models.COMMON, "num_hidden_layers": 4}, intermediate_size=112, num_key_value_heads=2,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def tiny(family: str) -> nn.Module:
    if family in VARIANTS:
        return tiny_models.randomised(VARIANTS[family], torch.float32)
    return tiny_models.build(family, torch.float32)


def case(name: str) -> nn.Module:
    family, mode = name.split("-")
    model = tiny(family)
    if mode == "standard":
        result = slice_model(model, tiny_models.random_batches(), 0.25, rotation="shared", progress=False)
        return standard_model(model, head_input=result.head_input)
    plans = {"perblock": PER_BLOCK, "uniform": UNIFORM, "attentionfree": ATTENTION_FREE, "mlpfree": MLP_FREE,
             "experts": EXPERTS}
    plan = plans[mode]
    blocks = model.config.num_hidden_layers
    if mode == "uniform" and blocks != len(plan.mlp_widths):
        plan = WidthPlan(0.8, 1, 1, mlp_widths=[96] * blocks, round_to=8)
    prune_model(model, tiny_models.random_batches(), plan)
    return model


CASES = ["llama-perblock", "mistral-perblock", "qwen2-perblock", "llama-attentionfree", "llama-mlpfree",
         "llama-uniform", "qwen2-uniform", "gemma-uniform", "llama-standard", "llama3rope-uniform",
         "llama3rope-perblock", "ministral-uniform", "qwen3-uniform", "qwen3-standard", "smollm3-uniform",
         "granite-uniform", "granite-standard", "olmo2-uniform", "gemma2-uniform", "gemma3-uniform",
         "llamalinear-uniform", "qwen3yarn-uniform", "phi3-uniform", "phi4mini-uniform", "mixtral-experts",
         "qwen3moe-experts", "olmoemha-experts"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, tuple[nn.Module, Path]]:
    directory = tmp_path_factory.mktemp("gguf")
    models = {}
    for name in CASES:
        model = case(name)
        export_gguf(model, directory / f"{name}.gguf", tiny_tokenizer, outtype="f32")
        models[name] = model, directory / f"{name}.gguf"
    return models


def open_llama(path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2,
                           type_k=GGML_F32, type_v=GGML_F32, verbose=False)


def reference(model: nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


PROMPTS = [[int(token) for token in torch.randint(0, tiny_models.VOCAB, (length,),
                                                  generator=torch.Generator().manual_seed(length))]
           for length in (5, 11, 24, 40)]


@pytest.mark.parametrize("name", CASES)
def test_llamacpp_logits_equal_lmslices(name: str, exported) -> None:
    model, path = exported[name]
    llm = open_llama(path)
    try:
        for prompt in PROMPTS:
            llm.reset()
            llm.eval(prompt)
            ours = np.asarray(llm.scores[:len(prompt)], dtype=np.float64)
            np.testing.assert_allclose(ours, reference(model, prompt), rtol=0, atol=tolerance(name))
    finally:
        llm.close()


def test_llama3_rope_scaling_matters_on_the_prompts() -> None:
    """Guards the llama3rope cases: the same model with unscaled rope gives other logits past the original
    context, so llama.cpp matching it needs the rope_freqs tensor."""
    model = tiny("llama3rope")
    unscaled = tiny_models.randomised(lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=2, tie_word_embeddings=True)), torch.float32)
    unscaled.load_state_dict(model.state_dict())
    prompt = PROMPTS[-1]
    assert np.abs(reference(unscaled, prompt) - reference(model, prompt))[32:].max() > 100 * TOLERANCE


@pytest.mark.parametrize("name", ["llama-perblock", "llama-mlpfree", "qwen2-perblock", "gemma-uniform",
                                  "llama3rope-perblock", "gemma3-uniform", "olmo2-uniform", "mixtral-experts",
                                  "qwen3moe-experts", "olmoemha-experts"])
def test_llamacpp_decodes_through_its_kv_cache_as_lmslice_does(name: str, exported) -> None:
    model, path = exported[name]
    llm = open_llama(path)
    try:
        sequence = list(PROMPTS[0])
        llm.reset()
        llm.eval(sequence)
        for _ in range(12):  # greedy, one token per llama.cpp call: every step reads the cache
            sequence.append(int(np.argmax(llm.scores[len(sequence) - 1])))
            llm.eval(sequence[-1:])
        ours = np.asarray(llm.scores[:len(sequence)], dtype=np.float64)
    finally:
        llm.close()
    expected = reference(model, sequence)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=tolerance(name))
    assert sequence[len(PROMPTS[0]):] == [int(token) for token in expected[len(PROMPTS[0]) - 1:-1].argmax(-1)]


def test_bench_times_gguf_files_in_llamacpp(exported, capsys) -> None:
    from lmslice.cli import main

    dense, sliced = str(exported["llama-uniform"][1]), str(exported["llama-perblock"][1])
    assert main(["bench", dense, sliced, "--runtime", "llamacpp", "--prompt-len", "8", "--new-tokens", "4",
                 "--repeats", "2", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dense"]["prompt"] > 0 and report["sliced"]["generation"] > 0
    assert report["bound"]["generation"] == pytest.approx(Path(dense).stat().st_size / Path(sliced).stat().st_size)
