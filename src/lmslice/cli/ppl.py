"""`lmslice ppl`: perplexity of a dense or compressed model on a text."""

from __future__ import annotations

import argparse
import json

from lmslice.cli.common import (add_model_options, check_minimums, context_length, placement_group,
                                require_text_sources, require_tokenizer, resolve_model_options)
from lmslice.evaluation.perplexity import perplexity
from lmslice.io.data import describe_sources, load_text, tokenize
from lmslice.io.models import load_with_tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ppl", help="perplexity of a model on a text",
        description="Perplexity on non-overlapping windows of the joined test text, exp(mean token NLL). "
                    "'wikitext2' is the test split joined by blank lines, as in the paper.")
    parser.add_argument("model", help="model directory (dense or compressed), .gguf file, hub id, or smollm2-135m")
    evaluation_options = parser.add_argument_group("evaluation")
    evaluation_options.add_argument("--data", "--eval-data", dest="data", required=True, metavar="TEXT",
                                    help=f"text source, its test split: {describe_sources()}")
    evaluation_options.add_argument("--seqlen", "--eval-seqlen", dest="seqlen", type=int, default=2048, metavar="N",
                                    help="window length, capped by the model context (default: 2048)")
    evaluation_options.add_argument("--batch-size", type=int, default=1, metavar="N",
                                    help="windows per forward pass (default: 1)")
    evaluation_options.add_argument("--max-windows", "--eval-max-windows", dest="max_windows", type=int, default=None,
                                    metavar="N", help="evaluate only the first N windows (default: all)")
    add_model_options(placement_group(parser))
    parser.add_argument_group("output").add_argument("--json", action="store_true",
                                                     help="print one JSON object instead of a sentence")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    resolve_model_options(args, args.model)
    check_minimums(args, {"seqlen": 2, "batch_size": 1, "max_windows": 1})
    require_text_sources(args.data)
    model, tokenizer = load_with_tokenizer(args.model, dtype=args.dtype, device=args.device)
    tokenizer = require_tokenizer(tokenizer, args.model)
    seqlen = context_length(model, args.seqlen)
    result = perplexity(model, tokenize(tokenizer, load_text(args.data, split="test"), args.data), seqlen,
                        batch_size=args.batch_size, max_windows=args.max_windows, progress=not args.json)
    if args.json:
        print(json.dumps({**result.as_dict(), "model": str(args.model), "data": args.data}))
    else:
        print(f"perplexity {result.perplexity:.3f} on {result.tokens} tokens of {args.data} "
              f"({result.windows} windows of {result.seqlen})")
    return 0
