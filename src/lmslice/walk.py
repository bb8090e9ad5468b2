"""The one walk over a model's blocks, which every pass of the pipeline makes.

A pass (slicing a block, measuring its Fisher backwards, pruning it, ...) is a `visit(index, block)`; the
walk brings each block to the compute device from where it lives, lets the pass measure and change it,
refuses the NaN or inf a change leaves, hands the block back, and moves the calibration streams on to
the next block. Where the blocks live is a `Placement`:

- `InMemory`: with the rest of the model, on the compute device (the default);
- `DeviceStreamed(device)`: in CPU memory, one block at a time on the accelerator (a model that does not
  fit on it, as the reference implementation slices Llama-2-70B on one GPU);
- `OffloadedBlocks` (`lmslice.io.offload`): in safetensors files, the source checkpoint and then each
  block's own shard of the output, one block in memory at a time.

Everything that is not a block (embeddings, final norm, head) stays on the compute device. Compare
llm-compressor's sequential pipeline and the reference's one-layer-on-the-GPU loop.

A run with a resume record (`lmslice.io.resume`, offloaded blocks only) records every block a walk
changes, with the streams and what the visit carries (`carried`), and a resumed walk starts after the
blocks its interrupted run finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lmslice.calibration import ActivationStore, BlockInput
from lmslice.io.models import check_finite
from lmslice.modeling import get_module, set_module

if TYPE_CHECKING:
    from lmslice.io.resume import ResumeRecord


class Placement(Protocol):
    """Where a model's blocks live between uses; `device` is where they compute, in `dtype` (None: their own)."""

    device: torch.device
    dtype: torch.dtype | None

    def load(self, index: int, block: nn.Module) -> None:
        """Makes the block's weights available on `device`, in the dtype it computes in."""

    def store(self, index: int, block: nn.Module, changed: bool) -> None:
        """Takes the block back once a pass is done with it (`changed`: the pass changed its weights)."""

    def last_step(self) -> None:
        """What the next changes write is final (a placement that writes blocks out writes them as saved)."""


class InMemory:
    """Every block stays where the model is."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.dtype = None

    def load(self, index: int, block: nn.Module) -> None:
        pass

    def store(self, index: int, block: nn.Module, changed: bool) -> None:
        pass

    def last_step(self) -> None:
        pass


class DeviceStreamed:
    """Blocks in CPU memory (in `storage_dtype`, by default the dtype they have), each moved to `device` in
    `dtype` for its turn and back afterwards: the accelerator holds one block, the rest of the model and
    the calibration stream. A changed block is rounded to `storage_dtype` on its way back, so later
    blocks are calibrated on what the saved model will compute."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype | None = None,
                 storage_dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.storage_dtype = storage_dtype

    def load(self, index: int, block: nn.Module) -> None:
        block.to(self.device, self.dtype)

    def store(self, index: int, block: nn.Module, changed: bool) -> None:
        block.to("cpu", self.storage_dtype)

    def last_step(self) -> None:
        pass


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    from lmslice.adapters import find_adapter

    path = find_adapter(model).blocks
    return path, get_module(model, path)


def move_all_but_blocks(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Moves everything but the blocks (embeddings, final norm, head, rotary buffers) to `device`; tied
    weights stay tied."""
    path, blocks = blocks_of(model)
    set_module(model, path, nn.ModuleList())
    try:
        model.to(device, dtype)
    finally:
        set_module(model, path, blocks)


class RunProgress:
    """One progress bar for a whole run: every block each pass visits is one step, so the ETA covers
    every pass (`expect` them up front); the bar names the pass under way. `seconds` keeps each pass's
    time and `visits` its blocks visited, by name (what a summary or a benchmark reports)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.seconds: dict[str, float] = {}
        self.visits: dict[str, int] = {}
        self.current: str | None = None
        self.started = 0.0

    def expect(self, visits: int) -> None:
        if self.enabled and visits:
            self.bar = tqdm(total=visits, unit="block", dynamic_ncols=True)

    def start(self, name: str) -> None:
        self.current, self.started = name, time.perf_counter()
        if self.bar is not None:
            self.bar.set_description(name)

    def skip(self, visits: int) -> None:
        """Visits a resumed run does not make (read back instead): the bar moves on, no time is counted."""
        if self.bar is not None and visits:
            self.bar.update(visits)

    def advance(self) -> None:
        now = time.perf_counter()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.started
        self.visits[self.current] = self.visits.get(self.current, 0) + 1
        self.started = now
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


Result = TypeVar("Result")


@dataclass
class Run:
    """What the passes of one `compress` share: the dense parameter count budgets are fractions of, where
    the blocks live (`placement`), where the calibration activations wait between blocks (`activations`,
    None: where they were computed), the progress bar, each step's result, in order, and for a resumable
    run its record (`resume`) and the position of the step under way (`step`), which names its walks and
    measurements there."""

    parameters_dense: int
    placement: Placement = field(default_factory=InMemory)
    activations: str | None = None  # None, "cpu", or a directory (see ActivationStore)
    progress: RunProgress = field(default_factory=lambda: RunProgress(False))
    results: list[Any] = field(default_factory=list)
    resume: ResumeRecord | None = None
    step: int = 0

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def streams_placed(self) -> bool:
        """Whether blocks live anywhere but in memory with the model."""
        return not isinstance(self.placement, InMemory)

    def store(self) -> ActivationStore:
        """A new store for a pass's calibration streams."""
        return ActivationStore(self.activations)

    def result(self, kind: type) -> Any:
        """The last result of this kind (`SliceResult`, `PruneResult`), or None."""
        return next((result for result in reversed(self.results) if isinstance(result, kind)), None)

    def remembered(self, name: str, measure: Callable[[], Result], visits: int) -> Result:
        """`measure()`, kept in a resumable run's record; a resumed run reads it back instead (`visits`: the
        block visits the measurement takes, which the progress bar skips)."""
        if self.resume is None:
            return measure()
        key = f"{self.step}.{name}"
        if self.resume.remembers(key):
            self.progress.skip(visits)
            return self.resume.recall(key)
        value = measure()
        self.resume.remember(key, value)
        return value


# Measures or changes one block; returns whether it changed it, or the block that replaces it.
Visit = Callable[[int, nn.Module], "bool | nn.Module"]


def walk_blocks(model: nn.Module, run: Run, visit: Visit, name: str, *,
                streams: Sequence[BlockInput] = (), reverse: bool = False,
                carried: dict[str, Any] | None = None) -> None:
    """`visit` every block of `model` in order (or in `reverse`), each brought to the compute device from
    its placement and handed back after; a block the visit changed must hold finite weights, and a block
    the visit returns (the standard format builds new ones) is handed back in the visited one's place.
    Forward, the `streams` (whose hidden states the visit carried through the block) then enter the next
    block. `carried` holds what the visit carries from one block to the next besides the streams (read
    through the dict: a resumed walk puts back what the interrupted one had carried)."""
    path, blocks = blocks_of(model)
    run.progress.start(name)
    order = list(reversed(range(len(blocks))) if reverse else range(len(blocks)))
    walk = f"{run.step}.{name}"
    carried = {} if carried is None else carried
    finished = 0 if run.resume is None else run.resume.restore(walk, blocks, order, streams, carried)
    run.progress.skip(finished)
    for position, index in enumerate(order[finished:], start=finished):
        run.placement.load(index, blocks[index])
        outcome = visit(index, blocks[index])
        block = blocks[index]
        if isinstance(outcome, nn.Module):
            run.placement.store(index, block, False)
            block = outcome
        if outcome is not False:
            check_finite(block, f"{path}.{index}.", after=f"{name} block {index}")
        run.placement.store(index, block, outcome is not False)
        for stream in streams:
            stream.at = index + 1
        if run.resume is not None and outcome is not False:
            run.resume.block_finished(walk, position + 1, index, blocks[index], streams, carried)
        run.progress.advance()
