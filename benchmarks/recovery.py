"""Recovery curves: perplexity (and zero-shot accuracy) after N training tokens, distillation from the
dense model against LoRA RFT, at one or more budgets.

    OMP_NUM_THREADS=1 python benchmarks/recovery.py --target-params 0.8 \
        --calib ../shared/data/wikitext-2/wiki.valid.tokens --train-data ../shared/data/wikitext-2/wiki.valid.tokens \
        --eval-data ../shared/data/wikitext-2/wiki.test.raw --tokens 25000,50000 --methods lora-rft,distill-lora

On a GPU, every budget, a learning-rate sweep and zero-shot in one run:

    python benchmarks/recovery.py --device cuda --batch-size 8 --schedule cosine --target-params 0.8,0.6 \
        --full-lr 2e-5,5e-5,1e-4,2e-4 --lora-lr 2e-4,5e-4,1e-3 --tokens 50000,100000,200000,500000 \
        --tasks piqa_local,arc_easy_local,hellaswag_local,winogrande_local,sciq_local --include-path benchmarks/tasks

Each budget's model is compressed once (`lmslice.frontier` mode, default mlp-heads: what `lmslice slice
--target-params` does), then each method trains its own copy on the same random windows of
--train-data (train split), --batch-size windows of --seqlen tokens per step, and its perplexity on
each --eval-data text (test split) is measured. With `--schedule constant` one run per method gives the
whole curve (measured each time the tokens seen pass a value of --tokens: a shorter run would have
trained the same steps); with `cosine` the rate decays to 0 at the end, so each value of --tokens is a
run of its own.

Several learning rates for a method (`--full-lr`, `--lora-lr`) are compared on the first budget at the
largest --tokens; the one with the lowest perplexity (geometric mean of the ratios over the --eval-data
texts) trains the rest of the curve and the other budgets. --tasks adds the zero-shot mean of lm-eval
tasks for the dense model, each compressed one and each method's longest run (at the best rate).

Methods: `lora-rft` (the paper's LoRA recipe on the next-token loss), `distill-lora` (the same LoRA,
the dense teacher's distribution as the target: `lmslice finetune --distill-from`), `distill-full`
(every parameter trained, distilled). Training seconds exclude the measurements. --time-budget skips a
run that the throughput measured so far says would end past it. Prints a markdown table (and --jsonl
writes its rows); --save-dir keeps each compressed model (and with --save-trained each method's longest
run), and --pruned DIR starts from one compressed model (a single budget) instead of compressing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from protocol import add_protocol_options, load_protocol, perplexity_cells, print_header
from torch import nn

import lmslice
from lmslice.distill import Distillation
from lmslice.finetune import FULL_LEARNING_RATE, LEARNING_RATE, SCHEDULES, TrainingConfig, finetune
from lmslice.frontier import MODES
from lmslice.io.data import calibration_batches, load_text, tokenize

METHODS = ("lora-rft", "distill-lora", "distill-full")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_options(parser)
    parser.add_argument("--target-params", default="0.8", help="comma-separated budgets")
    parser.add_argument("--mode", default="mlp-heads", choices=list(MODES))
    parser.add_argument("--train-data", default="pydoc", help="training text (train split)")
    parser.add_argument("--tokens", default="25000,50000,100000", help="training tokens at which to measure")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--full-lr", default=str(FULL_LEARNING_RATE),
                        help="learning rate(s) of distill-full, comma-separated (default: the library's)")
    parser.add_argument("--lora-lr", default=str(LEARNING_RATE),
                        help="learning rate(s) of the LoRA methods, comma-separated (default: the library's)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant")
    parser.add_argument("--warmup", type=float, default=0.0, help="warm-up share of the steps (cosine)")
    parser.add_argument("--batch-size", type=int, default=1, help="training windows per step")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep activations (faster, more memory)")
    parser.add_argument("--tasks", default=None, help="lm-eval tasks for the zero-shot mean")
    parser.add_argument("--include-path", default=None, help="directory of task YAML (e.g. benchmarks/tasks)")
    parser.add_argument("--limit", type=int, default=None, help="items per task")
    parser.add_argument("--task-batch-size", type=int, default=8)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--save-dir", type=Path, default=None, help="keep each compressed model here")
    parser.add_argument("--save-trained", action="store_true", help="keep each method's longest run in --save-dir too")
    parser.add_argument("--pruned", type=Path, default=None,
                        help="start from this compressed model (a --save-dir's pruned-F/) instead of compressing")
    parser.add_argument("--windows-seed", type=int, default=7,
                        help="seed of the training windows (another seed continues a saved run on new windows)")
    parser.add_argument("--jsonl", type=Path, default=None, help="also write every row to this file")
    return parser.parse_args()


class Recovery:
    """The run's shared state: the protocol, the training windows, the clock and the table."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.began = time.perf_counter()
        self.protocol = load_protocol(args)
        self.checkpoints = sorted(int(value) for value in args.tokens.split(","))
        window_count = -(-self.checkpoints[-1] // args.eval_seqlen)
        train = tokenize(self.protocol.tokenizer, load_text(args.train_data, split="train"))
        self.windows = calibration_batches(train, window_count, args.eval_seqlen, args.batch_size,
                                           seed=args.windows_seed)
        self.tokens_per_second: float | None = None
        self.tasks = args.tasks.split(",") if args.tasks else []  # emptied if lm-eval fails here
        self.task_manager = None
        self.dense_ppl = self.protocol.measure(self.protocol.model)

    def seconds_left(self) -> float:
        budget = self.args.time_budget
        return math.inf if budget is None else budget - (time.perf_counter() - self.began)

    def affordable(self, tokens: int) -> bool:
        rate = self.tokens_per_second
        return rate is None or tokens / rate < self.seconds_left()

    def zero_shot(self, model: nn.Module) -> float | None:
        if not self.tasks:
            return None
        from lmslice.evaluation.zeroshot import task_manager, zero_shot

        try:  # a long run keeps its perplexity rows if lm-eval or its data fails on this machine
            if self.task_manager is None:
                self.task_manager = task_manager(self.tasks, self.args.include_path)
            return zero_shot(model, self.protocol.tokenizer, self.tasks, limit=self.args.limit,
                             batch_size=self.args.task_batch_size, manager=self.task_manager).average
        except Exception as error:  # noqa: BLE001 - reported, and the table goes on without the column
            print(f"zero-shot failed: {type(error).__name__}: {error}", flush=True)
            self.tasks = []
            return None

    def row(self, budget: str, method: str, lr: float, tokens: int, steps: int, model: nn.Module,
            seconds: float, with_tasks: bool = False) -> dict[str, float]:
        ppl = self.protocol.measure(model)
        accuracy = self.zero_shot(model) if with_tasks else None
        cells = perplexity_cells(ppl, self.dense_ppl)
        print(f"| {budget} | {method} | {lr:g} | {tokens} | {steps} | {cells} | {seconds:.1f} | "
              f"{'' if accuracy is None else f'{accuracy:.4f}'} |", flush=True)
        if self.args.jsonl:
            record = {"budget": budget, "method": method, "lr": lr, "tokens": tokens, "steps": steps,
                      "perplexity": ppl, "dense": self.dense_ppl, "seconds": seconds, "zero_shot": accuracy}
            with self.args.jsonl.open("a") as file:
                file.write(json.dumps(record) + "\n")
        return ppl

    def train(self, budget: str, method: str, lr: float, compressed: nn.Module,
              tokens: list[int]) -> tuple[nn.Module | None, float, int]:
        """One training run of `method` at `lr` to the largest of `tokens`, a row at each of them; the
        model trained, the geometric-mean perplexity ratio of its last row and the tokens it had seen then
        (None, inf, 0 if skipped). A cosine run that would not end within the time budget is skipped; a
        constant-rate one stops when it runs out, its rows so far kept."""
        args = self.args
        if args.schedule == "cosine" and not self.affordable(tokens[-1]):
            print(f"| {budget} | {method} | {lr:g} | {tokens[-1]} | skipped: the time budget would run out |",
                  flush=True)
            return None, math.inf, 0
        steps = -(-tokens[-1] // (args.eval_seqlen * args.batch_size))
        left = self.seconds_left()
        config = TrainingConfig(lr=lr, full_parameters=method == "distill-full", schedule=args.schedule,
                                warmup=args.warmup, max_steps=steps, checkpointing=not args.no_checkpointing,
                                time_budget=None if args.schedule == "cosine" or math.isinf(left) else left)
        distillation = (Distillation(self.protocol.model, args.temperature, args.top_k)
                        if method.startswith("distill") else None)
        pending, measuring, started = list(tokens), [0.0], time.perf_counter()
        last: list[tuple[dict[str, float], int]] = []

        def measure(model: nn.Module, steps_done: int, seen: int) -> None:
            if not pending or (seen < pending[0] and steps_done < steps):
                return
            while pending and (seen >= pending[0] or steps_done == steps):
                pending.pop(0)
            paused = time.perf_counter()
            training_seconds = paused - started - measuring[0]
            self.tokens_per_second = seen / training_seconds
            last[:] = [(self.row(budget, method, lr, seen, steps_done, model, training_seconds), seen)]
            measuring[0] += time.perf_counter() - paused

        student, result = finetune(copy.deepcopy(compressed), self.windows, config, distillation=distillation,
                                   on_step=measure, progress=False)
        if result.tokens > (last[0][1] if last else 0):  # stopped by the time budget between two rows
            last[:] = [(self.row(budget, method, lr, result.tokens, result.steps, student,
                                 result.seconds - measuring[0]), result.tokens)]
        if not last:
            return student, math.inf, 0
        ppl, seen = last[0]
        return student, math.exp(sum(math.log(ppl[source] / self.dense_ppl[source]) for source in ppl) / len(ppl)), seen


def compressed_model(recovery: Recovery, target: float) -> tuple[nn.Module, str]:
    args, protocol = recovery.args, recovery.protocol
    if args.pruned:
        return lmslice.load(args.pruned, device=args.device), f"loaded from {args.pruned}"
    return MODES[args.mode].compress(copy.deepcopy(protocol.model), protocol.batches, target, round_to=8,
                                     progress=False)


def main() -> None:
    args = parse_args()
    budgets = args.target_params.split(",")
    if args.pruned and len(budgets) > 1:
        raise SystemExit("--pruned starts from one compressed model: give one --target-params")
    recovery = Recovery(args)
    rates = {"distill-full": [float(v) for v in args.full_lr.split(",")],
             **{method: [float(v) for v in args.lora_lr.split(",")] for method in ("lora-rft", "distill-lora")}}
    print_header(args, recovery.dense_ppl, ["budget", "method", "lr", "tokens", "steps"], ["training s", "zero-shot"],
                 f" on {args.device}; training {args.train_data}, windows of {args.eval_seqlen}, batch "
                 f"{args.batch_size}, {args.schedule} schedule")
    if recovery.tasks:
        recovery.row("1", "dense", 0, 0, 0, recovery.protocol.model, 0, with_tasks=True)
    for index, budget in enumerate(budgets):
        began = time.perf_counter()
        compressed, shape = compressed_model(recovery, float(budget))
        print(f"{budget}: {shape} ({time.perf_counter() - began:.0f} s)", flush=True)
        if args.save_dir and not args.pruned:
            lmslice.save_sliced(compressed, recovery.protocol.tokenizer, args.save_dir / f"pruned-{budget}",
                                overwrite=True)
        recovery.row(budget, "none", 0, 0, 0, compressed, 0, with_tasks=True)
        for method in args.methods.split(","):
            candidates = rates[method] if index == 0 else rates[method][:1]
            runs = ([recovery.checkpoints] if args.schedule == "constant" else
                    [[tokens] for tokens in recovery.checkpoints])
            # the sweep: every candidate rate on the longest run; the best one trains the other runs
            scored = [(recovery.train(budget, method, lr, compressed, runs[-1]), lr) for lr in candidates]
            (student, _, seen), best = min(scored, key=lambda item: item[0][1])
            rates[method] = [best]
            if recovery.tasks and seen:
                recovery.row(budget, f"{method}, zero-shot", best, seen, 0, student, 0, with_tasks=True)
            for tokens in runs[:-1]:
                recovery.train(budget, method, best, compressed, tokens)
            if args.save_dir and args.save_trained and student is not None:
                lmslice.save_sliced(student, recovery.protocol.tokenizer, args.save_dir / f"{method}-{budget}",
                                    overwrite=True)
            del student, scored
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
