"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import resource
import sys

import torch
from torch import nn

from lmslice.errors import LmsliceError
from lmslice.io.models import DTYPES


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="dtype to load and run the model in (default: float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LmsliceError(f"device {device} requested but CUDA is not available; use --device cpu")


def context_length(model: nn.Module, requested: int) -> int:
    """`requested`, capped by the model's maximum context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(requested, limit) if limit else requested


def peak_memory_gib(device: str) -> float:
    """Peak resident memory of this process (or peak CUDA allocation on a GPU), in GiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20
