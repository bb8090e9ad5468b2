"""Perplexity against *real* parameters: MLP channel pruning vs SliceGPT per-block slicing, equal sizes.

    OMP_NUM_THREADS=1 python benchmarks/prune_frontier.py --budgets 0.9,0.8,0.7,0.6 \
        --modes slicegpt,standard,mlp-uniform,mlp-measured --eval-data pydoc,../shared/data/wikitext-2/wiki.test.raw

For each budget F (fraction of the dense model's parameters, every tensor once, a tied embedding once)
and each mode, the model loaded once is deep-copied and compressed:

- a mode of `lmslice.frontier.MODES` (`slicegpt`, `standard`, `mlp-uniform`, `mlp-measured`, ...): what
  `lmslice report --target-params` runs; the slicing modes pick the residual width (multiple of 8) whose
  real parameter count (untied head and shortcut matrices included) is closest to F;
- `mlp:CRITERION[:FLAGS]` (obs, energy, leverage), for the ablations: MLP channels pruned within F,
  chosen by their Fisher-weighted output error, the down projection refit by least squares, the same
  width in every block, the Fisher and plan from every calibration window. FLAGS: `a` per-block widths
  from the measured cost, `u` unweighted output error (no Fisher), `d` delete the channels without a refit.

- `sliceS+mlp`: residual slicing at sparsity S (per block, head sliced), then MLP channels pruned to F with
  measured widths (`lmslice slice --sparsity S --target-params F`).

`--untie-head` gives the model its own copy of the head first: how the modes compare on a model that
ships an untied head, whose embedding and head the residual slicing shrinks too.

Prints a markdown table: real parameters, perplexity and ratio to dense on each evaluation text, the
compression time and the peak resident memory of the compression step (VmHWM, reset before each step).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from protocol import add_protocol_options, load_protocol, perplexity_cells, print_header

from lmslice.adapters import find_adapter
from lmslice.frontier import MODES, describe_mlp
from lmslice.prune import output_sensitivity, plan_by_importance, plan_uniform, prune_model, prune_to_budget
from lmslice.slicing import count_parameters, slice_model


def reset_peak_memory() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def compress(model: torch.nn.Module, mode: str, budget: float, batches: list) -> tuple[torch.nn.Module, str]:
    """Compresses `model` (in place, or into a new model for the standard format); returns the result
    and a short description of what was done."""
    if mode in MODES:
        return MODES[mode].compress(model, batches, budget, round_to=8, progress=False)
    if mode.startswith("slice"):  # sliceS+mlp: slice S of the residual stream (head too), then prune the MLPs
        dense = count_parameters(model)
        sliced = slice_model(model, batches, float(mode.removeprefix("slice").split("+")[0]), slice_head=True,
                             progress=False)
        pruned = prune_to_budget(model, batches, budget, parameters_dense=dense, progress=False)
        return model, f"D'={sliced.width}, {describe_mlp(pruned.plan.mlp_widths)}"
    _, criterion, flags = (mode.split(":") + [""])[:3]
    consumer = find_adapter(model).mlp.consumer
    if "a" in flags:
        plan, sensitivities = plan_by_importance(model, batches, budget, weighted="u" not in flags)
        sensitivity = sensitivities[consumer]
    else:
        plan = plan_uniform(model, budget)
        sensitivity = None if "u" in flags else output_sensitivity(model, find_adapter(model), batches)
    prune_model(model, batches, plan, criterion=criterion, refit_consumer="d" not in flags, sensitivity=sensitivity)
    return model, describe_mlp(plan.mlp_widths)


def untie_head(model: torch.nn.Module) -> None:
    """Gives the model a head of its own (a copy of the embedding): a stand-in for models that ship one."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_options(parser)
    parser.add_argument("--budgets", default="0.9,0.8,0.7,0.6")
    parser.add_argument("--modes", default="slicegpt,standard,mlp-uniform,mlp-measured")
    parser.add_argument("--untie-head", action="store_true", help="measure the model with an untied copy of its head")
    args = parser.parse_args()
    protocol = load_protocol(args)
    model, batches, measure = protocol.model, protocol.batches, protocol.measure
    if args.untie_head:
        untie_head(model)
    dense_ppl = measure(model)
    dense_parameters = count_parameters(model)
    print_header(args, dense_ppl, ["budget", "mode", "shape", "real parameters"], ["time s", "peak RSS GiB"],
                 " (head untied)" if args.untie_head else "")
    for budget in [float(value) for value in args.budgets.split(",")]:
        for mode in args.modes.split(","):
            candidate = copy.deepcopy(model)
            reset_peak_memory()
            started = time.perf_counter()
            candidate, shape = compress(candidate, mode, budget, batches)
            seconds, peak = time.perf_counter() - started, peak_memory_gib()
            ppl = measure(candidate)
            share = count_parameters(candidate) / dense_parameters
            cells = perplexity_cells(ppl, dense_ppl)
            print(f"| {budget:.2f} | {mode} | {shape} | {100 * share:.1f}% | {cells} | {seconds:.1f} | {peak:.2f} |",
                  flush=True)
            del candidate


if __name__ == "__main__":
    main()
