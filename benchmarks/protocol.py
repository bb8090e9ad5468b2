"""The measurement protocol the perplexity benchmarks share: one model, calibration windows from one
text, held-out perplexity on one or more others, and the options that set them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

import lmslice
from lmslice.evaluation.perplexity import perplexity
from lmslice.io.data import load_text, mixed_calibration_batches, tokenize


def add_protocol_options(parser: argparse.ArgumentParser, *, seqlen: int = 256, eval_max_windows: int | None = 40,
                         threads: int = 1) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="pydoc",
                        help="calibration text (train split), or a mix as `lmslice slice --calib` takes: a,b or a:0.7,b:0.3")
    parser.add_argument("--eval-data", default="pydoc", help="comma-separated evaluation texts (test split)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=seqlen)
    parser.add_argument("--eval-seqlen", type=int, default=seqlen)
    parser.add_argument("--eval-max-windows", type=int, default=eval_max_windows)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")


@dataclass
class Protocol:
    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    eval_tokens: dict[str, torch.Tensor]  # by source, in the order given
    seqlen: int
    max_windows: int | None
    tokenizer: PreTrainedTokenizerBase

    def measure(self, candidate: nn.Module) -> dict[str, float]:
        """Perplexity of `candidate` on every evaluation text."""
        return {source: self.perplexity(candidate, source) for source in self.eval_tokens}

    def perplexity(self, candidate: nn.Module, source: str | None = None) -> float:
        """Perplexity of `candidate` on one evaluation text (the first by default)."""
        tokens = self.eval_tokens[source or next(iter(self.eval_tokens))]
        return perplexity(candidate, tokens, self.seqlen, max_windows=self.max_windows, progress=False).perplexity


def load_protocol(args: argparse.Namespace) -> Protocol:
    torch.set_num_threads(args.threads)
    model, tokenizer = lmslice.load_with_tokenizer(args.model, device=args.device)
    batches = mixed_calibration_batches(tokenizer, args.calib, args.calib_samples, args.calib_seqlen, 8, seed=42)
    eval_tokens = {source: tokenize(tokenizer, load_text(source, split="test"))
                   for source in args.eval_data.split(",")}
    return Protocol(model, batches, eval_tokens, args.eval_seqlen, args.eval_max_windows, tokenizer)


def print_header(args: argparse.Namespace, dense: dict[str, float], key_columns: list[str], tail_columns: list[str],
                 model_note: str = "") -> None:
    """The protocol line (model, calibration, each evaluation text and its `dense` perplexity, by source) and
    the head of the markdown table the perplexity benchmarks print: `key_columns`, a perplexity and a
    ratio per text, `tail_columns`."""
    names = [Path(source).name for source in dense]
    print(f"model {args.model}{model_note}; calibration {args.calib} {args.calib_samples} x {args.calib_seqlen}; "
          f"evaluation {', '.join(names)} (test split, {args.eval_max_windows} windows of {args.eval_seqlen}); "
          "dense " + ", ".join(f"{value:.3f}" for value in dense.values()), flush=True)
    columns = [*key_columns, *(part for name in names for part in (f"ppl {name}", "× dense")), *tail_columns]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns), flush=True)


def perplexity_cells(ppl: dict[str, float], dense: dict[str, float]) -> str:
    """The table cells `print_header` heads for one model: its perplexity and ratio to dense on each text."""
    return " | ".join(f"{ppl[source]:.3f} | {ppl[source] / dense[source]:.3f}" for source in dense)
