"""What the plan and the pruning pass spend per MLP, by width: the solvers alone, on one Gram matrix.

    python benchmarks/solvers.py --widths 2048:5632,4096:11008 --threads 2

For each `hidden:mlp` pair (the consumer's output and input widths), a Gram matrix of `--tokens` random
activations (of uneven scales, as real ones are), timed as one full float32 product and as `add_gram`'s
blocks on and below the diagonal (the faster of two runs each), and a random consumer weight; then, in
this process, one after the other: the damped inverse (`damped_inverse`, which both of the others start
with), the plan's whole elimination path (`mlp_path`: the inverse and every step down to `round_to`
channels), the same path from the activations themselves where the plan keeps them instead of G (at most
a quarter as many tokens as channels: `eliminate_from_rows`, no inverse of G) and the pruning pass's choice
of the channels to keep (`keep_channels`, `--keep` of them) with the refit of the consumer (`refit`).
Prints a markdown table of seconds. Random matrices measure cost, not quality; run it on an otherwise idle
machine (LAPACK's threads slow down many times when the cores are oversubscribed).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lmslice.calibration import add_gram
from lmslice.prune.plan import mlp_path
from lmslice.prune.solvers import (DEFAULT_DAMPING, REFIT_DAMPING, InputRows, damped_inverse, keep_channels, refit,
                                   rows_are_cheaper)


def seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="2048:5632,4096:11008", help="hidden:mlp pairs, comma-separated")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens in the Gram matrix")
    parser.add_argument("--keep", type=float, default=0.7, help="the MLP width the pruning pass keeps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.tokens} tokens, {args.threads} threads, float32 eliminations, float64 refits")
    print("| hidden | MLP | G: one full product | G: add_gram | damped_inverse | plan: mlp_path "
          "| plan: mlp_path from the activations | prune: keep_channels + refit |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for pair in args.widths.split(","):
        hidden, width = map(int, pair.split(":"))
        generator = torch.Generator().manual_seed(0)
        activations = torch.randn(args.tokens, width, generator=generator) * torch.rand(width, generator=generator)
        summed = torch.zeros(width, width, dtype=torch.float64)  # what the timed accumulations add to
        full = min(seconds(lambda: summed.add_(activations.T @ activations)) for _ in range(2))
        lower = min(seconds(lambda: add_gram(summed, activations)) for _ in range(2))
        del summed
        gram = (activations.T @ activations).double()
        weight = torch.randn(hidden, width, generator=generator) / width**0.5  # float32, as consumer_weight
        kept_width = int(args.keep * width) // 8 * 8
        inverse = seconds(lambda: damped_inverse(gram, width, DEFAULT_DAMPING))
        plan = seconds(lambda: mlp_path(weight, gram, width, 8, 3 * hidden, DEFAULT_DAMPING))
        from_rows = "-"
        if rows_are_cheaper(args.tokens, width):  # where the plan keeps the activations instead of G
            rows = InputRows(activations)
            from_rows = f"{seconds(lambda: mlp_path(weight, rows, width, 8, 3 * hidden, DEFAULT_DAMPING)):.1f}"
        del activations
        kept: list[torch.Tensor] = []
        prune = seconds(lambda: kept.append(keep_channels(weight, gram, width, kept_width, "obs", DEFAULT_DAMPING)))
        prune += seconds(lambda: refit(weight, gram, kept[0], width, REFIT_DAMPING))  # uses G up: the last
        print(f"| {hidden} | {width} | {full:.2f} | {lower:.2f} | {inverse:.1f} | {plan:.1f} | {from_rows} "
              f"| {prune:.1f} |", flush=True)


if __name__ == "__main__":
    main()
