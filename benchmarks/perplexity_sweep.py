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

import torch

import lmslice
from lmslice.evaluation.perplexity import perplexity
from lmslice.io.data import calibration_batches, load_text, tokenize
from lmslice.slicing import count_parameters, slice_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="pydoc")
    parser.add_argument("--eval-data", default="pydoc")
    parser.add_argument("--sparsities", default="0,0.1,0.2,0.25,0.3")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-max-windows", type=int, default=None)
    parser.add_argument("--slice-head", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = lmslice.load_with_tokenizer(args.model)
    eval_tokens = tokenize(tokenizer, load_text(args.eval_data, split="test"))
    batches = calibration_batches(tokenize(tokenizer, load_text(args.calib, split="train")), args.calib_samples,
                                  args.calib_seqlen, 8, seed=42)

    def measure(candidate: torch.nn.Module) -> float:
        return perplexity(candidate, eval_tokens, args.eval_seqlen, max_windows=args.eval_max_windows,
                          progress=False).perplexity

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
