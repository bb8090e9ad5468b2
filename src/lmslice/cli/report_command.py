"""`lmslice report`: slice one model at several sparsities and tabulate and plot what each costs."""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

from lmslice.cli.common import (SLICING_MINIMUMS, add_eval_window_options, add_model_options, add_slicing_options,
                                add_zero_shot_options, calibration_data, check_device, check_minimums, check_widths,
                                evaluation, require_extra, require_text_sources, require_tokenizer, task_list)
from lmslice.errors import LmsliceError
from lmslice.evaluation.zeroshot import task_manager, zero_shot
from lmslice.io.models import (check_finite, check_output_dir, discarded_on_failure,
                               load_with_tokenizer, model_path, move_into_place, staging_dir)
from lmslice.report import format_markdown, write_report
from lmslice.slicing import check_sparsity, count_parameters, slice_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="slice at several sparsities; table and plots",
        description="Slices a fresh copy of the model at each sparsity and measures parameters and perplexity "
                    "(and the zero-shot average with --tasks). The dense model is always measured as sparsity 0. "
                    "Writes report.json, report.md, perplexity.png (perplexity against the fraction of "
                    "parameters kept) and spectra.png (eigenvalue spectra of the block outputs, from the "
                    "smallest sparsity above 0) into the output directory.")
    parser.add_argument("model", help="dense model directory, .gguf file or hub id")
    parser.add_argument("--sparsities", default="0,0.1,0.2,0.25,0.3",
                        help="comma-separated sparsities, at least one above 0 (default: 0,0.1,0.2,0.25,0.3)")
    parser.add_argument("--eval-data", required=True, help="perplexity text (its test split)")
    parser.add_argument("-o", "--output", required=True, help="directory to write the report to")
    parser.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    add_slicing_options(parser)
    add_eval_window_options(parser)
    add_zero_shot_options(parser, optional=True)
    parser.add_argument("--json", action="store_true", help="print the report's rows as one JSON object")
    add_model_options(parser)
    parser.set_defaults(run=run)


def parse_sparsities(text: str, round_to: int) -> list[float]:
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError as error:
        raise LmsliceError(f"--sparsities must be comma-separated numbers, got {text!r}") from error
    for value in values:
        check_sparsity(value, round_to)
    if not values or values[-1] == 0:
        raise LmsliceError("--sparsities needs at least one sparsity above 0")
    return values


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    check_device(args.device)
    check_minimums(args, {**SLICING_MINIMUMS, "limit": 1, "batch_size": 1})
    require_extra("matplotlib", "plot", "plotting the report")
    require_text_sources(args.calib, args.eval_data)
    sparsities = parse_sparsities(args.sparsities, args.round_to)
    output = check_output_dir(args.output, args.overwrite, protect=[model_path(args.model)])
    tasks = task_list(args.tasks) if args.tasks else None
    # checked before the slow work, so a wrong task name fails fast
    manager = task_manager(tasks, args.include_path) if tasks else None
    dense, tokenizer = load_with_tokenizer(args.model, dtype=args.dtype, device=args.device)
    check_finite(dense)
    check_widths(dense, sparsities, args.round_to)
    tokenizer = require_tokenizer(tokenizer, args.model)
    batches, calib_seqlen = calibration_data(args, dense, tokenizer)
    progress = not args.json
    evaluate = evaluation(args, dense, tokenizer, args.eval_data, progress)
    dense_parameters = count_parameters(dense)

    def measure(model: Any, sparsity: float, width: int) -> dict[str, Any]:
        parameters = count_parameters(model)
        row = {"sparsity": sparsity, "width": width, "parameters": parameters,
               "parameters_fraction": parameters / dense_parameters,
               "perplexity": evaluate(model).perplexity,
               "zero_shot_average": None, "zero_shot": None}
        if tasks:
            result = zero_shot(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                               manager=manager)
            row["zero_shot_average"], row["zero_shot"] = result.average, result.as_dict()["tasks"]
        return row

    rows = [measure(dense, 0.0, dense.config.hidden_size)]
    spectra = None
    for sparsity in (value for value in sparsities if value > 0):
        # each sparsity slices its own copy: slicing works in place and must start from the dense model
        model = copy.deepcopy(dense)
        result = slice_model(model, batches, sparsity, round_to=args.round_to, slice_head=args.slice_head,
                             progress=progress)
        row = measure(model, sparsity, result.width)
        rows.append({**row, "slicing_seconds": round(result.seconds, 2)})
        spectra = spectra or {"sparsity": sparsity, "values": result.spectra}
    report = {
        "model": str(args.model), "eval_data": args.eval_data, "eval_seqlen": evaluate.seqlen,
        "eval_max_windows": args.eval_max_windows, "tasks": tasks, "limit": args.limit,
        "calibration": {"source": args.calib, "samples": args.calib_samples, "seqlen": calib_seqlen,
                        "batch_size": args.calib_batch_size, "seed": args.seed},
        "round_to": args.round_to, "slice_head": args.slice_head, "parameters_dense": dense_parameters,
        "rows": rows, "total_seconds": round(time.perf_counter() - started, 2), "spectra": spectra,
    }
    staging = staging_dir(output)
    with discarded_on_failure(staging, output):
        files = [path.name for path in write_report(report, staging).values()]
    move_into_place(staging, output, args.overwrite)
    paths = [output / name for name in files]
    if args.json:
        print(json.dumps({**{key: value for key, value in report.items() if key != "spectra"},
                          "files": [str(path) for path in paths]}))
    else:
        print(format_markdown(report))
        print(f"\nwrote {', '.join(files)} to {output}")
    return 0
