"""Recovery curves: perplexity after N training tokens, distillation from the dense model vs LoRA RFT.

    OMP_NUM_THREADS=1 python benchmarks/recovery.py --target-params 0.8 \
        --calib ../shared/data/wikitext-2/wiki.valid.tokens --train-data ../shared/data/wikitext-2/wiki.valid.tokens \
        --eval-data ../shared/data/wikitext-2/wiki.test.raw --tokens 25000,50000 --methods lora-rft,distill-lora

The model is compressed once (`lmslice.frontier` mode, default mlp-heads: what `lmslice slice
--target-params` does), then each method trains its own copy on the same random windows of
--train-data (train split), one window of --seqlen tokens per step, and its perplexity on each
--eval-data text (test split) is measured each time the tokens seen pass a value of --tokens: one run per
method gives the whole curve (the learning rate is constant, so a shorter run would have trained the same steps).

Methods: `lora-rft` (the paper's LoRA recipe on the next-token loss), `distill-lora` (the same LoRA,
the dense teacher's distribution as the target: `lmslice finetune --distill-from`), `distill-full`
(every parameter trained, distilled). Training seconds exclude the perplexity measurements.
Prints a markdown table; --save-dir keeps the compressed model and each method's final one, and
--pruned DIR starts another run from that compressed model (or from a method's saved model, with
another --windows-seed, to extend its curve).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from protocol import add_protocol_options, load_protocol, perplexity_cells, print_header
from torch import nn

import lmslice
from lmslice.distill import Distillation
from lmslice.finetune import FULL_LEARNING_RATE, LEARNING_RATE, finetune
from lmslice.frontier import MODES
from lmslice.io.data import calibration_batches, load_text, tokenize

METHODS = ("lora-rft", "distill-lora", "distill-full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_options(parser)
    parser.add_argument("--target-params", type=float, default=0.8)
    parser.add_argument("--mode", default="mlp-heads", choices=list(MODES))
    parser.add_argument("--train-data", default="pydoc", help="training text (train split)")
    parser.add_argument("--tokens", default="25000,50000,100000", help="training tokens at which to measure")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--full-lr", type=float, default=FULL_LEARNING_RATE,
                        help=f"learning rate of distill-full (default: the library's, {FULL_LEARNING_RATE:g})")
    parser.add_argument("--save-dir", type=Path, default=None)
    parser.add_argument("--pruned", type=Path, default=None,
                        help="start from this compressed model (a --save-dir's pruned/) instead of compressing")
    parser.add_argument("--windows-seed", type=int, default=7,
                        help="seed of the training windows (another seed continues a saved run on new windows)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    checkpoints = sorted(int(value) for value in args.tokens.split(","))
    protocol = load_protocol(args)
    dense, tokenizer = protocol.model, protocol.tokenizer
    steps = -(-checkpoints[-1] // args.eval_seqlen)
    windows = calibration_batches(tokenize(tokenizer, load_text(args.train_data, split="train")), steps,
                                  args.eval_seqlen, 1, seed=args.windows_seed)

    dense_ppl = protocol.measure(dense)
    began = time.perf_counter()
    if args.pruned:
        compressed, shape = lmslice.load(args.pruned), f"loaded from {args.pruned}"
    else:
        compressed, shape = MODES[args.mode].compress(copy.deepcopy(dense), protocol.batches, args.target_params,
                                                      round_to=8, progress=False)
    compress_seconds = time.perf_counter() - began
    if args.save_dir and not args.pruned:
        lmslice.save_sliced(compressed, tokenizer, args.save_dir / "pruned", overwrite=True)
    print_header(args, dense_ppl, ["method", "lr", "tokens", "steps"],
                 ["training s"], f" at {args.target_params:g} ({args.mode}: {shape}, {compress_seconds:.0f} s); "
                 f"training {args.train_data}, windows of {args.eval_seqlen}, batch 1")

    def row(method: str, lr: float, tokens: int, steps: int, model: nn.Module, seconds: float) -> None:
        cells = perplexity_cells(protocol.measure(model), dense_ppl)
        print(f"| {method} | {lr:g} | {tokens} | {steps} | {cells} | {seconds:.0f} |", flush=True)

    row("none", 0, 0, 0, compressed, 0)
    for method in methods:
        full = method == "distill-full"
        lr = args.full_lr if full else LEARNING_RATE
        distillation = (Distillation(dense, args.temperature, args.top_k) if method.startswith("distill")
                        else None)
        pending = list(checkpoints)
        measuring = [0.0]  # seconds spent measuring, left out of the training time
        started = time.perf_counter()

        def measure(model, steps_done: int, tokens: int) -> None:
            if not pending or tokens < pending[0]:
                return
            while pending and tokens >= pending[0]:
                pending.pop(0)
            paused = time.perf_counter()
            row(method, lr, tokens, steps_done, model, paused - started - measuring[0])
            measuring[0] += time.perf_counter() - paused

        student, _ = finetune(copy.deepcopy(compressed), windows, lr=lr, full_parameters=full,
                              distillation=distillation, on_step=measure, progress=False)
        if args.save_dir:
            lmslice.save_sliced(student, tokenizer, args.save_dir / method, overwrite=True)
        del student


if __name__ == "__main__":
    main()
