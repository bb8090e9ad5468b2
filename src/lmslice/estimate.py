"""What a compression will cost before it runs: peak memory and time from the model's shapes, the steps, the
calibration and where the blocks live, with the device's speed measured on the operations the steps spend
their time in (matrix products, Cholesky factors, eigendecompositions). `lmslice compress --dry-run` prints
it; benchmarks/estimate.py holds it against measured runs.

The model is counted per block at its widths before the cut (an upper bound for what later walks see).
Time is the compute of the walks over the blocks and of the evaluation, not the load and save."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmslice.adapters import find_adapter
from lmslice.calibration import GRAM_BLOCKED_FROM
from lmslice.modeling import get_module
from lmslice.prune.config import PruneConfig
from lmslice.prune.measure import PLANNING_WINDOWS
from lmslice.prune.shapes import attention_of, mlp_of
from lmslice.prune.solvers import DEFAULT_DAMPING, REFIT_ELEMENTS, damped_inverse, rows_are_cheaper
from lmslice.slicing import SliceConfig, count_parameters

GIB = 2**30


@dataclass(frozen=True)
class Speed:
    """Measured rates of one device: matrix products in float32 and float64 (FLOP/s); the eliminations'
    damped inverse (`damped_inverse`, float32), Cholesky factor in float64 and symmetric eigendecomposition
    in float64 (each n³/s)."""

    gemm: float
    gemm64: float
    inverse: float
    cholesky64: float
    eigh64: float


def _seconds(work: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """The fastest of `repeats` runs after a warm-up: what the device can do, not what a busy moment let it."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    work()  # kernels, allocator
    fastest = float("inf")
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        work()
        synchronize()
        fastest = min(fastest, time.perf_counter() - started)
    return max(fastest, 1e-9)


def measure_speed(device: str | torch.device, size: int = 1024) -> Speed:
    """The device's rates on `size`-wide matrices (about a second on a CPU core pair)."""
    device = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    spd = a @ a.T + size * torch.eye(size, device=device)
    a64, spd64 = a.double(), spd.double()
    n3 = float(size) ** 3
    return Speed(gemm=2 * n3 / _seconds(lambda: a @ a, device),
                 gemm64=2 * n3 / _seconds(lambda: a64 @ a64, device),
                 inverse=n3 / _seconds(lambda: damped_inverse(spd, size, DEFAULT_DAMPING), device),
                 cholesky64=n3 / _seconds(lambda: torch.linalg.cholesky(spd64), device),
                 eigh64=n3 / _seconds(lambda: torch.linalg.eigh(spd64), device))


@dataclass(frozen=True)
class Calibration:
    samples: int
    seqlen: int
    batch_size: int
    eval_tokens: int = 0  # evaluated twice (before and after), 0 without --eval-data
    eval_seqlen: int = 0


@dataclass(frozen=True)
class BlockShape:
    """What one block's cost depends on."""

    hidden: int
    mlp: int  # the MLP consumer's input width
    attention: int  # the attention output projection's input width (0: no attention path known)
    linear: int  # parameters of the block's matrices
    parameters: int  # all of the block's parameters


def block_shape(model: nn.Module) -> BlockShape:
    adapter = find_adapter(model)
    block = get_module(model, adapter.blocks)[0]
    mlp = get_module(block, mlp_of(adapter).consumer).in_features
    attention = get_module(block, attention_of(adapter).output).in_features if adapter.attention else 0
    linear = sum(module.weight.numel() for module in block.modules() if isinstance(module, nn.Linear))
    return BlockShape(model.get_input_embeddings().weight.shape[1], mlp, attention, linear,
                      sum(parameter.numel() for parameter in block.parameters()))


@dataclass
class Estimate:
    """The run's cost: peak memory (bytes, of the process; on an accelerator, of the device too), seconds
    by phase, and the parts of the peak."""

    peak_bytes: float
    device_peak_bytes: float | None
    seconds: dict[str, float]
    memory: dict[str, float]

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def resident_bytes() -> float:
    """This process's resident memory now (what importing torch and transformers took), where readable."""
    status = Path("/proc/self/status")
    if status.is_file():
        match = re.search(r"VmRSS:\s+(\d+) kB", status.read_text())
        if match:
            return int(match[1]) * 1024.0
    return 0.0


def estimate(model: nn.Module, steps: list[object], placement: str, calibration: Calibration, *,
             device: str | torch.device, dtype: torch.dtype, stored_dtype: torch.dtype | None = None,
             speed: Speed, activations_on_disk: bool = False, base_bytes: float | None = None,
             saved_parameters: int | None = None) -> Estimate:
    """The cost of running `steps` (`SliceConfig`/`PruneConfig` configs of pipeline steps) on `model` (a
    weightless skeleton will do) with its blocks where `placement` ("memory", "streamed", "offload") keeps
    them, computing in `dtype` on `device`; with `saved_parameters`, the result (of that many parameters)
    saved from memory in `stored_dtype` and read back to check it, on top of what compressing left."""
    adapter = find_adapter(model)
    blocks = len(get_module(model, adapter.blocks))
    shape = block_shape(model)
    vocabulary = model.get_input_embeddings().weight.shape[0]
    width = torch.finfo(dtype).bits // 8
    stored = torch.finfo(stored_dtype or dtype).bits // 8
    tokens = calibration.samples * calibration.seqlen
    planning = min(PLANNING_WINDOWS, calibration.samples) * calibration.seqlen
    hidden, mlp, attention = shape.hidden, shape.mlp, shape.attention

    def forward(count: int) -> float:  # one block's forward over `count` tokens
        matrices = 2 * count * shape.linear
        scores = 2 * count * calibration.seqlen * attention  # QKᵀ and AV, causal: half of each
        return (matrices + scores) / speed.gemm

    def head(count: int) -> float:
        return 2 * count * hidden * vocabulary / speed.gemm

    def gram(width: int) -> float:  # the products of one token's contribution to a Gram matrix (`add_gram`)
        return 2 * width**2 * (9 / 16 if width >= GRAM_BLOCKED_FROM else 1)

    seconds: dict[str, float] = {}
    working = 0.0  # the largest per-block working set of any step
    stream = 2 * tokens * hidden * width  # a block's input and output stream
    fisher_inputs = 0.0  # the Fisher's forward walk keeps every block's input for its backward walk
    configs = [getattr(step, "config", step) for step in steps]
    for config in configs:
        if isinstance(config, SliceConfig):
            per_block = (forward(tokens) + 2 * tokens * gram(hidden) / speed.gemm64
                         + 2 * hidden**3 / speed.eigh64 + 2 * shape.linear * hidden / speed.gemm64)
            seconds["slicing"] = seconds.get("slicing", 0.0) + blocks * per_block
            # the embedding (and the head) rotated through float64: its copy, the product and the result
            working = max(working, 4 * 8 * hidden**2, (8 + 8 + width) * vocabulary * hidden)
        elif isinstance(config, PruneConfig):
            kept = int(mlp * config.target_params)
            grams = gram(mlp) + gram(attention)
            consumers = mlp**3 + attention**3
            if config.widths == "measured":
                # the MLP's path from its inputs where the plan keeps them (`eliminate_from_rows`), else from G
                if rows_are_cheaper(planning, mlp):
                    mlp_path = 8 * planning**2 * mlp / speed.gemm64 + planning * mlp**2 / speed.gemm
                    plan_grams = gram(attention)
                else:
                    mlp_path = mlp**3 / speed.inverse + 2 / 3 * mlp**3 / speed.gemm
                    plan_grams = grams
                fisher = forward(planning) * 4 + plan_grams * planning / speed.gemm + mlp_path \
                    + attention**3 / speed.inverse + 2 / 3 * attention**3 / speed.gemm
                seconds["fisher and plan"] = blocks * fisher + 3 * head(planning)
            refit = 2 * hidden * (mlp**2 + attention**2) / speed.gemm64 + kept**3 / 3 / speed.cholesky64
            eliminate = consumers / speed.inverse + 2 / 3 * (mlp**3 - kept**3) / speed.gemm
            seconds["pruning"] = blocks * (2 * forward(tokens) + grams * tokens / speed.gemm + eliminate + refit)
            stream += tokens * mlp * width  # each window keeps the MLP consumer's input beside it
            fisher_inputs = (blocks + 1) * planning * hidden * width  # and the gradient flowing back
            consumer = max(width, 4) * hidden * mlp  # its weight, float32 or wider (`consumer_weight`)
            working = max(working,
                          8 * mlp**2 + 4 * mlp**2 + 3 * consumer,  # choosing: G, its float32 inverse, W and 2 copies
                          8 * mlp**2 + 8 * hidden * kept + 2 * 8 * REFIT_ELEMENTS)  # refit: G (G[S, S] over it), W'
            # the tail's float32 logits, their log-softmax and both gradients, one planning window at a time
            working = max(working, 4 * calibration.seqlen * vocabulary * 4)
    if calibration.eval_tokens:
        seconds["evaluation"] = 2 * (blocks * forward(calibration.eval_tokens) + head(calibration.eval_tokens))
        working = max(working, 3 * calibration.eval_seqlen * vocabulary * 4)  # one window's logits and loss

    total = count_parameters(model)
    in_blocks = blocks * shape.parameters
    block_bytes = shape.parameters * width
    on_device = torch.device(device).type != "cpu"
    if activations_on_disk:
        batches = max(1, calibration.samples // max(1, calibration.batch_size))
        stream, fisher_inputs = stream / batches, fisher_inputs / max(1, blocks * batches)
    if placement == "offload":
        weights = (total - in_blocks) * width + 2 * block_bytes
    elif placement == "streamed":
        weights = total * stored
    else:
        weights = total * width
    base = resident_bytes() if base_bytes is None else base_bytes
    memory = {"process": base, "weights": weights, "calibration stream": stream + fisher_inputs,
              "block working set": working}
    if saved_parameters:  # the saved copy and the copy read back, while compressing's memory is still held
        memory["saving"] = 2 * saved_parameters * stored
    if on_device:  # the compute on the device; the process holds what the placement keeps in CPU memory
        device_weights = (total - in_blocks) * width + 2 * block_bytes if placement != "memory" else total * width
        activations = stream + fisher_inputs
        device_peak = device_weights + working + (0 if placement == "streamed" else activations)
        host_peak = base + (weights if placement != "memory" else 0) \
            + (activations if placement == "streamed" else 0) + memory.get("saving", 0.0)
        return Estimate(host_peak, device_peak, seconds, memory)
    return Estimate(sum(memory.values()), None, seconds, memory)

