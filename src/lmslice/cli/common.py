"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import resource
import sys

import torch
from torch import nn

from lmslice.errors import LmsliceError
from lmslice.evaluation.zeroshot import PAPER_TASKS
from lmslice.io.data import describe_sources
from lmslice.io.models import DTYPES


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="dtype to load and run the model in (default: float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def add_slicing_options(parser: argparse.ArgumentParser) -> None:
    """Calibration and width options of `slice` and `report`."""
    parser.add_argument("--calib", required=True, help=f"calibration text: {describe_sources()}")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default: 128)")
    parser.add_argument("--calib-seqlen", type=int, default=2048,
                        help="tokens per calibration window, capped by the model context (default: 2048)")
    parser.add_argument("--calib-batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument("--seed", type=int, default=42, help="seed for choosing the windows (default: 42)")
    parser.add_argument("--round-to", type=int, default=8,
                        help="round the kept width down to a multiple of this (default: 8)")
    parser.add_argument("--slice-head", action="store_true",
                        help="also slice the head's input (smaller model; by default the head keeps its "
                             "full width, as in the reference implementation)")


def add_eval_window_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window (default: 2048)")
    parser.add_argument("--eval-max-windows", type=int, default=None,
                        help="evaluate only the first N windows (default: all)")


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


def add_zero_shot_options(parser: argparse.ArgumentParser, optional: bool) -> None:
    """The lm-eval options of `eval` (tasks default to the paper's) and `report` (no tasks by default)."""
    paper = ",".join(PAPER_TASKS)
    parser.add_argument("--tasks", default=None if optional else paper,
                        help="comma-separated lm-eval task names (default: " + ("none" if optional else "the paper's")
                             + f"; the paper's are {paper})")
    parser.add_argument("--include-path", help="directory of extra lm-eval task YAML files (local data, offline)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each task")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")


def task_list(tasks: str) -> list[str]:
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise LmsliceError("--tasks is empty; give comma-separated lm-eval task names")
    return names
