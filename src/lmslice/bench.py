"""How much faster a sliced model runs than its dense original, and how much faster it could run.

Three measurements, taken side by side on the same inputs, device, dtype and thread count:

* **throughput**: tokens per second of the forward pass over `seqlen`-token sequences, the batch size
  doubled from 1 until memory runs out, throughput stops rising (two doublings without a new best), or
  `max_batch` (the SliceGPT paper's protocol); the best batch of each model is reported;
* **decode latency**: milliseconds per generated token at batch 1, prefill excluded: a prompt is
  prefilled (timed separately), then `new_tokens` greedy decode steps run with the KV cache;
* **FLOPs per token**, counted from the loaded model: every `nn.Linear` (attention projections, MLP,
  head) costs 2·in·out, every `ShortcutLinear` also 2·residual_width·out for its shortcut matrix, and
  attention's score and value products 4·layers·heads·head_dim·context. Their ratio bounds the
  speed-up a sliced model can reach; the achieved speed-up is reported as a share of it.

Measurements of the two models alternate (and alternate which goes first) so slow drift of a noisy
machine falls on both alike; each model gets warm-up runs before it is timed, everything runs under
`torch.inference_mode`, and the thread count is fixed for the whole run.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lmslice.errors import LmsliceError
from lmslice.layout import layout_of
from lmslice.modeling import ShortcutLinear
from lmslice.slicing import count_parameters


# ---------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class FlopCount:
    """Floating-point operations per token (a multiply-add is two)."""

    linear: int  # every nn.Linear, attention projections, MLP and head, shortcut matrices excluded
    shortcut: int  # the D'xD' residual matrices of a sliced model
    attention: float  # attention scores (q·k) and their weighted sum of values
    context: float  # keys each query attends to, which `attention` assumed

    @property
    def total(self) -> float:
        return self.linear + self.shortcut + self.attention

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def linear_flops_per_token(model: nn.Module) -> tuple[int, int]:
    """(linear, shortcut) FLOPs per token: 2·in·out per `nn.Linear`, plus 2·residual_width·out for the
    shortcut of each `ShortcutLinear`. Modules shared between paths (tied heads) count once."""
    linear = shortcut = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            linear += 2 * module.weight.shape[0] * module.weight.shape[1]
        if isinstance(module, ShortcutLinear):
            shortcut += 2 * module.shortcut_minus_identity.numel()
    return linear, shortcut


def attention_flops_per_token(config: Any, context: float) -> float:
    """FLOPs per token of attention's two matrix products when each query sees `context` keys:
    q·kᵀ and p·v each cost 2·heads·head_dim per key, in every layer. Slicing leaves them unchanged;
    pruned query heads (`attention_heads` of the lmslice record, per layer) count as they are."""
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layout = layout_of(config)
    per_layer = (layout and layout.attention_heads) or [heads] * config.num_hidden_layers
    return 4.0 * sum(per_layer) * head_dim * context


def count_flops(model: nn.Module, context: float) -> FlopCount:
    """FLOPs per token of `model`, counting attention over `context` keys.

    For a forward pass over `seqlen` tokens use `context=seqlen` (the full score matrix, as eager and
    math attention compute it); for a decode step, the length of the cache.
    """
    linear, shortcut = linear_flops_per_token(model)
    return FlopCount(linear, shortcut, attention_flops_per_token(model.config, context), context)


# ------------------------------------------------------------------------------------------- timing


@dataclass
class Throughput:
    """Forward-pass tokens per second at each batch size tried; the best one is the result."""

    seqlen: int
    by_batch: dict[int, float] = field(default_factory=dict)
    stopped: str = ""

    @property
    def best_batch(self) -> int:
        return max(self.by_batch, key=self.by_batch.__getitem__)

    @property
    def tokens_per_s(self) -> float:
        return self.by_batch[self.best_batch]

    def as_dict(self) -> dict[str, Any]:
        return {"tokens_per_s": self.tokens_per_s, "batch_size": self.best_batch, "seqlen": self.seqlen,
                "by_batch": {str(b): v for b, v in self.by_batch.items()}, "stopped": self.stopped}


@dataclass
class Latency:
    """Decode milliseconds per token at batch 1 (prefill excluded) and prefill milliseconds, per run."""

    prompt_len: int
    new_tokens: int
    decode_ms_per_token: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)

    @property
    def ms_per_token(self) -> float:
        return statistics.median(self.decode_ms_per_token)

    def as_dict(self) -> dict[str, Any]:
        return {"ms_per_token": self.ms_per_token, "prefill_ms": statistics.median(self.prefill_ms),
                "prompt_len": self.prompt_len, "new_tokens": self.new_tokens,
                "runs_ms_per_token": self.decode_ms_per_token}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_out_of_memory(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, oom_type) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _random_ids(vocab: int, shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=generator).to(device)


def _interleaved(names: list[str], repeat: int) -> list[str]:
    """Which model goes first alternates between repeats."""
    return names if repeat % 2 == 0 else names[::-1]


@torch.inference_mode()
def measure_throughput(models: Mapping[str, nn.Module], *, seqlen: int = 128, max_batch: int | None = None,
                       repeats: int = 3, warmup: int = 1, patience: int = 1, seed: int = 0,
                       ) -> dict[str, Throughput]:
    """Tokens/s of each model's forward pass, batch 1, 2, 4, ... until it runs out of memory, stops
    getting faster, or would exceed `max_batch`. The models are timed alternately at each batch size.

    "Stops getting faster" means `patience + 1` doublings in a row without a new best, so one noisy
    measurement does not end the search early."""
    names = list(models)
    device = _device_of(models[names[0]])
    vocab = min(model.config.vocab_size for model in models.values())
    results = {name: Throughput(seqlen) for name in names}
    misses = dict.fromkeys(names, 0)
    active = set(names)
    batch = 1
    while active:
        ids = _random_ids(vocab, (batch, seqlen), seed + batch, device)
        times: dict[str, list[float]] = {name: [] for name in active}

        def forward(name: str) -> None:
            models[name](input_ids=ids, use_cache=False)

        for step in range(-warmup, repeats):
            for name in _interleaved(names, step):
                if name not in active:
                    continue
                try:
                    elapsed = _timed(lambda: forward(name), device)
                except Exception as error:  # noqa: BLE001 - only out-of-memory is expected; others re-raise
                    if not _is_out_of_memory(error):
                        raise
                    active.discard(name)
                    results[name].stopped = f"out of memory at batch {batch}"
                    _free_memory(device)
                    continue
                if step >= 0:
                    times[name].append(elapsed)
        for name in list(active):
            result = results[name]
            speed = batch * seqlen / statistics.median(times[name])
            previous_best = result.tokens_per_s if result.by_batch else 0.0
            result.by_batch[batch] = speed
            misses[name] = misses[name] + 1 if speed <= previous_best else 0
            if misses[name] > patience:
                active.discard(name)
                result.stopped = f"throughput stopped rising (batch {batch})"
            elif max_batch is not None and 2 * batch > max_batch:
                active.discard(name)
                result.stopped = f"reached --max-batch {max_batch}"
        batch *= 2
    for name, result in results.items():
        if not result.by_batch:
            raise LmsliceError(f"the {name} model ran out of memory at batch size 1 with sequence length {seqlen}")
    return results


def _cache_argument(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by (`cache` in transformers 5.x, before that
    `past_key_values`)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Greedy generation with the KV cache: (prefill seconds, seconds for `new_tokens` decode steps).

    The prefill pass produces the first new token; each decode step feeds the previous token and
    produces one more. Only the last position's logits are computed in the prefill.
    """
    device = prompt.device
    cache_argument = _cache_argument(model)
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    state: dict[str, Any] = {}

    def prefill() -> None:
        output = model(input_ids=prompt, use_cache=True, **keep_last)
        state["cache"] = _output_cache(output)
        state["token"] = output.logits[:, -1:].argmax(-1)

    def steps() -> None:
        for _ in range(new_tokens):
            output = model(input_ids=state["token"], use_cache=True, **{cache_argument: state["cache"]})
            state["cache"] = _output_cache(output)
            state["token"] = output.logits[:, -1:].argmax(-1)

    prefill_s = _timed(prefill, device)
    decode_s = _timed(steps, device)
    return prefill_s, decode_s


@torch.inference_mode()
def measure_latency(models: Mapping[str, nn.Module], *, prompt_len: int = 32, new_tokens: int = 32,
                    repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict[str, Latency]:
    """Decode ms per generated token at batch 1 with prefill excluded, median of `repeats`, the models
    timed alternately on the same prompt."""
    if new_tokens < 1 or prompt_len < 1:
        raise LmsliceError("latency needs a prompt of at least 1 token and at least 1 new token")
    names = list(models)
    device = _device_of(models[names[0]])
    vocab = min(model.config.vocab_size for model in models.values())
    prompt = _random_ids(vocab, (1, prompt_len), seed, device)
    results = {name: Latency(prompt_len, new_tokens) for name in names}
    for step in range(-warmup, repeats):
        for name in _interleaved(names, step):
            prefill_s, decode_s = decode(models[name], prompt, new_tokens if step >= 0 else min(new_tokens, 4))
            if step >= 0:
                results[name].prefill_ms.append(1000 * prefill_s)
                results[name].decode_ms_per_token.append(1000 * decode_s / new_tokens)
    return results


# ------------------------------------------------------------------------------------------- report


@dataclass
class BenchSettings:
    seqlen: int
    max_batch: int | None
    repeats: int
    warmup: int
    prompt_len: int
    new_tokens: int
    device: str
    dtype: str
    threads: int


@dataclass
class ModelBench:
    parameters: int
    flops_forward: FlopCount  # per token of a forward pass over `seqlen` tokens
    flops_decode: FlopCount  # per token of a decode step, at the mean cache length
    throughput: Throughput
    latency: Latency

    def as_dict(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "flops_per_token": {"forward": self.flops_forward.as_dict(),
                                                                    "decode": self.flops_decode.as_dict()},
                "throughput": self.throughput.as_dict(), "latency": self.latency.as_dict()}


def _share(achieved: float, possible: float) -> float:
    return achieved / possible


# Below this possible gain (a FLOP bound of 1.05x), the share of the gain is timing noise over a near-zero
# denominator: a 2% timing wobble would read as 40% of the gain.
MIN_POSSIBLE_GAIN = 0.05


def _gain_share(achieved: float, possible: float) -> float | None:
    return (achieved - 1) / (possible - 1) if abs(possible - 1) >= MIN_POSSIBLE_GAIN else None


@dataclass
class BenchReport:
    """Dense and sliced measurements and their ratios. Each plain ratio is the sliced value over the
    dense one (tokens/s for throughput, ms/token for latency); speed-ups are dense time / sliced time; a
    `*_share` is the achieved speed-up divided by the FLOP bound (1.0 = all of it); a `*_gain_share` is
    the achieved gain divided by the possible gain, (speed-up - 1) / (bound - 1), None where the bound is
    within `MIN_POSSIBLE_GAIN` of 1."""

    settings: BenchSettings
    dense: ModelBench
    sliced: ModelBench
    labels: dict[str, str] = field(default_factory=dict)

    def ratios(self) -> dict[str, float | None]:
        flop_ratio = self.sliced.flops_forward.total / self.dense.flops_forward.total
        decode_flop_ratio = self.sliced.flops_decode.total / self.dense.flops_decode.total
        throughput_speedup = self.sliced.throughput.tokens_per_s / self.dense.throughput.tokens_per_s
        latency_speedup = self.dense.latency.ms_per_token / self.sliced.latency.ms_per_token
        return {
            "parameters": self.sliced.parameters / self.dense.parameters,
            "flops": flop_ratio,
            "flops_decode": decode_flop_ratio,
            "theoretical_speedup": 1 / flop_ratio,
            "theoretical_decode_speedup": 1 / decode_flop_ratio,
            "throughput": throughput_speedup,  # sliced tokens/s / dense tokens/s
            "latency": 1 / latency_speedup,  # sliced ms/token / dense ms/token
            "throughput_speedup": throughput_speedup,
            "latency_speedup": latency_speedup,
            "throughput_share": _share(throughput_speedup, 1 / flop_ratio),
            "latency_share": _share(latency_speedup, 1 / decode_flop_ratio),
            "throughput_gain_share": _gain_share(throughput_speedup, 1 / flop_ratio),
            "latency_gain_share": _gain_share(latency_speedup, 1 / decode_flop_ratio),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "models": self.labels, "dense": self.dense.as_dict(),
                "sliced": self.sliced.as_dict(), "ratios": self.ratios()}

    def table(self) -> str:
        dense, sliced, ratios = self.dense, self.sliced, self.ratios()
        settings = self.settings

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.0f}%"

        rows = [
            ("", "dense", "sliced", "sliced/dense"),
            ("parameters", f"{dense.parameters / 1e6:.2f}M", f"{sliced.parameters / 1e6:.2f}M",
             f"{ratios['parameters']:.3f}"),
            (f"GFLOP/token (forward, seq {settings.seqlen})", f"{dense.flops_forward.total / 1e9:.4g}",
             f"{sliced.flops_forward.total / 1e9:.4g}", f"{ratios['flops']:.3f}"),
            ("GFLOP/token (decode)", f"{dense.flops_decode.total / 1e9:.4g}",
             f"{sliced.flops_decode.total / 1e9:.4g}", f"{ratios['flops_decode']:.3f}"),
            ("throughput, tokens/s (best batch)",
             f"{dense.throughput.tokens_per_s:,.0f} (b={dense.throughput.best_batch})",
             f"{sliced.throughput.tokens_per_s:,.0f} (b={sliced.throughput.best_batch})",
             f"{ratios['throughput']:.3f}"),
            ("decode latency, ms/token", f"{dense.latency.ms_per_token:.2f}", f"{sliced.latency.ms_per_token:.2f}",
             f"{ratios['latency']:.3f}"),
            ("prefill, ms", f"{dense.latency.as_dict()['prefill_ms']:.2f}",
             f"{sliced.latency.as_dict()['prefill_ms']:.2f}", ""),
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [f"dense:  {self.labels.get('dense', '')}", f"sliced: {self.labels.get('sliced', '')}",
                 f"{settings.device}, {settings.dtype}, {settings.threads} threads, {settings.repeats} repeats", ""]
        lines += ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
                  for row in rows]
        lines += [
            "",
            f"throughput speed-up {ratios['throughput_speedup']:.3f}x of a possible "
            f"{ratios['theoretical_speedup']:.3f}x (FLOP ratio): {pct(ratios['throughput_share'])} of it, "
            f"{pct(ratios['throughput_gain_share'])} of the gain",
            f"latency speed-up    {ratios['latency_speedup']:.3f}x of a possible "
            f"{ratios['theoretical_decode_speedup']:.3f}x: {pct(ratios['latency_share'])} of it, "
            f"{pct(ratios['latency_gain_share'])} of the gain",
            f"throughput search stopped: dense {dense.throughput.stopped}; sliced {sliced.throughput.stopped}",
        ]
        return "\n".join(lines)


def benchmark(dense: nn.Module, sliced: nn.Module, *, seqlen: int = 128, max_batch: int | None = None,
              repeats: int = 5, warmup: int = 1, prompt_len: int = 32, new_tokens: int = 32,
              threads: int | None = None, seed: int = 0, labels: dict[str, str] | None = None) -> BenchReport:
    """Measures both models side by side (see the module docstring). Both must be on one device in
    one dtype. `threads` fixes torch's CPU thread count for the run (restored afterwards)."""
    if seqlen < 1 or repeats < 1 or warmup < 0:
        raise LmsliceError("bench needs seqlen >= 1, repeats >= 1 and warmup >= 0")
    if max_batch is not None and max_batch < 1:
        raise LmsliceError(f"--max-batch must be at least 1, got {max_batch}")
    parameters = {name: next(model.parameters()) for name, model in (("dense", dense), ("sliced", sliced))}
    if parameters["dense"].device != parameters["sliced"].device:
        raise LmsliceError("the dense and sliced models must be on the same device")
    models = {"dense": dense.eval(), "sliced": sliced.eval()}
    previous_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise LmsliceError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        throughput = measure_throughput(models, seqlen=seqlen, max_batch=max_batch, repeats=repeats,
                                        warmup=warmup, seed=seed)
        latency = measure_latency(models, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                                  warmup=warmup, seed=seed)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    decode_context = prompt_len + (new_tokens + 1) / 2  # mean cache length over the decode steps
    results = {
        name: ModelBench(
            parameters=count_parameters(model),
            flops_forward=count_flops(model, seqlen),
            flops_decode=count_flops(model, decode_context),
            throughput=throughput[name],
            latency=latency[name],
        )
        for name, model in models.items()
    }
    settings = BenchSettings(seqlen=seqlen, max_batch=max_batch, repeats=repeats, warmup=warmup,
                             prompt_len=prompt_len, new_tokens=new_tokens, device=str(parameters["dense"].device),
                             dtype=str(parameters["dense"].dtype).removeprefix("torch."), threads=used_threads)
    return BenchReport(settings, results["dense"], results["sliced"], labels or {})


# ------------------------------------------------------------------------------------ llama.cpp runtime


def gguf_matmul_parameters(path: str) -> int:
    """Parameters of the matrices a token multiplies in a GGUF (a tied embedding counts once, as the head)."""
    import gguf

    return sum(int(tensor.n_elements) for tensor in gguf.GGUFReader(path).tensors if len(tensor.shape) == 2)


def benchmark_llamacpp(dense: str, sliced: str, *, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 5,
                       threads: int = 2) -> dict[str, Any]:
    """Prompt and generation tokens/s of two GGUF files in llama.cpp (`llama-bench`), medians of `repeats`
    rounds that alternate which file goes first, and the bounds: generation reads every weight once per
    token (dense bytes / sliced bytes), a prompt costs the matmul FLOPs (dense / sliced matmul parameters)."""
    import json
    import os
    import subprocess

    from lmslice.llamacpp import tool

    runs: dict[str, dict[str, list[float]]] = {dense: {"prompt": [], "generation": []},
                                               sliced: {"prompt": [], "generation": []}}
    for round_index in range(repeats):
        order = [dense, sliced] if round_index % 2 == 0 else [sliced, dense]
        command = [str(tool("llama-bench")), "-t", str(threads), "-p", str(prompt_len), "-n", str(new_tokens),
                   "-r", "1", "-o", "json"] + [part for path in order for part in ("-m", path)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise LmsliceError(f"llama-bench failed: {done.stderr.strip().splitlines()[-1:]}")
        for row in json.loads(done.stdout[done.stdout.index("["):]):
            path = dense if os.path.samefile(row["model_filename"], dense) else sliced
            runs[path]["prompt" if row["n_prompt"] else "generation"].append(row["avg_ts"])
    speeds = {path: {kind: statistics.median(values) for kind, values in kinds.items()} for path, kinds in runs.items()}
    bounds = {"prompt": gguf_matmul_parameters(dense) / gguf_matmul_parameters(sliced),
              "generation": os.path.getsize(dense) / os.path.getsize(sliced)}
    return {"runtime": "llamacpp", "threads": threads, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "repeats": repeats, "dense": {"model": dense, **speeds[dense]}, "sliced": {"model": sliced, **speeds[sliced]},
            "speedup": {kind: speeds[sliced][kind] / speeds[dense][kind] for kind in bounds}, "bound": bounds}


def llamacpp_table(report: dict[str, Any]) -> str:
    lines = [f"llama.cpp, {report['threads']} threads, median of {report['repeats']} alternating rounds",
             f"{'tokens/s':<24}{'dense':>10}{'sliced':>10}{'speed-up':>10}{'bound':>8}{'of bound':>10}"]
    for kind, unit in (("prompt", f"prompt ({report['prompt_len']})"),
                       ("generation", f"generation ({report['new_tokens']})")):
        speedup, bound = report["speedup"][kind], report["bound"][kind]
        lines.append(f"{unit:<24}{report['dense'][kind]:>10.1f}{report['sliced'][kind]:>10.1f}"
                     f"{speedup:>9.2f}x{bound:>7.2f}x{100 * _share(speedup, bound):>9.0f}%")
    return "\n".join(lines)
