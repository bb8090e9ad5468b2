"""The sliced output keeps the source's precision on disk while slicing computes in float32, and the
summary reports what the cast costs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lmslice
import tiny_models
from lmslice.cli import main
from lmslice.io.models import round_to_dtype, source_dtype
from lmslice.slicing import slice_model


def stored_dtypes(directory: Path) -> set[str]:
    dtypes = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            dtypes |= {handle.get_slice(name).get_dtype() for name in handle.keys()}
    return dtypes


@pytest.fixture(scope="module")
def bfloat16_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("bf16") / "tiny-llama"
    tiny_models.build("llama", torch.bfloat16).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def slice_args(model: Path, out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["slice", str(model), "--sparsity", "0.25", "--calib", str(corpus), "-o", str(out),
            "--calib-samples", "4", "--calib-seqlen", "32", "--json", *extra]


def test_source_dtype_is_what_the_checkpoint_stores(bfloat16_dir: Path, tmp_path: Path) -> None:
    assert source_dtype(bfloat16_dir) == torch.bfloat16
    tiny_models.build("opt", torch.float16).save_pretrained(tmp_path / "half", max_shard_size="100KB")
    assert (tmp_path / "half" / "model.safetensors.index.json").is_file()
    assert source_dtype(tmp_path / "half") == torch.float16


def test_bfloat16_source_is_saved_in_bfloat16_and_the_cast_is_measured(bfloat16_dir: Path, text_file: Path,
                                                                        tmp_path: Path, capsys) -> None:
    out = tmp_path / "sliced"
    assert main(slice_args(bfloat16_dir, out, text_file, "--eval-data", str(text_file), "--eval-seqlen", "64",
                           "--eval-max-windows", "3")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert stored_dtypes(out) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert summary["save_dtype"] == "bfloat16"
    sliced, saved = summary["perplexity_sliced"]["perplexity"], summary["perplexity_saved"]["perplexity"]
    assert saved != sliced and saved == pytest.approx(sliced, rel=0.05)
    # the summary's figure is the saved model's, loaded back in float32
    assert main(["ppl", str(out), "--data", str(text_file), "--seqlen", "64", "--max-windows", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(saved, rel=1e-6)


def test_save_dtype_option_overrides_the_source(bfloat16_dir: Path, text_file: Path, tmp_path: Path,
                                                capsys) -> None:
    assert main(slice_args(bfloat16_dir, tmp_path / "f32", text_file, "--save-dtype", "float32")) == 0
    assert stored_dtypes(tmp_path / "f32") == {"F32"}
    assert main(slice_args(bfloat16_dir, tmp_path / "offloaded", text_file, "--offload")) == 0
    assert stored_dtypes(tmp_path / "offloaded") == {"BF16"}
    assert json.loads((tmp_path / "offloaded" / "config.json").read_text())["dtype"] == "bfloat16"
    assert lmslice.load(tmp_path / "offloaded").dtype == torch.float32  # loads in the dtype asked for


def test_a_model_rounded_to_the_save_dtype_computes_as_its_saved_copy(tmp_path: Path) -> None:
    model = tiny_models.build("phi", torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    lmslice.save_sliced(model, None, tmp_path / "half", dtype=torch.float16)
    round_to_dtype(model, torch.float16)
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        assert torch.equal(lmslice.load(tmp_path / "half")(ids, attention_mask=mask).logits,
                           model(ids, attention_mask=mask).logits)


def test_finetune_keeps_the_precision_of_the_sliced_model_it_trains(bfloat16_dir: Path, text_file: Path,
                                                                   tmp_path: Path, capsys) -> None:
    sliced, tuned = tmp_path / "sliced", tmp_path / "tuned"
    assert main(slice_args(bfloat16_dir, sliced, text_file)) == 0
    assert main(["finetune", str(sliced), "--data", str(text_file), "-o", str(tuned), "--samples", "2",
                 "--seqlen", "32", "--max-steps", "1", "--eval-seqlen", "32", "--eval-max-windows", "1",
                 "--json"]) == 0
    capsys.readouterr()
    assert stored_dtypes(tuned) == {"BF16"}
    assert json.loads((tuned / "config.json").read_text())["dtype"] == "bfloat16"
