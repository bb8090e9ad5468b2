"""`lmslice finetune`: recovery fine-tuning of a compressed or dense model (LoRA, saved merged, or every
parameter), on the next-token loss or distilled from the dense model."""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import Accelerator

from lmslice.cli.common import (add_eval_window_options, add_model_options, check_minimums, context_length, evaluation,
                                placement_group, require_extra, require_text_sources, require_tokenizer,
                                resolve_model_options)
from lmslice.distill import Distillation, check_same_vocabulary, check_settings
from lmslice.errors import LmsliceError
from lmslice.finetune import (FULL_LEARNING_RATE, LEARNING_RATE, LORA_ALPHA, LORA_DROPOUT, LORA_R, SCHEDULES,
                              TrainingConfig, check_data_parallel, finetune)
from lmslice.io.data import calibration_batches, describe_sources, load_text, tokenize
from lmslice.io.models import load_with_tokenizer, model_path, save_sliced, source_dtype
from lmslice.io.outputs import check_output, check_room
from lmslice.layout import layout_of
from lmslice.slicing import count_parameters

# Where the settings of a dense model's fine-tune are recorded (a compressed model records them in its config).
FINETUNE_FILE = "lmslice_finetune.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a compressed or dense model (LoRA, merged), or distil from the dense one",
        description="Recovery fine-tuning (RFT) as in the SliceGPT paper: LoRA adapters on every attention and MLP "
                    "linear of the blocks, trained for one pass over random windows of --data with AdamW, "
                    "then merged into the weights. The defaults are the paper's Alpaca recipe: 8000 windows "
                    "of 1024 tokens, r=32, alpha=10, dropout=0.05. With --distill-from DENSE the target is "
                    "the dense teacher's next-token distribution (KL at --temperature, optionally over its "
                    "--top-k tokens, plus --lm-weight times the usual loss), as in Minitron; the teacher runs "
                    "alongside, batch by batch, without gradients. --full-parameters trains every weight "
                    "instead of LoRA. A dense model (no lmslice record) is fine-tuned the same way. Prints "
                    "perplexity before and after and writes a model directory of the input's kind (the settings "
                    "are recorded in config.json, or for a dense model in lmslice_finetune.json). Started by "
                    "`accelerate launch` in several processes (one per GPU), each process trains on its share of "
                    "every batch and the first one measures and saves.")
    parser.add_argument("model", help="model directory (from `lmslice compress`, or dense), .gguf file or hub id")
    training = parser.add_argument_group("training", "the text and the optimiser")
    training.add_argument("--data", required=True, help=f"training text: {describe_sources()}")
    training.add_argument("--samples", type=int, default=8000, help="training windows (default: 8000)")
    training.add_argument("--seqlen", type=int, default=1024,
                          help="tokens per training window, capped by the model context (default: 1024)")
    training.add_argument("--batch-size", type=int, default=1,
                          help="windows per optimizer step, split between the processes of `accelerate launch` "
                               "(default: 1)")
    training.add_argument("--lr", type=float, default=None,
                          help=f"AdamW learning rate, the peak of --schedule (default: {LEARNING_RATE} with LoRA, "
                               f"{FULL_LEARNING_RATE} with --full-parameters)")
    training.add_argument("--schedule", choices=SCHEDULES, default="constant",
                          help="learning-rate schedule: constant (the paper's), or cosine = decay to 0 at the last "
                               "step after a linear --warmup (default: constant)")
    training.add_argument("--warmup", type=float, default=0.0,
                          help="share of the steps that warm the rate up linearly with --schedule cosine (default: 0)")
    training.add_argument("--max-steps", type=int, default=None,
                          help="stop after N optimizer steps (default: one pass over the windows)")
    training.add_argument("--time-budget", type=float, default=None,
                          help="start no new step after this many seconds of training (default: no limit)")
    training.add_argument("--seed", type=int, default=42, help="seed for the windows and LoRA (default: 42)")
    training.add_argument("--full-parameters", action="store_true",
                          help="train every parameter instead of LoRA adapters (more memory: AdamW keeps two "
                               "copies of the model)")
    training.add_argument("--no-checkpointing", action="store_true",
                          help="keep every block's activations for the backward pass instead of recomputing them: "
                               "faster, more memory (on CUDA, training runs in bfloat16 autocast)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=LORA_R, help=f"LoRA rank (default: {LORA_R})")
    lora.add_argument("--lora-alpha", type=float, default=LORA_ALPHA, help=f"LoRA alpha (default: {LORA_ALPHA:g})")
    lora.add_argument("--lora-dropout", type=float, default=LORA_DROPOUT,
                      help=f"LoRA dropout (default: {LORA_DROPOUT})")
    distill = parser.add_argument_group("distillation")
    distill.add_argument("--distill-from", metavar="DENSE",
                         help="distil from this teacher (the dense model the input was compressed from, or any model "
                              "with the same tokenizer)")
    distill.add_argument("--temperature", type=float, default=1.0,
                         help="softmax temperature of the distillation target (default: 1)")
    distill.add_argument("--top-k", type=int, default=None,
                         help="distil only the teacher's k most likely tokens at each position (default: all)")
    distill.add_argument("--lm-weight", type=float, default=0.0,
                         help="weight of the next-token loss added to the distillation loss (default: 0)")
    add_model_options(placement_group(parser))
    output = parser.add_argument_group("output")
    output.add_argument("-o", "--output", required=True, help="directory to write the fine-tuned model to")
    output.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    output.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    evaluation_options = parser.add_argument_group("evaluation", "perplexity before and after")
    evaluation_options.add_argument("--eval-data", help="perplexity text, test split (default: --data's test split; "
                                                        "alpaca and local files have only one)")
    add_eval_window_options(evaluation_options)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    resolve_model_options(args, args.model)
    check_minimums(args, {"samples": 1, "seqlen": 2, "batch_size": 1, "lora_r": 1, "max_steps": 1,
                          "eval_seqlen": 2, "eval_max_windows": 1})
    check_settings(args.temperature, args.top_k, args.lm_weight)
    if args.distill_from is None and (args.temperature != 1.0 or args.top_k is not None or args.lm_weight):
        raise LmsliceError("--temperature, --top-k and --lm-weight apply to --distill-from")
    if not args.full_parameters:
        require_extra("peft", "finetune", "recovery fine-tuning with LoRA")
    texts = require_text_sources(args.data, args.eval_data)
    training = TrainingConfig(lr=args.lr, full_parameters=args.full_parameters, lora_r=args.lora_r,
                              lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, schedule=args.schedule,
                              warmup=args.warmup, max_steps=args.max_steps, time_budget=args.time_budget,
                              seed=args.seed, checkpointing=not args.no_checkpointing)
    if args.warmup and args.schedule == "constant":
        raise LmsliceError("--warmup applies to --schedule cosine")
    reads = [("the model", model_path(args.model)), *texts]
    if args.distill_from:
        reads.append(("the teacher", model_path(args.distill_from)))
    output = check_output(args.output, args.overwrite, reads)
    processes = training_processes(args)
    model, tokenizer = load_with_tokenizer(args.model, dtype=args.dtype, device=args.device)
    # training runs in --dtype; the output keeps the precision its source was stored in
    save_dtype = source_dtype(args.model)
    check_room([(output, count_parameters(model) * save_dtype.itemsize)])
    tokenizer = require_tokenizer(tokenizer, args.model)
    distillation = None
    if args.distill_from is not None:
        teacher, teacher_tokenizer = load_with_tokenizer(args.distill_from, dtype=args.dtype, device=args.device)
        check_same_vocabulary(model, tokenizer, teacher, require_tokenizer(teacher_tokenizer, args.distill_from),
                              args.distill_from)
        distillation = Distillation(teacher, args.temperature, args.top_k, args.lm_weight)
    seqlen = context_length(model, args.seqlen)
    train_tokens = tokenize(tokenizer, load_text(args.data, split="train"), args.data)
    if len(train_tokens) - seqlen + 1 < args.samples:
        raise LmsliceError(f"training text too short: {len(train_tokens)} tokens cannot give {args.samples} "
                           f"windows of {seqlen}; give more text, fewer --samples or a shorter --seqlen")
    batches = calibration_batches(train_tokens, args.samples, seqlen, args.batch_size, args.seed)
    eval_source = args.eval_data or args.data
    main_process = processes.is_main_process
    evaluate = evaluation(args, model, tokenizer, eval_source, not args.json)
    before = evaluate(model).as_dict() if main_process else None
    model, result = finetune(model, batches, training, distillation=distillation, progress=not args.json)
    del distillation  # the teacher's memory, before saving
    processes.wait_for_everyone()
    if not main_process:  # every process holds the same trained model: the first measures and saves it
        return 0
    after = evaluate(model).as_dict()
    record = {
        "data": args.data, "samples": args.samples, "seqlen": seqlen, "batch_size": args.batch_size,
        "lr": training.learning_rate, "schedule": args.schedule, "warmup": args.warmup, "seed": args.seed,
        "optimizer": "AdamW", "processes": processes.num_processes,
        "lora": None if args.full_parameters else {"r": args.lora_r, "alpha": args.lora_alpha,
                                                   "dropout": args.lora_dropout, "target_modules": result.target_modules},
        "distill": None if args.distill_from is None else {
            "teacher": str(args.distill_from), "temperature": args.temperature, "top_k": args.top_k,
            "lm_weight": args.lm_weight},
        "steps": result.steps, "tokens": result.tokens, "max_steps": args.max_steps, "time_budget": args.time_budget,
        "stopped_by": result.stopped_by, "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None, "seconds": round(result.seconds, 2),
        "eval_data": eval_source, "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
        "save_dtype": str(save_dtype).removeprefix("torch."),
    }
    layout = layout_of(model.config)
    if layout is not None:
        model.config.lmslice = layout.replace(finetune=record).to_json()
    # a dense model stays a plain checkpoint of its family: the record goes beside it, not into its config
    extra_files = {} if layout is not None else {FINETUNE_FILE: json.dumps(record) + "\n"}
    # the reload is checked on training text, as slice checks on calibration text (not on token ids 0-15, a
    # tokenizer's control tokens, which no training window holds)
    save_sliced(model, tokenizer, output, overwrite=args.overwrite, dtype=save_dtype, extra_files=extra_files,
                check_ids=batches[0]["input_ids"][:1, :16])
    summary = {"model": str(args.model), "output": str(output), **record,
               "perplexity_before": before, "perplexity_after": after}
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def training_processes(args: argparse.Namespace) -> Accelerator:
    """The processes `accelerate launch` (or torchrun) started, each set to train on its own device (--device
    cuda: cuda:0, cuda:1, ...; --device cpu: the CPU, gloo between processes), or this process alone."""
    device = torch.device(args.device)
    processes = Accelerator(cpu=device.type == "cpu", device_placement=False)
    check_data_parallel(processes.distributed_type)
    if processes.num_processes > 1:
        if device.index is not None:
            raise LmsliceError(f"--device {args.device}: under accelerate launch each process trains on its own "
                               f"device; give --device {device.type}")
        # `calibration_batches` groups the windows into full batches, then what is left
        smallest = args.samples % args.batch_size or args.batch_size
        if smallest < processes.num_processes:
            raise LmsliceError(f"{processes.num_processes} processes split every batch of windows, but one has "
                               f"{smallest}: give a --batch-size of at least {processes.num_processes} and --samples "
                               "a multiple of it")
        args.device = str(processes.device)
    return processes


def format_summary(summary: dict) -> str:
    before, after = summary["perplexity_before"], summary["perplexity_after"]
    lora, distill = summary["lora"], summary["distill"]
    loss = (f", loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}" if summary["steps"] else "")
    how = (f"LoRA (r={lora['r']}, alpha={lora['alpha']:g}, dropout={lora['dropout']:g})" if lora
           else "every parameter trained")
    objective = ("the next-token loss" if distill is None else
                 f"distillation from {distill['teacher']} (T={distill['temperature']:g}, "
                 f"{'top ' + str(distill['top_k']) if distill['top_k'] else 'full'} distribution, "
                 f"LM weight {distill['lm_weight']:g})")
    processes = f" on {summary['processes']} processes" if summary["processes"] > 1 else ""
    return "\n".join([
        f"fine-tuned {summary['model']} with {how} on {summary['data']}",
        f"  objective      {objective}, lr {summary['lr']:g} {summary['schedule']}",
        f"  training       {summary['steps']} steps of {summary['batch_size']} x {summary['seqlen']} tokens"
        f"{loss}{processes} ({summary['seconds']:.1f} s, stopped by {summary['stopped_by'].replace('_', ' ')})",
        f"  adapted        {', '.join(lora['target_modules']) if lora else 'all parameters'}",
        f"  perplexity     {before['perplexity']:.3f} -> {after['perplexity']:.3f} on {summary['eval_data']} "
        f"({after['tokens']} tokens, windows of {after['seqlen']})",
        f"  saved to       {summary['output']} ({summary['save_dtype']})",
    ])
