"""A standard-format model through llama.cpp's own converter, read back: same perplexity?

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llamacpp   # the sdist vendors llama.cpp
    tar xzf /tmp/llamacpp/llama_cpp_python-*.tar.gz -C /tmp/llamacpp
    OMP_NUM_THREADS=1 python benchmarks/standard_gguf.py STANDARD_DIR \
        --llama-cpp /tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp --outtypes f32,f16,q8_0

Runs `convert_hf_to_gguf.py` (with the `gguf-py` next to it) on the directory written by
`lmslice slice --format standard` once per `--outtypes`, loads each GGUF with transformers
(`gguf_file=`, dequantised to float32) and prints the perplexity of the directory and of each GGUF on
the test split of `--eval-data`, with the largest logit difference on the first window.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

import lmslice
from lmslice.evaluation.perplexity import perplexity
from lmslice.io.data import load_text, tokenize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a directory written by lmslice slice --format standard")
    parser.add_argument("--llama-cpp", required=True, help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    parser.add_argument("--outtypes", default="f32,f16,q8_0")
    parser.add_argument("--eval-data", default="pydoc")
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--eval-max-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    converter = Path(args.llama_cpp) / "convert_hf_to_gguf.py"

    model, tokenizer = lmslice.load_with_tokenizer(model_dir)
    tokens = tokenize(tokenizer, load_text(args.eval_data, split="test"))
    window = tokens[: args.eval_seqlen].unsqueeze(0)

    def measure(candidate: torch.nn.Module) -> tuple[float, torch.Tensor]:
        ppl = perplexity(candidate, tokens, args.eval_seqlen, max_windows=args.eval_max_windows, progress=False)
        with torch.no_grad():
            return ppl.perplexity, candidate(input_ids=window).logits[0]

    reference_ppl, reference_logits = measure(model)
    print(f"{model_dir}: {model.config.architectures}, hidden_size {model.config.hidden_size}, head_dim "
          f"{model.config.head_dim}; evaluation {args.eval_data} test, {args.eval_max_windows} windows of "
          f"{args.eval_seqlen}\n")
    print("| model | file MiB | perplexity | × directory | max abs Δlogit (window 1) |\n|---|---|---|---|---|")
    print(f"| directory (safetensors) | - | {reference_ppl:.4f} | 1.0000 | 0 |")
    for outtype in args.outtypes.split(","):
        gguf = model_dir.parent / f"{model_dir.name}.{outtype}.gguf"
        subprocess.run([sys.executable, str(converter), str(model_dir), "--outfile", str(gguf), "--outtype", outtype],
                       check=True, capture_output=True)
        converted = lmslice.load(gguf)
        ppl, logits = measure(converted)
        print(f"| GGUF {outtype} (transformers gguf_file=) | {gguf.stat().st_size / 2**20:.1f} | {ppl:.4f} | "
              f"{ppl / reference_ppl:.4f} | {(logits - reference_logits).abs().max():.3g} |", flush=True)


if __name__ == "__main__":
    main()
