"""Compression modes compared at equal *real* size: each keeps about a fraction of the dense model's
parameters (`count_parameters`: every tensor once, a tied embedding once), so a report can plot
perplexity against what a user really gets.

A mode is a `Mode` in `MODES`: `supports` says whether the model's family can take it at all (the
report's default modes are the supported ones), and `steps` builds the pipeline steps (`lmslice.pipeline`)
that reach a budget, which `check` checks before any slow work and `compress` runs. Add a mode: add a
`Mode` to `MODES`.

Residual slicing keeps a width, not a parameter count, so the slicing modes search the widths (multiples
of `round_to`) for the widest whose real parameter count is at most the budget (a budget is a ceiling,
as for the pruning modes), counting each candidate on a weightless (meta-device) copy of the structure it
would have.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lmslice.adapters import find_adapter
from lmslice.errors import LmsliceError
from lmslice.export import check_family, standard_config
from lmslice.pipeline import (Compressed, Prune, PruneConfig, Slice, SliceConfig, StandardFormat, StandardFormatConfig,
                              Step, check_steps, compress)
from lmslice.prune import PruneResult, attention_of, plan_uniform
from lmslice.slicing import SliceResult, count_parameters, residual_width, sliced_skeleton

Batches = list[dict[str, torch.Tensor]]


def check_budget(target_params: float) -> None:
    if not 0 < target_params <= 1:
        raise LmsliceError(f"target_params must be in (0, 1], got {target_params:g}")


def sliced_parameters(model: nn.Module, width: int) -> int:
    """Real parameters of `model` sliced per block to `width` with the head sliced (SliceGPT's layout:
    shortcut matrices between blocks, the head untied from the embedding)."""
    return count_parameters(sliced_skeleton(model, width))


def standard_parameters(model: nn.Module, width: int) -> int:
    """Real parameters of `model` sliced with one basis to `width` and written in the standard format
    with an untied head: the family's own architecture at hidden size `width`, as `standard_config` writes it."""
    skeleton = sliced_skeleton(model, width)
    config = standard_config(skeleton, find_adapter(skeleton), tie_embeddings=False)
    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(config))


def widest_width_within(model: nn.Module, target_params: float, parameters: Callable[[nn.Module, int], int],
                        round_to: int) -> int:
    """The widest residual width (a multiple of `round_to`, below the model's) whose real parameter count,
    `parameters(model, width)`, is at most `target_params` of the dense model's. Refuses a budget that no
    width meets."""
    check_budget(target_params)
    if round_to < 1:
        raise LmsliceError(f"round_to must be a positive integer, got {round_to}")
    hidden = residual_width(model)
    dense = count_parameters(model)
    target = target_params * dense
    # The full width is left out: with its shortcut matrices and untied head it keeps more than the dense
    # model, so it never meets a budget, and a weightless copy cannot tell whether the head would be untied.
    widths = list(range(round_to, hidden, round_to))
    if not widths:
        raise LmsliceError(f"round_to {round_to} leaves no width to slice to below the residual width {hidden}")
    counts: dict[int, int] = {}

    def count(width: int) -> int:
        if width not in counts:
            counts[width] = parameters(model, width)
        return counts[width]

    # more width never means fewer parameters, so the first width over the budget is found by bisection
    over = bisect.bisect_right(widths, target, key=count)
    if over == 0:
        raise LmsliceError(f"slicing cannot reach {target_params:g} of the parameters: the narrowest residual "
                           f"width ({round_to}) keeps {count(widths[0]) / dense:.3f}")
    return widths[over - 1]


def sparsity_for_width(hidden: int, width: int) -> float:
    """The sparsity `slice_model` turns into exactly `width` < `hidden` (`sliced_width` rounds (1 - s)·D down)."""
    return 1 - (width + 0.5) / hidden


def describe_mlp(widths: list[int]) -> str:
    return f"MLP {widths[0]}" if len(set(widths)) == 1 else f"MLP {min(widths)}-{max(widths)}"


def _slicegpt(model: nn.Module, target_params: float, round_to: int) -> list[Step]:
    width = widest_width_within(model, target_params, sliced_parameters, round_to)
    return [Slice(SliceConfig(sparsity_for_width(residual_width(model), width), round_to, slice_head=True))]


def _standard(model: nn.Module, target_params: float, round_to: int) -> list[Step]:
    # transformers saves a hidden size only as a multiple of the query heads (see check_standard_width)
    round_to = math.lcm(round_to, model.config.num_attention_heads)
    width = widest_width_within(model, target_params, standard_parameters, round_to)
    return [Slice(SliceConfig(sparsity_for_width(residual_width(model), width), round_to, rotation="shared")),
            StandardFormat(StandardFormatConfig(tie_embeddings=False))]


def _prune(widths: str, heads: bool) -> Callable[[nn.Module, float, int], list[Step]]:
    def steps(model: nn.Module, target_params: float, round_to: int) -> list[Step]:
        return [Prune(PruneConfig(target_params, widths, heads, round_to))]

    return steps


def _describe_width(result: Compressed) -> str:
    return f"D'={result.result(SliceResult).width}"


def _describe_plan(result: Compressed) -> str:
    plan = result.result(PruneResult).plan
    heads = f", heads {min(plan.attention_heads)}-{max(plan.attention_heads)}" if plan.attention_heads else ""
    return describe_mlp(plan.mlp_widths) + heads


def _supports_slicing(model: nn.Module) -> None:
    reason = find_adapter(model).cannot_slice()
    if reason:
        raise LmsliceError(reason)


def _supports_standard(model: nn.Module) -> None:
    check_family(find_adapter(model))


def _supports_mlp(model: nn.Module) -> None:
    plan_uniform(model, 1.0)  # refuses families without known MLP channels, or with unequal MLP widths


def _supports_heads(model: nn.Module) -> None:
    _supports_mlp(model)
    attention_of(find_adapter(model))


@dataclass(frozen=True)
class Mode:
    """One way to compress a model to a real parameter budget: a list of pipeline steps.

    `supports(model)` raises `LmsliceError` if the model's family cannot take the mode; `steps(model,
    target_params, round_to)` are the steps that reach the budget (refusing, cheaply, one they cannot);
    `describe` says the shape a `compress` of them left, briefly.
    """

    name: str
    summary: str
    supports: Callable[[nn.Module], None]
    steps: Callable[[nn.Module, float, int], list[Step]]
    describe: Callable[[Compressed], str]

    def check(self, model: nn.Module, target_params: float, round_to: int) -> None:
        """Refuses, before any calibration, a budget this mode cannot meet on this model."""
        check_steps(model, self.steps(model, target_params, round_to))

    def compress(self, model: nn.Module, batches: Batches, target_params: float, *, round_to: int,
                 progress: bool) -> tuple[nn.Module, str]:
        """Compresses `model` (in place where the steps can) and returns the result and its shape."""
        result = compress(model, batches, self.steps(model, target_params, round_to), progress=progress)
        return result.model, self.describe(result)


MODES: dict[str, Mode] = {mode.name: mode for mode in (
    Mode("slicegpt", "SliceGPT: a basis per block joined by shortcut matrices, head sliced",
         _supports_slicing, _slicegpt, _describe_width),
    Mode("standard", "one basis for the whole stream, the family's own architecture (untied head)",
         _supports_standard, _standard, _describe_width),
    Mode("mlp-uniform", "MLP channels pruned with a least-squares refit, the same width in every block",
         _supports_mlp, _prune("uniform", heads=False), _describe_plan),
    Mode("mlp-measured", "MLP channels pruned with a least-squares refit, per-block widths by measured cost",
         _supports_mlp, _prune("measured", heads=False), _describe_plan),
    Mode("mlp-heads", "MLP channels and attention query heads pruned with least-squares refits, per block by "
         "measured cost", _supports_heads, _prune("measured", heads=True), _describe_plan),
)}


def parse_modes(text: str) -> list[str]:
    """Mode names from a comma-separated list, in order, each once; an unknown name is refused."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise LmsliceError("--modes is empty; give comma-separated mode names: " + ", ".join(MODES))
    unknown = [name for name in names if name not in MODES]
    if unknown:
        raise LmsliceError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    return names


def supported_modes(model: nn.Module) -> list[str]:
    """The modes this model's family can take, in registry order."""
    names = []
    for name, mode in MODES.items():
        try:
            mode.supports(model)
        except LmsliceError:
            continue
        names.append(name)
    return names


def check_frontier(model: nn.Module, modes: list[str], budgets: list[float], round_to: int) -> None:
    """Every (mode, budget) pair can be run on this model: refused in one line before the slow work."""
    for budget in budgets:
        check_budget(budget)
    for name in modes:
        try:
            MODES[name].supports(model)
            for budget in budgets:
                MODES[name].check(model, budget, round_to)
        except LmsliceError as error:
            raise LmsliceError(f"mode {name}: {error}") from error
