"""`lmslice eval`: zero-shot accuracy of a dense or compressed model, through lm-evaluation-harness."""

from __future__ import annotations

import argparse
import json

from lmslice.cli.common import (add_model_options, add_zero_shot_options, check_minimums, placement_group,
                                require_tokenizer, resolve_model_options, task_list)
from lmslice.evaluation.zeroshot import format_table, task_manager, zero_shot
from lmslice.io.models import load_with_tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="zero-shot accuracy on lm-eval tasks",
        description="Runs lm-evaluation-harness tasks zero-shot on the loaded model and prints acc and acc_norm "
                    "per task and their average (acc_norm where the task defines it, else acc, as in the paper). "
                    "Task data comes from the Hugging Face hub; offline, define tasks in YAML files that read "
                    "local data (dataset_path: json, dataset_kwargs: {data_files: {test: /abs/path.jsonl}}) and "
                    "pass their directory with --include-path.")
    parser.add_argument("model", help="model directory (dense or compressed), .gguf file or hub id")
    add_zero_shot_options(parser.add_argument_group("evaluation"), optional=False)
    add_model_options(placement_group(parser))
    parser.add_argument_group("output").add_argument("--json", action="store_true",
                                                     help="print one JSON object instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    resolve_model_options(args, args.model)
    check_minimums(args, {"limit": 1, "batch_size": 1})
    tasks = task_list(args.tasks)
    manager = task_manager(tasks, args.include_path)  # before the model: a wrong task name fails fast
    model, tokenizer = load_with_tokenizer(args.model, dtype=args.dtype, device=args.device)
    tokenizer = require_tokenizer(tokenizer, args.model)
    result = zero_shot(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                       manager=manager)
    if args.json:
        print(json.dumps({"model": str(args.model), "limit": args.limit, **result.as_dict()}))
    else:
        print(format_table(result))
    return 0
