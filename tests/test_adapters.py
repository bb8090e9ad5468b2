"""Every family's adapter: its paths exist, unsupported variants are refused clearly, and slicing removes
exactly the parameters that the config says it should."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import tiny_models
from lmslice.adapters import ADAPTERS, adapter_for_architecture, find_adapter, supported_architectures
from lmslice.calibration import ActivationStore, capture_block_inputs, run_block
from lmslice.errors import LmsliceError
from lmslice.fuse import fuse_norms
from lmslice.modeling import get_module
from lmslice.slicing import count_parameters, slice_model, sliced_width

SPARSITY = 0.25


# --- what each family's config says its residual stream is read and written by -------------------------

@dataclass
class Connection:
    """One residual connection: (out_features, has_bias) of each reader and (in_features, has_bias) of
    each writer; `norms` is how many norms read its input."""

    readers: list[tuple[int, bool]]
    writers: list[tuple[int, bool]]
    norms: int = 1


@dataclass
class Spec:
    embedding_rows: list[int]
    connections: list[Connection]
    layer_norm: bool  # LayerNorm (weight and bias; fused shifts give every reader a bias)
    head_bias: bool
    inner: int = 0  # parameters of each block off the stream (norms on the query and key heads)


def _head_norms(c: Any, whole_projection: bool = False) -> int:
    """q_norm and k_norm: head_dim each (shared by the heads), or over the whole query and key projection."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (c.num_attention_heads + c.num_key_value_heads) * head_dim if whole_projection else 2 * head_dim


def _attention(c: Any, qkv_bias: bool, out_bias: bool) -> Connection:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    return Connection([(q, qkv_bias), (kv, qkv_bias), (kv, qkv_bias)], [(q, out_bias)])


def _gated_mlp(c: Any, bias: bool) -> Connection:
    return Connection([(c.intermediate_size, bias)] * 2, [(c.intermediate_size, bias)])


def spec(family: str, c: Any) -> Spec:
    if family in ("llama", "smollm3", "granite"):
        return Spec([c.vocab_size], [_attention(c, c.attention_bias, c.attention_bias), _gated_mlp(c, c.mlp_bias)],
                    False, False)
    if family in ("mistral", "ministral", "ministral3"):
        return Spec([c.vocab_size], [_attention(c, False, False), _gated_mlp(c, False)], False, False)
    if family == "qwen3":
        return Spec([c.vocab_size], [_attention(c, c.attention_bias, c.attention_bias), _gated_mlp(c, False)],
                    False, False, inner=_head_norms(c))
    if family in ("gemma2", "gemma3"):  # a norm before and after each sublayer
        attention, mlp = _attention(c, c.attention_bias, c.attention_bias), _gated_mlp(c, False)
        attention.norms = mlp.norms = 2
        return Spec([c.vocab_size], [attention, mlp], False, False, inner=_head_norms(c) if family == "gemma3" else 0)
    if family == "olmo2":  # a norm after each sublayer only
        return Spec([c.vocab_size], [_attention(c, c.attention_bias, c.attention_bias), _gated_mlp(c, False)],
                    False, False, inner=_head_norms(c, whole_projection=True))
    if family == "qwen2":
        return Spec([c.vocab_size], [_attention(c, True, False), _gated_mlp(c, False)], False, False)
    if family == "gemma":
        return Spec([c.vocab_size], [_attention(c, c.attention_bias, c.attention_bias), _gated_mlp(c, False)],
                    False, False)
    if family == "phi3":
        head_dim = c.hidden_size // c.num_attention_heads
        qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim
        attention = Connection([(qkv, False)], [(c.num_attention_heads * head_dim, False)])
        mlp = Connection([(2 * c.intermediate_size, False)], [(c.intermediate_size, False)])
        return Spec([c.vocab_size], [attention, mlp], False, False)
    if family == "opt":
        d, bias = c.hidden_size, c.enable_bias
        attention = Connection([(d, bias)] * 3, [(d, bias)])
        mlp = Connection([(c.ffn_dim, bias)], [(c.ffn_dim, bias)])
        return Spec([c.vocab_size, c.max_position_embeddings + 2], [attention, mlp], True, False)  # positions +2
    if family == "phi":
        attention = _attention(c, True, True)
        return Spec([c.vocab_size], [Connection(attention.readers + [(c.intermediate_size, True)],
                                                attention.writers + [(c.intermediate_size, True)])], True, True)
    if family in ("gpt_neox", "gpt_neox_sequential"):
        d, bias = c.hidden_size, c.attention_bias
        attention = Connection([(3 * d, bias)], [(d, bias)])
        mlp = Connection([(c.intermediate_size, True)], [(c.intermediate_size, True)])
        if family == "gpt_neox":
            parallel = Connection(attention.readers + mlp.readers, attention.writers + mlp.writers, norms=2)
            return Spec([c.vocab_size], [parallel], True, False)
        return Spec([c.vocab_size], [attention, mlp], True, False)
    raise AssertionError(f"no parameter spec for {family}")


def expected_dense(s: Spec, c: Any) -> int:
    d = c.hidden_size
    norm = d * (2 if s.layer_norm else 1)
    block = sum(k.norms * norm
                + sum(out * d + (out if bias else 0) for out, bias in k.readers)
                + sum(fan_in * d + (d if bias else 0) for fan_in, bias in k.writers) for k in s.connections)
    head = (0 if c.tie_word_embeddings else c.vocab_size * d) + (c.vocab_size if s.head_bias else 0)
    return sum(rows * d for rows in s.embedding_rows) + c.num_hidden_layers * (block + s.inner) + norm + head


def expected_sliced(s: Spec, c: Any, width: int, head_width: int) -> int:
    """Embeddings V·D'; readers out·D'; writers in·D'; a D'xD' shortcut per connection, except that the
    last block's last connection writes (and its shortcut maps to) the head's width (D when the head is
    unsliced); weightless norms; an untied V·head_width head."""
    total = sum(rows * width for rows in s.embedding_rows) + c.num_hidden_layers * s.inner
    for block in range(c.num_hidden_layers):
        for position, k in enumerate(s.connections):
            last = block == c.num_hidden_layers - 1 and position == len(s.connections) - 1
            out_width = head_width if last else width
            total += sum(out * width + (out if bias or s.layer_norm else 0) for out, bias in k.readers)
            total += sum(fan_in * out_width + (out_width if bias else 0) for fan_in, bias in k.writers)
            total += width * out_width
    return total + c.vocab_size * head_width + (c.vocab_size if s.head_bias or s.layer_norm else 0)


@torch.no_grad()
def confine_stream_before_last_write(model: nn.Module, rank: int = 40, spare_last_write: bool = True) -> None:
    """Makes everything written to the residual stream, except by the last block's last connection, lie in
    one random rank-40 subspace: slicing to 48 then loses nothing on the way, while the last block's
    output stays full-width. `spare_last_write=False` confines that one too (the whole stream)."""
    adapter = find_adapter(model)
    generator = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(model.config.hidden_size, rank, generator=generator,
                                        dtype=torch.float64))[0].to(model.dtype)
    projection = basis @ basis.T
    for path in adapter.embeddings:
        embedding = get_module(model, path)
        embedding.weight.copy_(embedding.weight @ projection)
    blocks = get_module(model, adapter.blocks)
    for index, block in enumerate(blocks):
        for position, residual in enumerate(adapter.residuals):
            if spare_last_write and index == len(blocks) - 1 and position == len(adapter.residuals) - 1:
                continue
            for path in residual.writes:
                linear = get_module(block, path)
                linear.weight.copy_(projection @ linear.weight)
                if linear.bias is not None:
                    linear.bias.copy_(projection @ linear.bias)


@pytest.mark.parametrize("family", sorted(tiny_models.FACTORIES))
def test_dense_parameter_count_matches_the_config(family: str) -> None:
    """What the config says every family's dense model holds (the sliced counts below build on it)."""
    model = tiny_models.FACTORIES[family]()
    assert count_parameters(model) == expected_dense(spec(family, model.config), model.config)


SLICEABLE = sorted(family for family in tiny_models.FACTORIES
                   if adapter_for_architecture(type(tiny_models.FACTORIES[family]()).__name__).cannot_slice() is None)


def structure(family: str) -> tuple:
    """What a pass over the blocks depends on: the adapter's paths and the facts that change how a family is
    cut, and whether the tiny model's blocks get different arguments (mixed attention types)."""
    model = tiny_models.FACTORIES[family]()
    adapter = find_adapter(model)
    return (adapter.modules(), adapter.norm_kind, adapter.residual_scale, adapter.mlp.writes_stream,
            adapter.cannot_slice() is None, len(set(getattr(model.config, "layer_types", None) or ())) > 1)


# One tiny model of each structure, for the slow tests of composing steps and placing blocks: Llama stands for
# Mistral, Ministral, Ministral 3, Qwen3 and SmolLM3, Gemma 2 for Gemma 3 (their differences live inside the
# attention, which those passes never touch).
REPRESENTATIVES = sorted({structure(family): family for family in sorted(tiny_models.FACTORIES, reverse=True)}
                         .values())


@pytest.fixture(scope="module", params=SLICEABLE)
def sliced(request: pytest.FixtureRequest) -> tuple[str, nn.Module, dict[bool, nn.Module]]:
    """One family (float64, stream confined as above), dense and sliced at 25% with a full-width and a
    sliced head."""
    dense = tiny_models.build(request.param)
    confine_stream_before_last_write(dense)
    models = {}
    for slice_head in (False, True):
        models[slice_head] = copy.deepcopy(dense)
        slice_model(models[slice_head], tiny_models.random_batches(count=1), SPARSITY, slice_head=slice_head,
                    centre_embeddings=False, progress=False)  # centring would move the stream out of its subspace
    return request.param, dense, models


def test_parameter_count_matches_the_config(sliced) -> None:
    family, dense, models = sliced
    config = dense.config
    family_spec = spec(family, config)
    width = sliced_width(config.hidden_size, SPARSITY)
    assert width == 48
    assert count_parameters(models[False]) == expected_sliced(family_spec, config, width, config.hidden_size)
    assert count_parameters(models[True]) == expected_sliced(family_spec, config, width, width)
    assert models[False].config.hidden_size == 64  # the original D: Gemma's embedding scale and norms use it


def test_slicing_a_signal_that_fits_is_exact_with_a_full_width_head(sliced) -> None:
    """At 25%, when the stream fits in the kept width, the sliced model equals the dense one, provided
    the last block's full-width output reaches the head: the surplus features of every writer of the last
    connection (two in a parallel block) go to the final norm. Slicing the head too must lose them."""
    _, dense, models = sliced
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        reference = dense(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        errors = {head: (model(input_ids=ids, attention_mask=mask).logits[mask.bool()] - reference).abs().max()
                  for head, model in models.items()}
    # 1e-5, not 1e-8: transformers' RMSNorms round through float32
    assert errors[False] <= 1e-5, f"full-width head: max |Δlogit| = {errors[False]:.3g}"
    assert errors[True] > 1e-3, "the test must exercise the last block's surplus"


def test_gemma_embedding_scale_uses_the_original_width() -> None:
    """The scale is sqrt(config.hidden_size), which slicing leaves at D (the layout records the width)."""
    model = tiny_models.build("gemma", torch.float32)
    slice_model(model, tiny_models.random_batches(count=1), SPARSITY, progress=False)
    rebuilt = type(model)(model.config).model.embed_tokens  # what a reload constructs from the config
    assert model.model.embed_tokens.weight.shape[1] == model.config.lmslice["width"] == 48
    scale = float(model.model.embed_tokens.embed_scale)
    assert float(rebuilt.embed_scale) == scale == pytest.approx(math.sqrt(64))


# --- coverage: every adapter has a tiny model, and its paths are all of that model's stream matrices ----

DENSE_ADAPTERS = [adapter for adapter in ADAPTERS if adapter.mlp is None or adapter.mlp.experts is None]


@pytest.mark.parametrize("adapter", DENSE_ADAPTERS, ids=[a.family for a in DENSE_ADAPTERS])
def test_adapter_paths_exist_in_its_tiny_model(adapter) -> None:  # mixtures of experts: tests/test_moe.py
    assert adapter.family in tiny_models.FACTORIES, f"add a tiny {adapter.family} model to tests/tiny_models.py"
    model = tiny_models.FACTORIES[adapter.family]()
    assert find_adapter(model) is adapter
    assert type(model).__name__ in adapter.architectures
    hidden = model.config.hidden_size
    for path in adapter.embeddings:
        assert isinstance(get_module(model, path), nn.Embedding)
    assert get_module(model, adapter.final_norm).weight.shape == (hidden,)
    assert get_module(model, adapter.head).in_features == hidden
    blocks = get_module(model, adapter.blocks)
    assert len(blocks) == model.config.num_hidden_layers
    for block in blocks:
        listed: set[str] = set()
        for residual in adapter.residuals:
            for norm_path, readers in residual.reads.items():
                if norm_path:  # "": the readers read the stream itself
                    assert get_module(block, norm_path).weight.shape == (hidden,)
                for path in readers:
                    assert get_module(block, path).in_features == hidden
                listed.update(readers)
            for path in residual.writes:
                assert get_module(block, path).out_features == hidden
            for path in residual.output_norms:
                assert get_module(block, path).weight.shape == (hidden,)
            listed.update(residual.writes)
        linears = {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        assert linears == listed, "every linear layer of a block reads or writes the residual stream"
        norms = {name for name, module in block.named_children() if "norm" in type(module).__name__.lower()}
        assert norms == {norm for residual in adapter.residuals for norm in [*residual.reads, *residual.output_norms]
                         if norm}
    # the MLP's consumer writes the stream as it is only where no norm or scale comes between
    mlp_residual = next(residual for residual in adapter.residuals if adapter.mlp.consumer in residual.writes)
    assert adapter.mlp.writes_stream == (not mlp_residual.output_norms and adapter.residual_scale is None)


# --- variants and architectures that are refused ---------------------------------------------------------

def test_unsupported_architecture_lists_the_supported_ones() -> None:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tiny_models.VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(LmsliceError, match="unsupported architecture GPT2LMHeadModel") as error:
        slice_model(model, tiny_models.random_batches(count=1), SPARSITY, progress=False)
    for architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM",
                         "OPTForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "GPTNeoXForCausalLM"):
        assert architecture in str(error.value)
    assert str(error.value).count("GPTNeoXForCausalLM") == 1
    assert set(supported_architectures()) <= set(str(error.value).replace(",", " ").split())


@pytest.mark.parametrize("config, message", [
    (transformers.StableLmConfig(vocab_size=tiny_models.VOCAB, hidden_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=112),
     r"^unsupported architecture StableLmForCausalLM \(its blocks have the modules of LlamaForCausalLM, lmslice's "
     r"llama, but its forward was not checked against it\); lmslice supports .*Qwen3ForCausalLM"),
    (transformers.GPT2Config(vocab_size=tiny_models.VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=32),
     r"^unsupported architecture GPT2LMHeadModel; lmslice supports .*Gemma2ForCausalLM"),
    (transformers.OPTConfig(vocab_size=tiny_models.VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            ffn_dim=112, word_embed_proj_dim=64, do_layer_norm_before=False),
     r"^OPT variants that normalise after each block .*\(architecture OPTForCausalLM\)$"),
])
def test_an_unsupported_model_is_refused_before_its_weights_are_read(config, message: str, tmp_path: Path) -> None:
    """Its weights are garbage: reading them would fail otherwise. A model laid out like a supported family
    under another class name is told which."""
    from lmslice.io.models import load

    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(LmsliceError, match=message) as error:
        load(tmp_path)
    assert "\n" not in str(error.value)


def test_opt_that_normalises_after_each_block_is_refused() -> None:
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=tiny_models.VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, ffn_dim=112,
        word_embed_proj_dim=64, do_layer_norm_before=False))
    with pytest.raises(LmsliceError, match=r"normalise after each block .*OPTForCausalLM"):
        find_adapter(model)


def block_kwargs(model: nn.Module) -> list[dict[str, Any]]:
    """What each block receives besides the stream, in an ordinary forward on a padded batch."""
    received: list[dict[str, Any]] = []
    blocks = get_module(model, adapter_for_architecture(type(model).__name__).blocks)
    handles = [block.register_forward_pre_hook(lambda m, args, kwargs: received.append(kwargs), with_kwargs=True)
               for block in blocks]
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for handle in handles:
        handle.remove()
    return received


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a is b or a == b


@pytest.mark.parametrize("family", sorted(tiny_models.FACTORIES))
def test_calibration_gives_every_block_what_an_ordinary_forward_gives_it(family: str) -> None:
    """Each block's own attention mask and position embeddings: sliding-window and global layers differ
    (Qwen2 with max_window_layers, Gemma 2 and 3, whose sliding layers have a rope base of their own)."""
    model = tiny_models.FACTORIES[family]().eval()
    received = block_kwargs(model)
    ids, mask = tiny_models.padded_inputs()
    streams = capture_block_inputs(model, find_adapter(model), [{"input_ids": ids, "attention_mask": mask}],
                                   ActivationStore())
    assert isinstance(received[0]["attention_mask"], torch.Tensor)  # the padded batch needs a real mask
    for index, kwargs in enumerate(received):
        captured = streams[0].arguments[index][1]
        assert all(same(captured[key], kwargs[key]) for key in kwargs), (index, sorted(kwargs))


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3"])
def test_walking_the_blocks_with_their_own_arguments_is_the_model_s_forward(family: str) -> None:
    """The calibration stream run block by block, each with its own arguments, arrives at the final norm as
    in an ordinary forward of the padded batch; with block 0's arguments everywhere it would not."""
    model = tiny_models.build(family)
    adapter = find_adapter(model)
    ids, mask = tiny_models.padded_inputs()
    final: list[torch.Tensor] = []
    handle = get_module(model, adapter.final_norm).register_forward_pre_hook(lambda m, args: final.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    handle.remove()
    stream = capture_block_inputs(model, adapter, [{"input_ids": ids, "attention_mask": mask}], ActivationStore())[0]
    start = stream.hidden
    walked = {}
    for own in (True, False):
        hidden = start
        for index, block in enumerate(get_module(model, adapter.blocks)):
            stream.at = index if own else 0
            hidden = run_block(block, stream, hidden)
        walked[own] = hidden[mask.bool()]
    torch.testing.assert_close(walked[True], final[0][mask.bool()], rtol=0, atol=1e-12)
    assert (walked[False] - final[0][mask.bool()]).abs().max() > 1e-3


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_gpt_neox_block_type_follows_the_config(parallel: bool) -> None:
    adapter = find_adapter(tiny_models.gpt_neox(parallel=parallel))
    assert adapter.parallel is parallel
    assert adapter.family == ("gpt_neox" if parallel else "gpt_neox_sequential")


def test_fusion_removes_every_norm_parameter() -> None:
    """After fusion the only 1-D parameters left are biases (Gemma's 1 + w scales are folded too)."""
    for family in ("gemma", "phi", "gpt_neox"):
        model = tiny_models.build(family, torch.float32)
        fuse_norms(model, find_adapter(model))
        leftover = [name for name, p in model.named_parameters() if p.dim() == 1 and not name.endswith("bias")]
        assert leftover == [], family


def test_phi_with_qk_layernorm_is_supported_and_exact() -> None:
    """Phi's optional q/k LayerNorms normalise per-head queries and keys, not the residual stream: slicing
    leaves them alone (the fixed-width heads they read are not sliced)."""
    torch.manual_seed(0)
    dense = transformers.PhiForCausalLM(transformers.PhiConfig(
        **tiny_models.COMMON, intermediate_size=112, qk_layernorm=True)).double().eval()
    for name, parameter in dense.named_parameters():
        if parameter.dim() == 1:
            with torch.no_grad():
                parameter.add_(0.2 * torch.randn_like(parameter))
    rotated = copy.deepcopy(dense)
    slice_model(rotated, tiny_models.random_batches(count=1), 0.0, progress=False)
    assert isinstance(rotated.model.layers[0].self_attn.q_layernorm, nn.LayerNorm)
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        difference = (rotated(input_ids=ids, attention_mask=mask).logits
                      - dense(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max()
    assert difference <= 1e-8


def test_an_adapter_that_does_not_match_its_model_is_reported_not_asserted(monkeypatch: pytest.MonkeyPatch) -> None:
    """If installing the sliced structure did not leave a shortcut projection where the adapter says (its
    paths disagree with the model), slicing stops with an error naming the path, also under `python -O`."""
    import lmslice.rotate

    monkeypatch.setattr(lmslice.rotate, "install_block", lambda *args: None)
    with pytest.raises(LmsliceError, match="self_attn.o_proj is not a shortcut projection"):
        slice_model(tiny_models.build("llama", torch.float32), tiny_models.random_batches(count=1), 0.25,
                    progress=False)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2"])
def test_a_norm_on_a_sublayer_s_output_refuses_slicing_in_one_line_and_says_why(family: str) -> None:
    """Such a norm sits between the writer and the stream (the writer cannot absorb the rotation) and is
    not rotation-equivariant; the refusal comes before any calibration and names pruning instead."""
    model = tiny_models.build(family, torch.float32)
    with pytest.raises(LmsliceError) as error:
        slice_model(model, [], SPARSITY, progress=False)
    message = str(error.value)
    assert "\n" not in message and "cannot be sliced" in message and "rotation" in message
    assert "post_feedforward_layernorm" in message and "--keep" in message


def test_why_a_norm_on_a_sublayer_s_output_is_not_rotation_invariant() -> None:
    """The maths behind the refusal: with a per-feature scale g, norm(y)·g rotated is not norm(yQ)·g' for
    the diagonal g' that would carry the scale, while with g = 1 the norm commutes with a square rotation."""
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(5, 8, dtype=torch.float64, generator=generator)
    g = 1 + 0.3 * torch.randn(8, dtype=torch.float64, generator=generator)
    q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=generator))[0]

    def norm(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return scale * x / x.pow(2).mean(-1, keepdim=True).sqrt()

    unit = torch.ones(8, dtype=torch.float64)
    assert torch.allclose(norm(y, unit) @ q, norm(y @ q, unit))
    # the best diagonal g' (least squares per feature) still misses
    target, normalised = norm(y, g) @ q, norm(y @ q, unit)
    best = (target * normalised).sum(0) / normalised.pow(2).sum(0)
    assert (norm(y @ q, best) - target).abs().max() > 0.05


def test_phi4_is_phi3_s_architecture_with_partial_rotary_and_tied_embeddings() -> None:
    """Phi-4 ships as Phi3ForCausalLM (the phi3 adapter); Phi-4-mini adds a partial rotary factor (0.75)
    and tied embeddings, which change nothing lmslice touches: rotation at sparsity 0 stays exact."""
    torch.manual_seed(0)
    dense = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=2, partial_rotary_factor=0.75,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)).double().eval()
    assert find_adapter(dense).family == "phi3"
    rotated = copy.deepcopy(dense)
    slice_model(rotated, tiny_models.random_batches(count=1), 0.0, progress=False)
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        difference = (rotated(input_ids=ids, attention_mask=mask).logits
                      - dense(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max()
    assert difference <= 1e-6  # Phi-3's RMSNorm rounds through float32
