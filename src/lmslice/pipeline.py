"""The cuts as steps of one pipeline: `compress(model, batches, steps)`.

A step is a typed config (validated when it is made) and two methods:

- `check(model, run)` refuses, before any calibration text is read, what the step cannot do to a model
  of this structure and layout in this run (its blocks offloaded, say), and returns the structure the
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
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from lmslice.adapters import find_adapter
from lmslice.calibration import ActivationStore
from lmslice.errors import LmsliceError
from lmslice.export import TIE_BY_DEFAULT, check_family, check_standard_source, standard_model
from lmslice.io.data import check_batches
from lmslice.layout import ROTATIONS, layout_of
from lmslice.prune import (CRITERIA, DEFAULT_CRITERION, DEFAULT_DAMPING, PLANNING_WINDOWS, WIDTHS, PruneResult,
                           attention_of, check_pruning, per_block_skeleton, prune_to_budget)
from lmslice.shared_basis import WEIGHTINGS
from lmslice.slicing import (BlockStorage, SliceResult, check_can_slice, check_sparsity, count_parameters,
                             residual_width, slice_model, sliced_skeleton, sliced_width)

Batches = list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class SliceConfig:
    """SliceGPT: rotate the residual stream into its principal components and delete the trailing
    `sparsity` of its width (rounded down to a multiple of `round_to`). `rotation` "per-block" gives every
    block its own basis, joined by shortcut matrices; "shared" one basis for the whole stream, weighted as
    `weighting` says (see `shared_basis`), which the standard format needs. The head keeps its full input
    width unless `slice_head` (always sliced with a shared basis)."""

    sparsity: float
    round_to: int = 8
    slice_head: bool = False
    rotation: str = "per-block"
    weighting: str = "unit-rms"

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, self.round_to)
        if self.rotation not in ROTATIONS:
            raise LmsliceError(f"unknown rotation {self.rotation!r}; choose one of {', '.join(ROTATIONS)}")
        if self.weighting not in WEIGHTINGS:
            raise LmsliceError(f"unknown basis weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


@dataclass(frozen=True)
class PruneConfig:
    """Structured pruning to `target_params` of the dense model's real parameters: MLP channels (and, with
    `heads`, query heads; None: wherever the family's heads are known and widths are measured), chosen by
    `criterion`, the layer reading them refit by least squares with `damping`; the same width in every
    block (`widths` "uniform") or per-block widths from the measured cost ("measured"), in multiples of
    `round_to`, planned on the first `planning_windows` calibration windows."""

    target_params: float
    widths: str = "measured"
    heads: bool | None = None
    round_to: int = 8
    criterion: str = DEFAULT_CRITERION
    damping: float = DEFAULT_DAMPING
    planning_windows: int = PLANNING_WINDOWS

    def __post_init__(self) -> None:
        if not 0 < self.target_params <= 1:
            raise LmsliceError(f"target_params must be in (0, 1], got {self.target_params:g}")
        if self.round_to < 1:
            raise LmsliceError(f"round_to must be a positive integer, got {self.round_to}")
        if self.widths not in WIDTHS:
            raise LmsliceError(f"unknown MLP widths {self.widths!r}; choose one of {', '.join(WIDTHS)}")
        if self.criterion not in CRITERIA:
            raise LmsliceError(f"unknown channel criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.heads and self.widths != "measured":
            raise LmsliceError("pruning attention heads needs per-block widths (measured mlp_widths)")
        if not self.damping > 0:
            raise LmsliceError(f"the refit's damping must be positive, got {self.damping:g}")
        if self.planning_windows < 1:
            raise LmsliceError(f"planning needs at least one calibration window, got {self.planning_windows}")

    def prunes_heads(self, model: nn.Module) -> bool:
        if self.heads is not None:
            return self.heads
        return self.widths == "measured" and find_adapter(model).attention is not None


@dataclass(frozen=True)
class StandardFormatConfig:
    """Write a model sliced with one shared basis as its family's own architecture at the sliced hidden
    size. `tie_embeddings` keeps the head tied to the embedding (smaller, approximate); None: as
    `TIE_BY_DEFAULT` says, where the source was tied."""

    tie_embeddings: bool | None = None


@dataclass
class Run:
    """What the steps of one `compress` share: the dense parameter count budgets are fractions of, where
    the calibration activations and the blocks wait (`ActivationStore`, `BlockStorage`), whether to show
    progress, and each step's result, in order."""

    parameters_dense: int
    progress: bool = True
    activations: ActivationStore | None = None
    storage: BlockStorage | None = None
    results: list[Any] = field(default_factory=list)

    def result(self, kind: type) -> Any:
        """The last result of this kind (`SliceResult`, `PruneResult`), or None."""
        return next((result for result in reversed(self.results) if isinstance(result, kind)), None)


class Step(Protocol):
    name: str  # as the recipe in the layout records it
    config: Any  # the step's typed settings (a frozen dataclass)

    def check(self, model: nn.Module, run: Run) -> nn.Module:
        """Raises `LmsliceError` if the step cannot apply to a model of this structure and layout in `run`;
        returns the structure it leaves (weightless where it differs from `model`)."""

    def apply(self, model: nn.Module, batches: Batches, run: Run) -> nn.Module:
        """Makes the cut (in place where it can) and returns the model; appends its result to `run.results`."""


@dataclass(frozen=True)
class Slice:
    config: SliceConfig
    name: str = "slice"

    def check(self, model: nn.Module, run: Run) -> nn.Module:
        check_can_slice(model)
        width = sliced_width(residual_width(model), self.config.sparsity, self.config.round_to)
        if self.config.rotation == "shared" and run.storage is not None:
            raise LmsliceError("a shared basis needs the whole model in memory for its dense pass: do not offload "
                               "its blocks")
        return sliced_skeleton(model, width, self.config.rotation, self.config.slice_head, self.config.round_to)

    def apply(self, model: nn.Module, batches: Batches, run: Run) -> nn.Module:
        config = self.config
        run.results.append(slice_model(model, batches, config.sparsity, round_to=config.round_to,
                                       slice_head=config.slice_head, progress=run.progress, storage=run.storage,
                                       activations=run.activations, rotation=config.rotation,
                                       weighting=config.weighting))
        return model


@dataclass(frozen=True)
class Prune:
    config: PruneConfig
    name: str = "prune"

    def check(self, model: nn.Module, run: Run) -> nn.Module:
        if run.storage is not None:
            raise LmsliceError("pruning needs the whole model in memory: do not offload its blocks")
        config = self.config
        heads = config.prunes_heads(model)
        if config.heads:  # asked for explicitly: a family without known heads is refused
            attention_of(find_adapter(model))
        check_pruning(model, config.target_params, config.round_to, widths=config.widths, heads=heads,
                      parameters_dense=run.parameters_dense)
        # measured widths are known only after calibration: what follows sees a model pruned per block
        return per_block_skeleton(model, heads) if config.widths == "measured" else model

    def apply(self, model: nn.Module, batches: Batches, run: Run) -> nn.Module:
        config = self.config
        run.results.append(prune_to_budget(model, batches, config.target_params, widths=config.widths,
                                           round_to=config.round_to, criterion=config.criterion,
                                           damping=config.damping, progress=run.progress,
                                           activations=run.activations, parameters_dense=run.parameters_dense,
                                           planning_windows=config.planning_windows,
                                           heads=config.prunes_heads(model)))
        return model


@dataclass(frozen=True)
class StandardFormat:
    config: StandardFormatConfig = StandardFormatConfig()
    name: str = "standard-format"

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
        return standard_model(model, tie_embeddings=tie, head_input=sliced.head_input)


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


def check_steps(model: nn.Module, steps: list[Step], *, storage: BlockStorage | None = None) -> nn.Module:
    """Every step can apply to what the steps before it leave (with the blocks in `storage`, if given):
    refused in one line naming the step, before any calibration. Returns the structure the last step leaves."""
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
    run = Run(count_parameters(model), storage=storage)
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
        return [note for result in self.run.results if isinstance(result, PruneResult) for note in result.notes]


def compress(model: nn.Module, batches: Batches, steps: list[Step], *, progress: bool = True,
             activations: ActivationStore | None = None, storage: BlockStorage | None = None,
             calibration: dict[str, Any] | None = None, source_model: str | None = None) -> Compressed:
    """Applies `steps` in order to `model` (in place where they can) on the calibration `batches`, after
    checking the whole list (`check_steps`), and records the run in the result's layout: `calibration`
    (how the batches were drawn), `source_model` and the steps with their configs."""
    started = time.perf_counter()
    check_steps(model, steps, storage=storage)
    run = Run(count_parameters(model), progress, activations, storage)
    batches = check_batches(batches, model.get_input_embeddings().weight.shape[0])
    for step in steps:
        model = step.apply(model, batches, run)
    layout = layout_of(model.config)
    model.config.lmslice = layout.replace(
        calibration=calibration or layout.calibration,
        source_model=source_model or layout.source_model,
        steps=tuple({"step": step.name, **dataclasses.asdict(step.config)} for step in steps),
    ).to_json()
    return Compressed(model, run, time.perf_counter() - started)
