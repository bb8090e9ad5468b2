"""Perplexity, parameters and slicing time of one model at several sparsities, in one run.

    python benchmarks/perplexity_sweep.py --model smollm2-135m --calib pydoc --eval-data pydoc \
        --sparsities 0,0.1,0.2,0.25,0.3 --calib-samples 32 --calib-seqlen 512 --eval-seqlen 512

Prints a markdown table. The model is loaded once and deep-copied for each sparsity.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

from protocol import add_protocol_options, load_protocol

from lmslice.slicing import count_parameters, slice_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_options(parser, seqlen=512, eval_max_windows=None, threads=2)
    parser.add_argument("--sparsities", default="0,0.1,0.2,0.25,0.3")
    parser.add_argument("--slice-head", action="store_true")
    args = parser.parse_args()
    protocol = load_protocol(args)
    model, batches, measure = protocol.model, protocol.batches, protocol.perplexity

    dense_ppl = measure(model)
    dense_parameters = count_parameters(model)
    print(f"model {args.model}; calibration {args.calib} {args.calib_samples} x {args.calib_seqlen}; "
          f"evaluation {args.eval_data} test split, windows of {args.eval_seqlen}")
    print("| sparsity | width | parameters | % of dense | perplexity | × dense | slicing s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| dense | {model.config.hidden_size} | {dense_parameters / 1e6:.2f}M | 100.0 | {dense_ppl:.3f} | 1.00 | - "
          f"| {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} |")
    for sparsity in [float(value) for value in args.sparsities.split(",")]:
        sliced = copy.deepcopy(model)
        started = time.perf_counter()
        result = slice_model(sliced, batches, sparsity, slice_head=args.slice_head, progress=False)
        seconds = time.perf_counter() - started
        ppl = measure(sliced)
        parameters = count_parameters(sliced)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"| {sparsity:.2f} | {result.width} | {parameters / 1e6:.2f}M | {100 * parameters / dense_parameters:.1f} "
              f"| {ppl:.3f} | {ppl / dense_ppl:.2f} | {seconds:.1f} | {peak:.2f} |", flush=True)
        del sliced


if __name__ == "__main__":
    main()
