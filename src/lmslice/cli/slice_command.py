"""`lmslice compress` (or `lmslice slice`): prune or slice a model, save it, and say what was done."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lmslice.adapters import ModelAdapter, find_adapter
from lmslice.budget import FORMATS, SizeBudget, file_bytes, format_size, parse_size, row_block, size_budget
from lmslice.calibration import check_calibration
from lmslice.cli.common import (SLICING_MINIMUMS, add_calibration_options, add_eval_window_options, add_model_options,
                                add_width_options, calibration_data, check_minimums, context_length, evaluation,
                                peak_memory_gib, placement_group, require_text_sources, require_tokenizer,
                                resolve_model_options)
from lmslice.cli.export_command import describe, gguf_bytes, source_gguf, write_gguf
from lmslice.errors import LmsliceError
from lmslice.estimate import Calibration, estimate, measure_speed
from lmslice.export import TIE_BY_DEFAULT
from lmslice.export.gguf import check_exportable, gguf_vocabulary
from lmslice.io.data import mix_record
from lmslice.io.models import (DTYPES, load_tokenizer, model_path, open_skeleton, out_of_range, resolve_dtype,
                               round_to_dtype, save_sliced, source_dtype)
from lmslice.io.outputs import GGUF, check_output, check_room, process_tag
from lmslice.io.offload import OffloadedBlocks, partial_output_removed_on_failure, save_offloaded
from lmslice.io.placement import choose_placement, open_placed, streamed_dtype
from lmslice.layout import layout_of
from lmslice.modeling import get_module, head_counts
from lmslice.pipeline import (Prune, PruneConfig, Slice, SliceConfig, StandardFormat, StandardFormatConfig, Step,
                              check_steps, compress)
from lmslice.prune import CRITERIA, DEFAULT_CRITERION, WIDTHS, PruneResult, mlp_width
from lmslice.shared_basis import WEIGHTINGS
from lmslice.slicing import SliceResult, check_sparsity, count_parameters, residual_width
from lmslice.walk import DeviceStreamed, InMemory, Placement, move_all_but_blocks

# Row lengths llama.cpp's quantised types need: 32 for Q8_0 and the legacy types, 256 for K-quants
# (Q4_K_M ...); llama-quantize writes a matrix with other rows in a larger type, down to F16.
ALIGNMENTS = {"auto": None, "none": 1, "gguf": 32, "gguf-k": 256}

REPORT_FILE = "lmslice_report.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress", aliases=["slice"], help="compress a model (prune to a parameter budget, or SliceGPT) and save it",
        description="Compress a model and save it. --keep F prunes MLP channels and attention heads, with "
                    "least-squares refits, to the fraction F of the model's real parameters; --sparsity S slices "
                    "the residual stream as SliceGPT publishes it (rotate every block into the principal components "
                    "of its calibration signal, delete the trailing fraction S). Prints a summary and writes a "
                    "model directory loadable with lmslice.load or transformers (plain, or trust_remote_code=True "
                    "for lmslice's per-block layout). `lmslice slice` is the same command.")
    parser.add_argument("model", help="model directory, .gguf file, hub id, or smollm2-135m (built in)")

    budget = parser.add_argument_group("budget", "how much to remove (give --keep, --sparsity, or both; or "
                                                 "--target-size)")
    budget.add_argument("--keep", "--target-params", dest="target_params", type=float, metavar="F",
                        help="keep this fraction, in (0, 1], of the real parameters (every tensor once) by pruning "
                             "MLP channels and attention heads; with --sparsity, slicing comes first")
    budget.add_argument("--sparsity", type=float, metavar="S",
                        help="SliceGPT: delete this fraction, in [0, 1), of the hidden width. The result can hold "
                             "MORE parameters than the source (shortcut matrices, a full-width untied head) unless "
                             "--slice-head or --keep")
    budget.add_argument("--target-size", metavar="SIZE",
                        help="prune as --keep does until the model file is at most SIZE (300MB, 4GB, 4GiB or bytes) "
                             "in --target-format; refused if pruning cannot reach it")
    budget.add_argument("--target-format", choices=FORMATS, metavar="FORMAT",
                        help="the file --target-size measures: safetensors (the saved weights, default); gguf-f32, "
                             "gguf-f16, gguf-bf16, gguf-q8_0 (as lmslice writes them); gguf-q6_k, gguf-q5_k_m, "
                             "gguf-q5_k_s, gguf-q4_k_m, gguf-q4_k_s, gguf-q4_0 (after llama-quantize)")
    budget.add_argument("--mlp-widths", choices=WIDTHS, default="measured",
                        help="--keep: measured = per-block widths from each block's measured cost (lmslice's layout, "
                             "loads with trust_remote_code); uniform = one width in every block (the family's own "
                             "architecture, any runtime) (default: measured)")
    budget.add_argument("--prune-heads", action=argparse.BooleanOptionalAction, default=None,
                        help="--keep with measured widths: attention heads compete with MLP channels for the budget, "
                             "output projection refit (default: yes where lmslice knows the family's heads)")
    budget.add_argument("--prune-experts", action="store_true",
                        help="--keep with measured widths, in a mixture of experts: whole experts (with their router "
                             "rows) compete for the budget too (default: experts' channels only; docs/families.md)")
    budget.add_argument("--prune-criterion", choices=CRITERIA, default=DEFAULT_CRITERION,
                        help="--keep: how MLP channels are chosen. obs = optimal brain surgeon: drop the channel whose "
                             "removal, the rest refit, raises the output error least, repeat; energy = what each "
                             "channel writes alone; leverage = ridge leverage of its activations, blind to weights "
                             f"(default: {DEFAULT_CRITERION})")
    add_width_options(budget)

    calibration = parser.add_argument_group("calibration", "the text the statistics are measured on")
    add_calibration_options(calibration)

    placement = placement_group(parser)
    add_model_options(placement)
    placement.add_argument("--offload", action="store_true",
                           help="keep the blocks on disk, one in memory at a time, read from the safetensors "
                                "checkpoint and written to the output (needs a local model directory)")
    placement.add_argument("--stream-blocks", action="store_true",
                           help="keep the blocks in CPU memory and move one at a time to --device (chosen by itself "
                                "on a GPU the model does not fit)")
    placement.add_argument("--resume", action="store_true",
                           help="with --offload: keep what this run finishes if it is interrupted, and continue an "
                                "interrupted run of the same command (finished blocks read back, not redone)")
    placement.add_argument("--offload-activations", action="store_true",
                           help="keep the calibration activations on disk next to the output, one batch in memory "
                                "(removed at the end)")

    output = parser.add_argument_group("output")
    output.add_argument("-o", "--output", required=True, help="directory to write the compressed model to")
    output.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    output.add_argument("--format", choices=("sliced", "standard"), default="sliced",
                        help="--sparsity: sliced = a basis per block joined by shortcut matrices (lmslice or "
                             "trust_remote_code); standard = one basis for the whole stream, written as the family's "
                             "own architecture with a smaller hidden_size (plain transformers, GGUF) (default: sliced)")
    output.add_argument("--basis-weighting", choices=WEIGHTINGS, default="unit-rms",
                        help="--format standard: how tokens enter the shared basis. unit-rms = each scaled to unit "
                             "RMS; raw = as they are; reader-gain = also weighted by the gain of the layers that "
                             "read them (default: unit-rms)")
    output.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                        help="--format standard, tied source: keep the head tied to the embedding (smaller, "
                             "approximate: the final norm is refitted) or untie it (exact) "
                             f"(default: {'tied' if TIE_BY_DEFAULT else 'untied'})")
    output.add_argument("--save-dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype of the saved weights; auto (default) = the source checkpoint's (float16 for GGUF, "
                             "bfloat16 where a tensor exceeds float16's range). Computing uses --dtype")
    output.add_argument("--align", choices=ALIGNMENTS, default="auto",
                        help="widths llama.cpp quantises without falling back to a larger type: gguf = multiples of "
                             "32 (Q8_0, Q4_0), gguf-k = 256 (K-quants such as Q4_K_M), none = --round-to alone; "
                             "auto (default) = gguf-k for measured widths, or the blocks of --target-format's type, "
                             "where the dense MLP width is a multiple of them, else none")
    output.add_argument("--gguf", metavar="OUT.gguf",
                        help="also write the result as a float16 GGUF for llama.cpp (as `lmslice export`)")
    output.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    output.add_argument("--dry-run", action="store_true",
                        help="print the plan and stop: the steps, the parameters and bytes reached, where the result "
                             "loads, the estimated peak memory and time; no weight or text is read, nothing written")

    evaluation_options = parser.add_argument_group("evaluation", "perplexity before and after, on held-out text")
    evaluation_options.add_argument("--eval-data", metavar="TEXT",
                                    help="report dense and compressed perplexity on this text's test split")
    add_eval_window_options(evaluation_options)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    resolve_model_options(args, args.model)
    check_minimums(args, SLICING_MINIMUMS)
    if args.target_size is not None and (args.target_params is not None or args.sparsity is not None):
        raise LmsliceError("give one budget: --target-size (the bytes of the model file) or --keep/--sparsity")
    if args.target_format is not None and args.target_size is None:
        raise LmsliceError("--target-format says what --target-size measures: give --target-size too")
    if args.target_size is not None:
        parse_size(args.target_size)  # a malformed size is refused before the model is opened
    if args.sparsity is None and not prunes(args):
        raise LmsliceError("say how much to remove: --keep (the fraction of the parameters to keep) or --sparsity "
                           "(SliceGPT: the fraction of the hidden width to delete), or both; or --target-size "
                           "(the bytes of the model file)")
    if args.sparsity is not None:
        check_sparsity(args.sparsity, args.round_to)
    if args.prune_heads and (not prunes(args) or args.mlp_widths != "measured"):
        raise LmsliceError("--prune-heads spends a --keep budget on per-block widths: give --keep and keep "
                           "--mlp-widths measured")
    if args.prune_experts and (not prunes(args) or args.mlp_widths != "measured"):
        raise LmsliceError("--prune-experts spends a --keep budget on per-block widths: give --keep and keep "
                           "--mlp-widths measured")
    if prunes(args) and args.format == "standard":
        raise LmsliceError("--keep prunes per block, in lmslice's layout; --format standard applies to "
                           "--sparsity alone (then --mlp-widths uniform is the family's own architecture too)")
    if args.offload and args.stream_blocks:
        raise LmsliceError("choose one place for the blocks: --offload (on disk) or --stream-blocks (CPU memory)")
    if args.resume and not args.offload:
        raise LmsliceError("--resume continues an --offload run (only there are finished blocks on disk before the "
                           "end): add --offload")
    reads = [("the source model", model_path(args.model)), *require_text_sources(args.calib, args.eval_data)]
    output = check_output(args.output, args.overwrite, reads, resuming=args.resume)
    gguf = check_output(args.gguf, args.overwrite, [*reads, ("the output", output)], kind=GGUF) if args.gguf else None
    if gguf and args.offload:
        raise LmsliceError("--gguf needs the result in memory; with --offload write it afterwards with "
                           "`lmslice export OUTPUT -o OUT.gguf`")
    requested_save_dtype = None if args.save_dtype == "auto" else resolve_dtype(args.save_dtype)
    placement_asked = "offload" if args.offload else "streamed" if args.stream_blocks else "auto"
    if args.dry_run:
        plan = dry_run(args, placement_asked, requested_save_dtype, output, gguf)
        print(json.dumps(plan) if args.json else format_dry_run(plan))
        return 0
    model, tokenizer, placement = open_placed(args.model, placement_asked, device=args.device, dtype=args.dtype,
                                              out=output, overwrite=args.overwrite, save_dtype=requested_save_dtype,
                                              resume=args.resume)
    storage = placement if isinstance(placement, OffloadedBlocks) else None
    in_memory = isinstance(placement, InMemory)
    save_dtype = storage.save_dtype if storage else requested_save_dtype or source_dtype(args.model)
    adapter = find_adapter(model)  # an unsupported model fails before the slow work
    args.round_to = math.lcm(args.round_to, alignment(args, model, adapter))
    budget = apply_size_budget(args, model, save_dtype, tokenizer)
    steps = build_steps(args)
    shape = check_command(args, model, steps, adapter, placement, gguf=gguf is not None)
    check_room(output_sizes(args, model, shape, save_dtype, output, gguf))
    tokenizer = require_tokenizer(tokenizer, args.model)

    batches, calib_seqlen = calibration_data(args, model, tokenizer)
    notes = [note for note in [check_calibration(batches, model.get_input_embeddings().weight.shape[1])] if note]
    move_all_but_blocks(model, placement.device, placement.dtype)
    evaluate = evaluation(args, model, tokenizer, args.eval_data, not args.json, placement) if args.eval_data \
        else None
    dense_parameters = count_parameters(model)
    dense_ppl = evaluate(model).as_dict() if evaluate else None
    calibration = {"source": args.calib, "samples": args.calib_samples, "seqlen": calib_seqlen,
                   "batch_size": args.calib_batch_size, "seed": args.seed,
                   "mix": mix_record(args.calib, args.calib_samples)}
    with contextlib.ExitStack() as cleanup:
        activations = "cpu" if isinstance(placement, DeviceStreamed) else None
        if args.offload_activations:
            # named with this process, so a later run can tell a killed run's activations from a live one's
            activations = cleanup.enter_context(tempfile.TemporaryDirectory(
                prefix=f".lmslice-activations-{process_tag()}-", dir=Path(output).absolute().parent))
        if storage is not None:
            cleanup.enter_context(partial_output_removed_on_failure(storage))
        result = compress(model, batches, steps, progress=not args.json, placement=placement,
                          activations=activations, calibration=calibration, source_model=str(args.model))
        model = result.model
        sliced, pruned = result.result(SliceResult), result.result(PruneResult)
        notes += result.notes
        too_large = out_of_range(model.state_dict().items(), save_dtype) if in_memory else None
        if too_large and requested_save_dtype is None:  # the default dtype falls back; one asked for is refused
            notes.append(f"{too_large}: saved in bfloat16 instead of {str(save_dtype).removeprefix('torch.')}")
            save_dtype = torch.bfloat16
        if count_parameters(model) > dense_parameters:
            notes.append(larger_than_source(model, count_parameters(model) / dense_parameters))
        sliced_ppl = evaluate(model).as_dict() if evaluate else None
        saved_ppl = sliced_ppl
        if evaluate and in_memory and save_dtype != resolve_dtype(args.dtype):
            round_to_dtype(model, save_dtype)  # measures the weights as written: the rounding is idempotent
            saved_ppl = evaluate(model).as_dict()
    summary = {
        "model": str(args.model),
        "family": (sliced or pruned).family,
        **({"sparsity": args.sparsity, "format": args.format, "hidden_size": sliced.hidden_size,
            "width": sliced.width, "head_width": sliced.head_width} if sliced else {}),
        **({"target_params": args.target_params, "mlp_widths": pruned.plan.mlp_widths,
            "attention_heads": pruned.plan.attention_heads, "key_value_heads": _key_value_heads(model, pruned),
            "expert_counts": pruned.plan.expert_counts,
            "prune_criterion": args.prune_criterion}
           if pruned else {}),
        **({"target_size": {**budget.as_dict(), "reached_bytes": reached_bytes(args, model, budget, save_dtype,
                                                                                tokenizer)}} if budget else {}),
        "parameters_dense": dense_parameters,
        "parameters_sliced": count_parameters(model),
        "calibration": calibration,
        "slicing_seconds": round(result.seconds, 2),
        "perplexity_dense": dense_ppl,
        "perplexity_sliced": sliced_ppl,
        "save_dtype": str(save_dtype).removeprefix("torch."),
        "perplexity_saved": saved_ppl,
        "eval_data": args.eval_data,
        "output": str(output),
        # measured before saving: the report is written with the model, so it cannot include the save
        "total_seconds": round(time.perf_counter() - started, 2),
        "device": args.device,
        "dtype": args.dtype,
        "peak_memory_gib": round(peak_memory_gib(args.device), 3),
        "notes": notes,
    }
    report = {REPORT_FILE: json.dumps({**summary, "spectra": sliced.spectra if sliced else {}}) + "\n"}
    if storage is None:
        model.to("cpu", placement.storage_dtype if isinstance(placement, DeviceStreamed) else None)
        save_sliced(model, tokenizer, output, overwrite=args.overwrite, dtype=save_dtype, extra_files=report,
                    check_ids=batches[0]["input_ids"][:1, :16])
    else:
        save_offloaded(model, storage, tokenizer, output, args.overwrite, extra_files=report)
    print(json.dumps(summary) if args.json else format_summary(summary))
    if gguf:
        layout = write_gguf(model, tokenizer, args.model, gguf, "f16")
        if not args.json:
            print(describe(layout, gguf, "f16"))
    return 0


def prunes(args: argparse.Namespace) -> bool:
    """Whether the command prunes: to a fraction of the parameters (--keep) or to a file size."""
    return args.target_params is not None or args.target_size is not None


def apply_size_budget(args: argparse.Namespace, model: nn.Module, save_dtype: torch.dtype,
                      tokenizer: object) -> SizeBudget | None:
    """Turns --target-size into the fraction of the parameters it keeps in this model (`args.target_params`,
    as --keep gives it), at the widths' rounding the plan uses; refuses a size pruning cannot reach."""
    if args.target_size is None:
        return None
    heads = PruneConfig(1.0, args.mlp_widths, args.prune_heads, args.round_to).prunes_heads(model)
    budget = size_budget(model, parse_size(args.target_size), args.target_format or "safetensors",
                         save_dtype=save_dtype, vocabulary=budget_vocabulary(args, model, tokenizer),
                         round_to=args.round_to, widths=args.mlp_widths, heads=heads)
    args.target_params = budget.keep
    return budget


def reached_bytes(args: argparse.Namespace, model: nn.Module, budget: SizeBudget, save_dtype: torch.dtype,
                  tokenizer: object) -> int:
    """The size of the compressed model's file in the format --target-size measured, tensor by tensor."""
    vocabulary = budget_vocabulary(args, model, tokenizer)
    return round(file_bytes(model, budget.file_format, save_dtype=save_dtype, vocabulary=vocabulary)[0])


def budget_vocabulary(args: argparse.Namespace, model: nn.Module, tokenizer: object) -> dict | None:
    """The vocabulary a GGUF of the result holds (sized by --target-size), as the export writes it."""
    if not (args.target_format or "").startswith("gguf-"):
        return None
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    return gguf_vocabulary(tokenizer, vocab_rows, source_gguf(args.model, model))


def build_steps(args: argparse.Namespace) -> list[Step]:
    """The pipeline the flags describe: slice the residual stream, prune to the budget, write the
    standard format, each where asked."""
    steps: list[Step] = []
    if args.sparsity is not None:
        # pruning after slicing needs the head to read the sliced width (see prune.check_consumer)
        steps.append(Slice(SliceConfig(args.sparsity, args.round_to,
                                       slice_head=args.slice_head or args.target_params is not None,
                                       rotation="shared" if args.format == "standard" else "per-block",
                                       weighting=args.basis_weighting)))
    if args.target_params is not None:
        steps.append(Prune(PruneConfig(args.target_params, args.mlp_widths, args.prune_heads, args.round_to,
                                       args.prune_criterion, whole_experts=args.prune_experts)))
    if args.format == "standard":
        steps.append(StandardFormat(StandardFormatConfig(args.tie_embeddings)))
    return steps


def check_command(args: argparse.Namespace, model: nn.Module, steps: list[Step], adapter: ModelAdapter,
                  placement: Placement, gguf: bool) -> nn.Module:
    """Refuses, before the calibration text is read, every step this model cannot take (`check_steps`:
    slicing a stream already sliced, the standard format of blocks pruned per block, a budget that pruning
    cannot reach on what slicing leaves, heads of a family whose heads are unknown, a standard hidden size
    transformers rejects), and a result `gguf` (llama.cpp) cannot represent. Returns the structure the
    steps leave (weightless where it differs; per-block widths at most the model's own)."""
    shape = check_steps(model, steps, placement=placement)
    if gguf:
        check_exportable(adapter.family, config=model.config,
                         shortcuts=args.sparsity is not None and args.format != "standard",
                         per_block=args.target_params is not None and args.mlp_widths == "measured")
    return shape


def output_sizes(args: argparse.Namespace, model: nn.Module, shape: nn.Module, save_dtype: torch.dtype,
                 output: Path, gguf: Path | None) -> list[tuple[Path, float]]:
    """About how many bytes each output takes at most: the result's weights in `save_dtype` (a measured
    plan is counted at the widths it starts from), the calibration activations spilled beside it (a
    block's input and output stream), what a resumable run keeps beside it (the stream after the last
    block of a finished walk and after the last finished block of the next; two while a new one
    replaces the old), and the GGUF file."""
    parameters = count_parameters(shape)
    if args.target_params is not None:  # pruning stops at the budget
        parameters = min(parameters, args.target_params * count_parameters(model))
    stream = args.calib_samples * context_length(model, args.calib_seqlen) * residual_width(model) \
        * resolve_dtype(args.dtype).itemsize
    spilled = 2 * stream * args.offload_activations + 3 * stream * args.resume
    sizes = [(output, parameters * save_dtype.itemsize + spilled)]
    if gguf is not None:
        sizes.append((gguf, gguf_bytes(parameters, "f16")))
    return sizes


def larger_than_source(model: nn.Module, ratio: float) -> str:
    """Why a sliced model holds more parameters than its source, and what makes it smaller."""
    layout = layout_of(model.config)
    stream = layout.stream if layout is not None else None
    causes = []
    if stream is not None and stream.tied_embeddings and stream.head_width == layout.hidden_size:
        causes.append("the head keeps its full width, no longer tied to the (sliced) embedding it shared")
    if stream is not None and stream.rotation == "per-block":
        causes.append("each block adds shortcut matrices between its bases")
    why = f" ({'; '.join(causes)})" if causes else ""
    return (f"the result holds {ratio:.0%} of the source's parameters{why}: slice the head too (--slice-head) or "
            "prune to a real budget (--keep) for a smaller model")


def alignment(args: argparse.Namespace, model: nn.Module, adapter: ModelAdapter) -> int:
    """The row length `--align` asks widths to be multiples of; see its help for what auto chooses. A
    --target-format's type asks for its own blocks, so that the down projection keeps the type its size
    was counted in."""
    if args.align != "auto":
        return ALIGNMENTS[args.align]
    per_block = prunes(args) and args.sparsity is None and args.mlp_widths == "measured"
    wanted = max(ALIGNMENTS["gguf-k"] if per_block else 1, row_block(args.target_format))
    if wanted > 1 and adapter.mlp is not None:
        dense_width = mlp_width(get_module(model, adapter.blocks)[0], adapter.mlp)  # each expert's, in experts
        if dense_width % wanted == 0:
            return wanted
    return 1


def format_summary(summary: dict) -> str:
    dense, sliced = summary["parameters_dense"], summary["parameters_sliced"]
    calibration = summary["calibration"]
    model = f"{summary['model']} ({summary['family']})"
    pruned = f"to {summary['target_params']:g} of its parameters" if "target_params" in summary else ""
    if "sparsity" in summary:
        lines = [f"sliced {model} at sparsity {summary['sparsity']}"
                 + (", standard format" if summary.get("format") == "standard" else "")
                 + (f", then pruned {pruned}" if pruned else "")]
    else:
        lines = [f"pruned {model} {pruned}"]
    if "sparsity" in summary:
        head = "" if summary["head_width"] == summary["width"] else f" (head reads {summary['head_width']})"
        lines.append(f"  hidden width   {summary['hidden_size']} -> {summary['width']}{head}")
    if "target_params" in summary:
        lines.append(f"  MLP widths     {_describe_widths(summary['mlp_widths'])} (channels by "
                     f"{summary['prune_criterion']}, down projection refit by least squares)")
        if summary["attention_heads"]:
            lines.append(f"  query heads    {_describe_widths(summary['attention_heads'])} (output projection refit)")
        experts = [count for count in summary.get("expert_counts") or () if count]  # 0: a block without experts
        if experts:
            lines.append(f"  experts        {_describe_widths(experts)} (whole experts leave with their router rows)")
        if summary["key_value_heads"] and len(set(summary["key_value_heads"])) > 1:
            lines.append(f"  key/value heads {_describe_widths(summary['key_value_heads'])} (whole groups removed)")
        for key, label in (("attention_heads", "no attention"), ("mlp_widths", "no MLP      ")):
            free = [str(index) for index, width in enumerate(summary[key] or ()) if width == 0]
            if free:
                lines.append(f"  {label}   block{'s' * (len(free) > 1)} {', '.join(free)} (deleted whole)")
    lines += [
        f"  parameters     {dense / 1e6:.2f}M -> {sliced / 1e6:.2f}M ({100 * sliced / dense:.1f}% of dense)",
    ]
    if "target_size" in summary:
        lines.append(f"  file size      {_size_reached(summary['target_size'], 'reached_bytes')}")
    if summary["perplexity_dense"]:
        before, after = summary["perplexity_dense"], summary["perplexity_sliced"]
        lines.append(f"  perplexity     {before['perplexity']:.3f} -> {after['perplexity']:.3f} on "
                     f"{summary['eval_data']} ({after['tokens']} tokens, windows of {after['seqlen']})")
        lines.append(f"                 {summary['perplexity_saved']['perplexity']:.3f} as saved "
                     f"({summary['save_dtype']} weights)")
    lines += [
        f"  calibration    {calibration['source']}, {calibration['samples']} x {calibration['seqlen']} tokens, "
        f"seed {calibration['seed']}",
        f"  time           compression {summary['slicing_seconds']:.1f} s, total {summary['total_seconds']:.1f} s",
        f"  computed on    {summary['device']} in {summary['dtype']}",
        f"  peak memory    {summary['peak_memory_gib']:.2f} GiB",
        f"  saved to       {summary['output']} ({summary['save_dtype']})",
    ]
    lines += [f"  note           {note}" for note in summary["notes"]]
    return "\n".join(lines)


def _size_reached(budget: dict, reached: str) -> str:
    return (f"about {format_size(budget[reached])} as {budget['format']} (target {format_size(budget['target_bytes'])}"
            f", dense {format_size(budget['dense_bytes'])})")


def _key_value_heads(model: nn.Module, pruned: PruneResult) -> list[int] | None:
    """Each block's key/value heads, where query heads were pruned (whole groups may have left)."""
    if not pruned.plan.attention_heads:
        return None
    adapter = find_adapter(model)
    return [head_counts(block, adapter.attention)[1] for block in get_module(model, adapter.blocks)]


def _describe_widths(widths: list[int]) -> str:
    if len(set(widths)) == 1:
        return f"{widths[0]} in every block"
    return f"{min(widths)}-{max(widths)} by block, {sum(widths) / len(widths):.0f} on average"


def dry_run(args: argparse.Namespace, placement_asked: str, requested_save_dtype: torch.dtype | None,
            output: Path, gguf: Path | None) -> dict:
    """What the run would do and cost, from the model's config alone (no weight, no calibration text is
    read): the steps, the parameters and bytes it reaches, where the result loads, and the peak memory and
    compute time `estimate` expects on this device. Every refusal the structure allows is made as in a run."""
    dtype = resolve_dtype(args.dtype)
    model = open_skeleton(args.model, dtype)
    adapter = find_adapter(model)
    args.round_to = math.lcm(args.round_to, alignment(args, model, adapter))
    save_dtype = requested_save_dtype or source_dtype(args.model)
    sized_as_gguf = (args.target_format or "").startswith("gguf-")
    tokenizer = load_tokenizer(str(model_path(args.model))) \
        if sized_as_gguf and source_gguf(args.model, model) is None else None
    budget = apply_size_budget(args, model, save_dtype, tokenizer)
    steps = build_steps(args)
    shape = check_command(args, model, steps, adapter, InMemory(), gguf=gguf is not None)
    dense = count_parameters(model)
    parameters = args.target_params * dense if args.target_params is not None else count_parameters(shape)
    placement = choose_placement(args.model, placement_asked, args.device, dtype)
    eval_seqlen = context_length(model, args.eval_seqlen)
    eval_tokens = (args.eval_max_windows or 0) * eval_seqlen if args.eval_data else 0
    calibration = Calibration(args.calib_samples, context_length(model, args.calib_seqlen), args.calib_batch_size,
                              eval_tokens, eval_seqlen)
    cost = estimate(model, steps, placement, calibration, device=args.device, dtype=dtype,
                    stored_dtype=streamed_dtype(args.model, dtype),
                    speed=measure_speed(args.device), activations_on_disk=args.offload_activations,
                    saved_parameters=None if placement == "offload" else int(parameters))  # offloaded: shard by shard
    uniform = args.target_params is None or args.mlp_widths == "uniform"
    plain = (args.sparsity is None or args.format == "standard") and uniform
    try:
        check_exportable(adapter.family, config=model.config,
                         shortcuts=args.sparsity is not None and args.format != "standard", per_block=not uniform)
        # measured per-block widths are written as llama.cpp's deci, equal blocks as the family's own
        llama_cpp = ("deci" if not uniform else adapter.gguf.architecture) if adapter.gguf else "no"
    except LmsliceError as refusal:
        llama_cpp = f"no: {refusal}"
    return {
        "model": str(args.model), "family": adapter.family, "steps": [step.name for step in steps],
        "parameters_dense": dense, "parameters": round(parameters),
        "target_size": budget.as_dict() if budget else None,
        "output": str(output), "output_bytes": parameters * torch.finfo(save_dtype).bits // 8,
        "save_dtype": str(save_dtype).removeprefix("torch."),
        "gguf": str(gguf) if gguf else None, "gguf_bytes": gguf_bytes(parameters, "f16"),
        "loads_in": "transformers" if plain else "transformers (trust_remote_code=True) or lmslice.load",
        "llama_cpp": llama_cpp,
        "placement": placement, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
        "calibration": {"samples": calibration.samples, "seqlen": calibration.seqlen},
        "estimated_peak_gib": round(cost.peak_bytes / 2**30, 2),
        "estimated_device_peak_gib": round(cost.device_peak_bytes / 2**30, 2) if cost.device_peak_bytes else None,
        "estimated_memory_gib": {part: round(size / 2**30, 2) for part, size in cost.memory.items()},
        "estimated_seconds": {phase: round(seconds, 1) for phase, seconds in cost.seconds.items()},
    }


def format_dry_run(plan: dict) -> str:
    def size(count: float) -> str:
        return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"

    seconds = plan["estimated_seconds"]
    total = sum(seconds.values())
    memory = ", ".join(f"{part} {gib:.2f}" for part, gib in plan["estimated_memory_gib"].items())
    lines = [
        f"dry run: no weight or text read, nothing written ({plan['model']}, {plan['family']})",
        f"  steps          {' -> '.join(plan['steps'])}",
        f"  parameters     {plan['parameters_dense'] / 1e6:.2f}M -> {plan['parameters'] / 1e6:.2f}M "
        f"({100 * plan['parameters'] / plan['parameters_dense']:.1f}% of dense)",
        *([f"  file size      {_size_reached(plan['target_size'], 'estimated_bytes')}"] if plan["target_size"] else []),
        f"  output         {plan['output']}: about {size(plan['output_bytes'])} ({plan['save_dtype']})"
        + (f"; {plan['gguf']}: about {size(plan['gguf_bytes'])} (f16)" if plan["gguf"] else ""),
        f"  loads in       {plan['loads_in']}; llama.cpp: {plan['llama_cpp']}",
        f"  blocks         {plan['placement']} on {plan['device']}, computing in {plan['dtype']}; calibration "
        f"{plan['calibration']['samples']} x {plan['calibration']['seqlen']} tokens",
        f"  peak memory    about {plan['estimated_peak_gib']:.2f} GiB ({memory})"
        + (f"; on the device about {plan['estimated_device_peak_gib']:.2f} GiB"
           if plan["estimated_device_peak_gib"] else ""),
        f"  compute time   about {_duration(total)} ("
        + ", ".join(f"{phase} {_duration(value)}" for phase, value in seconds.items()) + "), not counting load and save",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
