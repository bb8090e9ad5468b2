"""The cuts as steps of one pipeline: `compress(model, batches, steps)`.

A step is a typed config (validated when it is made) and two methods:

- `check(model, run)` refuses, before any calibration text is read, what the step cannot do to a model
  of this structure and layout in this run, and returns the structure the
  step will leave (a weightless copy where it differs), so `check_steps` checks a whole list against the
  model it starts from;
- `apply(model, batches, run)` makes the cut and returns the model (the standard format builds a new one).

`compress` runs the steps in order on the same calibration batches and then writes the run's record (the
calibration, the source, the steps and their configs) into the layout once. Each cut keeps the layout's
structural entries (widths, heads, bases) current as it goes, because the modules of the next cut depend
on them. The CLI, `frontier` and `report` build lists of steps; add a cut by adding a config and a step
here. Compare llm-compressor's `oneshot(model, recipe=[...])`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lmslice import __version__
from lmslice.adapters import find_adapter
from lmslice.errors import LmsliceError
from lmslice.export import TIE_BY_DEFAULT, check_family, check_standard_source, standard_model
from lmslice.io.data import check_batches
from lmslice.io.offload import OffloadedBlocks
from lmslice.layout import layout_of
from lmslice.modeling import get_module
from lmslice.prune import (PASSES, PruneConfig, PruneResult, attention_of, check_pruning, mlp_of, per_block_skeleton,
                           prune_blocks_to_budget)
from lmslice.slicing import (SliceConfig, SliceResult, check_can_slice, count_parameters, residual_width,
                             slice_blocks, sliced_skeleton, sliced_width)
from lmslice.walk import InMemory, Placement, Run, RunProgress, move_all_but_blocks

Batches = list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class StandardFormatConfig:
    """Write a model sliced with one shared basis as its family's own architecture at the sliced hidden
    size. `tie_embeddings` keeps the head tied to the embedding (smaller, approximate); None: as
    `TIE_BY_DEFAULT` says, where the source was tied."""

    tie_embeddings: bool | None = None


class Step(Protocol):
    name: str  # as the recipe in the layout records it
    config: Any  # the step's typed settings (a frozen dataclass)
    passes: int  # the walks over the blocks `apply` makes (for the run's one progress bar)

    def check(self, model: nn.Module, run: Run) -> nn.Module:
        """Raises `LmsliceError` if the step cannot apply to a model of this structure and layout in `run`;
        returns the structure it leaves (weightless where it differs from `model`)."""

    def apply(self, model: nn.Module, batches: Batches, run: Run) -> nn.Module:
        """Makes the cut (in place where it can) and returns the model; appends its result to `run.results`."""


@dataclass(frozen=True)
class Slice:
    config: SliceConfig
    name: str = "slice"

    @property
    def passes(self) -> int:
        return self.config.passes

    def check(self, model: nn.Module, run: Run) -> nn.Module:
        check_can_slice(model)
        width = sliced_width(residual_width(model), self.config.sparsity, self.config.round_to)
        return sliced_skeleton(model, width, self.config.rotation, self.config.slice_head, self.config.round_to)

    def apply(self, model: nn.Module, batches: Batches, run: Run) -> nn.Module:
        run.results.append(slice_blocks(model, batches, self.config, run))
        return model


@dataclass(frozen=True)
class Prune:
    config: PruneConfig
    name: str = "prune"
    passes: int = PASSES

    def check(self, model: nn.Module, run: Run) -> nn.Module:
        config = self.config
        heads = config.prunes_heads(model)
        if config.heads:  # asked for explicitly: a family without known heads is refused
            attention_of(find_adapter(model))
        if config.whole_experts and mlp_of(find_adapter(model)).experts is None:
            raise LmsliceError(f"whole experts: {type(model).__name__} has no mixture of experts; prune without them")
        check_pruning(model, config.target_params, config.round_to, widths=config.widths, heads=heads,
                      parameters_dense=run.parameters_dense)
        # measured widths are known only after calibration: what follows sees a model pruned per block
        return per_block_skeleton(model, heads) if config.widths == "measured" else model

    def apply(self, model: nn.Module, batches: Batches, run: Run) -> nn.Module:
        run.results.append(prune_blocks_to_budget(model, batches, self.config, run))
        return model


@dataclass(frozen=True)
class StandardFormat:
    config: StandardFormatConfig = StandardFormatConfig()
    name: str = "standard-format"
    passes: int = 1

    def check(self, model: nn.Module, run: Run) -> nn.Module:
        check_family(find_adapter(model))
        layout = layout_of(model.config)
        check_standard_source(layout)
        if layout is None or layout.stream is None or layout.stream.rotation != "shared":
            raise LmsliceError("the standard format writes a stream sliced with one shared basis: slice it with "
                               "rotation 'shared' first")
        check_standard_width(model, layout.stream.width, layout.stream.round_to)
        return model

    def apply(self, model: nn.Module, batches: Batches, run: Run) -> nn.Module:
        sliced = run.result(SliceResult)
        tie = self.config.tie_embeddings
        if tie is None:
            tie = TIE_BY_DEFAULT and layout_of(model.config).stream.tied_embeddings
        return standard_model(model, tie_embeddings=tie, head_input=sliced.head_input, run=run)


def check_standard_width(model: nn.Module, width: int, round_to: int | None) -> None:
    """transformers requires the standard format's hidden size to be a multiple of the query heads (even
    with head_dim given): refused here, with the widths that are, rather than at save, after the whole run."""
    heads, hidden = model.config.num_attention_heads, layout_of(model.config).hidden_size
    if width % heads:
        step = math.lcm(round_to or 1, heads)
        nearest = list(range(step, hidden, step))[-4:]
        raise LmsliceError(f"the standard format's hidden size {width} is not a multiple of the {heads} attention "
                           f"heads, which transformers requires; widths that are (multiples of {round_to or 1}): "
                           f"{', '.join(map(str, nearest)) or 'none below ' + str(hidden)} (sparsity "
                           f"{', '.join(f'{1 - kept / hidden:.3g}' for kept in nearest)})")


def check_steps(model: nn.Module, steps: list[Step], *, placement: Placement | None = None) -> nn.Module:
    """Every step can apply to what the steps before it leave (with the blocks where `placement` keeps
    them, if given): refused in one line naming the step, before any calibration. Returns the structure
    the last step leaves."""
    if not isinstance(steps, (list, tuple)):
        raise LmsliceError(f"steps must be a list of steps (Slice, Prune, StandardFormat), got a "
                           f"{type(steps).__name__}")
    if not steps:
        raise LmsliceError("no steps: give at least one cut")
    for index, step in enumerate(steps):
        if not all(callable(getattr(step, method, None)) for method in ("check", "apply")) \
                or not hasattr(step, "name") or not hasattr(step, "config"):
            raise LmsliceError(f"step {index} is a {type(step).__name__}, not a step: give Slice(SliceConfig(...)), "
                               "Prune(PruneConfig(...)) or StandardFormat()")
    run = Run(count_parameters(model), placement or InMemory())
    shape = model
    for step in steps:
        try:
            shape = step.check(shape, run)
        except LmsliceError as error:
            if len(steps) == 1:
                raise
            raise LmsliceError(f"{step.name}: {error}") from error
    return shape


@dataclass
class Compressed:
    """What `compress` returns: the model (possibly a new one), the run (each step's result: `run.result`)
    and the time taken."""

    model: nn.Module
    run: Run
    seconds: float

    def result(self, kind: type) -> Any:
        return self.run.result(kind)

    @property
    def notes(self) -> list[str]:
        resumed = self.run.resume.notes() if self.run.resume is not None else []
        return resumed + [note for result in self.run.results if isinstance(result, PruneResult)
                          for note in result.notes]


def compress(model: nn.Module, batches: Batches, steps: list[Step], *, progress: bool = True,
             placement: Placement | None = None, activations: str | None = None,
             calibration: dict[str, Any] | None = None, source_model: str | None = None) -> Compressed:
    """Applies `steps` in order to `model` (in place where they can) on the calibration `batches`, after
    checking the whole list (`check_steps`), and records the run in the result's layout: `calibration`
    (how the batches were drawn), `source_model` and the steps with their configs.

    The blocks live where `placement` keeps them (default: in memory with the model; `DeviceStreamed`
    for a model larger than the accelerator, `OffloadedBlocks` for one larger than memory), everything
    else on its compute device; the calibration stream waits between blocks where `activations` says
    (None: where it was computed; "cpu"; or a directory). One progress bar covers every walk. Offloaded
    blocks opened to be resumed (`open_offloaded(..., resume=True)`) continue the interrupted run of
    the same steps on the same calibration, if there is one (`lmslice.io.resume`)."""
    started = time.perf_counter()
    placement = placement or InMemory(model.get_input_embeddings().weight.device)
    check_steps(model, steps, placement=placement)
    batches = check_batches(batches, model.get_input_embeddings().weight.shape[0])
    move_all_but_blocks(model, placement.device, placement.dtype)
    run = Run(count_parameters(model), placement, activations, RunProgress(progress))
    if isinstance(placement, OffloadedBlocks) and placement.resume:
        run.resume = placement.open_record(run_identity(steps, batches, calibration))
    blocks = len(get_module(model, find_adapter(model).blocks))
    run.progress.expect(sum(step.passes for step in steps) * blocks)
    try:
        for position, step in enumerate(steps):
            if position == len(steps) - 1:
                placement.last_step()
            run.step = position
            model = step.apply(model, batches, run)
    finally:
        run.progress.close()
    layout = layout_of(model.config)
    model.config.lmslice = layout.replace(
        calibration=calibration or layout.calibration,
        source_model=source_model or layout.source_model,
        steps=tuple({"step": step.name, **dataclasses.asdict(step.config)} for step in steps),
    ).to_json()
    return Compressed(model, run, time.perf_counter() - started)


def run_identity(steps: list[Step], batches: Batches, calibration: dict[str, Any] | None) -> dict[str, Any]:
    """What makes two runs the same run, for resuming one with the other (with where the blocks come
    from, `OffloadedBlocks.open_record`): the steps and their configs, the calibration tokens (hashed)
    and how they were drawn, and the lmslice version that computes them."""
    tokens = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            tokens.update(key.encode())
            tokens.update(batch[key].cpu().contiguous().numpy().tobytes())
    return {"steps": [{"step": step.name, **dataclasses.asdict(step.config)} for step in steps],
            "calibration": calibration, "calibration_tokens": tokens.hexdigest(), "lmslice": __version__}
