"""Does the pruned model generalise beyond its calibration text? Refit variants, side by side.

    OMP_NUM_THREADS=1 python benchmarks/cross_domain.py --calib ../shared/data/wikitext-2/wiki.valid.tokens \
        --eval-data ../shared/data/wikitext-2/wiki.test.raw,pydoc --budgets 0.8 \
        --variants default,zero:0.01,zero:0.1,anchor:0.01,anchor:0.1,anchor:1,delete

For each budget and variant, the model loaded once is deep-copied and pruned to the budget by
`lmslice.prune.prune_to_budget` (measured widths, query heads too: the default), with the consumers'
(down and output projections') least-squares refit replaced by the variant's. W is the consumer, G the
Gram matrix of its input over the calibration tokens, S the channels kept, λ = LAMBDA · mean diag G[S, S]:

- `default`: whatever `prune_to_budget` does today, untouched;
- `zero:LAMBDA`: W' = W G[:, S] (G[S, S] + λI)⁻¹, the ridge refit toward zero;
- `anchor:LAMBDA`: W' = (W G[:, S] + λ W[:, S]) (G[S, S] + λI)⁻¹, the refit toward the un-refit
  weights (argmin ‖W'X_S − WX‖² + λ‖W' − W[:, S]‖²): plain deletion as λ → ∞;
- `shrinkALPHA:LAMBDA`: W[:, S] + ALPHA (W'_zero − W[:, S]), the zero refit's change scaled by ALPHA;
- `delete`: W[:, S], no refit (as LLM-Pruner).

Options of `prune_to_budget` follow as `+NAME=VALUE`: `+damping=0.3` the damping that choosing the
channels and heads and planning the widths use, `+planning_windows=32` the windows the Fisher and the
plan are measured on (default: the library's own). Prints a markdown table: real
parameters, perplexity and its ratio to dense on each evaluation text, the heads left (query, key/value,
and the blocks whose attention and whose MLP were deleted), the pruning time.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from protocol import add_protocol_options, load_protocol, perplexity_cells, print_header

import lmslice.prune.surgery
from lmslice.adapters import find_adapter
from lmslice.modeling import get_module, head_counts
from lmslice.prune import mlp_width, prune_to_budget
from lmslice.slicing import count_parameters

Refit = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def variant_refit(kind: str, strength: float) -> Refit:
    """The consumer refit of variant `kind` (zero, anchor, shrinkALPHA, delete) at λ = `strength`
    · mean diag G[S, S]; it replaces `lmslice.prune.surgery.refit` (same arguments: its own damping is ignored)."""

    def refit(weight: torch.Tensor, matrix: torch.Tensor, kept: torch.Tensor, channels: int,
              damping: float) -> torch.Tensor:
        columns = torch.cat([kept, torch.arange(channels, len(matrix), device=kept.device)])
        unrefit = weight[:, columns]
        if kind == "delete":
            return unrefit
        sub = matrix[columns][:, columns]
        mean = sub.diagonal()[:len(kept)].mean()
        shift = strength * (mean if mean > 0 else torch.ones_like(mean))
        regularised = sub.clone()
        regularised.diagonal()[:len(kept)] += shift
        rhs = weight @ matrix[:, columns]
        if kind == "anchor":  # the constant (bias) channel is not damped, so it is not anchored either
            rhs[:, :len(kept)] += shift * weight[:, kept]
        solved = torch.linalg.solve(regularised, rhs.T).T
        if kind.startswith("shrink"):
            return unrefit + float(kind.removeprefix("shrink")) * (solved - unrefit)
        return solved

    return refit


def parse_variant(spec: str) -> tuple[Refit | None, dict[str, float]]:
    """A variant's refit (None: the library's own) and the keyword arguments for `prune_to_budget`."""
    name, *settings = spec.split("+")
    options: dict[str, float] = {}
    for setting in settings:
        key, value = setting.split("=")
        options[key] = int(value) if key == "planning_windows" else float(value)
    if name == "default":
        return None, options
    kind, *strength = name.split(":")
    if kind != "delete" and not strength:
        raise SystemExit(f"variant {spec!r} needs a λ: {kind}:LAMBDA")
    return variant_refit(kind, float(strength[0]) if strength else 0.0), options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_options(parser)
    parser.add_argument("--budgets", default="0.8")
    parser.add_argument("--variants", default="default,anchor:0.01,anchor:0.1,anchor:0.3,anchor:1,zero:0.1,zero:1")
    args = parser.parse_args()
    protocol = load_protocol(args)
    model, batches = protocol.model, protocol.batches
    dense_ppl = protocol.measure(model)
    dense_parameters = count_parameters(model)
    print_header(args, dense_ppl, ["budget", "variant", "real parameters"],
                 ["query / key-value heads, blocks without attention / MLP", "time s"])
    library_refit = lmslice.prune.surgery.refit
    for budget in [float(value) for value in args.budgets.split(",")]:
        for spec in args.variants.split(","):
            refit, options = parse_variant(spec)
            candidate = copy.deepcopy(model)
            lmslice.prune.surgery.refit = refit or library_refit
            try:
                started = time.perf_counter()
                prune_to_budget(candidate, batches, budget, progress=False, **options)
                seconds = time.perf_counter() - started
            finally:
                lmslice.prune.surgery.refit = library_refit
            ppl = protocol.measure(candidate)
            share = count_parameters(candidate) / dense_parameters
            cells = perplexity_cells(ppl, dense_ppl)
            print(f"| {budget:.2f} | {spec} | {100 * share:.1f}% | {cells} | {describe_heads(candidate)} | "
                  f"{seconds:.0f} |", flush=True)
            del candidate


def describe_heads(model: torch.nn.Module) -> str:
    adapter = find_adapter(model)
    blocks = get_module(model, adapter.blocks)
    counts = [head_counts(block, adapter.attention) for block in blocks]
    return (f"{sum(count[0] for count in counts)} / {sum(count[1] for count in counts)}, "
            f"{sum(count[0] == 0 for count in counts)} / {sum(mlp_width(block, adapter.mlp) == 0 for block in blocks)}")


if __name__ == "__main__":
    main()
