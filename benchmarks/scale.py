"""What compression costs as the model grows: seconds per block and peak memory, per width and placement.

    python benchmarks/scale.py --shapes tinyllama,llama2-7b,llama3-8b --blocks 2 --placements memory,offload
    python benchmarks/scale.py --shapes llama2-7b --blocks 2,4,8 --placements offload      # memory flat in depth?
    python benchmarks/scale.py --shapes llama3-70b --blocks 2 --placements offload --vocab 32000
    python benchmarks/scale.py --shapes llama2-7b --blocks 32 --placements offload --modes prune  # the whole 7B
    python benchmarks/scale.py --device cuda --placements memory,streamed,offload ...               # on a GPU

Checkpoints are random-initialised Llama models with the real widths of each shape (hidden, MLP, query and
key/value heads, vocabulary) and `--blocks` blocks, written once as bfloat16 safetensors (a shard per
block) under `--cache`. Random weights say nothing about quality; they measure cost. Each (shape, blocks,
placement, mode) runs in its own process, which reports the seconds of every walk over the blocks (the
Fisher forward and backward with the plan's paths, the pruning; the slicing), its peak resident memory
(VmHWM) and, on a GPU, the CUDA allocator's peak. The whole model's time is projected as the measured
seconds per block times the shape's real depth. Calibration is random token ids, `--calib-samples` x
`--calib-seqlen`.

Modes: `prune` (`--target-params 0.8`, measured widths with heads), `slice` (`--sparsity 0.25`).
Placements: `memory` (the model in memory on --device), `streamed` (CPU memory, one block on --device),
`offload` (the checkpoint on disk, one block in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # hidden, MLP, query heads, key/value heads, vocabulary, real depth
    "tinyllama": (2048, 5632, 32, 4, 32000, 22),
    "llama2-7b": (4096, 11008, 32, 32, 32000, 32),
    "llama3-8b": (4096, 14336, 32, 8, 128256, 32),
    "llama3-70b": (8192, 28672, 64, 8, 128256, 80),
}
MODES = ("prune", "slice")


def checkpoint(cache: Path, shape: str, blocks: int, vocab: int | None) -> Path:
    """The random bfloat16 checkpoint of `shape` with `blocks` blocks, written tensor by tensor (one shard
    per block: no more than one block in memory), reused once complete."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    hidden, mlp, heads, kv_heads, real_vocab, _ = SHAPES[shape]
    vocab = vocab or real_vocab
    path = cache / f"{shape}-{blocks}b-v{vocab}"
    if (path / "model.safetensors.index.json").is_file():
        return path
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, num_hidden_layers=blocks, vocab_size=vocab,
                                      max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    with init_empty_weights():
        skeleton = transformers.LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, parameter in skeleton.named_parameters():
        match = re.match(r"model\.layers\.(\d+)\.", name)
        shard = f"block-{int(match[1]):05d}.safetensors" if match else "rest.safetensors"
        tensor = torch.ones(parameter.shape) if parameter.dim() == 1 else \
            torch.randn(parameter.shape, generator=generator) * config.initializer_range
        shards.setdefault(shard, {})[name] = tensor.to(torch.bfloat16)
        if match and len(shards[shard]) == sum(1 for key in skeleton.state_dict() if key.startswith(match[0])):
            save_file(shards.pop(shard), path / shard, metadata={"format": "pt"})
    save_file(shards.pop("rest.safetensors"), path / "rest.safetensors", metadata={"format": "pt"})
    weight_map = {name: (f"block-{int(m[1]):05d}.safetensors" if (m := re.match(r"model\.layers\.(\d+)\.", name))
                         else "rest.safetensors") for name in skeleton.state_dict()}
    config.save_pretrained(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def measure(args: argparse.Namespace) -> dict:
    """One run, in this process: open the checkpoint in the placement, compress, save; what it cost."""
    import torch

    import lmslice
    from lmslice.estimate import Calibration, estimate, measure_speed, resident_bytes
    from lmslice.io.offload import open_offloaded, save_offloaded
    from lmslice.io.placement import open_placed
    from lmslice.pipeline import Prune, PruneConfig, Slice, SliceConfig, compress

    torch.set_num_threads(args.threads)
    source = checkpoint(Path(args.cache), args.shape, args.blocks_one, args.vocab)
    steps = [Prune(PruneConfig(0.8))] if args.mode == "prune" else [Slice(SliceConfig(0.25))]
    outputs = tempfile.TemporaryDirectory(dir=args.cache)  # removed with this process's run
    out = Path(outputs.name) / "out"
    base = resident_bytes()
    speed = measure_speed(args.device)
    started = time.perf_counter()
    if args.placement == "offload":
        model, placement = open_offloaded(source, out, dtype=getattr(torch, args.dtype), device=args.device)
    else:
        model, _, placement = open_placed(source, args.placement, device=args.device, dtype=args.dtype)
    loaded = time.perf_counter() - started
    predicted = estimate(model, steps, args.placement, Calibration(args.calib_samples, args.calib_seqlen, 8),
                         device=args.device, dtype=getattr(torch, args.dtype), stored_dtype=torch.bfloat16,
                         speed=speed, base_bytes=base)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.calib_samples, args.calib_seqlen), generator=generator)
    batches = [{"input_ids": ids[start:start + 8]} for start in range(0, len(ids), 8)]
    started = time.perf_counter()
    result = compress(model, batches, steps, progress=False, placement=placement,
                      activations="cpu" if args.placement == "streamed" else None)
    seconds = time.perf_counter() - started
    progress = result.run.progress
    if args.placement == "offload":
        save_offloaded(result.model, placement, None, out, overwrite=False)
    kept = lmslice.count_parameters(result.model) / lmslice.count_parameters(model) if args.mode == "slice" else None
    status = Path("/proc/self/status").read_text()
    peak_rss = int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 2**20
    cuda = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"shape": args.shape, "blocks": args.blocks_one, "placement": args.placement, "mode": args.mode,
            "load_s": loaded, "compress_s": seconds, "walks": {name: [progress.seconds[name], progress.visits[name]]
                                                                for name in progress.seconds},
            "peak_rss_gib": peak_rss, "peak_cuda_gib": cuda, "kept": kept,
            "estimated_s": predicted.total_seconds, "estimated_peak_gib": predicted.peak_bytes / 2**30,
            "estimated_device_gib": (predicted.device_peak_bytes or 0) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tinyllama,llama2-7b,llama3-8b")
    parser.add_argument("--blocks", default="2", help="comma-separated block counts")
    parser.add_argument("--placements", default="memory,offload")
    parser.add_argument("--modes", default="prune,slice")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="what the blocks compute in")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary instead of the shape's own")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lmslice-scale"))
    parser.add_argument("--one", nargs=4, metavar=("SHAPE", "BLOCKS", "PLACEMENT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if args.one:
        args.shape, blocks, args.placement, args.mode = args.one
        args.blocks_one = int(blocks)
        print(json.dumps(measure(args)))
        return
    print(f"calibration {args.calib_samples} x {args.calib_seqlen} random tokens; compute {args.dtype} on "
          f"{args.device}; {args.threads} threads; checkpoints bfloat16")
    print("| shape | blocks | placement | mode | s/block by walk | s/block | estimated s/block | peak RSS GiB "
          "| estimated GiB | peak CUDA GiB | whole model (projected) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    forwarded = [f"--{name}={getattr(args, name.replace('-', '_'))}" for name in
                 ("device", "dtype", "calib-samples", "calib-seqlen", "threads", "cache")]
    forwarded += [f"--vocab={args.vocab}"] if args.vocab else []
    for shape in args.shapes.split(","):
        for blocks in args.blocks.split(","):
            for placement in args.placements.split(","):
                for mode in args.modes.split(","):
                    command = [sys.executable, __file__, "--one", shape, blocks, placement, mode, *forwarded]
                    process = subprocess.run(command, capture_output=True, text=True)
                    if process.returncode:
                        print(f"| {shape} | {blocks} | {placement} | {mode} | failed: "
                              f"{(process.stderr.strip().splitlines() or ['?'])[-1][:120]} | | | | | | |", flush=True)
                        continue
                    row = json.loads(process.stdout.strip().splitlines()[-1])
                    per_walk = ", ".join(f"{name} {total / visits:.1f}" for name, (total, visits) in row["walks"].items())
                    per_block = row["compress_s"] / row["blocks"]
                    depth = SHAPES[shape][5]
                    cuda = f"{row['peak_cuda_gib']:.1f}" if row["peak_cuda_gib"] is not None else "-"
                    estimated = row["estimated_s"] / row["blocks"]
                    estimated_memory = row["estimated_device_gib"] if row["peak_cuda_gib"] is not None \
                        else row["estimated_peak_gib"]
                    print(f"| {shape} | {blocks} | {placement} | {mode} | {per_walk} | {per_block:.1f} | "
                          f"{estimated:.1f} | {row['peak_rss_gib']:.2f} | {estimated_memory:.2f} | {cuda} | "
                          f"{per_block * depth / 60:.0f} min ({depth} blocks) |", flush=True)


if __name__ == "__main__":
    main()
