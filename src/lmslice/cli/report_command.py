"""`lmslice report`: slice one model at several sparsities, or compress it by every mode at several real
parameter budgets, and tabulate and plot what each costs."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from lmslice.calibration import check_calibration
from lmslice.cli.common import (SLICING_MINIMUMS, add_calibration_options, add_eval_window_options, add_model_options,
                                add_width_options, add_zero_shot_options, calibration_data, check_minimums,
                                evaluation, placement_group, require_extra, require_text_sources, require_tokenizer,
                                resolve_model_options, task_list)
from lmslice.errors import LmsliceError
from lmslice.evaluation.zeroshot import task_manager, zero_shot
from lmslice.frontier import MODES, check_budget, check_frontier, parse_modes, supported_modes
from lmslice.io.data import mix_record
from lmslice.io.models import (check_finite, discarded_on_failure, load_with_tokenizer, model_path, move_into_place,
                               staging_dir)
from lmslice.io.outputs import check_output
from lmslice.report import format_frontier_markdown, format_markdown, write_frontier_report, write_report
from lmslice.pipeline import Slice, SliceConfig, check_steps, compress
from lmslice.slicing import SliceResult, check_sparsity, count_parameters, residual_width


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="slice at several sparsities, or compare modes at real sizes; table and plots",
        description="Slices a fresh copy of the model at each sparsity and measures parameters and perplexity "
                    "(and the zero-shot average with --tasks). The dense model is always measured as sparsity 0. "
                    "Writes report.json, report.md, perplexity.png (perplexity against the fraction of "
                    "parameters kept) and spectra.png (eigenvalue spectra of the block outputs, from the "
                    "smallest sparsity above 0) into the output directory. With --keep instead, "
                    "compresses a fresh copy per budget and mode to that fraction of the real parameters "
                    "and writes report.json, report.md and frontier.png (perplexity against real "
                    "parameters, a line per mode): which mode to use at which size.")
    parser.add_argument("model", help="dense model directory, .gguf file or hub id")
    budget = parser.add_argument_group("budget", "the sizes to measure (--sparsities or --keep)")
    sweep = budget.add_mutually_exclusive_group()
    sweep.add_argument("--sparsities", default="0,0.1,0.2,0.25,0.3",
                       help="comma-separated SliceGPT sparsities (fractions of the hidden width deleted), at least "
                            "one above 0 (default: 0,0.1,0.2,0.25,0.3)")
    sweep.add_argument("--keep", "--target-params", dest="target_params", metavar="F,...",
                       help="comma-separated fractions, in (0, 1], of the dense model's real parameters (every "
                            "tensor once) to keep: compare the compression modes at these sizes instead")
    budget.add_argument("--modes",
                        help="with --keep: comma-separated modes, of " + "; ".join(
                            f"{name} ({mode.summary})" for name, mode in MODES.items())
                        + " (default: every mode the model's family supports)")
    add_width_options(budget)
    add_calibration_options(parser.add_argument_group("calibration", "the text the statistics are measured on"))
    add_model_options(placement_group(parser))
    output = parser.add_argument_group("output")
    output.add_argument("-o", "--output", required=True, help="directory to write the report to")
    output.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    output.add_argument("--json", action="store_true", help="print the report's rows as one JSON object")
    evaluation_options = parser.add_argument_group("evaluation")
    evaluation_options.add_argument("--eval-data", required=True, help="perplexity text (its test split)")
    add_eval_window_options(evaluation_options)
    add_zero_shot_options(evaluation_options, optional=True)
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


def parse_budgets(text: str) -> list[float]:
    """Parameter budgets from a comma-separated list, largest first, each in (0, 1]."""
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()}, reverse=True)
    except ValueError as error:
        raise LmsliceError(f"--keep must be comma-separated numbers, got {text!r}") from error
    if not values:
        raise LmsliceError("--keep is empty; give comma-separated fractions such as 0.9,0.8,0.7")
    for value in values:
        check_budget(value)
    return values


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    resolve_model_options(args, args.model)
    check_minimums(args, {**SLICING_MINIMUMS, "limit": 1, "batch_size": 1})
    require_extra("matplotlib", "plot", "plotting the report")
    texts = require_text_sources(args.calib, args.eval_data)
    compare_modes = args.target_params is not None
    if compare_modes:
        budgets = parse_budgets(args.target_params)
        modes = parse_modes(args.modes) if args.modes is not None else None
        if args.slice_head:
            raise LmsliceError("--slice-head applies to --sparsities; with --keep the slicing modes "
                               "always slice the head")
    else:
        if args.modes is not None:
            raise LmsliceError("--modes applies to --keep")
        sparsities = parse_sparsities(args.sparsities, args.round_to)
    reads = [("the source model", model_path(args.model)), *texts, ("the task files", args.include_path)]
    output = check_output(args.output, args.overwrite, reads)
    tasks = task_list(args.tasks) if args.tasks else None
    # checked before the slow work, so a wrong task name fails fast
    manager = task_manager(tasks, args.include_path) if tasks else None
    dense, tokenizer = load_with_tokenizer(args.model, dtype=args.dtype, device=args.device)
    check_finite(dense)
    if compare_modes:
        modes = modes or supported_modes(dense)
        check_frontier(dense, modes, budgets, args.round_to)
    else:
        slices = {sparsity: Slice(SliceConfig(sparsity, args.round_to, slice_head=args.slice_head))
                  for sparsity in sparsities if sparsity > 0}
        for step in slices.values():
            check_steps(dense, [step])
    tokenizer = require_tokenizer(tokenizer, args.model)
    batches, calib_seqlen = calibration_data(args, dense, tokenizer)
    warning = check_calibration(batches, dense.get_input_embeddings().weight.shape[1])
    if warning:
        print(f"lmslice: warning: {warning}", file=sys.stderr)
    progress = not args.json
    evaluate = evaluation(args, dense, tokenizer, args.eval_data, progress)
    dense_parameters = count_parameters(dense)

    def measure(model: Any) -> dict[str, Any]:
        parameters = count_parameters(model)
        row = {"parameters": parameters, "parameters_fraction": parameters / dense_parameters,
               "perplexity": evaluate(model).perplexity, "zero_shot_average": None, "zero_shot": None}
        if tasks:
            result = zero_shot(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                               manager=manager)
            row["zero_shot_average"], row["zero_shot"] = result.average, result.as_dict()["tasks"]
        return row

    report = {
        "model": str(args.model), "eval_data": args.eval_data, "eval_seqlen": evaluate.seqlen,
        "eval_max_windows": args.eval_max_windows, "tasks": tasks, "limit": args.limit,
        "calibration": {"source": args.calib, "samples": args.calib_samples, "seqlen": calib_seqlen,
                        "batch_size": args.calib_batch_size, "seed": args.seed,
                        "mix": mix_record(args.calib, args.calib_samples)},
        "round_to": args.round_to,
    }
    if compare_modes:
        report.update(target_params=budgets, modes=modes, parameters_dense=dense_parameters,
                      **compare(dense, batches, budgets, modes, measure, args.round_to, progress))
        write, format_table = write_frontier_report, format_frontier_markdown
    else:
        report.update(slice_head=args.slice_head, parameters_dense=dense_parameters,
                      **sweep(dense, batches, slices, measure, progress))
        write, format_table = write_report, format_markdown
    report["total_seconds"] = round(time.perf_counter() - started, 2)
    staging = staging_dir(output)
    with discarded_on_failure(staging, output):
        files = [path.name for path in write(report, staging).values()]
    move_into_place(staging, output, args.overwrite)
    paths = [output / name for name in files]
    if args.json:
        print(json.dumps({**{key: value for key, value in report.items() if key != "spectra"},
                          "files": [str(path) for path in paths]}))
    else:
        print(format_table(report))
        print(f"\nwrote {', '.join(files)} to {output}")
    return 0


def sweep(dense: Any, batches: list, slices: dict[float, Slice], measure: Callable[[Any], dict[str, Any]],
          progress: bool) -> dict[str, Any]:
    """The dense model and a SliceGPT copy per sparsity above 0 (its step in `slices`): `rows` and the
    `spectra` of the first."""
    rows = [{"sparsity": 0.0, "width": dense.config.hidden_size, **measure(dense)}]
    spectra = None
    for sparsity, step in slices.items():
        # each sparsity slices its own copy: slicing works in place and must start from the dense model
        model = copy.deepcopy(dense)
        result = compress(model, batches, [step], progress=progress).result(SliceResult)
        rows.append({"sparsity": sparsity, "width": result.width, **measure(model),
                     "slicing_seconds": round(result.seconds, 2)})
        spectra = spectra or {"sparsity": sparsity, "values": result.spectra}
    return {"rows": rows, "spectra": spectra}


def compare(dense: Any, batches: list, budgets: list[float], modes: list[str],
            measure: Callable[[Any], dict[str, Any]], round_to: int, progress: bool) -> dict[str, Any]:
    """The dense model and a copy compressed by each mode at each budget: `dense` and `rows`."""
    dense_row = {"shape": f"D={residual_width(dense)}", **measure(dense)}
    rows = []
    for budget in budgets:
        for mode in modes:
            # each pair compresses its own copy: every mode works in place and must start from the dense model
            began = time.perf_counter()
            model, shape = MODES[mode].compress(copy.deepcopy(dense), batches, budget, round_to=round_to,
                                                progress=progress)
            seconds = time.perf_counter() - began
            row = measure(model)
            del model
            rows.append({"target_params": budget, "mode": mode, "shape": shape, **row,
                         "perplexity_ratio": row["perplexity"] / dense_row["perplexity"],
                         "seconds": round(seconds, 2)})
            if progress:
                print(f"{budget:g} {mode}: {shape}, {100 * row['parameters_fraction']:.1f}% of the parameters, "
                      f"perplexity {row['perplexity']:.3f} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return {"dense": dense_row, "rows": rows}
