"""`compress --target-size`: a budget in bytes of the model file, in the format it is measured in.

The files lmslice writes (safetensors in the save dtype, a GGUF f16) are at most the target and within a
few percent of it; the sizes of llama-quantize's files are estimated within a few percent of what
llama-quantize really writes (when a llama.cpp build is there); a size pruning cannot reach is refused.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import transformers

from lmslice.budget import file_bytes, parse_size
from lmslice.errors import LmsliceError
from lmslice.estimate import Speed
from lmslice.export.gguf import export_gguf, gguf_vocabulary
from tests.test_cli import run_cli
from tests.tiny_models import VOCAB

# How far under the target a written file may land: the plan misses its budget by less than a rounding
# step of channels in every block, a few percent of a tiny model.
UNDER_TARGET = 0.05
# How close an estimate of a llama-quantize file is to the file (only metadata sizes are approximate).
ESTIMATE_TOLERANCE = 0.01


def test_sizes_are_read_as_people_write_them() -> None:
    assert parse_size("300MB") == 300_000_000
    assert parse_size("4GB") == 4_000_000_000
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("1.5g") == 1_500_000_000
    assert parse_size("123456") == 123456
    for bad in ("4 apples", "", "-3GB", "0"):
        with pytest.raises(LmsliceError, match="not a size"):
            parse_size(bad)


def saved_model(tmp_path: Path, tokenizer: transformers.PreTrainedTokenizerBase, tied: bool,
                name: str = "dense") -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=256, max_position_embeddings=128,
                                      tie_word_embeddings=tied)
    path = tmp_path / name
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(("tied", "file_format", "save_dtype"), [(True, "safetensors", "float16"),
                                                               (False, "safetensors", "float32"),
                                                               (True, "gguf-f16", "float16"),
                                                               (False, "gguf-f16", "float16")],
                         ids=["tied-float16", "untied-float32", "tied-gguf", "untied-gguf"])
def test_the_written_files_are_within_the_target_size(capsys, tmp_path: Path, tiny_tokenizer, text_file: Path,
                                                      tied: bool, file_format: str, save_dtype: str) -> None:
    dense = saved_model(tmp_path, tiny_tokenizer, tied)
    if file_format == "safetensors":
        dense_bytes = (dense / "model.safetensors").stat().st_size * {"float16": 2, "float32": 4}[save_dtype] / 4
    else:
        assert run_cli(capsys, "export", dense, "-o", tmp_path / "dense.gguf")[0] == 0
        dense_bytes = (tmp_path / "dense.gguf").stat().st_size
    target = int(0.7 * dense_bytes)
    out, gguf = tmp_path / "out", tmp_path / "out.gguf"
    code, stdout, stderr = run_cli(capsys, "compress", dense, "--target-size", str(target), "--target-format",
                                   file_format, "--save-dtype", save_dtype, "--calib", text_file, "--calib-samples",
                                   "4", "--calib-seqlen", "32", "--align", "none", "-o", out, "--gguf", gguf)
    assert code == 0, stderr
    written = (out / "model.safetensors" if file_format == "safetensors" else gguf).stat().st_size
    assert (1 - UNDER_TARGET) * target <= written <= target, (written, target)
    assert "file size" in stdout


def test_the_dry_run_shows_the_size_it_reaches(capsys, tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    # the device's speed only times the plan, which this test does not read: not measured on a busy machine
    monkeypatch.setattr("lmslice.cli.slice_command.measure_speed", lambda device: Speed(*[1e10] * 5))
    dense = saved_model(tmp_path, tiny_tokenizer, tied=True)
    code, stdout, stderr = run_cli(capsys, "compress", dense, "--target-size", "150kB", "--target-format",
                                   "gguf-q8_0", "--align", "none", "--dry-run", "-o", tmp_path / "out")
    assert code == 0, stderr
    assert "file size      about 150.0 kB as gguf-q8_0 (target 150.0 kB" in stdout, stdout


def test_a_size_pruning_cannot_reach_is_refused_before_any_work(capsys, tmp_path: Path, tiny_tokenizer,
                                                              text_file: Path) -> None:
    dense = saved_model(tmp_path, tiny_tokenizer, tied=True)
    capsys.readouterr()
    code, stdout, stderr = run_cli(capsys, "compress", dense, "--target-size", "50kB", "--calib", text_file,
                                   "-o", tmp_path / "out")
    assert code == 2 and not stdout
    error = stderr.splitlines()[-1]  # after the weights' loading bar
    assert error.startswith("lmslice: error: --target-size 50.0 kB is below what pruning MLP channels")
    assert "the smallest safetensors file is about" in error
    assert not (tmp_path / "out").exists()


def test_a_size_the_dense_file_meets_is_refused(capsys, tmp_path: Path, tiny_tokenizer) -> None:
    dense = saved_model(tmp_path, tiny_tokenizer, tied=True)
    capsys.readouterr()
    code, _, stderr = run_cli(capsys, "compress", dense, "--target-size", "1GB", "--dry-run", "-o", tmp_path / "out")
    assert code == 2
    assert stderr.splitlines()[-1].startswith("lmslice: error: --target-size 1.00 GB: the dense model's safetensors "
                                              "file is already about")


@pytest.mark.parametrize("flags", [["--keep", "0.8"], ["--sparsity", "0.2"]])
def test_one_budget_at_a_time(capsys, tmp_path: Path, flags: list[str]) -> None:
    code, _, stderr = run_cli(capsys, "compress", "M", "--target-size", "1GB", *flags, "-o", tmp_path / "out")
    assert code == 2
    assert stderr == ("lmslice: error: give one budget: --target-size (the bytes of the model file) or "
                      "--keep/--sparsity\n")


def llama_quantize() -> Path:
    from lmslice.llamacpp import tool

    try:
        return tool("llama-quantize")
    except LmsliceError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("mixture", ["Q4_K_M", "Q8_0", "Q5_K_M", "Q5_K_S", "Q4_K_S", "Q6_K", "Q4_0"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_quantised_sizes_match_llama_quantize(tmp_path: Path, tiny_tokenizer, mixture: str, tied: bool) -> None:
    """A model whose rows divide into 256-blocks (the K-quants' own types) and one whose MLP rows do not
    (llama-quantize's fallbacks), eight blocks (Q4_K_M's layer rules pick blocks 0, 3, 6 and 7)."""
    quantize = llama_quantize()
    for intermediate in (512, 320):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=intermediate, max_position_embeddings=128, tie_word_embeddings=tied))
        f16, quantised = tmp_path / f"{intermediate}.f16.gguf", tmp_path / f"{intermediate}.{mixture}.gguf"
        export_gguf(model, f16, tiny_tokenizer)
        subprocess.run([str(quantize), str(f16), str(quantised), mixture], check=True, capture_output=True)
        vocabulary = gguf_vocabulary(tiny_tokenizer, VOCAB, None)
        for path, file_format in ((f16, "gguf-f16"), (quantised, f"gguf-{mixture.lower()}")):
            estimate, _ = file_bytes(model, file_format, save_dtype=torch.float16, vocabulary=vocabulary)
            real = path.stat().st_size
            assert abs(estimate - real) <= ESTIMATE_TOLERANCE * real, (file_format, intermediate, estimate, real)


def test_a_pruned_model_quantised_by_llama_quantize_is_within_the_target(capsys, tmp_path: Path, tiny_tokenizer,
                                                                         text_file: Path) -> None:
    """The whole path: --target-size of a Q4_K_M file, the GGUF lmslice writes, quantised by llama-quantize."""
    quantize = llama_quantize()
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=1024, max_position_embeddings=128, tie_word_embeddings=True)).save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    target = 4_000_000  # the dense model's Q4_K_M file is 4.8 MB
    gguf, quantised = tmp_path / "pruned.gguf", tmp_path / "pruned.Q4_K_M.gguf"
    code, stdout, stderr = run_cli(capsys, "compress", dense, "--target-size", str(target), "--target-format",
                                   "gguf-q4_k_m", "--calib", text_file, "--calib-samples", "4", "--calib-seqlen", "32",
                                   "--prune-criterion", "energy", "-o", tmp_path / "pruned", "--gguf", gguf)
    assert code == 0, stderr
    subprocess.run([str(quantize), str(gguf), str(quantised), "Q4_K_M"], check=True, capture_output=True)
    assert (1 - UNDER_TARGET) * target <= quantised.stat().st_size <= target, (quantised.stat().st_size, stdout)
