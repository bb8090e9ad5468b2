"""GGUF for llama.cpp: a dense, pruned or standard-format model written as one file llama.cpp runs.

Which llama.cpp architecture a model becomes is decided by its blocks:

* every block equal (dense, `--mlp-widths uniform`, `--format standard`): the family's own
  architecture (`ModelAdapter.gguf`: `llama` for Llama, Mistral and Ministral, `qwen2`, `qwen3`,
  `smollm3`, `granite`, `olmo2`, `phi3` for Phi-3 and Phi-4, `gemma`, `gemma2`, `gemma3`), as llama.cpp's
  `convert_hf_to_gguf.py` writes it, with the architecture's own keys (softcaps, windows, multipliers).
  Its loader reads layer 0's widths for every layer;
* per-block MLP widths and query heads (`--keep` with measured widths): `deci`, the
  architecture of the Nemotron-NAS models, whose loader (`src/models/deci.cpp`) reads
  `feed_forward_length`, `attention.head_count` and `attention.head_count_kv` as per-layer arrays
  (a block whose attention was pruned away is `head_count` 0 and has no attention tensors). No other
  llama.cpp architecture sizes its tensors per block (they read n_ff and n_head of layer 0).
  Its block is Llama's (RMSNorm, SiLU-gated MLP, rope on interleaved pairs) with optional q/k/v,
  output and MLP biases, so Llama, Mistral, Ministral and Qwen2 (q/k/v biases) fit it. The others do
  not: q/k norms (Qwen3, OLMo 2, Gemma 3), layers without rope (SmolLM3), multipliers (Granite), norms
  after the sublayers, GELU and soft-capping (Gemma).

Tensor names come from the `gguf` package's own map (HF name -> GGUF name, the one the converter uses).
Architectures with llama.cpp's "normal" rope (`ARCHITECTURES`) take the query and key rows of each head
permuted from HF's halves layout to interleaved pairs, as the converter does; the NEOX ones read HF's
layout as it is. Gemma's norm weights are stored +1 (HF computes x·(1 + w)). Sliding-window attention
(Mistral) is not modelled by llama.cpp's `llama`: the file's context length is capped at the window,
within which the two agree. Rope scaling is written as the converter writes it (`rope_scaling`).

What llama.cpp cannot represent is refused before any file is written: a per-block SliceGPT model
(its shortcut matrices), the families this writer does not cover (LayerNorm: OPT, Phi-2, GPT-NeoX;
Ministral 3's mistral3: save them and use llama.cpp's converter), and configs llama.cpp's architecture
computes otherwise (`Gguf.refuse`). The file is written under a temporary name and renamed, so an interrupted
export leaves no partial `.gguf`; one a killed export left is removed by the next run's output check
(`lmslice.io.outputs.clear_leftovers`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lmslice.adapters import ADAPTERS, Mlp, adapter_of_family, find_adapter
from lmslice.errors import LmsliceError, first_line
from lmslice.io.outputs import GGUF, check_output, make_parents, process_tag
from lmslice.export.standard import standard_model
from lmslice.layout import layout_of
from lmslice.modeling import ShortcutLinear, experts_of, get_module, head_counts

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
QUANT_BLOCK = 32  # row length Q8_0 (and every legacy type) needs; K-quants need 256


@dataclass(frozen=True)
class Architecture:
    """What one llama.cpp architecture's builder (src/models/<name>.cpp) computes, as far as the export
    depends on it: its MLP activation, whether its rope rotates interleaved pairs (LLAMA_ROPE_TYPE_NORM:
    q and k rows are permuted as the converter does) or halves (NEOX: HF's layout as it is), whether it
    reads a `rope_freqs` tensor (Llama 3's rope scaling), and whether it models a sliding window itself
    (else the file's context is capped at the window, within which the two agree)."""

    activations: tuple[str, ...] = ("silu",)
    interleaved_rope: bool = False
    rope_freqs: bool = False
    sliding_window: bool = False


GELU = ("gelu_pytorch_tanh", "gelu")
ARCHITECTURES = {
    "llama": Architecture(interleaved_rope=True, rope_freqs=True),
    "deci": Architecture(interleaved_rope=True, rope_freqs=True),
    "granite": Architecture(interleaved_rope=True, rope_freqs=True),
    "smollm3": Architecture(interleaved_rope=True),
    "qwen2": Architecture(),
    "qwen3": Architecture(),
    "olmo2": Architecture(),
    "phi3": Architecture(),  # its sliding window is switched off in llama.cpp (llama_model_phi3::load_arch_hparams)
    "gemma": Architecture(GELU),
    "gemma2": Architecture(GELU, sliding_window=True),
    "gemma3": Architecture(GELU, sliding_window=True),
    "qwen3moe": Architecture(),
    "olmoe": Architecture(),
}

# The experts' 3-D weights as llama.cpp's converter writes them (one expert per index of the first dimension
# in both): the producers' stacked halves as the gate and up tensors, the consumer as the down one.
EXPERT_TENSORS = {"producers": ("FFN_GATE_EXP", "FFN_UP_EXP"), "consumer": ("FFN_DOWN_EXP",)}


NO_SHORTCUTS = ("llama.cpp has no architecture for per-block SliceGPT shortcut matrices: slice with --format "
                "standard (one basis, the family's own architecture) or prune with --keep (per-block "
                "widths are exported as llama.cpp's deci)")


def check_exportable(family: str, *, shortcuts: bool = False, per_block: bool = False, config: Any = None) -> None:
    """Refuses what llama.cpp cannot run, naming the alternative: checkable before any work is done. With
    the model's `config`, also what its architecture computes otherwise (`Gguf.refuse`) and rope scaling
    llama.cpp cannot represent."""
    if shortcuts:
        raise LmsliceError(NO_SHORTCUTS)
    adapter = adapter_of_family(family)
    gguf = adapter.gguf
    if gguf is None:
        written = sorted({adapter.family for adapter in ADAPTERS if adapter.gguf is not None})
        raise LmsliceError(f"lmslice writes GGUF for {', '.join(written)}, not {family}: save the model with equal "
                           "blocks (--mlp-widths uniform) and convert it with llama.cpp's convert_hf_to_gguf.py")
    if per_block and adapter.mlp is not None and adapter.mlp.experts is not None:
        raise LmsliceError(f"llama.cpp's {gguf.architecture} reads one experts' width and one expert count for every "
                           "block, and this model's blocks differ: prune with --mlp-widths uniform (which keeps "
                           "every expert)")
    if per_block and not gguf.per_block:
        raise LmsliceError(f"llama.cpp sizes tensors per block only in deci (Llama's block), which cannot build "
                           f"{family}'s block: prune with --mlp-widths uniform (llama.cpp's {gguf.architecture})")
    if config is not None:
        refusal = gguf.refuse(config)
        if refusal:
            raise LmsliceError(f"{refusal}: save the model and run it with transformers")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope_scaling(config, "deci" if per_block else gguf.architecture, head_dim)


@dataclass(frozen=True)
class GgufLayout:
    """What llama.cpp will build: the architecture and every block's widths."""

    architecture: str
    embedding_length: int
    head_dim: int
    heads: list[int]
    kv_heads: list[int]
    mlp_widths: list[int]
    tied_embeddings: bool
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    family: str
    norm_shift: float = 0.0  # added to every norm weight (Gemma's 1 + w)
    rope_dimensions: int | None = None  # the features of each head that rope rotates (None: all)
    metadata: dict[str, Any] = field(default_factory=dict)  # further keys, without the "<architecture>." prefix
    extra_tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # rope_freqs
    fallbacks: list[str] = field(default_factory=list)  # tensors written wider than asked (unquantisable rows)

    @property
    def per_block(self) -> bool:
        return self.architecture == "deci"


def gguf_source(model: nn.Module) -> nn.Module:
    """The model whose weights the file holds: a sliced model with one basis (every shortcut the identity)
    is its standard format first; other sliced models are refused."""
    layout = layout_of(model.config)
    if layout is None or layout.stream is None or layout.standard:
        return model
    shortcuts = [module for module in model.modules() if isinstance(module, ShortcutLinear)]
    if layout.stream.rotation == "shared" and all(s.shortcut_minus_identity.abs().max() <= 1e-5 for s in shortcuts):
        return standard_model(model)
    raise LmsliceError(NO_SHORTCUTS)


def gguf_layout(model: nn.Module) -> GgufLayout:
    """The llama.cpp architecture and widths for `model` (already through `gguf_source`); refuses what
    llama.cpp cannot run, naming the alternative."""
    adapter = find_adapter(model)
    family, config = adapter.family, model.config
    check_exportable(family)
    blocks = get_module(model, adapter.blocks)
    embedding = model.get_input_embeddings().weight.shape[1]
    counts = [head_counts(block, adapter.attention) for block in blocks]
    heads, kv_heads, head_dim = [count[0] for count in counts], [count[1] for count in counts], counts[0][2]
    # deci leaves a block whose n_ff is 0 before adding its attention's output (src/models/deci.cpp), and
    # llama.cpp 0.3.36 aborted on such a file: a block without MLP is written with one channel of zero
    # weights instead, which adds exactly nothing (tests/test_llamacpp.py)
    widths = [max(_mlp_width(block, adapter.mlp), 1) for block in blocks]
    experts = [0 if experts_of(block, adapter.mlp) is None else
               getattr(experts_of(block, adapter.mlp), adapter.mlp.experts.count_attribute) for block in blocks]
    per_block = len({*zip(heads, kv_heads, widths, experts)}) > 1
    check_exportable(family, per_block=per_block, config=config)
    name = "deci" if per_block else adapter.gguf.architecture
    architecture = ARCHITECTURES[name]
    activation = getattr(config, "hidden_activation", None) or config.hidden_act
    if activation not in architecture.activations:
        raise LmsliceError(f"llama.cpp's {name} uses {architecture.activations[0]}, this model {activation}")
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    tied = head is embed or (head.shape == embed.shape and torch.equal(head, embed))
    if adapter.gguf.tied_head and not tied:
        raise LmsliceError(f"llama.cpp's {name} reads its head from the embedding, but this model's head is its own: "
                           "keep the embeddings tied")
    context = config.max_position_embeddings
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and not architecture.sliding_window:
        context = min(context, window)
    theta, metadata, extra_tensors = rope_scaling(config, name, head_dim)
    rotary = rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return GgufLayout(name, embedding, head_dim, heads, kv_heads, widths, tied, context, theta,
                      float(config.rms_norm_eps), family, adapter.gguf.norm_shift,
                      None if rotary is None else int(head_dim * rotary), {**adapter.gguf.metadata(config), **metadata},
                      extra_tensors)


def _mlp_width(block: nn.Module, mlp: Mlp) -> int:
    """The block's MLP channels (each expert's, in a block of experts)."""
    experts = experts_of(block, mlp)
    if experts is not None:
        return getattr(experts, mlp.experts.consumer).shape[-1]
    return get_module(block, mlp.consumer).in_features


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope parameters of the model's global layers (per layer type in Gemma 3)."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return parameters.get("full_attention", parameters)


def rope_scaling(config: Any, architecture: str, head_dim: int,
                 ) -> tuple[float, dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """The rope base of the model's global layers and their rope scaling, as llama.cpp's converter writes
    it: `linear` and `yarn` as metadata, `llama3` as the `rope_freqs` tensor (each frequency's divisor),
    for the architectures that read it. What llama.cpp cannot represent is refused."""
    parameters = rope_parameters(config)
    theta = float(parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind == "default":
        return theta, {}, []
    if kind == "linear":
        return theta, {"rope.scaling.type": "linear", "rope.scaling.factor": float(parameters["factor"])}, []
    if kind == "yarn":
        return theta, _yarn(config, parameters), []
    if kind == "llama3" and ARCHITECTURES[architecture].rope_freqs:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).double() / head_dim)
        scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].double()
        return theta, {}, [("rope_freqs.weight", (default / scaled).float())]
    if kind == "llama3":
        raise LmsliceError(f"llama.cpp's {architecture} reads no rope_freqs tensor, which Llama 3's rope scaling "
                           "needs: save the model and run it with transformers")
    if kind == "longrope":
        raise LmsliceError("llama.cpp chooses longrope's long or short factors by the context it is given, "
                           "transformers by each sequence's length: save the model and run it with transformers")
    raise LmsliceError(f"llama.cpp has no {kind!r} rope scaling that computes what transformers does: save the model "
                       "and run it with transformers")


def _yarn(config: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    """YaRN as llama.cpp computes it: the ramp between its default corrections (beta_fast 32, beta_slow 1,
    rounded outwards), and an attention factor of 0.1·ln(factor) + 1, which `rope.scaling.attn_factor`
    multiplies to give the model's own (transformers': `attention_factor`, or from mscale/mscale_all_dim)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factor = parameters.get("factor") or config.max_position_embeddings / parameters["original_max_position_embeddings"]
    corrections = (parameters.get("beta_fast") or 32, parameters.get("beta_slow") or 1,
                   parameters.get("truncate", True))
    if corrections != (32, 1, True):
        raise LmsliceError(f"llama.cpp's YaRN ramps between beta_fast 32 and beta_slow 1, rounded outwards; this "
                           f"model's beta_fast, beta_slow, truncate are {corrections}: save the model and run it "
                           "with transformers")
    attention = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")[1]
    metadata = {"rope.scaling.type": "yarn", "rope.scaling.factor": float(factor),
                "rope.scaling.original_context_length": int(parameters["original_max_position_embeddings"])}
    default = 0.1 * math.log(factor) + 1 if factor > 1 else 1.0
    if not math.isclose(attention, default, rel_tol=1e-7):
        metadata["rope.scaling.attn_factor"] = float(attention / default)
    return metadata


def interleave_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows from HF's rope layout (first halves, then second halves) to llama.cpp's
    "normal" one (pairs interleaved): the permutation `convert_hf_to_gguf.py` applies to q and k."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model: nn.Module, layout: GgufLayout) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) in the model's own order, renamed, permuted and shifted as llama.cpp reads them."""
    import gguf

    architecture = next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == layout.architecture)
    names = gguf.get_tensor_name_map(architecture, len(layout.heads))
    adapter = find_adapter(model)
    head_key = f"{adapter.head}.weight"
    experts = adapter.mlp.experts if adapter.mlp is not None else None
    # each experts' 3-D weight (no ".weight" in its name) -> the GGUF names of its parts
    expert_names = {} if experts is None else {
        f"{adapter.blocks}.{index}.{experts.module}.{getattr(experts, role)}":
            [f"{gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, tensor)].format(bid=index)}.weight" for tensor in parts]
        for index in range(len(layout.heads)) for role, parts in EXPERT_TENSORS.items()}
    tensors = []
    for key, value in model.state_dict().items():
        if key == head_key and layout.tied_embeddings:
            continue
        if key in expert_names:
            parts = value.detach().to("cpu", torch.float32).chunk(len(expert_names[key]), dim=1)
            tensors += [(name, part.contiguous()) for name, part in zip(expert_names[key], parts)]
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LmsliceError(f"no GGUF name for {key} in llama.cpp's {layout.architecture}")
        if name.startswith("blk.") and ".attn_" in name and not layout.heads[int(name.split(".")[1])]:
            continue  # deci builds a block without heads from no attention tensors, not even its norm
        data = value.detach().to("cpu", torch.float32)
        if not data.numel() and ".ffn_" in name:  # a block without MLP: its one zero channel (`gguf_layout`)
            data = torch.zeros(*(size or 1 for size in data.shape))
        if ARCHITECTURES[layout.architecture].interleaved_rope and (".attn_q." in name or ".attn_k." in name):
            block = int(name.split(".")[1])
            data = interleave_rope(data, (layout.heads if ".attn_q." in name else layout.kv_heads)[block])
        if name.endswith("norm.weight"):
            data = data + layout.norm_shift
        tensors.append((name, data))
    return tensors + layout.extra_tensors


def _encode(data: torch.Tensor, outtype: str, name: str, fallbacks: list[str]) -> tuple[np.ndarray, Any]:
    """The tensor's bytes in `outtype` (1-D tensors, norms and biases, stay float32 as the converter keeps
    them); a Q8_0 matrix whose rows are not a multiple of 32 is written float16, as llama-quantize would."""
    import gguf

    array = data.numpy()
    quant = gguf.GGMLQuantizationType
    if outtype == "f32" or data.dim() == 1:
        return array, quant.F32
    if outtype == "q8_0" and array.shape[-1] % QUANT_BLOCK:
        fallbacks.append(f"{name} ({array.shape[-1]} columns)")
        outtype = "f16"
    if outtype == "f16":
        return array.astype(np.float16), quant.F16
    qtype = quant.BF16 if outtype == "bf16" else quant.Q8_0
    return gguf.quants.quantize(array, qtype), qtype


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def export_gguf(model: nn.Module, path: str | os.PathLike[str], tokenizer: Any = None, *, outtype: str = "f16",
                source_gguf: str | os.PathLike[str] | None = None, name: str = "lmslice") -> GgufLayout:
    """Writes `model` to `path` as a GGUF llama.cpp runs; returns what was written.

    The vocabulary comes from `source_gguf` when given (every `tokenizer.*` field copied: the model was
    loaded from it) or else from `tokenizer`, a byte-level BPE `transformers` tokenizer (written as
    llama.cpp's `gpt2` model, with the `default` pre-tokenizer)."""
    import gguf

    if outtype not in OUTTYPES:
        raise LmsliceError(f"unknown GGUF type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    # an existing GGUF file is replaced, but not the one the vocabulary is read from, nor any other file
    path = check_output(path, overwrite=True, reads=[("the vocabulary's source", source_gguf)], kind=GGUF)
    model = gguf_source(model)
    layout = gguf_layout(model)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    vocabulary = gguf_vocabulary(tokenizer, vocab_rows, source_gguf)
    tensors = gguf_tensors(model, layout)

    # named as `clear_leftovers` recognises, so the next run removes what a killed one left
    temporary = path.with_name(f".{path.name}.partial-{process_tag()}")
    make_parents(path)
    try:
        writer = gguf.GGUFWriter(temporary, layout.architecture)
        _write_metadata(writer, layout, vocab_rows, outtype, name)
        for key, (vtype, value, sub_type) in vocabulary.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        for tensor_name, data in tensors:
            array, qtype = _encode(data, outtype, tensor_name, layout.fallbacks)
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # a read-only file system refuses even the clean-up
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise LmsliceError(f"cannot write {path}: {first_line(error)} (nothing was written)") from error
        raise
    return layout


def _write_metadata(writer: Any, layout: GgufLayout, vocab_rows: int, outtype: str, name: str) -> None:
    import gguf

    def per_block(values: list[int]) -> int | list[int]:
        return values if layout.per_block else values[0]

    writer.add_name(name)
    writer.add_context_length(layout.context_length)
    writer.add_embedding_length(layout.embedding_length)
    writer.add_block_count(len(layout.heads))
    writer.add_feed_forward_length(per_block(layout.mlp_widths))
    writer.add_head_count(per_block(layout.heads))
    writer.add_head_count_kv(per_block(layout.kv_heads))
    writer.add_key_length(layout.head_dim)  # llama.cpp would otherwise derive it from hidden / heads
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.rope_dimensions or layout.head_dim)
    writer.add_rope_freq_base(layout.rope_theta)
    writer.add_layer_norm_rms_eps(layout.rms_norm_eps)
    writer.add_vocab_size(vocab_rows)
    for key, value in layout.metadata.items():
        writer.add_key_value(f"{layout.architecture}.{key}", value, *_value_type(value))
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _value_type(value: Any) -> tuple[Any, Any]:
    """The GGUF type of a metadata value (and of an array's items): llama.cpp reads floats as float32,
    counts as uint32."""
    import gguf

    kinds = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32,
             str: gguf.GGUFValueType.STRING}
    if isinstance(value, list):
        return gguf.GGUFValueType.ARRAY, kinds[type(value[0])]
    return kinds[type(value)], None


Vocabulary = dict[str, tuple[Any, Any, Any]]  # GGUF key -> (value type, value, array element type)


def gguf_vocabulary(tokenizer: Any, vocab_rows: int, source_gguf: str | os.PathLike[str] | None) -> Vocabulary:
    """The vocabulary fields a GGUF of an embedding with `vocab_rows` rows gets: `source_gguf`'s copied
    when given, else `tokenizer`'s."""
    vocabulary = _copied_vocabulary(source_gguf) if source_gguf is not None else _hf_vocabulary(tokenizer, vocab_rows)
    if len(vocabulary["tokenizer.ggml.tokens"][1]) != vocab_rows:
        raise LmsliceError(f"the tokenizer has {len(vocabulary['tokenizer.ggml.tokens'][1])} tokens, the embedding "
                           f"{vocab_rows} rows")
    return vocabulary


def _copied_vocabulary(source: str | os.PathLike[str]) -> Vocabulary:
    """Every `tokenizer.*` field of the GGUF the model was loaded from."""
    import gguf

    reader = gguf.GGUFReader(source)
    copied = {}
    for key, read in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = read.types[0]
            sub_type = read.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            copied[key] = (vtype, read.contents(), sub_type)
    if "tokenizer.ggml.tokens" not in copied:
        raise LmsliceError(f"{source} has no tokenizer to copy")
    return copied


def _hf_vocabulary(tokenizer: Any, vocab_rows: int) -> Vocabulary:
    """A byte-level BPE `transformers` tokenizer as llama.cpp's `gpt2` vocabulary; ids past the
    tokenizer's up to the embedding's rows are unused padding, as the converter writes them."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise LmsliceError("the GGUF export writes byte-level BPE tokenizers (GPT-2 style); this one is not: export "
                           "a model loaded from a GGUF file (its tokenizer is copied) or convert the saved model "
                           "with llama.cpp's convert_hf_to_gguf.py")
    by_id = {index: text for text, index in backend.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > vocab_rows:
        raise LmsliceError(f"the tokenizer has {len(by_id)} tokens, more than the embedding's {vocab_rows} rows")
    kinds = gguf.TokenType
    added = {index: (kinds.CONTROL if token.special else kinds.USER_DEFINED)
             for index, token in tokenizer.added_tokens_decoder.items()}
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(vocab_rows)]
    types = [added.get(index, kinds.NORMAL if index in by_id else kinds.UNUSED) for index in range(vocab_rows)]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    value = gguf.GGUFValueType
    fields: Vocabulary = {
        "tokenizer.ggml.model": (value.STRING, "gpt2", None),
        "tokenizer.ggml.pre": (value.STRING, "default", None),
        "tokenizer.ggml.tokens": (value.ARRAY, tokens, value.STRING),
        "tokenizer.ggml.token_type": (value.ARRAY, [int(kind) for kind in types], value.INT32),
        "tokenizer.ggml.merges": (value.ARRAY, merges, value.STRING),
        "tokenizer.ggml.add_bos_token": (value.BOOL, bool(getattr(tokenizer, "add_bos_token", False)), None),
    }
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            key = "tokenizer.ggml.padding_token_id" if role == "pad" else f"tokenizer.ggml.{role}_token_id"
            fields[key] = (value.UINT32, int(token_id), None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields["tokenizer.chat_template"] = (value.STRING, template, None)
    return fields
