"""The standard format: one basis for the whole stream, written as the family's own architecture."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lmslice
import tiny_models
from lmslice.bench import count_flops
from lmslice.cli import main
from lmslice.errors import LmsliceError
from lmslice.export import standard_model
from lmslice.slicing import slice_model
from test_adapters import confine_stream_before_last_write
from test_invariance import exact_rms_norms  # noqa: F401 - autouse: exact float64 reference norms

RMS_FAMILIES = ["gemma", "granite", "llama", "ministral", "ministral3", "mistral", "phi3", "qwen2", "qwen3", "smollm3"]


@torch.no_grad()
def with_tying(model: nn.Module, tied: bool) -> nn.Module:
    """The tiny model with its head tied to the embedding, or untied with a head of its own."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied:
        head.weight = embedding.weight
    elif head.weight is embedding.weight:
        head.weight = nn.Parameter(torch.randn_like(embedding.weight) * 0.08)
    model.config.tie_word_embeddings = tied
    return model


def logits(model: nn.Module) -> torch.Tensor:
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def sliced_standard(dense: nn.Module, sparsity: float, **options) -> nn.Module:
    model = copy.deepcopy(dense)
    result = slice_model(model, tiny_models.random_batches(), sparsity, rotation="shared", progress=False,
                         **options)
    return standard_model(model, head_input=result.head_input)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_standard_at_sparsity_zero_keeps_logits(family: str, tied: bool) -> None:
    dense = with_tying(tiny_models.build(family), tied)
    standard = sliced_standard(dense, 0.0)
    assert type(standard) is type(dense)
    assert not any("Shortcut" in type(module).__name__ for module in standard.modules())
    difference = (logits(standard) - logits(dense)).abs().max()
    assert difference <= 1e-8, f"max |Δlogit| = {difference:.3g}"


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_standard_is_exact_when_the_stream_fits_the_kept_width(family: str) -> None:
    """What sparsity 0 cannot see: epsilon and scale of norms over D' features, head_dim kept while
    hidden_size shrinks, Gemma's √hidden_size embedding multiplier."""
    dense = with_tying(tiny_models.build(family), False)
    confine_stream_before_last_write(dense, spare_last_write=False)  # one basis of 48 holds the stream
    standard = sliced_standard(dense, 0.25, centre_embeddings=False)  # centring leaves the subspace
    assert standard.config.hidden_size == 48 and standard.get_input_embeddings().weight.shape[1] == 48
    difference = (logits(standard) - logits(dense)).abs().max()
    assert difference <= 1e-5, f"max |Δlogit| = {difference:.3g}"


def test_the_exactness_test_can_fail() -> None:
    """Guards the test above: with the norms' epsilon left at ε (not ε·D/D') the logits move."""
    dense = with_tying(tiny_models.build("llama"), False)
    confine_stream_before_last_write(dense, spare_last_write=False)  # one basis of 48 holds the stream
    standard = sliced_standard(dense, 0.25, centre_embeddings=False)
    for module in standard.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon *= 48 / 64
    assert (logits(standard) - logits(dense)).abs().max() > 1e-5


def test_tied_head_is_close_and_untied_is_exact() -> None:
    """A tied source kept tied shares one matrix (fewer parameters), at a bounded cost in logits."""
    dense = with_tying(tiny_models.build("llama"), True)
    model = copy.deepcopy(dense)
    result = slice_model(model, tiny_models.random_batches(), 0.0, rotation="shared", progress=False)
    untied = standard_model(copy.deepcopy(model))
    tied = standard_model(model, tie_embeddings=True, head_input=result.head_input)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert lmslice.slicing.count_parameters(tied) == lmslice.slicing.count_parameters(untied) - 300 * 64
    reference = logits(dense)
    error = (logits(tied) - reference).norm() / reference.norm()
    assert (logits(untied) - reference).abs().max() <= 1e-8
    assert 0 < error < 0.5


def test_layer_norm_families_are_refused_in_one_line() -> None:
    model = tiny_models.build("opt")
    slice_model(model, tiny_models.random_batches(), 0.25, rotation="shared", progress=False)
    with pytest.raises(LmsliceError, match="opt cannot be written in the standard format") as error:
        standard_model(model)
    assert "\n" not in str(error.value)


def test_per_block_slices_are_refused() -> None:
    model = tiny_models.build("llama")
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    with pytest.raises(LmsliceError, match="one basis for the whole stream"):
        standard_model(model)


@pytest.fixture(scope="module")
def standard_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, tuple[Path, torch.Tensor]]:
    """Standard outputs (float32, 25%) of a tied Llama kept tied and a Gemma, with lmslice's logits."""
    saved = {}
    for family, tie in (("llama", True), ("gemma", False)):
        model = tiny_models.build(family, torch.float32)
        result = slice_model(model, tiny_models.random_batches(), 0.25, rotation="shared", progress=False)
        model = standard_model(model, tie_embeddings=tie, head_input=result.head_input)
        out = lmslice.save_sliced(model, tiny_tokenizer, tmp_path_factory.mktemp(family) / "standard")
        saved[family] = (out, logits(model))
    return saved


def test_plain_transformers_without_lmslice_loads_it(standard_dirs, tmp_path: Path) -> None:
    script = """
import sys
sys.modules["lmslice"] = None  # any import of lmslice now fails
import torch
from transformers import AutoModelForCausalLM
ids, mask, *dirs = torch.load(sys.argv[1])
out = {}
for path in dirs:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out[path] = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
torch.save(out, sys.argv[2])
"""
    ids, mask = tiny_models.padded_inputs()
    dirs = [str(path) for path, _ in standard_dirs.values()]
    torch.save([ids, mask, *dirs], tmp_path / "inputs.pt")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script, tmp_path / "inputs.pt", tmp_path / "logits.pt"], check=True,
                   env=environment, cwd=tmp_path)
    loaded = torch.load(tmp_path / "logits.pt")
    for path, expected in standard_dirs.values():
        assert not (path / "modeling_lmslice.py").exists()
        torch.testing.assert_close(loaded[str(path)], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_config_says_what_the_weights_need(standard_dirs, family: str) -> None:
    path, _ = standard_dirs[family]
    config = json.loads((path / "config.json").read_text())
    weights = load_file(path / "model.safetensors")
    dense = tiny_models.build(family).config
    assert "auto_map" not in config
    assert config["hidden_size"] == weights["model.embed_tokens.weight"].shape[1] == 48
    q_rows, q_columns = weights["model.layers.0.self_attn.q_proj.weight"].shape
    assert config["head_dim"] * config["num_attention_heads"] == q_rows and q_columns == 48
    assert config["head_dim"] == 16  # not 48 // 4: attention keeps its width
    assert config["rms_norm_eps"] == pytest.approx(dense.rms_norm_eps * 64 / 48, rel=1e-12)
    assert config["tie_word_embeddings"] == ("lm_head.weight" not in weights)
    assert config["lmslice"]["export"] == "standard"


def test_cli_slice_standard_then_bench_and_finetune(capsys, tiny_tokenizer, text_file: Path, tmp_path: Path) -> None:
    dense_dir = tmp_path / "dense"
    tiny_models.build("llama", torch.float32).save_pretrained(dense_dir)
    tiny_tokenizer.save_pretrained(dense_dir)
    out = tmp_path / "standard"
    assert main(["slice", str(dense_dir), "--sparsity", "0.25", "--calib", str(text_file), "-o", str(out),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--format", "standard", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "standard" and summary["width"] == summary["head_width"] == 48
    model = lmslice.load(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 48

    flops = count_flops(model, 16)
    assert flops.shortcut == 0
    assert flops.attention == 4.0 * 3 * 4 * 16 * 16  # layers · heads · head_dim · context: head_dim stays 16

    assert main(["bench", str(dense_dir), str(out), "--seqlen", "16", "--max-batch", "1", "--repeats", "1",
                 "--prompt-len", "4", "--new-tokens", "2", "--threads", "1", "--json"]) == 0
    ratios = json.loads(capsys.readouterr().out)["ratios"]
    assert 0 < ratios["flops"] < 1 and ratios["parameters"] < 1

    tuned = tmp_path / "tuned"
    assert main(["finetune", str(out), "--data", str(text_file), "-o", str(tuned), "--samples", "2", "--seqlen",
                 "32", "--max-steps", "2", "--eval-seqlen", "32", "--eval-max-windows", "2", "--json"]) == 0
    capsys.readouterr()
    assert "auto_map" not in json.loads((tuned / "config.json").read_text())
    assert not (tuned / "modeling_lmslice.py").exists()
    assert type(lmslice.load(tuned)).__name__ == "LlamaForCausalLM"


def test_cli_refuses_layer_norm_families_before_slicing(capsys, tiny_tokenizer, text_file: Path,
                                                        tmp_path: Path) -> None:
    dense_dir = tmp_path / "opt"
    tiny_models.build("opt", torch.float32).save_pretrained(dense_dir)
    tiny_tokenizer.save_pretrained(dense_dir)
    capsys.readouterr()
    code = main(["slice", str(dense_dir), "--sparsity", "0.25", "--calib", str(text_file), "-o",
                 str(tmp_path / "out"), "--format", "standard"])
    error = capsys.readouterr().err
    last_line = error.strip().splitlines()[-1]  # after the loading progress bar
    assert code != 0 and "standard format" in last_line and last_line.endswith("use --format sliced")
    assert not (tmp_path / "out").exists()


def test_gemma_embedding_multiplier_follows_the_new_width(standard_dirs) -> None:
    path, _ = standard_dirs["gemma"]
    model = lmslice.load(path)
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(math.sqrt(48))
