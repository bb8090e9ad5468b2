"""GGUF export: the file lmslice writes for llama.cpp, read back with the gguf package (no llama.cpp needed;
tests/test_llamacpp.py runs the files in llama.cpp itself)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from torch import nn

import lmslice
import tiny_models
from lmslice.cli import main
from lmslice.errors import LmsliceError
from lmslice.export import standard_model
from lmslice.export.gguf import export_gguf, interleave_rope
from lmslice.io.models import save_sliced
from lmslice.prune import WidthPlan, prune_model
from lmslice.slicing import slice_model

PER_BLOCK = WidthPlan(0.8, 1, 1, mlp_widths=[96, 64, 112], round_to=8, attention_heads=[4, 2, 1])
UNIFORM = WidthPlan(0.8, 1, 1, mlp_widths=[96, 96, 96], round_to=8)


def pruned(family: str, plan: WidthPlan = PER_BLOCK) -> nn.Module:
    model = tiny_models.build(family, torch.float32)
    prune_model(model, tiny_models.random_batches(), plan)
    return model


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_per_block_widths_and_heads_are_deci_arrays(family: str, tmp_path: Path, tiny_tokenizer) -> None:
    model = pruned(family)
    path = tmp_path / "model.gguf"
    layout = export_gguf(model, path, tiny_tokenizer, outtype="f32")
    read = fields(path)
    assert layout.architecture == read["general.architecture"] == "deci"
    assert read["deci.feed_forward_length"] == [96, 64, 112]
    # the last block keeps one whole key/value group of the two
    assert read["deci.attention.head_count"] == [4, 2, 1]
    assert read["deci.attention.head_count_kv"] == [2, 2, 1]
    assert read["deci.attention.key_length"] == read["deci.rope.dimension_count"] == 16
    stored = tensors(path)
    for index, (width, heads, key_value_heads) in enumerate(zip([96, 64, 112], [4, 2, 1], [2, 2, 1])):
        # ggml lists dimensions innermost first: (columns, rows)
        assert list(stored[f"blk.{index}.ffn_down.weight"].shape) == [width, 64]
        assert list(stored[f"blk.{index}.attn_q.weight"].shape) == [64, heads * 16]
        assert list(stored[f"blk.{index}.attn_output.weight"].shape) == [heads * 16, 64]
        assert list(stored[f"blk.{index}.attn_k.weight"].shape) == [64, key_value_heads * 16]
    # q rows are permuted per head for llama.cpp's rope, as its converter does; v is not
    q = model.model.layers[1].self_attn.q_proj.weight.detach()
    np.testing.assert_array_equal(np.asarray(stored["blk.1.attn_q.weight"].data), interleave_rope(q, 2).numpy())
    v = model.model.layers[1].self_attn.v_proj.weight.detach()
    np.testing.assert_array_equal(np.asarray(stored["blk.1.attn_v.weight"].data), v.numpy())
    assert ("blk.0.attn_q.bias" in stored) == (family == "qwen2")
    assert "output.weight" not in stored or not model.config.tie_word_embeddings


def test_a_block_without_attention_has_no_heads_and_no_attention_tensors(tmp_path: Path, tiny_tokenizer) -> None:
    model = pruned("llama", WidthPlan(0.8, 1, 1, mlp_widths=[96, 64, 112], round_to=8, attention_heads=[4, 0, 1]))
    path = tmp_path / "model.gguf"
    export_gguf(model, path, tiny_tokenizer, outtype="f32")
    read = fields(path)
    assert read["deci.attention.head_count"] == [4, 0, 1] and read["deci.attention.head_count_kv"] == [2, 0, 1]
    names = set(tensors(path))
    assert not {name for name in names if name.startswith("blk.1.attn_")}
    assert {"blk.0.attn_norm.weight", "blk.2.attn_q.weight", "blk.1.ffn_norm.weight"} <= names


@pytest.mark.parametrize("family, architecture", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                                  ("gemma", "gemma"), ("ministral", "llama"), ("qwen3", "qwen3"),
                                                  ("granite", "granite"), ("gemma3", "gemma3")])
def test_equal_blocks_are_the_familys_own_architecture(family: str, architecture: str, tmp_path: Path,
                                                       tiny_tokenizer) -> None:
    model = pruned(family, UNIFORM)
    path = tmp_path / "model.gguf"
    export_gguf(model, path, tiny_tokenizer, outtype="f32")
    read, stored = fields(path), tensors(path)
    assert read["general.architecture"] == architecture
    assert read[f"{architecture}.feed_forward_length"] == 96
    assert read[f"{architecture}.attention.head_count"] == 4
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    # llama and granite rotate interleaved pairs; qwen2/qwen3 and the gemmas halves (NEOX: HF's layout)
    expected = interleave_rope(q, 4) if architecture in ("llama", "granite") else q
    np.testing.assert_array_equal(np.asarray(stored["blk.0.attn_q.weight"].data), expected.numpy())
    norm = model.model.layers[0].input_layernorm.weight.detach()
    np.testing.assert_array_equal(np.asarray(stored["blk.0.attn_norm.weight"].data),
                                  (norm + 1 if family.startswith("gemma") else norm).numpy())


def test_architecture_metadata_and_per_head_norms(tmp_path: Path, tiny_tokenizer) -> None:
    """What each architecture's loader reads beside the widths: Gemma 3's windows (one flag per layer) and
    its sliding layers' rope base, its q/k norms (head_dim wide, +1); Granite's four multipliers; OLMo 2's
    norms after the sublayers and over the whole query and key projections."""
    gemma3, granite, olmo2 = (pruned(family, UNIFORM) for family in ("gemma3", "granite", "olmo2"))
    for model, name in ((gemma3, "gemma3"), (granite, "granite"), (olmo2, "olmo2")):
        export_gguf(model, tmp_path / f"{name}.gguf", tiny_tokenizer, outtype="f32")
    read, stored = fields(tmp_path / "gemma3.gguf"), tensors(tmp_path / "gemma3.gguf")
    assert read["gemma3.attention.sliding_window"] == 8
    assert read["gemma3.attention.sliding_window_pattern"] == [True, True, False]
    assert read["gemma3.rope.freq_base_swa"] == 10000.0 and read["gemma3.rope.freq_base"] == 1e6
    q_norm = gemma3.model.layers[0].self_attn.q_norm.weight.detach()
    np.testing.assert_array_equal(np.asarray(stored["blk.0.attn_q_norm.weight"].data), (q_norm + 1).numpy())
    assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(stored)
    read = fields(tmp_path / "granite.gguf")
    config = granite.config
    assert read["granite.attention.scale"] == pytest.approx(config.attention_multiplier)
    assert read["granite.embedding_scale"] == pytest.approx(config.embedding_multiplier)
    assert read["granite.residual_scale"] == pytest.approx(config.residual_multiplier)
    assert read["granite.logit_scale"] == pytest.approx(config.logits_scaling)
    stored = tensors(tmp_path / "olmo2.gguf")
    assert list(stored["blk.0.attn_q_norm.weight"].shape) == [64]  # every query head's features
    assert list(stored["blk.0.attn_k_norm.weight"].shape) == [32]
    assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(stored)
    assert "blk.0.attn_norm.weight" not in stored


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def with_rope(family: str, rope: dict) -> nn.Module:
    model = tiny_models.build(family, torch.float32)
    config = copy.deepcopy(model.config)
    config.rope_parameters = rope
    rebuilt = type(model)(config).float().eval()
    rebuilt.load_state_dict(model.state_dict())
    assert isinstance(rebuilt, transformers.PreTrainedModel)
    return rebuilt


def test_llama3_rope_is_the_rope_freqs_tensor_the_converter_writes(tmp_path: Path, tiny_tokenizer) -> None:
    """convert_hf_to_gguf.py's formula for each frequency's divisor, against what lmslice writes (from
    transformers' own llama3 frequencies)."""
    path = tmp_path / "model.gguf"
    export_gguf(with_rope("llama", LLAMA3_ROPE), path, tiny_tokenizer, outtype="f32")
    expected = []
    for frequency in 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)):
        wavelength = 2 * math.pi / frequency
        if wavelength < 32 / 4:
            expected.append(1.0)
        elif wavelength > 32 / 1:
            expected.append(8.0)
        else:
            smooth = (32 / wavelength - 1) / (4 - 1)
            expected.append(1 / ((1 - smooth) / 8 + smooth))
    written = np.asarray(tensors(path)["rope_freqs.weight"].data)
    np.testing.assert_allclose(written, expected, rtol=1e-6)
    assert len(set(np.round(written, 4))) == 3  # kept, smoothed, divided by 8
    assert "llama.rope.scaling.type" not in fields(path)


@pytest.mark.parametrize("family, rope, read", [
    ("llama", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
     {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}),
    ("qwen2", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
     {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 32}),
])
def test_linear_and_yarn_rope_are_metadata(family: str, rope: dict, read: dict, tmp_path: Path,
                                          tiny_tokenizer) -> None:
    path = tmp_path / "model.gguf"
    layout = export_gguf(with_rope(family, rope), path, tiny_tokenizer, outtype="f32")
    written = fields(path)
    for key, value in read.items():
        assert written[f"{layout.architecture}.{key}"] == pytest.approx(value)
    assert "rope_freqs.weight" not in tensors(path)


def test_standard_format_writes_its_hidden_size_and_head_dim(tmp_path: Path, tiny_tokenizer) -> None:
    model = tiny_models.build("llama", torch.float32)
    result = slice_model(model, tiny_models.random_batches(), 0.25, rotation="shared", progress=False)
    standard = standard_model(model, head_input=result.head_input)
    path = tmp_path / "model.gguf"
    export_gguf(standard, path, tiny_tokenizer, outtype="f32")
    read = fields(path)
    assert read["llama.embedding_length"] == 48
    assert read["llama.attention.key_length"] == 16  # not 48 / 4: attention keeps its width
    assert read["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(standard.config.rms_norm_eps)
    assert list(tensors(path)["blk.0.attn_q.weight"].shape) == [48, 64]


def test_a_sliced_model_with_one_basis_is_exported_through_the_standard_format(tmp_path: Path,
                                                                                tiny_tokenizer) -> None:
    model = tiny_models.build("llama", torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, rotation="shared", progress=False)
    export_gguf(model, tmp_path / "model.gguf", tiny_tokenizer, outtype="f32")
    assert fields(tmp_path / "model.gguf")["llama.embedding_length"] == 48


def test_vocabulary_from_the_hf_tokenizer_and_copied_from_a_source_gguf(tmp_path: Path, tiny_tokenizer) -> None:
    model = pruned("llama")
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    export_gguf(model, first, tiny_tokenizer, outtype="f32")
    read = fields(first)
    assert read["tokenizer.ggml.model"] == "gpt2"
    assert len(read["tokenizer.ggml.tokens"]) == tiny_models.VOCAB
    assert read["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_token_id
    assert read["tokenizer.ggml.token_type"][tiny_tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert len(read["tokenizer.ggml.merges"]) > 0
    export_gguf(model, second, None, outtype="f32", source_gguf=first)
    copied = fields(second)
    assert {key: value for key, value in copied.items() if key.startswith("tokenizer.")} == \
           {key: value for key, value in read.items() if key.startswith("tokenizer.")}


def test_q8_0_quantises_rows_of_32_and_keeps_other_rows_float16(tmp_path: Path, tiny_tokenizer) -> None:
    model = pruned("llama", WidthPlan(0.8, 1, 1, mlp_widths=[96, 104, 64], round_to=8))
    path = tmp_path / "model.gguf"
    layout = export_gguf(model, path, tiny_tokenizer, outtype="q8_0")
    stored = tensors(path)
    kinds = gguf.GGMLQuantizationType
    assert stored["blk.0.ffn_down.weight"].tensor_type == kinds.Q8_0
    assert stored["blk.1.ffn_down.weight"].tensor_type == kinds.F16  # 104 columns
    assert stored["blk.0.attn_norm.weight"].tensor_type == kinds.F32
    assert layout.fallbacks == ["blk.1.ffn_down.weight (104 columns)"]


@pytest.mark.parametrize("case, message", [
    ("sliced", "per-block SliceGPT shortcut"),
    ("opt", "not opt"),
    ("ministral3", "not ministral3"),
    ("gemma_per_block", "prune with --mlp-widths uniform"),
    ("qwen3_per_block", r"cannot build qwen3's block: prune with --mlp-widths uniform \(llama.cpp's qwen3\)"),
    ("gemma_untied", "keep the embeddings tied"),
    ("smollm3_rope_layers", r"llama.cpp's smollm3 applies rope in layers \[1, 1, 1\]"),
    ("gemma2_global_only", "needs a sliding-window layer"),
    ("qwen2_llama3_rope", "llama.cpp's qwen2 reads no rope_freqs tensor"),
    ("llama_dynamic_rope", "no 'dynamic' rope scaling"),
    ("qwen2_yarn_beta", "beta_fast 32 and beta_slow 1"),
    ("phi3_longrope", "longrope's long or short factors by the context"),
    ("phi3_standard", r"llama.cpp's phi3 sizes the attention output hidden x hidden \(48\)"),
])
def test_what_llamacpp_cannot_run_is_refused_before_writing(case: str, message: str, tmp_path: Path,
                                                            tiny_tokenizer) -> None:
    if case == "sliced":
        model = tiny_models.build("llama", torch.float32)
        slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    elif case in ("opt", "ministral3"):
        model = pruned(case, UNIFORM)
    elif case == "gemma_per_block":
        model = pruned("gemma", WidthPlan(0.8, 1, 1, mlp_widths=[96, 64, 112], round_to=8))
    elif case == "qwen3_per_block":
        model = pruned("qwen3")
    elif case == "smollm3_rope_layers":  # the tiny SmolLM3 leaves rope out of layer 1
        model = pruned("smollm3", UNIFORM)
    elif case == "gemma2_global_only":
        model = tiny_models.randomised(lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
            layer_types=["full_attention"] * 3)), torch.float32)
    elif case == "qwen2_llama3_rope":
        model = with_rope("qwen2", LLAMA3_ROPE)
    elif case == "llama_dynamic_rope":
        model = with_rope("llama", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    elif case == "phi3_longrope":
        model = with_rope("phi3", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                   "long_factor": [2.0] * 8, "original_max_position_embeddings": 32})
    elif case == "phi3_standard":
        model = tiny_models.build("phi3", torch.float32)
        slice_model(model, tiny_models.random_batches(), 0.25, rotation="shared", progress=False)
    elif case == "qwen2_yarn_beta":
        model = with_rope("qwen2", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 16.0,
                                    "original_max_position_embeddings": 32})
    else:
        model = pruned("gemma", UNIFORM)
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone() + 1)
    with pytest.raises(LmsliceError, match=message):
        export_gguf(model, tmp_path / "model.gguf", tiny_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_no_file(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    def interrupted(self, **_) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(pruned("llama"), tmp_path / "model.gguf", tiny_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_saved_pruned_model(tmp_path: Path, tiny_tokenizer, capsys) -> None:
    saved = save_sliced(pruned("llama"), tiny_tokenizer, tmp_path / "pruned")
    out = tmp_path / "model.gguf"
    assert main(["export", str(saved), "--gguf", str(out), "--outtype", "f32"]) == 0
    assert "deci" in capsys.readouterr().out
    assert fields(out)["deci.feed_forward_length"] == [96, 64, 112]
    assert main(["export", str(saved), "--gguf", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(saved), "--gguf", str(tmp_path / "model.bin")]) == 2


def slice_args(dense_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["slice", str(dense_dir), "--calib", str(corpus), "-o", str(out), "--calib-samples", "4",
            "--calib-seqlen", "32", "--calib-batch-size", "2", "--json", *extra]


def test_slice_aligns_uniform_widths_and_writes_the_gguf(dense_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    assert main(slice_args(dense_dir, text_file, tmp_path / "pruned", "--target-params", "0.8", "--mlp-widths",
                           "uniform", "--align", "gguf", "--gguf", str(out))) == 0
    read = fields(out)
    assert read["general.architecture"] == "llama"
    assert read["llama.feed_forward_length"] % 32 == 0


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "0.25", "--gguf", "{tmp}/model.gguf"], "per-block SliceGPT"),
    (["--sparsity", "0.25", "--gguf", "{tmp}/model.txt"], "ends in .gguf"),
    (["--sparsity", "0.33", "--round-to", "1", "--format", "standard"], "not a multiple of the 4 attention heads"),
])
def test_slice_refuses_what_it_cannot_write_before_the_work(extra: list[str], message: str, dense_dir: Path,
                                                            text_file: Path, tmp_path: Path, capsys) -> None:
    extra = [part.format(tmp=tmp_path) for part in extra]
    assert main(slice_args(dense_dir, text_file, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("width, options, expected", [
    (512, dict(target_params=0.8, sparsity=None, mlp_widths="measured", align="auto"), 256),
    (112, dict(target_params=0.8, sparsity=None, mlp_widths="measured", align="auto"), 1),  # 112: steps break rows
    (512, dict(target_params=0.8, sparsity=None, mlp_widths="uniform", align="auto"), 1),
    (512, dict(target_params=None, sparsity=0.25, mlp_widths="measured", align="auto"), 1),
    (112, dict(target_params=0.8, sparsity=None, mlp_widths="uniform", align="gguf"), 32),
    # a --target-size counted in a quantised type keeps the down projection in that type's blocks
    (512, dict(target_params=None, target_size="1GB", target_format="gguf-q4_k_m", sparsity=None,
               mlp_widths="uniform", align="auto"), 256),
    (512, dict(target_params=None, target_size="1GB", target_format="gguf-q8_0", sparsity=None,
               mlp_widths="uniform", align="auto"), 32),
    (112, dict(target_params=None, target_size="1GB", target_format="gguf-q4_k_m", sparsity=None,
               mlp_widths="measured", align="auto"), 1),
])
def test_auto_alignment_is_k_quant_rows_for_per_block_widths_of_an_aligned_model(width: int, options: dict,
                                                                                 expected: int) -> None:
    import argparse

    import transformers
    from lmslice.adapters import find_adapter
    from lmslice.cli.slice_command import alignment

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**tiny_models.COMMON, "num_hidden_layers": 1}, intermediate_size=width))
    args = argparse.Namespace(**{"target_size": None, "target_format": None, **options})
    assert alignment(args, model, find_adapter(model)) == expected


def test_slice_refuses_a_config_llamacpp_computes_otherwise_before_the_work(text_file: Path, tmp_path: Path,
                                                                            tiny_tokenizer, capsys,
                                                                            monkeypatch) -> None:
    """The tiny SmolLM3 leaves rope out of layer 1, llama.cpp's smollm3 out of every fourth layer: refused
    before the calibration text is read."""
    source = tmp_path / "smollm3"
    tiny_models.build("smollm3", torch.float32).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    capsys.readouterr()
    monkeypatch.setattr("lmslice.cli.slice_command.calibration_data", pytest.fail)
    assert main(slice_args(source, text_file, tmp_path / "out", "--target-params", "0.8", "--mlp-widths", "uniform",
                           "--gguf", str(tmp_path / "model.gguf"))) == 2
    assert "rope in layers [1, 1, 1] (none in every 4th), this model in [1, 0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.gguf"))


def test_a_gguf_lmslice_does_not_read_is_refused_from_its_metadata(tmp_path: Path, tiny_tokenizer) -> None:
    """lmslice's own per-block export (llama.cpp's deci) is refused on load in one line, from the metadata
    alone: its weights are cut off here, so reading them would fail otherwise."""
    path = tmp_path / "model.gguf"
    export_gguf(pruned("llama"), path, tiny_tokenizer, outtype="f32")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LmsliceError, match=r"holds llama.cpp's deci, which lmslice does not read; it reads GGUF files "
                                           r"of gemma, .*qwen3"):
        lmslice.load(path)
