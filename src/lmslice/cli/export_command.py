"""`lmslice export`: write a dense, pruned or standard-format model as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from torch import nn

from lmslice.errors import LmsliceError
from lmslice.export.gguf import OUTTYPES, GgufLayout, export_gguf
from lmslice.io.models import load_with_tokenizer, model_path
from lmslice.layout import layout_of


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a model as a GGUF file for llama.cpp",
        description="Per-block MLP widths and query heads (--target-params) become llama.cpp's deci "
                    "architecture; models whose blocks are equal (dense, --mlp-widths uniform, --format standard) "
                    "the family's own (llama, qwen2, gemma). K-quants: run llama.cpp's llama-quantize on the result "
                    "(widths from --align gguf-k quantise without falling back).")
    parser.add_argument("model", help="model directory (dense, pruned or standard format), .gguf file, or smollm2-135m")
    parser.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16",
                        help="weight type: matrices in it, norms and biases float32 (default: f16)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    parser.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    parser.set_defaults(run=run)


def check_gguf_output(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuses, before any work, an output that is not a new .gguf file in an existing directory."""
    path = Path(path)
    if path.suffix != ".gguf":
        raise LmsliceError(f"{path}: a GGUF file name ends in .gguf")
    if not path.absolute().parent.is_dir():
        raise LmsliceError(f"cannot write {path}: its directory does not exist")
    if path.is_dir() or (path.exists() and not overwrite):
        raise LmsliceError(f"{path} exists; pass --overwrite to replace it")
    return path


def source_gguf(source: str, model: nn.Module) -> Path | None:
    """The GGUF whose tokenizer the export copies: the source itself, or the one the model was compressed
    from (recorded by `lmslice slice`), if it is still there."""
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
    path = check_gguf_output(args.gguf, args.overwrite)
    model, tokenizer = load_with_tokenizer(args.model)
    layout = write_gguf(model, tokenizer, args.model, path, args.outtype)
    if args.json:
        print(json.dumps({"gguf": str(path), "bytes": os.path.getsize(path), "outtype": args.outtype,
                          "architecture": layout.architecture, "mlp_widths": layout.mlp_widths,
                          "attention_heads": layout.heads, "fallbacks": layout.fallbacks}))
    else:
        print(describe(layout, path, args.outtype))
    return 0
