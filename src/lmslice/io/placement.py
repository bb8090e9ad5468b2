"""Opening a model where its blocks will live: in memory on the compute device, in CPU memory streamed one
block at a time to an accelerator it does not fit, or in its safetensors checkpoint on disk."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmslice.errors import LmsliceError
from lmslice.io.models import (check_finite, load_tokenizer, load_with_tokenizer, model_path, open_skeleton,
                               resolve_dtype, source_dtype)
from lmslice.io.offload import open_offloaded
from lmslice.walk import DeviceStreamed, InMemory, Placement

PLACEMENTS = ("auto", "memory", "streamed", "offload")
# The share of an accelerator's free memory a model in memory may take: the rest holds the calibration
# stream, one block's activations and the solvers' matrices.
DEVICE_SHARE = 0.6


def model_bytes(source: str | os.PathLike[str], dtype: torch.dtype) -> int | None:
    """The model's weights in `dtype`, from its config alone (`open_skeleton`); None for a GGUF file, whose
    config takes as long to read as its vocabulary."""
    if model_path(source).suffix == ".gguf":
        return None
    try:
        skeleton = open_skeleton(source, dtype)
    except (OSError, ValueError):
        return None
    return sum(p.numel() for p in skeleton.parameters()) * torch.finfo(dtype).bits // 8


def choose_placement(source: str | os.PathLike[str], placement: str, device: str, dtype: torch.dtype) -> str:
    """`placement` as asked, or for "auto": in memory, unless the device is an accelerator whose free memory
    the model would fill beyond `DEVICE_SHARE`: then streamed from CPU memory."""
    if placement not in PLACEMENTS:
        raise LmsliceError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if placement != "auto":
        return placement
    if torch.device(device).type != "cuda":
        return "memory"
    size = model_bytes(source, dtype)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return "streamed" if size is not None and size > DEVICE_SHARE * free else "memory"


def streamed_dtype(source: str | os.PathLike[str], compute_dtype: torch.dtype) -> torch.dtype:
    """What streamed blocks are kept in, in CPU memory: as the checkpoint stores them (half the bytes of
    float32 for most), unless they compute in fewer bits."""
    return min(source_dtype(source), compute_dtype, key=lambda kind: torch.finfo(kind).bits)


def open_placed(source: str | os.PathLike[str], placement: str, *, device: str, dtype: str, out: Path | None = None,
                overwrite: bool = False, save_dtype: torch.dtype | None = None, resume: bool = False,
                ) -> tuple[nn.Module, PreTrainedTokenizerBase | None, Placement]:
    """The model from `source` with its blocks where `placement` (`choose_placement`) says, its tokenizer,
    and the placement: "memory" on `device`; "streamed" in CPU memory, the rest of the model on `device`;
    "offload" in the checkpoint, streamed to the output `out` in `save_dtype` (a run to be `resume`d)."""
    compute_dtype = resolve_dtype(dtype)
    chosen = choose_placement(source, placement, device, compute_dtype)
    if chosen == "offload":
        if out is None:
            raise LmsliceError("offloaded blocks need an output directory to write them to")
        model, storage = open_offloaded(source, out, dtype=compute_dtype, device=device, overwrite=overwrite,
                                        save_dtype=save_dtype, resume=resume)
        return model, load_tokenizer(source), storage
    if chosen == "memory":
        model, tokenizer = load_with_tokenizer(source, dtype=compute_dtype, device=device)
        check_finite(model)
        return model, tokenizer, InMemory(device)
    stored = streamed_dtype(source, compute_dtype)
    model, tokenizer = load_with_tokenizer(source, dtype=stored, device="cpu")
    check_finite(model)
    return model, tokenizer, DeviceStreamed(device, compute_dtype, stored)

