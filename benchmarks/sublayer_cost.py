"""Would deleting a block's whole attention or whole MLP pay? Their perplexity cost against the plan's own.

    OMP_NUM_THREADS=1 python benchmarks/sublayer_cost.py --target-params 0.8 \
        --calib ../shared/data/wikitext-2/wiki.valid.tokens --eval-data ../shared/data/wikitext-2/wiki.test.raw \
        --eval-max-windows 10

The model is compressed at F (`--mode`, default mlp-heads: what `lmslice slice --target-params F` does)
and, for the plan's marginal price, at F minus the parameters of one block's attention (so the plan
spends exactly those parameters on its cheapest channels and heads). Then each block's attention, and
separately its MLP, is deleted from the model at F (its output projection zeroed: what a cut to no heads
or no channels leaves, before any refit). A whole sublayer would pay where its row's perplexity increase
per million parameters is below the plan's.

Prints a markdown table: per block, its heads and MLP width at F, the parameters and the perplexity
increase per million parameters of deleting the attention and of deleting the MLP.
"""

from __future__ import annotations

import argparse
import copy

from protocol import add_protocol_options, load_protocol

from lmslice.adapters import find_adapter
from lmslice.frontier import MODES
from lmslice.modeling import get_module
from lmslice.prune.shapes import attention_of, mlp_of
from lmslice.slicing import count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_options(parser)
    parser.add_argument("--target-params", type=float, default=0.8)
    parser.add_argument("--mode", default="mlp-heads", choices=list(MODES))
    args = parser.parse_args()
    protocol = load_protocol(args)
    dense = protocol.model
    adapter = find_adapter(dense)
    attention, mlp = attention_of(adapter), mlp_of(adapter)
    parameters_dense = count_parameters(dense)
    mode = MODES[args.mode]
    pruned, shape = mode.compress(copy.deepcopy(dense), protocol.batches, args.target_params, round_to=8,
                                  progress=False)
    blocks = get_module(pruned, adapter.blocks)
    attention_size = count_parameters(get_module(get_module(dense, adapter.blocks)[0], attention.module))
    deeper, _ = mode.compress(copy.deepcopy(dense), protocol.batches,
                              args.target_params - attention_size / parameters_dense, round_to=8, progress=False)
    base = protocol.perplexity(pruned)
    plan_price = (protocol.perplexity(deeper) - base) / (count_parameters(pruned) - count_parameters(deeper)) * 1e6
    print(f"model {args.model} at {args.target_params:g} ({args.mode}: {shape}); calibration {args.calib} "
          f"{args.calib_samples} x {args.calib_seqlen}; evaluation {next(iter(protocol.eval_tokens))} "
          f"({args.eval_max_windows} windows of {args.eval_seqlen}); dense {protocol.perplexity(dense):.3f}, "
          f"at {args.target_params:g} {base:.3f}; the plan's next {attention_size / 1e6:.2f}M parameters cost "
          f"{plan_price:+.3f} perplexity per million", flush=True)
    print("| block | heads | MLP width | attention params | Δppl per M, attention deleted | MLP params | "
          "Δppl per M, MLP deleted |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for index, block in enumerate(blocks):
        sublayers = [  # (the projection whose zeroing deletes it, its parameters)
            (get_module(block, attention.output), count_parameters(get_module(block, attention.module))),
            (get_module(block, mlp.consumer), sum(count_parameters(get_module(block, path))
                                                  for path in (*mlp.producers, mlp.consumer)))]
        cells = []
        for output, size in sublayers:
            kept = output.weight.data.clone()
            output.weight.data.zero_()
            increase = protocol.perplexity(pruned) - base
            output.weight.data.copy_(kept)
            cells += [f"{size / 1e6:.3f}M", f"{increase / size * 1e6:+.2f}"]
        heads = get_module(block, attention.output).in_features // get_module(block, attention.module).head_dim
        width = get_module(block, mlp.consumer).in_features
        print(f"| {index} | {heads} | {width} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
