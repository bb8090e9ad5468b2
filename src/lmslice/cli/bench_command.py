"""`lmslice bench`: speed of a dense and a compressed model side by side, against their FLOP ratio."""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn

from lmslice.bench import benchmark, benchmark_llamacpp, llamacpp_table
from lmslice.cli.common import (add_model_options, check_minimums, context_length, placement_group,
                                resolve_model_options)
from lmslice.errors import LmsliceError
from lmslice.layout import layout_of
from lmslice.io.models import load


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="throughput, decode latency and FLOPs of a dense and a compressed model",
        description="Measures a dense model and its compressed version side by side, alternating between them: "
                    "(1) forward-pass throughput in tokens/s over --seqlen-token sequences, the batch size "
                    "doubled from 1 until memory runs out, throughput stops rising (two doublings without a new "
                    "best) or --max-batch, best batch "
                    "reported (the SliceGPT paper's protocol); (2) decode latency in ms per generated token at "
                    "batch 1 with the KV cache, prefill excluded, median of --repeats; (3) FLOPs per token "
                    "counted from the models (linear layers, shortcut matrices, head, attention products), "
                    "whose ratio bounds the speed-up, and the achieved speed-ups as a share of it.")
    parser.add_argument("dense", help="the dense model: directory, .gguf file or hub id")
    parser.add_argument("sliced", metavar="compressed", help="the compressed model directory (from lmslice compress)")
    throughput = parser.add_argument_group("throughput", "tokens/s of the forward pass at the best batch size")
    throughput.add_argument("--seqlen", type=int, default=128,
                            help="tokens per sequence, capped by the model context (default: 128)")
    throughput.add_argument("--max-batch", type=int, default=None,
                            help="largest batch size to try (default: no limit; doubling stops when throughput stops "
                                 "rising or, on a GPU, when memory runs out)")
    latency = parser.add_argument_group("latency", "ms per generated token at batch 1, prefill excluded")
    latency.add_argument("--prompt-len", type=int, default=32,
                         help="prompt tokens prefilled before the timed decode steps (default: 32)")
    latency.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run (default: 32)")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--repeats", type=int, default=5,
                        help="timed runs per measurement; the median is reported (default: 5)")
    timing.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement (default: 1)")
    timing.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (torch.set_num_threads); default: torch's current setting")
    timing.add_argument("--seed", type=int, default=0, help="seed for the random input tokens (default: 0)")
    timing.add_argument("--runtime", choices=("transformers", "llamacpp"), default="transformers",
                        help="transformers (default): the models in torch; llamacpp: DENSE and COMPRESSED are .gguf "
                             "files (lmslice export), timed with llama.cpp's llama-bench (--prompt-len, "
                             "--new-tokens, --threads, default 2)")
    add_model_options(placement_group(parser))
    parser.add_argument_group("output").add_argument("--json", action="store_true",
                                                     help="print one JSON object instead of a table")
    parser.set_defaults(run=run)


def _key_value_heads(config: object) -> int | None:
    return getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)


def check_same_model(dense: nn.Module, sliced: nn.Module, dense_name: str, sliced_name: str) -> None:
    """`sliced` is a slice of a model shaped like `dense`: same architecture, width, depth and vocabulary
    (the weights themselves cannot be compared once rotated)."""
    layout = layout_of(sliced.config)
    if layout is None:
        raise LmsliceError(f"{sliced_name} is not a sliced model; give a dense model and a slice of it "
                           "(from `lmslice compress`)")
    if layout_of(dense.config) is not None:
        raise LmsliceError(f"{dense_name} is itself a sliced model; give the dense model it was sliced from first")
    differences = [
        f"{what} {dense_value} vs {sliced_value}" for what, dense_value, sliced_value in (
            ("architecture", type(dense).__name__, layout.base_architecture),
            ("hidden size", dense.get_input_embeddings().weight.shape[1], layout.hidden_size),
            ("key/value heads", _key_value_heads(dense.config), _key_value_heads(sliced.config)),
            ("layers", dense.config.num_hidden_layers, sliced.config.num_hidden_layers),
            ("vocabulary", dense.config.vocab_size, sliced.config.vocab_size),
        ) if dense_value != sliced_value]
    if differences:
        raise LmsliceError(f"{sliced_name} is not a slice of a model like {dense_name} ({'; '.join(differences)}): "
                           "give a dense model and a slice of it")


def run(args: argparse.Namespace) -> int:
    previous_threads = torch.get_num_threads()
    try:
        return measure(args)
    finally:  # --threads sets torch's global thread count; `main` may run inside a longer-lived process
        torch.set_num_threads(previous_threads)


def measure(args: argparse.Namespace) -> int:
    resolve_model_options(args, args.dense)
    check_minimums(args, {"seqlen": 1, "repeats": 1, "prompt_len": 1, "new_tokens": 1, "threads": 1,
                          "max_batch": 1, "warmup": 0})
    if args.runtime == "llamacpp":
        for path in (args.dense, args.sliced):
            if not (path.endswith(".gguf") and os.path.isfile(path)):
                raise LmsliceError(f"--runtime llamacpp times GGUF files: {path} is not one (write it with lmslice export)")
        report = benchmark_llamacpp(args.dense, args.sliced, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                    repeats=args.repeats, threads=args.threads or 2)
        print(json.dumps(report) if args.json else llamacpp_table(report))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # also for loading
    dense = load(args.dense, dtype=args.dtype, device=args.device)
    sliced = load(args.sliced, dtype=args.dtype, device=args.device)
    check_same_model(dense, sliced, args.dense, args.sliced)
    seqlen = min(context_length(dense, args.seqlen), context_length(sliced, args.seqlen))
    limit = min(context_length(dense, 1 << 30), context_length(sliced, 1 << 30))
    if args.prompt_len + args.new_tokens > limit:
        raise LmsliceError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceed the models' "
                           f"context of {limit} tokens")
    report = benchmark(dense, sliced, seqlen=seqlen, max_batch=args.max_batch, repeats=args.repeats,
                       warmup=args.warmup, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       threads=args.threads, seed=args.seed,
                       labels={"dense": str(args.dense), "sliced": str(args.sliced)})
    print(json.dumps(report.as_dict()) if args.json else report.table())
    return 0
