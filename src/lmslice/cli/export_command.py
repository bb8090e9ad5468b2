"""`lmslice export`: write a dense, pruned or standard-format model as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from torch import nn

from lmslice.errors import LmsliceError
from lmslice.export.gguf import OUTTYPES, GgufLayout, export_gguf
from lmslice.io.models import load_with_tokenizer, model_path, read_config
from lmslice.io.outputs import GGUF, check_output, check_room
from lmslice.layout import layout_of
from lmslice.slicing import count_parameters


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a model as a GGUF file for llama.cpp",
        description="Per-block MLP widths and query heads (compress --keep) become llama.cpp's deci "
                    "architecture; models whose blocks are equal (dense, --mlp-widths uniform, --format standard) "
                    "the family's own (llama, qwen2, gemma). K-quants: run llama.cpp's llama-quantize on the result "
                    "(widths from --align gguf-k quantise without falling back).")
    parser.add_argument("model", help="model directory (dense, pruned or standard format), .gguf file, or smollm2-135m")
    output = parser.add_argument_group("output")
    output.add_argument("-o", "--output", "--gguf", dest="gguf", required=True, metavar="OUT.gguf",
                        help="the GGUF file to write")
    output.add_argument("--outtype", choices=OUTTYPES, default="f16",
                        help="weight type of the matrices (norms and biases stay float32): f32, f16, bf16, or q8_0 = "
                             "8-bit blocks of 32 with a float16 scale (default: f16)")
    output.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    output.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    parser.set_defaults(run=run)


# Bytes a weight takes in the GGUF file by type (Q8_0: blocks of 32 int8 values and a float16 scale).
GGUF_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


def gguf_bytes(parameters: float, outtype: str) -> float:
    """About how large a GGUF file of `parameters` weights in `outtype` is (norms are few)."""
    return parameters * GGUF_BYTES_PER_WEIGHT[outtype]


def recorded_source(source: str) -> Path | None:
    """The model an lmslice output in directory `source` records it was compressed from, where that is a
    local path (its GGUF's tokenizer is read by the export)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    layout = read_config(Path(source)).get("lmslice")
    recorded = layout.get("source_model") if isinstance(layout, dict) else None
    if not isinstance(recorded, str):
        return None
    try:
        return model_path(recorded)
    except LmsliceError:
        return None


def source_gguf(source: str, model: nn.Module) -> Path | None:
    """The GGUF whose tokenizer the export copies: the source itself, or the one the model was compressed
    from (recorded by `lmslice compress`), if it is still there."""
    layout = layout_of(model.config)
    recorded = layout.source_model if layout is not None else None
    for candidate in (source, recorded):
        if candidate is not None:
            try:
                path = model_path(candidate)
            except LmsliceError:
                continue
            if path.suffix == ".gguf" and path.is_file():
                return path
    return None


def write_gguf(model: nn.Module, tokenizer: object, source: str, path: Path, outtype: str) -> GgufLayout:
    return export_gguf(model, path, tokenizer, outtype=outtype, source_gguf=source_gguf(source, model),
                       name=Path(str(source)).stem)


def describe(layout: GgufLayout, path: Path, outtype: str) -> str:
    widths = (f"MLP widths {min(layout.mlp_widths)}-{max(layout.mlp_widths)}, query heads "
              f"{min(layout.heads)}-{max(layout.heads)} by block" if layout.per_block
              else f"MLP width {layout.mlp_widths[0]}, {layout.heads[0]} query heads in every block")
    lines = [f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {outtype}): llama.cpp architecture "
             f"{layout.architecture}, hidden {layout.embedding_length}, {widths}"]
    if layout.fallbacks:
        lines.append(f"  float16 (rows not a multiple of 32): {', '.join(layout.fallbacks)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    reads = [("the source model", model_path(args.model)), ("the model it was compressed from",
                                                            recorded_source(args.model))]
    path = check_output(args.gguf, args.overwrite, reads, kind=GGUF)
    model, tokenizer = load_with_tokenizer(args.model)
    check_room([(path, gguf_bytes(count_parameters(model), args.outtype))])
    layout = write_gguf(model, tokenizer, args.model, path, args.outtype)
    if args.json:
        print(json.dumps({"gguf": str(path), "bytes": os.path.getsize(path), "outtype": args.outtype,
                          "architecture": layout.architecture, "mlp_widths": layout.mlp_widths,
                          "attention_heads": layout.heads, "fallbacks": layout.fallbacks}))
    else:
        print(describe(layout, path, args.outtype))
    return 0
