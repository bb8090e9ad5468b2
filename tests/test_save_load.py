"""A sliced model survives save → load exactly, through lmslice and through plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lmslice
import tiny_models
from lmslice.errors import LmsliceError
from lmslice.slicing import slice_model


@pytest.fixture(scope="module", params=sorted(tiny_models.FACTORIES))
def sliced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           tiny_tokenizer) -> tuple[torch.nn.Module, Path]:
    model = tiny_models.build(request.param, torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False,
                metadata={"calibration": {"source": "random", "samples": 6}})
    out = tmp_path_factory.mktemp(request.param) / "sliced"
    lmslice.save_sliced(model, tiny_tokenizer, out)
    return model, out


def test_reload_gives_bit_identical_logits(sliced) -> None:
    model, out = sliced
    ids, mask = tiny_models.padded_inputs()
    reloaded = lmslice.load(out)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, reloaded(ids, attention_mask=mask).logits)


def test_plain_transformers_loads_it_with_remote_code(sliced) -> None:
    model, out = sliced
    ids, mask = tiny_models.padded_inputs()
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, reloaded(ids, attention_mask=mask).logits)


def test_output_is_safetensors_with_a_descriptive_config(sliced) -> None:
    model, out = sliced
    files = {path.name for path in out.iterdir()}
    assert "model.safetensors" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert not [name for name in out.parent.iterdir() if ".partial" in name.name]
    config = json.loads((out / "config.json").read_text())
    record = config["lmslice"]
    assert record["sparsity"] == 0.25
    assert record["width"] == 48 and record["hidden_size"] == 64
    assert record["calibration"]["samples"] == 6
    assert record["version"] == lmslice.__version__
    assert config["tie_word_embeddings"] is False


def test_generate_works_after_reload(sliced) -> None:
    _, out = sliced
    reloaded = lmslice.load(out)
    ids, _ = tiny_models.padded_inputs()
    generated = reloaded.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    with torch.no_grad():  # greedy generation must follow the model's own argmax
        first = reloaded(ids[:1]).logits[0, -1].argmax()
    assert generated[0, ids.shape[1]] == first


def test_existing_output_is_refused_unless_overwrite(sliced, tiny_tokenizer) -> None:
    model, out = sliced
    with pytest.raises(LmsliceError, match="already exists"):
        lmslice.save_sliced(model, tiny_tokenizer, out)
    lmslice.save_sliced(model, tiny_tokenizer, out, overwrite=True)
    assert (out / "model.safetensors").is_file()


def test_failed_save_leaves_no_directory(tmp_path: Path, tiny_tokenizer) -> None:
    model = tiny_models.build("llama", torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)

    class ExplodingTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        lmslice.save_sliced(model, ExplodingTokenizer(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
