"""Per-block slicing vs the standard format (one shared basis) at equal real-parameter budgets, and the
shared basis' candidates (weighting of the norm inputs, centring, tied vs untied head).

    OMP_NUM_THREADS=1 python benchmarks/standard_format.py --model smollm2-135m --calib pydoc \
        --eval-data pydoc --calib-samples 32 --calib-seqlen 256 --eval-seqlen 256 --eval-max-windows 40

Budgets are the real parameter counts of per-block slices with a sliced head at `--budget-sparsities`;
the standard format then gets the widest multiple of 8 that fits each budget, untied and tied (every
parameter of the standard format is proportional to its width, so that width is exact). Perplexity is
on the test split of `--eval-data`, calibration on the train split of `--calib`. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from protocol import add_protocol_options, load_protocol

from lmslice.export import standard_model
from lmslice.slicing import count_parameters, slice_model


def sparsity_for_width(hidden: int, width: int) -> float:
    """The sparsity whose rounded width (multiple of 8) is exactly `width`."""
    return 1 - (width + 0.5) / hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_options(parser)
    parser.add_argument("--budget-sparsities", default="0.25,0.35,0.45")
    parser.add_argument("--candidate-sparsity", type=float, default=0.25)
    parser.add_argument("--weightings", default="unit-rms,raw,reader-gain")
    parser.add_argument("--full-head", action="store_true", help="also per-block slices with a full-width head")
    parser.add_argument("--heads", default="untied,tied", help="standard-format heads to measure (tied: if the "
                                                                "source ties them)")
    parser.add_argument("--uncentred", action="store_true", help="also the unit-RMS basis without centring")
    parser.add_argument("--skip-budgets", action="store_true")
    parser.add_argument("--skip-candidates", action="store_true")
    args = parser.parse_args()
    protocol = load_protocol(args)
    model, batches = protocol.model, protocol.batches
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    dense_parameters = count_parameters(model)
    tied_source = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    ties = tuple(head == "tied" for head in args.heads.split(",") if tied_source or head == "untied")

    measure = protocol.perplexity

    dense_ppl = measure(model)
    print(f"model {args.model} (D={hidden}, {dense_parameters / 1e6:.2f}M parameters, tied={tied_source}); "
          f"calibration {args.calib} train {args.calib_samples} x {args.calib_seqlen}; evaluation {args.eval_data} "
          f"test, {args.eval_max_windows} windows of {args.eval_seqlen}; dense perplexity {dense_ppl:.3f}")

    def row(label: str, candidate: torch.nn.Module, width: int, seconds: float) -> int:
        parameters = count_parameters(candidate)
        ppl = measure(candidate)
        print(f"| {label} | {width} | {parameters / 1e6:.2f}M | {100 * parameters / dense_parameters:.1f} | "
              f"{ppl:.3f} | {ppl / dense_ppl:.3f} | {seconds:.0f} |", flush=True)
        return parameters

    def per_block(sparsity: float, slice_head: bool) -> tuple[torch.nn.Module, int, float]:
        sliced = copy.deepcopy(model)
        started = time.perf_counter()
        result = slice_model(sliced, batches, sparsity, slice_head=slice_head, progress=False)
        return sliced, result.width, time.perf_counter() - started

    def standard(width: int, ties: tuple[bool, ...], **options) -> list[tuple[torch.nn.Module, int, float]]:
        """One slicing, exported once per tying choice."""
        sliced = copy.deepcopy(model)
        started = time.perf_counter()
        result = slice_model(sliced, batches, sparsity_for_width(hidden, width), rotation="shared", progress=False,
                             **options)
        seconds = time.perf_counter() - started
        return [(standard_model(sliced, tie_embeddings=tie, head_input=result.head_input), result.width, seconds)
                for tie in ties]

    header = ("| model | width | parameters | % of dense | perplexity | × dense | slicing s |\n"
              "|---|---|---|---|---|---|---|")
    # Every standard-format parameter is proportional to the width (head_dim stays, attention keeps its width).
    per_width_untied = (dense_parameters + (vocab * hidden if tied_source else 0)) / hidden
    per_width_tied = dense_parameters / hidden
    if not args.skip_budgets:
        print("\n### equal real-parameter budgets\n")
        print(header)
        for sparsity in [float(value) for value in args.budget_sparsities.split(",")]:
            if args.full_head:
                row(f"per-block {sparsity:.2f}, full head", *per_block(sparsity, False))
            budget = row(f"per-block {sparsity:.2f}, sliced head", *per_block(sparsity, True))
            for tie in ties:
                width = int(budget / (per_width_tied if tie else per_width_untied)) // 8 * 8
                row(f"standard, {'tied' if tie else 'untied'}", *standard(width, (tie,))[0])

    if not args.skip_candidates:
        width = int((1 - args.candidate_sparsity) * hidden) // 8 * 8
        print(f"\n### shared-basis candidates at width {width} (sparsity {args.candidate_sparsity})\n")
        print(header)
        centring = [(w, True) for w in args.weightings.split(",")] + ([("unit-rms", False)] if args.uncentred else [])
        for weighting, centre in centring:
            exported = standard(width, ties, weighting=weighting, centre_embeddings=centre)
            for tie, result in zip(ties, exported):
                row(f"{weighting}, {'centred' if centre else 'uncentred'}, {'tied' if tie else 'untied'}", *result)


if __name__ == "__main__":
    main()
