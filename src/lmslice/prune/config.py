"""The settings of one pruning run, validated once, when they are made."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmslice.adapters import find_adapter
from lmslice.errors import LmsliceError
from lmslice.prune.measure import PLANNING_WINDOWS
from lmslice.prune.plan import WIDTHS
from lmslice.prune.solvers import CRITERIA, DEFAULT_CRITERION, DEFAULT_DAMPING


@dataclass(frozen=True)
class PruneConfig:
    """Structured pruning to `target_params` of the dense model's real parameters: MLP channels (and, with
    `heads`, query heads; None: wherever the family's heads are known and widths are measured), chosen by
    `criterion`, the layer reading them refit by least squares with `damping`; the same width in every
    block (`widths` "uniform") or per-block widths from the measured cost ("measured"), in multiples of
    `round_to`, planned on the first `planning_windows` calibration windows. With `whole_experts`, in a
    mixture of experts, whole experts compete for the budget too (off by default: docs/families.md)."""

    target_params: float
    widths: str = "measured"
    heads: bool | None = None
    round_to: int = 8
    criterion: str = DEFAULT_CRITERION
    damping: float = DEFAULT_DAMPING
    planning_windows: int = PLANNING_WINDOWS
    whole_experts: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.target_params <= 1:
            raise LmsliceError(f"target_params must be in (0, 1], got {self.target_params:g}")
        if self.round_to < 1:
            raise LmsliceError(f"round_to must be a positive integer, got {self.round_to}")
        if self.widths not in WIDTHS:
            raise LmsliceError(f"unknown MLP widths {self.widths!r}; choose one of {', '.join(WIDTHS)}")
        if self.criterion not in CRITERIA:
            raise LmsliceError(f"unknown channel criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.whole_experts and self.widths != "measured":
            raise LmsliceError("removing whole experts needs per-block widths (measured mlp_widths)")
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
