"""Step 2 of the method: the calibration signal entering each norm, and its principal components.

The stream entering block 0 is captured once; each block is then run on the stream that the already
sliced blocks before it produce, so its PCA sees what the sliced model will really feed it. Blocks run
with their fused, not yet rotated, weights on the stream mapped back to original coordinates (the
same function as the rotated block on sliced coordinates); where a block has an inner residual
connection, the stream there is projected onto the kept components in place, as slicing will do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmslice.adapters import ModelAdapter
from lmslice.errors import LmsliceError, first_line
from lmslice.modeling import get_module


# A calibration text whose distinct tokens are fewer than this fraction of the model's width cannot
# calibrate it: the embeddings' covariance has rank at most the number of distinct tokens, and the blocks
# see little more, so pruning then empties whole blocks (docs/method.md has the measured case).
DEGENERATE_FRACTION = 1 / 8


def check_calibration(batches: list[dict[str, torch.Tensor]], width: int) -> str | None:
    """Refuses calibration batches with fewer distinct tokens than `DEGENERATE_FRACTION` of `width` (the
    model's residual width); returns a warning, with the numbers, when they are fewer than `width`."""
    tokens = [batch["input_ids"][batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()]
              for batch in batches]
    total = sum(len(ids) for ids in tokens)
    distinct = len(torch.unique(torch.cat(tokens))) if tokens else 0
    if distinct < DEGENERATE_FRACTION * width:
        raise LmsliceError(f"the calibration text has {distinct} distinct tokens ({total} in all), too few to "
                           f"calibrate a model of width {width} (at least {math.ceil(DEGENERATE_FRACTION * width)} "
                           "needed): give varied text")
    if distinct < width:
        return (f"the calibration text has {distinct} distinct tokens ({total} in all), fewer than the model's "
                f"width {width}: the embeddings' covariance has rank {distinct} at most; more varied text calibrates "
                "better")
    return None


class StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


class ActivationStore:
    """Where the calibration stream waits between blocks: where it was computed (`location` None), in CPU
    memory beside an accelerator ("cpu"), or in one file per batch in a directory (a path), read back when a
    block needs it, so only one batch of activations is resident. `get` returns a tensor on the device it
    was put from."""

    def __init__(self, location: str | Path | None = None) -> None:
        self.directory = Path(location) if location is not None and location != "cpu" else None
        self.on_cpu = location == "cpu"
        self.tensors: dict[str, torch.Tensor] = {}
        self.devices: dict[str, torch.device] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.devices[name] = tensor.device
        if self.directory is None:
            self.tensors[name] = tensor.to("cpu") if self.on_cpu else tensor
            return
        try:
            save_file({"activations": tensor.contiguous()}, self.directory / f"{name}.safetensors")
        except (OSError, SafetensorError) as error:  # disk full, mostly
            raise LmsliceError(f"cannot spill calibration activations to {self.directory}: {first_line(error)}; free disk "
                               "space there, or drop --offload-activations") from error

    def get(self, name: str) -> torch.Tensor:
        if self.directory is None:
            return self.tensors[name].to(self.devices[name])
        return load_file(self.directory / f"{name}.safetensors", device=str(self.devices[name]))["activations"]

    def take(self, name: str) -> torch.Tensor:
        """`get`, then forget the tensor (and delete its file)."""
        tensor = self.get(name)
        self.forget(name)
        return tensor

    def forget(self, name: str) -> None:
        if self.directory is None:
            del self.tensors[name]
        else:
            (self.directory / f"{name}.safetensors").unlink()
        del self.devices[name]


# What a block receives besides its hidden states: positional and keyword arguments (attention mask,
# position embeddings, ...). Blocks of different attention types (sliding-window and global layers) receive
# different ones, so each block's are kept; blocks of the same type share the same objects.
BlockArguments = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class BlockInput:
    """One calibration batch as the blocks receive it; the hidden states themselves live in `store`.
    `at` is the block the hidden states currently enter: the walk over the blocks moves it on."""

    name: str
    arguments: list[BlockArguments]  # one per block
    mask: torch.Tensor  # (batch, tokens), True for real tokens
    store: ActivationStore = field(repr=False)
    at: int = 0
    input_ids: torch.Tensor | None = field(default=None, repr=False)  # what the model's loss predicts

    @property
    def args(self) -> tuple[Any, ...]:
        return self.arguments[self.at][0]

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.arguments[self.at][1]

    @property
    def hidden(self) -> torch.Tensor:
        """(batch, tokens, width), coordinates in the current basis."""
        return self.store.get(self.name)

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        self.store.put(self.name, value)

    def beside(self, name: str) -> BlockInput:
        """Another stream of the same batch (a block's outputs beside its inputs), at the same block."""
        return BlockInput(name, self.arguments, self.mask, self.store, self.at, self.input_ids)


# From this width on, `add_gram` computes a Gram matrix's blocks on and below the diagonal only.
GRAM_BLOCKED_FROM = 2048
GRAM_BLOCKS = 8


def add_gram(matrix: torch.Tensor, rows: torch.Tensor) -> None:
    """matrix += rowsᵀ rows, the product in rows' dtype and the sum in matrix's. A wide product is taken in
    `GRAM_BLOCKS` bands of columns, each only against the columns up to its own end (the blocks on and
    below the diagonal, about 9/16 of one full product's work), and added at once with its mirror above the
    diagonal: no temporary larger than one band (at Llama-3-70B's MLP width a full float32 product would
    be 3.3 GB beside the float64 sum)."""
    width = rows.shape[1]
    if width < GRAM_BLOCKED_FROM:
        matrix.add_(rows.T @ rows)
        return
    step = math.ceil(width / GRAM_BLOCKS)
    for start in range(0, width, step):
        stop = min(start + step, width)
        band = rows[:, start:stop].T @ rows[:, :stop]  # rows start:stop of the product, up to the diagonal
        matrix[start:stop, :stop] += band
        matrix[:start, start:stop] += band[:, :start].T


class Covariance:
    """C = Σ xᵀx over non-padding tokens, accumulated in float64 (`add_gram`) one batch at a time. `signal` names
    what is measured, for the error that refuses a NaN or inf in it."""

    def __init__(self, dim: int, device: torch.device, signal: str = "calibration signal") -> None:
        self.matrix = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0
        self.signal = signal

    def add(self, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        rows = hidden.reshape(-1, hidden.shape[-1])[mask.reshape(-1).to(hidden.device)].to(torch.float64)
        add_gram(self.matrix, rows)
        self.tokens += rows.shape[0]

    def principal_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending, per token) and the matching eigenvectors as columns."""
        if not torch.isfinite(self.matrix).all():
            raise LmsliceError(f"the {self.signal} has NaN or inf values on the calibration text: the model "
                               "overflows (try --dtype float32) or its weights are damaged; refusing to slice")
        matrix = self.matrix / max(self.tokens, 1)
        damping = 0.01 * matrix.diagonal().mean()
        eigenvalues, eigenvectors = _eigh(matrix + damping * torch.eye(len(matrix), dtype=matrix.dtype,
                                                                       device=matrix.device))
        order = torch.argsort(eigenvalues, descending=True)
        return eigenvalues[order] - damping, eigenvectors[:, order]


SINGLE_THREAD_EIGH_MAX_DIM = 2048


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh`, on one thread for CPU matrices up to 2048 wide: there, the threaded LAPACK
    solver gains little and, on a busy machine, its spinning threads made it 20-100x slower (measured on
    2 cores: 576 wide, 8.4 s on two threads vs 0.08 s on one)."""
    if matrix.device.type != "cpu" or len(matrix) > SINGLE_THREAD_EIGH_MAX_DIM:
        return torch.linalg.eigh(matrix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrix)
    finally:
        torch.set_num_threads(threads)


Item = TypeVar("Item")
Hook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]


def walk(items: Iterable[Item], forward: Callable[[Item], Any],
         hooks: Sequence[tuple[nn.Module, Hook]] = ()) -> list[Any]:
    """The one walk over calibration data that every pass makes: `forward(item)` for each item, with
    `hooks` in place as forward pre-hooks `hook(module, args, kwargs, item)` that also receive the item
    being run (its mask, its stream). A hook that has what it needs raises `StopForward`, which ends that
    item's forward early (its result is then None). The hooks are removed afterwards, whatever happens."""
    current: list[Item] = []

    def bind(hook: Hook) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        return lambda module, args, kwargs: hook(module, args, kwargs, current[0])

    handles = [module.register_forward_pre_hook(bind(hook), with_kwargs=True) for module, hook in hooks]
    results: list[Any] = []
    try:
        for item in items:
            current[:] = [item]
            try:
                results.append(forward(item))
            except StopForward:
                results.append(None)
    finally:
        for handle in handles:
            handle.remove()
    return results


@dataclass(frozen=True)
class ModelBatch:
    """One calibration batch on the model's device: token ids and the mask of real tokens."""

    input_ids: torch.Tensor
    mask: torch.Tensor  # (batch, tokens), True for real tokens


def model_batches(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[ModelBatch]:
    device = model.get_input_embeddings().weight.device
    prepared = []
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        prepared.append(ModelBatch(input_ids, batch.get("attention_mask", torch.ones_like(input_ids)).to(device).bool()))
    return prepared


def run_model(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], hooks: Sequence[tuple[nn.Module, Hook]],
              ) -> None:
    """`walk` over the calibration batches through the whole model (each hook gets the `ModelBatch`)."""
    walk(model_batches(model, batches),
         lambda batch: model(input_ids=batch.input_ids, attention_mask=batch.mask.long(), use_cache=False), hooks)


class _StandIn(nn.Module):
    """Stands in for block `index` while the model runs without its blocks: `forward` returns what
    `respond(index, hidden_states, args, kwargs)` returns (the hidden states, or a replacement), so such
    a pass costs the embeddings and the head, and no block (the blocks may not even be in memory)."""

    def __init__(self, index: int, respond: Callable[[int, torch.Tensor, tuple[Any, ...], dict[str, Any]],
                                                     torch.Tensor]) -> None:
        super().__init__()
        self.index, self.respond = index, respond

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.respond(self.index, hidden_states, args, kwargs)


@contextlib.contextmanager
def blocks_stood_in(model: nn.Module, adapter: ModelAdapter,
                    respond: Callable[[int, torch.Tensor, tuple[Any, ...], dict[str, Any]], torch.Tensor],
                    ) -> Iterator[None]:
    """The model's blocks replaced by `_StandIn`s for the body, put back whatever happens."""
    blocks = get_module(model, adapter.blocks)
    originals = list(blocks)
    for index in range(len(blocks)):
        blocks[index] = _StandIn(index, respond)
    try:
        yield
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: ModelAdapter, batches: Iterable[dict[str, torch.Tensor]],
                         store: ActivationStore) -> list[BlockInput]:
    """Runs the model on every batch with its blocks stood in for, and keeps what the first block receives
    and the arguments every block receives (its own attention mask and position embeddings)."""
    captured: list[BlockInput] = []
    arguments: list[BlockArguments] = []
    current: list[ModelBatch] = []

    def record(index: int, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        arguments.append((args, kwargs))
        if index == 0:
            batch = current[0]
            stream = BlockInput(f"stream-{len(captured)}", [], batch.mask, store, input_ids=batch.input_ids)
            stream.hidden = hidden
            captured.append(stream)
        return hidden

    def start(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: ModelBatch) -> None:
        current[:] = [batch]
        arguments.clear()

    def finish(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: ModelBatch) -> None:
        captured[-1].arguments = list(arguments)
        raise StopForward

    with blocks_stood_in(model, adapter, record):
        run_model(model, batches, [(model, start), (get_module(model, adapter.final_norm), finish)])
    return captured


def window_loss(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, mask: torch.Tensor,
                hidden: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss of one window (`input_ids` and `mask` of one row) when the last block
    outputs `hidden`, as the model's own tail computes it: final norm, head, logit soft-capping or
    scaling, the loss. One window at a time: the vocabulary-wide logits dominate the memory."""
    last = len(get_module(model, adapter.blocks)) - 1
    labels = input_ids.masked_fill(~mask, -100)
    with blocks_stood_in(model, adapter, lambda index, hidden_states, args, kwargs:
                         hidden if index == last else hidden_states):
        loss = model(input_ids=input_ids, attention_mask=mask.long(), labels=labels, use_cache=False).loss
    return loss * (labels[:, 1:] != -100).sum()


def run_block(block: nn.Module, stream: BlockInput, hidden: torch.Tensor) -> torch.Tensor:
    """The block's output on `hidden`, given what `stream` says it receives besides."""
    out = block(hidden, *stream.args, **stream.kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class BlockSignals:
    """The principal bases of one block: one per residual connection inside it, and of its output."""

    inner: list[tuple[torch.Tensor, torch.Tensor]]  # (eigenvalues, eigenvectors) per inner connection
    output: tuple[torch.Tensor, torch.Tensor]
    outputs: list[BlockInput]  # block outputs in original coordinates, one per batch


@torch.no_grad()
def block_signals(block: nn.Module, adapter: ModelAdapter, streams: list[BlockInput], basis_in: torch.Tensor,
                  width: int, progress: Callable[[], None] = lambda: None, name: str = "block") -> BlockSignals:
    """PCA of the signals of one block fed the sliced stream.

    `basis_in` (D x width) maps the stream's coordinates back to original ones. Connection k > 0 of a
    sequential block is fed by connection k - 1 whose output is already sliced: its PCA is taken with
    the stream at the earlier norms projected onto their kept components.
    """
    dim = basis_in.shape[0]
    device, dtype = basis_in.device, next(block.parameters()).dtype
    up = basis_in.T.to(dtype)
    norm_paths = [next(iter(residual.reads)) for residual in adapter.residuals[1:]]
    norms = [get_module(block, path) for path in norm_paths]
    projections: list[torch.Tensor] = []
    inner: list[tuple[torch.Tensor, torch.Tensor]] = []

    def project(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], stream: BlockInput) -> None:
        hidden = args[0]
        projection = projections[norms.index(module)]
        hidden.copy_(hidden @ projection)

    def accumulate_and_stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                            stream: BlockInput) -> None:
        covariance.add(args[0], stream.mask)
        raise StopForward

    def forward(stream: BlockInput) -> torch.Tensor:
        return run_block(block, stream, stream.hidden @ up)

    for norm, norm_path in zip(norms, norm_paths):
        covariance = Covariance(dim, device, f"input of {name}'s {norm_path}")
        walk(streams, forward, [(n, project) for n in norms[: len(projections)]] + [(norm, accumulate_and_stop)])
        eigenvalues, eigenvectors = covariance.principal_components()
        inner.append((eigenvalues, eigenvectors))
        kept = eigenvectors[:, :width].to(dtype)
        projections.append(kept @ kept.T)
        progress()

    covariance = Covariance(dim, device, f"output of {name}")
    outputs: list[BlockInput] = []

    def keep_output(stream: BlockInput) -> None:  # one batch's output resident at a time (see ActivationStore)
        out = forward(stream)
        covariance.add(out, stream.mask)
        outputs.append(stream.beside(f"output-{len(outputs)}"))
        outputs[-1].hidden = out

    walk(streams, keep_output, [(n, project) for n in norms])
    progress()
    return BlockSignals(inner, covariance.principal_components(), outputs)
