"""A budget in bytes of a file format, turned into the planner's budget of parameters (`--target-size`).

Pruning removes block matrices only: MLP channels (rows of the gate and up projections, columns of the
down projection) and query heads (rows of q, columns of the output projection, key/value rows where a
whole group goes). The embedding, the head and the norms stay. So a format's file shrinks from the
dense model's size by what the removed weights cost in it, and the fraction to keep is

    keep = 1 - (dense bytes - target bytes) / (dense parameters x bytes a removed parameter saves)

The dense bytes are counted tensor by tensor, each in the type the format stores it in (a tied embedding
once), with the file's own overhead (the safetensors header; a GGUF's metadata, its vocabulary above
all, and tensor alignment). A removed parameter is counted at the cheapest rate of any block's MLP or
attention (their matrices' bytes over their weights): where the plan removes dearer weights the file
comes out smaller than the target, never larger, and the planner itself stops at or under its budget.

GGUF formats are the types lmslice writes (`lmslice export --outtype`: 1-D tensors stay float32, a
Q8_0 matrix whose rows are not a multiple of 32 is written float16) and the mixtures llama-quantize
makes from them (`llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp, as vendored by
llama-cpp-python 0.3.36): the head (or the tied embedding) in Q6_K, or Q8_0 where its rows do not
divide into 256-blocks; Q4_K_M and Q5_K_M give attn_v and ffn_down Q6_K in the layers `use_more_bits`
picks; Q4_K_S gives ffn_down Q5_K in the first eighth of the layers and attn_v in the first four; a
matrix whose rows do not divide into its type's blocks falls back (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to
Q8_0, then float16). The rules for 70B-sized models and eight-expert mixtures are not modelled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmslice.adapters import find_adapter
from lmslice.errors import LmsliceError
from lmslice.export.gguf import Vocabulary, check_exportable
from lmslice.modeling import get_module
from lmslice.prune.plan import fewest_parameters
from lmslice.slicing import count_parameters

# How many bytes a size's unit is: decimal SI prefixes and binary IEC ones, as `ls` and `df` print them.
UNITS = {"": 1, "B": 1, **{prefix + "B": 1000 ** power for power, prefix in enumerate("KMGT", 1)},
         **{prefix + "IB": 1024 ** power for power, prefix in enumerate("KMGT", 1)},
         **{prefix: 1000 ** power for power, prefix in enumerate("KMGT", 1)}}

# GGUF types lmslice writes itself (`lmslice export --outtype`) and llama-quantize's mixtures.
WRITTEN = ("f32", "f16", "bf16", "q8_0")
QUANTISED = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_0")
FORMATS = ("safetensors", *(f"gguf-{kind}" for kind in WRITTEN + QUANTISED))

# The base type of each llama-quantize mixture (`llama_ftype_get_default_type`).
MIXTURE_BASE = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q5_k_s": "Q5_K", "q4_k_m": "Q4_K",
                "q4_k_s": "Q4_K", "q4_0": "Q4_0"}
# A type a matrix falls back to when its rows do not divide into the type's blocks (`tensor_type_fallback`).
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
GGUF_ALIGNMENT = 32  # every tensor's data starts at a multiple of it (gguf.GGUF_DEFAULT_ALIGNMENT)
# Metadata other than the vocabulary: architecture, widths, rope, file type (a few hundred bytes; per-block
# widths add 12 bytes a block).
GGUF_METADATA_BYTES = 2048


def row_block(file_format: str | None) -> int:
    """The row length `file_format`'s main type quantises in blocks of (1: any)."""
    kind = (file_format or "").removeprefix("gguf-")
    if kind in MIXTURE_BASE:
        return _block(MIXTURE_BASE[kind])
    return 1


def parse_size(text: str) -> int:
    """Bytes from a size as people write it: 300MB, 4GB, 4GiB, 1.5G, 123456789."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in UNITS:
        raise LmsliceError(f"--target-size {text!r} is not a size: write it as 300MB, 4GB, 4GiB or a number of bytes")
    size = float(match.group(1)) * UNITS[unit]
    if size < 1:
        raise LmsliceError(f"--target-size {text!r} is not a size: it must be positive")
    return int(size)


def format_size(size: float) -> str:
    if size >= 1e9:
        return f"{size / 1e9:.2f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


@dataclass(frozen=True)
class SizeBudget:
    """`target_bytes` of `file_format`, as the fraction `keep` of the dense model's parameters, which
    reaches about `estimated_bytes` (at most the target)."""

    target_bytes: int
    file_format: str
    keep: float
    dense_bytes: int
    estimated_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"target_bytes": self.target_bytes, "format": self.file_format, "keep": self.keep,
                "dense_bytes": self.dense_bytes, "estimated_bytes": self.estimated_bytes}


def size_budget(model: nn.Module, target_bytes: int, file_format: str, *, save_dtype: torch.dtype,
                vocabulary: Vocabulary | None = None, round_to: int = 8, widths: str = "measured",
                heads: bool = False) -> SizeBudget:
    """The pruning budget that makes `model`'s file in `file_format` (safetensors in `save_dtype`, or a
    GGUF whose `vocabulary` is given) at most `target_bytes`. Refuses, in one line, a target the dense
    file already meets, or one below the file of the fewest parameters pruning can leave (`round_to`,
    `widths`, `heads` as the plan's)."""
    dense_bytes, removed_rate = file_bytes(model, file_format, save_dtype=save_dtype, vocabulary=vocabulary)
    dense = count_parameters(model)
    smallest = dense_bytes - (dense - fewest_parameters(model, round_to, widths=widths, heads=heads)) * removed_rate
    if target_bytes < smallest:
        raise LmsliceError(f"--target-size {format_size(target_bytes)} is below what pruning MLP channels"
                           f"{' and attention heads' if heads else ''} can reach: the smallest {file_format} file "
                           f"is about {format_size(math.ceil(smallest))} (the dense one {format_size(dense_bytes)})")
    if target_bytes >= dense_bytes:
        raise LmsliceError(f"--target-size {format_size(target_bytes)}: the dense model's {file_format} file is "
                           f"already about {format_size(dense_bytes)}, nothing to prune; give a smaller size")
    keep = 1 - (dense_bytes - target_bytes) / (dense * removed_rate)
    estimated = dense_bytes - (1 - keep) * dense * removed_rate
    return SizeBudget(target_bytes, file_format, keep, dense_bytes, math.floor(estimated))


def file_bytes(model: nn.Module, file_format: str, *, save_dtype: torch.dtype,
               vocabulary: Vocabulary | None = None) -> tuple[int, float]:
    """How many bytes `model` takes as a `file_format` file, and how many a parameter pruning removes
    saves at least there."""
    if file_format == "safetensors":
        return safetensors_bytes(model, save_dtype), save_dtype.itemsize
    if vocabulary is None:
        raise LmsliceError(f"sizing a {file_format} file needs the model's vocabulary")
    check_exportable(find_adapter(model).family)
    tensors = [(name, shape, gguf_type(name, shape, file_format.removeprefix("gguf-"), placement))
               for name, shape, placement in _gguf_tensor_places(model)]
    data = sum(math.ceil(_type_bytes(kind, math.prod(shape)) / GGUF_ALIGNMENT) * GGUF_ALIGNMENT
               for _, shape, kind in tensors)
    infos = sum(8 + len(name) + 4 + 8 * len(shape) + 4 + 8 for name, shape, _ in tensors)
    header = 24 + GGUF_METADATA_BYTES + _metadata_bytes(vocabulary) + infos + GGUF_ALIGNMENT
    return data + header, _cheapest_removal(tensors)


def safetensors_bytes(model: nn.Module, save_dtype: torch.dtype) -> int:
    """Every parameter once (a tied head is the embedding's) in `save_dtype`, and the JSON header that
    names each tensor, its dtype, shape and offsets (a little over 100 bytes a tensor)."""
    parameters = dict(model.named_parameters())  # shared parameters once, under their first name
    data = sum(parameter.numel() * (save_dtype.itemsize if parameter.is_floating_point()
                                    else parameter.element_size()) for parameter in parameters.values())
    return data + sum(len(name) + 96 for name in parameters) + 64


@dataclass(frozen=True)
class _Placement:
    """Where llama-quantize's rules see a tensor: its role, and for attn_v and ffn_down its index among
    its kind and how many there are."""

    role: str
    index: int = 0
    count: int = 1
    tied: bool = False


def _gguf_tensor_places(model: nn.Module) -> list[tuple[str, tuple[int, ...], _Placement]]:
    """(GGUF name, shape as llama.cpp reads it (row length first), placement) of every tensor the export
    writes, in its order: the head once if tied."""
    import gguf

    adapter = find_adapter(model)
    blocks = len(get_module(model, adapter.blocks))
    architecture = next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == adapter.gguf.architecture)
    names = gguf.get_tensor_name_map(architecture, blocks)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    listed = []
    for key, parameter in model.named_parameters():  # a tied head is not listed: it is the embedding
        name = names.get_name(key, try_suffixes=(".weight", ".bias")) or key
        listed.append((name, tuple(reversed(parameter.shape))))
    values = [name for name, shape in listed if "attn_v.weight" in name and len(shape) >= 2]
    places = []
    for name, shape in listed:
        role = name if name in ("output.weight", "token_embd.weight") else \
            next((role for role in ("attn_qkv.weight", "attn_v.weight", "ffn_down") if role in name), "")
        index, count = (values.index(name), len(values)) if role == "attn_v.weight" else (0, 1)
        if role == "ffn_down":
            index, count = int(name.split(".")[1]), blocks
        places.append((name, shape, _Placement(role, index, count, tied)))
    return places


def gguf_type(name: str, shape: tuple[int, ...], kind: str, place: _Placement) -> str:
    """The GGML type a tensor of `shape` (row length first) is stored in, in a GGUF of `kind`."""
    quantisable = len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
    if not quantisable or kind == "f32":
        return "F32"
    if kind in ("f16", "bf16"):
        return kind.upper()
    if kind == "q8_0":
        return "Q8_0" if shape[0] % 32 == 0 else "F16"
    chosen = _mixture_type(kind, shape[0], place)
    if shape[0] % _block(chosen):
        chosen = FALLBACK.get(chosen, chosen)
    return chosen if shape[0] % _block(chosen) == 0 else "F16"


def _mixture_type(kind: str, row_length: int, place: _Placement) -> str:
    """llama-quantize's choice for one tensor in the mixture `kind`, before the fallback for its rows."""
    base = MIXTURE_BASE[kind]
    if place.role == "output.weight" or (place.tied and place.role == "token_embd.weight"):
        if row_length % _block(base):
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"

    def use_more_bits() -> bool:
        index, count = place.index, place.count
        return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2

    if place.role == "attn_v.weight":
        if kind in ("q4_k_m", "q5_k_m") and use_more_bits():
            return "Q6_K"
        if kind == "q4_k_s" and place.index < 4:
            return "Q5_K"
    if place.role == "ffn_down":
        if kind in ("q4_k_m", "q5_k_m") and use_more_bits():
            return "Q6_K"
        if kind == "q4_k_s" and place.index < place.count // 8:
            return "Q5_K"
    if place.role == "attn_qkv.weight":
        return {"q4_k_m": "Q5_K", "q5_k_m": "Q6_K"}.get(kind, base)
    return base


def _block(kind: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]


def _type_bytes(kind: str, weights: int) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return weights / block * size


def _cheapest_removal(tensors: list[tuple[str, tuple[int, ...], str]]) -> float:
    """The fewest bytes a weight pruning removes saves: the cheapest of every block's MLP and attention
    (each channel or head takes a row or column of each of their matrices, of equal length)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for name, shape, kind in tensors:
        parts = name.split(".")
        if parts[0] == "blk" and len(shape) >= 2 and parts[2].startswith(("ffn_", "attn_")):
            part = groups.setdefault((parts[1], parts[2][:4]), [0.0, 0.0])
            part[0] += _type_bytes(kind, math.prod(shape))
            part[1] += math.prod(shape)
    return min(total / weights for total, weights in groups.values() if weights)


# Bytes of a GGUF metadata value of each fixed-size type (gguf.GGUFValueType names).
_VALUE_BYTES = {"UINT8": 1, "INT8": 1, "BOOL": 1, "UINT16": 2, "INT16": 2, "UINT32": 4, "INT32": 4, "FLOAT32": 4,
                "UINT64": 8, "INT64": 8, "FLOAT64": 8}


def _metadata_bytes(fields: Vocabulary) -> int:
    """The bytes GGUF key-value fields take: key, type, value (strings and arrays with 8-byte lengths)."""
    def value_bytes(kind: Any, value: Any, item_kind: Any) -> int:
        if kind.name == "STRING":
            return 8 + len(str(value).encode())
        if kind.name == "ARRAY":
            return 4 + 8 + sum(value_bytes(item_kind, item, None) for item in value)
        return _VALUE_BYTES[kind.name]

    return sum(8 + len(key) + 4 + value_bytes(kind, value, item_kind)
               for key, (kind, value, item_kind) in fields.items())
