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
from lmslice.pipeline import Slice, SliceConfig, compress
from lmslice.slicing import slice_model
from test_adapters import SLICEABLE


@pytest.fixture(scope="module", params=SLICEABLE)
def sliced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           tiny_tokenizer) -> tuple[torch.nn.Module, Path]:
    model = tiny_models.build(request.param, torch.float32)
    compress(model, tiny_models.random_batches(), [Slice(SliceConfig(0.25))], progress=False,
             calibration={"source": "random", "samples": 6})
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


def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool,
           new_tokens: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of a left-padded batch: the tokens, and the logits each step chose from."""
    output = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, use_cache=use_cache, pad_token_id=0, output_logits=True,
                            return_dict_in_generate=True)
    assert output.sequences.shape == (ids.shape[0], ids.shape[1] + new_tokens)
    return output.sequences, torch.stack(output.logits, dim=1)


def test_generate_after_reload_decodes_from_the_cache_as_without_it(sliced) -> None:
    """Tokens after the first come from the KV cache: 12 of them, against full recomputation."""
    _, out = sliced
    reloaded = lmslice.load(out)
    ids, mask = tiny_models.padded_inputs()
    cached_tokens, cached_logits = greedy(reloaded, ids, mask, use_cache=True)
    tokens, logits = greedy(reloaded, ids, mask, use_cache=False)
    assert torch.equal(cached_tokens, tokens)
    assert (cached_logits - logits).abs().max() <= 1e-4


@pytest.mark.parametrize("slice_head", [False, True], ids=["full-head", "sliced-head"])
@pytest.mark.parametrize("family", SLICEABLE)
def test_cached_decode_equals_recomputation(family: str, slice_head: bool) -> None:
    model = tiny_models.build(family, torch.float64)
    slice_model(model, tiny_models.random_batches(), 0.25, slice_head=slice_head, progress=False)
    ids, mask = tiny_models.padded_inputs()
    cached_tokens, cached_logits = greedy(model, ids, mask, use_cache=True)
    tokens, logits = greedy(model, ids, mask, use_cache=False)
    assert torch.equal(cached_tokens, tokens)
    assert (cached_logits - logits).abs().max() <= 1e-9


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


def stored_bytes(directory: Path) -> int:
    """The bytes of tensor data in the directory's safetensors files (each file less its JSON header, which
    in these tiny models is a few percent of the file)."""
    total = 0
    for path in directory.glob("*.safetensors"):
        with path.open("rb") as handle:
            header = int.from_bytes(handle.read(8), "little")
        total += path.stat().st_size - 8 - header
    return total


def cut(family: str, how: str) -> torch.nn.Module:
    """A tiny model of `family` cut as `how` says: pruned (its tie kept where it has one), sliced (the head
    untied), or sliced with one basis and written in its own architecture with a tied head."""
    from lmslice.pipeline import Prune, PruneConfig, StandardFormat, StandardFormatConfig

    steps = {"pruned": [Prune(PruneConfig(0.8))],
             "sliced": [Slice(SliceConfig(0.25))],
             "standard, tied": [Slice(SliceConfig(0.25, rotation="shared")),
                                StandardFormat(StandardFormatConfig(True))]}
    return compress(tiny_models.build(family, torch.float32), tiny_models.random_batches(), steps[how],
                    progress=False).model


@pytest.mark.parametrize("family, how, tied", [("llama", "pruned", True), ("qwen2", "pruned", True),
                                               ("gemma", "pruned", True), ("mistral", "pruned", False),
                                               ("llama", "sliced", False), ("llama", "standard, tied", True)])
def test_every_tensor_is_written_once_and_reloads_exactly(family: str, how: str, tied: bool, tmp_path: Path) -> None:
    model = cut(family, how)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (head is embedding) == tied
    for dtype in (torch.float32, torch.float16):
        out = lmslice.save_sliced(model, None, tmp_path / str(dtype), dtype=dtype)
        assert stored_bytes(out) == pytest.approx(lmslice.count_parameters(model) * dtype.itemsize, rel=0.01)
    reloaded = lmslice.load(tmp_path / str(torch.float32))
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, reloaded(ids, attention_mask=mask).logits)


def test_offloaded_and_finetuned_outputs_hold_every_tensor_once(tmp_path: Path, tiny_tokenizer,
                                                                text_file: Path) -> None:
    from lmslice.cli import main

    dense = tmp_path / "dense"
    # tied, stored in float16: the outputs are written in it, computed in float32
    tiny_models.build("llama", torch.float16).save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    calibration = ["--calib", str(text_file), "--calib-samples", "4", "--calib-seqlen", "32", "--json"]
    commands = {"pruned": ["slice", str(dense), "--target-params", "0.8", *calibration],
                "offloaded": ["slice", str(dense), "--sparsity", "0.25", "--offload", *calibration],
                "finetuned": ["finetune", str(tmp_path / "pruned"), "--data", str(text_file), "--samples", "2",
                              "--seqlen", "32", "--eval-seqlen", "32", "--eval-max-windows", "1", "--json"]}
    for name, command in commands.items():
        assert main([*command, "-o", str(tmp_path / name)]) == 0
        model = lmslice.load(tmp_path / name)
        assert stored_bytes(tmp_path / name) == pytest.approx(lmslice.count_parameters(model) * 2, rel=0.01)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
