"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmslice.errors import LmsliceError
from lmslice.evaluation.perplexity import Perplexity, perplexity
from lmslice.evaluation.zeroshot import PAPER_TASKS
from lmslice.io.data import (DEFAULT_CALIBRATION, HUB_SOURCES, describe_sources, load_text, local_text_files,
                             mixed_calibration_batches, parse_mix, tokenize)
from lmslice.io.models import DTYPES, source_dtype
from lmslice.walk import Placement


def add_calibration_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The calibration text and its windows, for `compress` and `report`; also spelled as `finetune` spells its
    training text and windows (--data, --samples, --seqlen)."""
    parser.add_argument("--calib", "--data", dest="calib", default=DEFAULT_CALIBRATION, metavar="TEXT",
                        help=f"calibration text: {describe_sources()}; several mix in equal shares (wikitext2,pydoc) "
                             f"or stated ones (a.txt:0.7,pydoc:0.3) (default: {DEFAULT_CALIBRATION})")
    parser.add_argument("--calib-samples", "--samples", dest="calib_samples", type=int, default=128, metavar="N",
                        help="calibration windows (default: 128)")
    parser.add_argument("--calib-seqlen", "--seqlen", dest="calib_seqlen", type=int, default=256, metavar="N",
                        help="tokens per calibration window, capped by the model context (default: 256)")
    parser.add_argument("--calib-batch-size", type=int, default=8, metavar="N",
                        help="windows per forward pass (default: 8)")
    parser.add_argument("--seed", type=int, default=42, metavar="N", help="seed for choosing the windows (default: 42)")


def add_width_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """How kept widths are rounded and whether the head is sliced, for `compress` and `report`."""
    parser.add_argument("--round-to", type=int, default=8, metavar="N",
                        help="round every kept width down to a multiple of this (default: 8)")
    parser.add_argument("--slice-head", action="store_true",
                        help="--sparsity: slice the head's input too (fewer parameters; by default the head keeps its "
                             "full width, as in the SliceGPT reference implementation)")


def add_eval_window_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--eval-seqlen", type=int, default=2048, metavar="N", help="perplexity window (default: 2048)")
    parser.add_argument("--eval-max-windows", type=int, default=None, metavar="N",
                        help="evaluate only the first N windows (default: all)")


# The dtypes `--dtype auto` keeps from a checkpoint on an accelerator; anything else computes in float32.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def add_model_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device and --dtype, with `auto` defaults that `resolve_model_options` turns into a device and dtype."""
    parser.add_argument("--device", default="auto",
                        help="torch device: cpu, cuda, cuda:N, mps, or auto (default: cuda where there is one, "
                             "else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype the model's weights are loaded and run in; auto (default): float32 on the CPU, "
                             "the checkpoint's float16/bfloat16 on a GPU. Statistics and solves stay float32/float64")


def placement_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    return parser.add_argument_group("placement", "where the model's weights live and what dtype they compute in")


def resolve_model_options(args: argparse.Namespace, source: str) -> None:
    """Replaces `--device auto` and `--dtype auto` (`add_model_options`) by what they choose for `source`,
    and refuses a device that is not there, before any model is loaded."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(args.device)
    if args.dtype == "auto":
        args.dtype = auto_dtype(source, args.device)


def auto_dtype(source: str, device: str) -> str:
    """float32 on the CPU (whose half-precision matrix products are slow and inexact); on an accelerator the
    checkpoint's own half-precision dtype, which halves the weights' memory, else float32."""
    if torch.device(device).type == "cpu":
        return "float32"
    stored = source_dtype(source)
    return str(stored).removeprefix("torch.") if stored in HALF_DTYPES else "float32"


def check_device(device: str) -> None:
    """Refuses a device that is not there, before any model is loaded."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise LmsliceError(f"unknown device {device!r}; give cpu, cuda, cuda:N or mps") from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise LmsliceError(f"device {device} requested but CUDA is not available; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise LmsliceError(f"device {device} requested but there are {torch.cuda.device_count()} CUDA devices")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise LmsliceError(f"device {device} requested but MPS is not available; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise LmsliceError(f"device {device} is not supported; give cpu, cuda, cuda:N or mps")


# The least value of each numeric option of `add_calibration_options` and `add_eval_window_options`.
SLICING_MINIMUMS = {"calib_samples": 1, "calib_seqlen": 2, "calib_batch_size": 1, "eval_seqlen": 2,
                    "eval_max_windows": 1}


def check_minimums(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Refuses options below their minimum (option dest -> least value); unset (None) options pass."""
    for name, least in minimums.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise LmsliceError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Says which extra to install before any work, not after it."""
    if importlib.util.find_spec(module) is None:
        raise LmsliceError(f"{purpose} needs {module}: pip install 'lmslice[{extra}]'")


def require_text_sources(*sources: str | None) -> list[tuple[str, Path]]:
    """Refuses a malformed calibration mix, a missing or empty file and an unknown source name, and asks for
    the extra that hub sources need, before any work. Returns the local files read, as `check_output`'s
    `reads`."""
    names = [part.source for source in sources if source is not None for part in parse_mix(source)]
    files = [("the text file", path) for source in sources if source is not None for path in local_text_files(source)]
    if any(name in HUB_SOURCES for name in names):
        require_extra("datasets", "data", "reading a Hugging Face dataset")
    return files


def calibration_data(args: argparse.Namespace, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                     ) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The calibration batches `add_calibration_options` describe, and their sequence length."""
    seqlen = context_length(model, args.calib_seqlen)
    return mixed_calibration_batches(tokenizer, args.calib, args.calib_samples, seqlen, args.calib_batch_size,
                                     args.seed), seqlen


@dataclass
class Evaluation:
    """Perplexity on one text, tokenized once, for measuring a model before and after a change, its
    blocks where `placement` keeps them (None: with the model)."""

    tokens: torch.Tensor
    seqlen: int
    max_windows: int | None
    progress: bool
    placement: Placement | None = None

    def __call__(self, model: nn.Module) -> Perplexity:
        return perplexity(model, self.tokens, self.seqlen, max_windows=self.max_windows, progress=self.progress,
                          placement=self.placement)


def evaluation(args: argparse.Namespace, model: nn.Module, tokenizer: PreTrainedTokenizerBase, source: str,
               progress: bool, placement: Placement | None = None) -> Evaluation:
    """Perplexity on `source`'s test split with the windows `add_eval_window_options` describe."""
    tokens = tokenize(tokenizer, load_text(source, split="test"), source)
    return Evaluation(tokens, context_length(model, args.eval_seqlen), args.eval_max_windows, progress, placement)


def require_tokenizer(tokenizer: Any, source: str) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise LmsliceError(f"{source} has no tokenizer; save one next to the model")
    return tokenizer


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


def add_zero_shot_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, optional: bool) -> None:
    """The lm-eval options of `eval` (tasks default to the paper's) and `report` (no tasks by default)."""
    paper = ",".join(PAPER_TASKS)
    parser.add_argument("--tasks", default=None if optional else paper,
                        help="comma-separated lm-eval task names (default: " + ("none" if optional else "the paper's")
                             + f"; the paper's are {paper})")
    parser.add_argument("--include-path", help="directory of extra lm-eval task YAML files (local data, offline)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each task")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval items per forward pass (default: 8)")


def task_list(tasks: str) -> list[str]:
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise LmsliceError("--tasks is empty; give comma-separated lm-eval task names")
    return names
