"""lmslice's GGUF files run by llama.cpp itself: a tiny pruned model of every exportable family, exported
float32, gives llama.cpp's logits equal to lmslice's, on whole prompts and decoding token by token through
llama.cpp's KV cache.

Needs a llama.cpp build (scripts/build-llamacpp; LMSLICE_LLAMACPP to point at another) and the binding of
the same sdist; skipped with the reason where there is none. Tolerance: the logits are O(1) (max |logit|
about 2-5), float32 on both sides and a float32 KV cache; llama.cpp sums in another order (and its
softmax and rope in float32 kernels): measured max |difference| 1.1e-6 to 2.0e-6, TOLERANCE 2e-5. Gemma's
GELU is looked up in ggml's CPU backend in a float16 table (GGML_GELU_FP16 in ggml-cpu/vec.h): measured
3.4e-3, GELU_TOLERANCE 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tiny_models
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
# block 1 keeps its attention but no MLP (written as one zero channel: deci skips an n_ff = 0 block's
# attention output), block 2 keeps nothing (the identity)
MLP_FREE = WidthPlan(0.8, 1, 1, mlp_widths=[96, 0, 0], round_to=8, attention_heads=[4, 2, 0])


def tiny(family: str) -> nn.Module:
    model = tiny_models.build(family, torch.float32)
    if family == "mistral":  # llama.cpp's llama has no sliding window; the export caps the context at it
        model.config.sliding_window = None
    return model


def case(name: str) -> nn.Module:
    family, mode = name.split("-")
    model = tiny(family)
    if mode == "standard":
        result = slice_model(model, tiny_models.random_batches(), 0.25, rotation="shared", progress=False)
        return standard_model(model, head_input=result.head_input)
    plans = {"perblock": PER_BLOCK, "uniform": UNIFORM, "attentionfree": ATTENTION_FREE, "mlpfree": MLP_FREE}
    prune_model(model, tiny_models.random_batches(), plans[mode])
    return model


CASES = ["llama-perblock", "mistral-perblock", "qwen2-perblock", "llama-attentionfree", "llama-mlpfree",
         "llama-uniform", "qwen2-uniform", "gemma-uniform", "llama-standard"]


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
           for length in (5, 11, 24)]


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


@pytest.mark.parametrize("name", ["llama-perblock", "llama-mlpfree", "qwen2-perblock", "gemma-uniform"])
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
