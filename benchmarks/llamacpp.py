"""lmslice's outputs in llama.cpp itself: file size, llama-perplexity and llama-bench speed, f16 and Q4_K_M.

    OMP_NUM_THREADS=1 python benchmarks/llamacpp.py --budgets 0.9,0.8,0.7,0.6 \
        --calib ../shared/data/wikitext-2/wiki.valid.tokens --eval-data ../shared/data/wikitext-2/wiki.test.raw

For each budget F and mode, the model loaded once is deep-copied, compressed and written with
`lmslice.export.gguf.export_gguf` (f16; the tokenizer copied from the source GGUF), then quantised to
Q4_K_M by llama.cpp's `llama-quantize`. Modes (ALIGN: none = multiples of 8, gguf = 32, gguf-k = 256):

- `mlp-heads[:ALIGN]`: `--target-params F`, per-block MLP widths and query heads (llama.cpp's `deci`);
- `mlp-uniform[:ALIGN]`: `--target-params F --mlp-widths uniform` (the family's own architecture);
- `standard[:ALIGN]`: `--format standard`, the hidden width whose parameter count is closest to F
  (a multiple of the alignment and of the heads, as transformers requires).

Every file, the dense one (lmslice's own export of the source) first, is then measured back to back:
`llama-perplexity` on the evaluation text (-c SEQLEN, --chunks WINDOWS) and `llama-bench` prompt and
generation tokens/s (-p 128 -n 32, THREADS threads). Beside them the bounds: generation reads every
weight once per token (bound: dense bytes / bytes), a prompt costs the matmul FLOPs (bound: dense
matmul parameters / matmul parameters; the tied head counted, the embedding lookup not). lmslice's own
perplexity (the protocol's windows) is the reference for the llama.cpp ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import gguf
from protocol import add_protocol_options, load_protocol

from lmslice.export import standard_model
from lmslice.export.gguf import export_gguf
from lmslice.io.models import model_path
from lmslice.llamacpp import tool
from lmslice.prune import prune_to_budget
from lmslice.slicing import count_parameters, slice_model

ALIGNMENTS = {"none": 8, "gguf": 32, "gguf-k": 256}


def compress(protocol, mode: str, budget: float):
    kind, _, align = mode.partition(":")
    step = ALIGNMENTS[align or "none"]
    model = copy.deepcopy(protocol.model)
    if kind in ("mlp-heads", "mlp-uniform"):
        prune_to_budget(model, protocol.batches, budget, widths="measured" if kind == "mlp-heads" else "uniform",
                        round_to=step, progress=False)
        return model
    if kind != "standard":
        raise SystemExit(f"unknown mode {mode}")
    hidden, heads = model.config.hidden_size, model.config.num_attention_heads
    dense = count_parameters(model)
    per_feature = (dense - model.config.vocab_size * hidden) / hidden + 2 * model.config.vocab_size  # head untied
    width = min(range(math.lcm(step, heads), hidden, math.lcm(step, heads)),
                key=lambda kept: abs(kept * per_feature - budget * dense))
    result = slice_model(model, protocol.batches, 1 - width / hidden, rotation="shared", round_to=step,
                         slice_head=True, progress=False)
    return standard_model(model, head_input=result.head_input)


def run(command: list) -> str:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{command[0]} failed:\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def matmul_parameters(path: Path) -> int:
    """Parameters of the matrices a token multiplies (the tied embedding counts once, as the head)."""
    tensors = gguf.GGUFReader(path).tensors
    return sum(int(t.n_elements) for t in tensors if len(t.shape) == 2)


def measure(path: Path, args, speed: bool = True) -> dict:
    ppl = run([tool("llama-perplexity"), "-m", path, "-f", args.eval_data, "-c", args.eval_seqlen,
               "--chunks", args.eval_max_windows, "-t", args.threads])
    speeds = {"prompt": math.nan, "generation": math.nan}
    if speed:
        bench = _bench_json(run([tool("llama-bench"), "-m", path, "-t", args.threads, "-p", 128, "-n", 32,
                                 "-r", args.repetitions, "-o", "json"]))
        speeds = {("prompt" if row["n_prompt"] else "generation"): row["avg_ts"] for row in bench}
    return {"bytes": path.stat().st_size, "perplexity": float(re.search(r"Final estimate: PPL = ([\d.]+)", ppl)[1]),
            "matmul": matmul_parameters(path), **speeds}


def _bench_json(output: str) -> list:
    return json.loads(output[output.index("["):output.rindex("]") + 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_options(parser)
    parser.add_argument("--budgets", default="0.8")
    parser.add_argument("--modes", default="mlp-heads,mlp-heads:gguf-k,mlp-uniform,mlp-uniform:gguf-k,standard,"
                                           "standard:gguf")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--bench-threads", type=int, default=2)
    parser.add_argument("--no-quant-speed", action="store_true", help="time the f16 files only")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the GGUF files here (default: a temp dir)")
    args = parser.parse_args()
    protocol = load_protocol(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lmslice-llamacpp-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = model_path(args.model)
    source_gguf = source if source.suffix == ".gguf" else None
    candidates = [("dense", 1.0, protocol.model)]
    rows = []
    files = []
    dense_ppl = protocol.perplexity(protocol.model)
    for budget in [float(b) for b in args.budgets.split(",")]:
        for mode in args.modes.split(","):
            candidates.append((mode, budget, None))
    for mode, budget, model in candidates:
        model = model if model is not None else compress(protocol, mode, budget)
        name = f"{mode.replace(':', '-')}-{budget:g}"
        f16 = workdir / f"{name}.f16.gguf"
        layout = export_gguf(model, f16, None, outtype="f16", source_gguf=source_gguf)
        quantised = workdir / f"{name}.{args.quant}.gguf"
        log = run([tool("llama-quantize"), f16, quantised, args.quant, args.bench_threads])
        fallbacks = " ".join(f"{kind}:{count}" for kind, count in
                             sorted(Counter(re.findall(r"falling back to\s+(\S+)", log)).items())) or "none"
        ours = dense_ppl if mode == "dense" else protocol.perplexity(model)
        files.append((mode, budget, layout, ours, fallbacks, f16, quantised))
        print(f"compressed {name}: {layout.architecture}, lmslice perplexity {ours:.3f}, "
              f"{args.quant} fallbacks {fallbacks}", flush=True)
        del model
    args.threads = args.bench_threads
    for mode, budget, layout, ours, fallbacks, f16, quantised in files:  # measured back to back
        rows.append((mode, budget, layout, ours, fallbacks, measure(f16, args),
                     measure(quantised, args, speed=not args.no_quant_speed)))
        print(f"measured {f16.name}: {json.dumps({'f16': rows[-1][5], args.quant: rows[-1][6]})}", flush=True)
    print_table(rows, dense_ppl, args.quant)


def print_table(rows: list, dense_ppl: float, quant: str) -> None:
    dense = rows[0]
    print(f"\n| mode | F | arch | lmslice ppl ratio | llama.cpp f16 ppl | ratio | f16 MB | {quant} MB | "
          f"vs dense {quant} | {quant} ppl | ratio | {quant} fallbacks | f16 pp t/s (x, bound) | "
          f"f16 tg t/s (x, bound) | {quant} pp x | {quant} tg x (bound) |")
    print("|" + "---|" * 17)
    for mode, budget, layout, ours, fallbacks, f16, quantised in rows:
        d16, dq = dense[5], dense[6]
        print(f"| {mode} | {budget:g} | {layout.architecture} | {ours / dense_ppl:.3f} | {f16['perplexity']:.2f} | "
              f"{f16['perplexity'] / d16['perplexity']:.3f} | {f16['bytes'] / 1e6:.1f} | {quantised['bytes'] / 1e6:.1f} | "
              f"{quantised['bytes'] / dq['bytes']:.3f} | {quantised['perplexity']:.2f} | "
              f"{quantised['perplexity'] / dq['perplexity']:.3f} | {fallbacks} | "
              f"{f16['prompt']:.0f} ({f16['prompt'] / d16['prompt']:.2f}, {d16['matmul'] / f16['matmul']:.2f}) | "
              f"{f16['generation']:.1f} ({f16['generation'] / d16['generation']:.2f}, "
              f"{d16['bytes'] / f16['bytes']:.2f}) | {quantised['prompt'] / dq['prompt']:.2f} | "
              f"{quantised['generation'] / dq['generation']:.2f} ({dq['bytes'] / quantised['bytes']:.2f}) |")


if __name__ == "__main__":
    main()
