"""How a parameter budget is spent: uniform widths, or per-block widths and heads from each cut's measured
cost along its elimination path, taken greedily."""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lmslice.adapters import Experts, Mlp, ModelAdapter, find_adapter
from lmslice.errors import LmsliceError
from lmslice.modeling import experts_of, get_module
from lmslice.prune.measure import (Sensitivities, consumer_sensitivity, consumer_weight, expert_removal,
                                   sensitivity_weighted)
from lmslice.slicing import count_parameters, layout_before, skeleton_of
from lmslice.walk import Run
from lmslice.prune.shapes import (HeadShape, attention_of, attention_removable, channel_cost, check_consumer, mlp_of,
                                  expert_count, mlp_removable, mlp_removable_in, mlp_width, mlp_width_configs,
                                  mlp_writers, narrowest_width)
from lmslice.prune.solvers import (DEFAULT_DAMPING, ELIMINATION_DTYPE, InputRows, damped_inverse, eliminate,
                                   eliminate_from_rows, head_elimination)


WIDTHS = ("uniform", "measured")

# Channels per expert that keep its weights' rows a multiple of 16 bytes in 16-bit (and float32) precision, as
# transformers' default experts kernel (torch's grouped_mm) needs; its eager loop over the experts needs none.
GROUPED_EXPERTS_ROUND_TO = 8


@dataclass
class WidthPlan:
    """How a parameter budget is spent: the MLP width of every block. Stored in the output's config."""

    target_params: float  # fraction of the dense model's parameters to keep
    parameters_dense: int
    parameters_planned: int
    mlp_widths: list[int]
    round_to: int
    attention_heads: list[int] | None = None  # query heads per block, where heads are pruned too
    expert_counts: list[int] | None = None  # experts per block (0: none), where whole experts are removed

    @property
    def achieved(self) -> float:
        return self.parameters_planned / self.parameters_dense

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "achieved": self.achieved}


def check_pruning(model: nn.Module, target_params: float, round_to: int = 8, *, widths: str = "measured",
                  heads: bool = False, parameters_dense: int | None = None) -> None:
    """Refuses, before any calibration, what pruning cannot do to this model: a budget out of range or
    below what the narrowest MLPs (none with measured widths, `mlp_removable`; and, with `heads`, the
    fewest query heads each block's path reaches) keep, a family whose channels are unknown, a sliced
    model whose head was not sliced, or uniform widths for blocks that differ (an output pruned per
    block). `parameters_dense` is what `target_params` is a fraction of (default: the model's own
    parameters)."""
    if not 0 < target_params <= 1:
        raise LmsliceError(f"target_params must be in (0, 1], got {target_params}")
    if round_to < 1:
        raise LmsliceError(f"round_to must be a positive integer, got {round_to}")
    if widths not in WIDTHS:
        raise LmsliceError(f"unknown MLP widths {widths!r}; choose one of {', '.join(WIDTHS)}")
    adapter = find_adapter(model)
    mlp = mlp_of(adapter)
    blocks = list(get_module(model, adapter.blocks))
    for block in blocks:
        check_consumer(block, mlp)
    grouped = getattr(model.config, "_experts_implementation", None) != "eager"
    if grouped and round_to % GROUPED_EXPERTS_ROUND_TO and any(experts_of(block, mlp) is not None for block in blocks):
        raise LmsliceError(f"round_to {round_to}: transformers' grouped experts kernel (grouped_mm, its default) needs "
                           f"every expert's width a multiple of 16 bytes; round to a multiple of "
                           f"{GROUPED_EXPERTS_ROUND_TO} (--round-to {GROUPED_EXPERTS_ROUND_TO})")
    full = [mlp_width(block, mlp) for block in blocks]
    uneven = [group for group in _width_groups(blocks, mlp).values() if len({full[index] for index in group}) > 1]
    if widths == "uniform" and uneven:
        group_widths = [full[index] for index in uneven[0]]
        raise LmsliceError(f"the blocks' MLPs differ in width ({min(group_widths)}-{max(group_widths)}: pruned per "
                           "block); uniform pruning needs equal widths: use measured mlp_widths, or start from the "
                           "dense model")
    dense = parameters_dense or count_parameters(model)
    layout = layout_before(model, adapter)
    removable_mlps = [widths == "measured" and mlp_removable_in(block, mlp, layout) for block in blocks]
    whole_mlps = any(removable_mlps)
    narrow = [index for index, width in enumerate(full) if 0 < width <= round_to and removable_mlps[index]]
    if whole_mlps and narrow and count_parameters(model) > target_params * dense:
        raise LmsliceError(f"round_to {round_to} is no narrower than the MLP of block{'s' * (len(narrow) > 1)} "
                           f"{', '.join(map(str, narrow[:5]))}{' ...' if len(narrow) > 5 else ''} ({full[narrow[0]]} "
                           "channels): its only widths would be all or none (the whole MLP deleted); lower round_to "
                           "(--align gguf or none)")
    smallest = fewest_parameters(model, round_to, widths=widths, heads=heads)
    if smallest > target_params * dense:
        what = "no MLP" if whole_mlps else f"the narrowest MLP ({round_to} channels)"
        if heads:
            what += " and the fewest query heads" + ("" if attention_of(adapter).whole_groups
                                                     else " (one per key/value group)")
        raise LmsliceError(f"pruning MLP channels cannot reach {target_params:g} of the parameters: {what} keeps "
                           f"{smallest / dense:.3f}")


def fewest_parameters(model: nn.Module, round_to: int = 8, *, widths: str = "measured", heads: bool = False) -> int:
    """The fewest parameters pruning can leave in `model`: every MLP at its narrowest width (none where
    measured widths may delete it whole, `mlp_removable_in`) and, with `heads`, every block at the fewest
    query heads its path reaches."""
    adapter = find_adapter(model)
    mlp = mlp_of(adapter)
    blocks = list(get_module(model, adapter.blocks))
    layout = layout_before(model, adapter)
    removable = 0
    for block in blocks:
        width, whole = mlp_width(block, mlp), widths == "measured" and mlp_removable_in(block, mlp, layout)
        removable += (width - narrowest_width(width, round_to, whole)) * channel_cost(block, mlp)
    if heads:
        attention = attention_of(adapter)
        for block, shape in zip(blocks, head_shapes(model, adapter)):
            removable += sum(shape.step_costs(block, attention))
    return count_parameters(model) - removable


def per_block_skeleton(model: nn.Module, heads: bool) -> nn.Module:
    """A weightless copy of `model` recorded as pruned per block (its current MLP widths and expert counts,
    and query heads with `heads`): what a measured plan leaves, for the checks of the steps after it."""
    adapter = find_adapter(model)
    blocks = get_module(model, adapter.blocks)
    before = layout_before(model, adapter)
    attention_heads = tuple(HeadShape.of(block, attention_of(adapter)).heads for block in blocks) if heads \
        else before.attention_heads
    mlp = mlp_of(adapter)
    expert_counts = tuple(expert_count(block, mlp) for block in blocks) if mlp.experts is not None else None
    return skeleton_of(model, before.replace(export=None, mlp_widths=tuple(mlp_width(block, mlp) for block in blocks),
                                             attention_heads=attention_heads, expert_counts=expert_counts))


def plan_uniform(model: nn.Module, target_params: float, round_to: int = 8, *,
                 parameters_dense: int | None = None) -> WidthPlan:
    """The widest MLP width, the same in every block, that keeps at most `target_params` of
    `parameters_dense` (default: the model's own parameters; give the dense model's when `model` was
    already sliced): the full width, or a multiple of `round_to`. The plan then misses the budget by
    less than one rounding step (`round_to` channels in every block)."""
    check_pruning(model, target_params, round_to, widths="uniform", parameters_dense=parameters_dense)
    adapter = find_adapter(model)
    mlp = mlp_of(adapter)
    blocks = list(get_module(model, adapter.blocks))
    dense = parameters_dense or count_parameters(model)
    current = count_parameters(model)
    budget = target_params * dense
    groups = list(_width_groups(blocks, mlp).values())
    fulls = [mlp_width(blocks[group[0]], mlp) for group in groups]
    per_channel = [sum(channel_cost(blocks[index], mlp) for index in group) for group in groups]
    if current <= budget:
        group_widths = fulls
    elif len(groups) == 1:  # reachable (checked above), so at least round_to
        full, cost = fulls[0], per_channel[0]
        group_widths = [min(math.floor((budget - current + full * cost) / cost) // round_to * round_to,
                            full // round_to * round_to)]
    else:  # experts and a dense MLP (Qwen3-MoE's mlp_only_layers): each keeps the same fraction of its width
        def kept(fraction: float) -> list[int]:
            return [min(full, max(round_to, math.floor(fraction * full / round_to) * round_to)) for full in fulls]

        fractions = sorted({min(1.0, width / full) for full in fulls
                            for width in range(round_to, full + round_to, round_to)}, reverse=True)
        group_widths = next((kept(fraction) for fraction in fractions
                             if current - sum((full - width) * cost for full, width, cost in
                                              zip(fulls, kept(fraction), per_channel)) <= budget), kept(0.0))
    planned = current - sum((full - width) * cost for full, width, cost in zip(fulls, group_widths, per_channel))
    widths = [0] * len(blocks)
    for group, width in zip(groups, group_widths):
        for index in group:
            widths[index] = width
    return WidthPlan(target_params, dense, planned, widths, round_to)


def _width_groups(blocks: list[nn.Module], mlp: Mlp) -> dict[str, list[int]]:
    """The blocks whose MLP widths one config field holds, by field (experts and a dense MLP differ)."""
    groups: dict[str, list[int]] = {}
    for index, field_name in enumerate(mlp_width_configs(blocks, mlp)):
        groups.setdefault(field_name, []).append(index)
    return groups


@dataclass(frozen=True)
class CutPath:
    """One cut's elimination path (a block's MLP channels, its query heads or its whole experts): the output
    error after each step, the parameters each step removes, and the width (channels, heads or experts)
    each step leaves."""

    errors: list[float]
    costs: list[int]
    widths: list[int]


def plan_by_importance(model: nn.Module, batches: list[dict[str, torch.Tensor]], target_params: float, *,
                       round_to: int = 8, heads: bool = False, damping: float = DEFAULT_DAMPING,
                       parameters_dense: int | None = None, run: Run | None = None, weighted: bool = True,
                       whole_experts: bool = False) -> tuple[WidthPlan, Sensitivities]:
    """Per-block MLP widths (and with `heads`, query heads; in a mixture of experts, how many experts) within
    `target_params`, spent where they cost least; returns the plan and the sensitivities it was weighted
    by (for the pruning pass).

    On the dense model's calibration stream, each block's output error as a function of its cut is
    measured along the least-squares elimination path (`eliminate`, `round_to` channels a step;
    `head_elimination`, one query head from every key/value group a step, then whole groups;
    with `whole_experts`, `expert_removal`, one whole expert a step, the router routing among the rest), weighted
    (unless not `weighted`) by the diagonal Fisher of what the MLP and the attention write (the error then
    estimates the loss it costs, comparable across blocks and kinds of cut). The paths are measured in the
    Fisher's own backward walk (`consumer_sensitivity`), one block at a time. Steps are then taken
    greedily, the cheapest marginal error per parameter first, until the budget is met.
    """
    check_pruning(model, target_params, round_to, heads=heads, parameters_dense=parameters_dense)
    adapter = find_adapter(model)
    mlp = mlp_of(adapter)
    attention = attention_of(adapter) if heads else None
    blocks = get_module(model, adapter.blocks)
    dense = parameters_dense or count_parameters(model)
    whole_mlps = mlp_removable(layout_before(model, adapter))
    shapes = head_shapes(model, adapter) if attention is not None else []
    mlp_paths: list[CutPath | None] = [None] * len(blocks)
    head_paths: list[CutPath | None] = [None] * len(blocks)
    # whole experts: a path per block where the family has experts (empty in a block without them)
    expert_paths = [CutPath([], [], [])] * len(blocks) if mlp.experts is not None and whole_experts else []

    @torch.no_grad()
    def measure_paths(index: int, block: nn.Module, sensitivity: dict[str, torch.Tensor | None],
                      grams: dict[str, torch.Tensor | InputRows]) -> None:
        if attention is not None:
            shape = shapes[index]
            if shape.steps:
                weight = sensitivity_weighted(consumer_weight(get_module(block, attention.output)),
                                              sensitivity[attention.output])
                errors = head_elimination(weight, grams.pop(attention.output), shape, shape.steps, damping)[1]
                head_paths[index] = CutPath(errors, shape.step_costs(block, attention), shape.path()[1:])
            else:  # no attention left to cut
                head_paths[index] = CutPath([], [], [])
        experts = experts_of(block, mlp)
        if experts is not None:  # every expert keeps the same width: the block's error is theirs summed
            consumer = getattr(experts, mlp.experts.consumer)
            matrices = grams.pop(mlp.experts.module)
            paths = [mlp_path(sensitivity_weighted(consumer[expert].double(), sensitivity[mlp.experts.module]),
                              matrices[expert], consumer.shape[-1], round_to, channel_cost(block, mlp), damping)
                     for expert in range(consumer.shape[0])]
            mlp_paths[index] = CutPath([sum(errors) for errors in zip(*(path.errors for path in paths))],
                                       paths[0].costs, paths[0].widths)
            if expert_paths:
                expert_paths[index] = experts_path(block, mlp.experts, grams.pop(mlp.experts.router),
                                                   sensitivity[mlp.experts.module])
            return
        consumer = get_module(block, mlp.consumer)
        weight = sensitivity_weighted(consumer_weight(consumer), sensitivity[mlp.consumer])
        mlp_paths[index] = mlp_path(weight, grams.pop(mlp.consumer), consumer.in_features, round_to,
                                    channel_cost(block, mlp), damping, whole_mlps)

    consumers = mlp_writers(mlp) + ([attention.output] if attention is not None else [])
    sensitivities = consumer_sensitivity(model, adapter, batches, consumers, run, observe=measure_paths,
                                         grams=tuple(consumers), fisher=weighted, experts=mlp.experts,
                                         rows=(mlp.consumer,))
    paths = [path for path in mlp_paths + head_paths if path is not None] + expert_paths
    experts_from = len(paths) - len(expert_paths)
    current = count_parameters(model)
    budget = target_params * dense
    excess = current - budget

    def width(cut: int, full: int) -> int:
        return paths[cut].widths[steps[cut] - 1] if steps[cut] else full

    while True:
        steps = spend(paths, excess, target_params)
        widths = [width(cut, mlp_width(block, mlp)) for cut, block in enumerate(blocks)]
        attention_heads = [width(len(blocks) + cut, shape.heads) for cut, shape in enumerate(shapes)]
        expert_counts = [width(experts_from + index, expert_count(block, mlp))
                         for index, block in enumerate(blocks)] if expert_paths else []
        # A block's channels and its whole experts are two paths whose costs overlap: a channel step counts
        # the channel in every expert, a removed expert all its channels, so once both are cut the
        # removed experts' removed channels were counted twice. The greedy order does not depend on the
        # excess: ask it for more until what the plan really leaves is within the budget.
        planned = current - sum(sum(path.costs[:taken]) for path, taken in zip(paths, steps)) + sum(
            _counted_twice(block, mlp, kept, count) for block, kept, count in zip(blocks, widths, expert_counts)
            if count)
        if planned <= budget:
            break
        excess += planned - budget
    return WidthPlan(target_params, dense, planned, widths, round_to, attention_heads or None,
                     expert_counts or None), sensitivities


def _counted_twice(block: nn.Module, mlp: Mlp, width: int, count: int) -> int:
    """The parameters both a block's channel path and its expert path count as removed: the removed
    experts' removed channels."""
    return (expert_count(block, mlp) - count) * (mlp_width(block, mlp) - width) * (
        channel_cost(block, mlp) // expert_count(block, mlp))


def experts_path(block: nn.Module, paths: Experts, tokens: torch.Tensor, sensitivity: torch.Tensor | None) -> CutPath:
    """The block's whole experts removed one at a time, the cheapest first (`expert_removal`, on the
    router's inputs `tokens`, weighted by the Fisher `sensitivity`), down to as many as a token is routed
    to; each step removes one expert's weights and its router row."""
    experts = get_module(block, paths.module)
    _, errors = expert_removal(block, paths, tokens, sensitivity)
    count = getattr(experts, paths.count_attribute)
    cost = (getattr(experts, paths.producers)[0].numel() + getattr(experts, paths.consumer)[0].numel()
            + get_module(block, paths.router).weight.shape[1])
    return CutPath(errors, [cost] * len(errors), [count - removed for removed in range(1, len(errors) + 1)])


def spend(paths: list[CutPath], excess: float, target_params: float) -> list[int]:
    """How many steps of each path to take to remove at least `excess` parameters, the step of least
    marginal error per parameter first (ties: the earlier path). Each path's next step waits in a heap."""

    def marginal(cut: int, step: int) -> float:
        errors, costs = paths[cut].errors, paths[cut].costs
        before = errors[step - 1] if step else 0.0
        return (errors[step] - before) / costs[step]

    steps = [0] * len(paths)
    waiting = [(marginal(cut, 0), cut) for cut, path in enumerate(paths) if path.errors]
    heapq.heapify(waiting)
    removed = 0
    while removed < excess:
        if not waiting:  # every path is at its end (check_pruning makes this unreachable)
            raise LmsliceError(f"pruning cannot reach {target_params:g} of the parameters: every block is at its "
                               "narrowest")
        _, cut = heapq.heappop(waiting)
        removed += paths[cut].costs[steps[cut]]
        steps[cut] += 1
        if steps[cut] < len(paths[cut].errors):
            heapq.heappush(waiting, (marginal(cut, steps[cut]), cut))
    return steps


def head_shapes(model: nn.Module, adapter: ModelAdapter) -> list[HeadShape]:
    """Each block's heads, and how far its path goes (its whole attention where `attention_removable`)."""
    layout = layout_before(model, adapter)
    attention = attention_of(adapter)
    return [HeadShape.of(block, attention, attention_removable(index, layout))
            for index, block in enumerate(get_module(model, adapter.blocks))]


def mlp_path(weight: torch.Tensor, gram: torch.Tensor | InputRows, channels: int, round_to: int, cost: int,
             damping: float, removable: bool = False) -> CutPath:
    """One MLP's elimination path (`eliminate`) at the widths a plan may leave: the multiples of `round_to`
    below `channels`, down to `round_to`, then with `removable` none (the whole MLP). Returns the output
    error at each, the parameters each step removes (`cost` per channel) and the widths. The path is
    measured in about 32 steps (in ELIMINATION_DTYPE) and interpolated. `gram` (G of the consumer's input,
    undamped; damped here by `damping`) is let go once inverted; given as the inputs themselves (fewer
    tokens than channels), the path is `eliminate_from_rows`'s, which never forms G."""
    widths = list(range((channels - 1) // round_to * round_to, round_to - 1, -round_to)) + [0] * removable
    curve: list[float] = []
    if widths:
        remove = channels - widths[-1]
        chunk = math.ceil(remove / round_to / 32) * round_to
        weight = weight.to(ELIMINATION_DTYPE)
        if isinstance(gram, InputRows):
            errors = eliminate_from_rows(weight, gram, remove, chunk, damping)
        else:
            inverse = damped_inverse(gram, channels, damping)
            del gram
            # removing every channel in steps ends where deleting them at once does (the path's end is
            # independent of its order): the whole MLP's point needs no second factorisation
            errors = eliminate(weight, inverse, channels, remove, chunk)[1]
        positions = [min((step + 1) * chunk, remove) for step in range(len(errors))]
        curve = [_interpolate(positions, errors, channels - kept) for kept in widths]
    costs = [(before - kept) * cost for before, kept in zip([channels] + widths, widths)]
    return CutPath(curve, costs, widths)


def _interpolate(positions: list[int], values: list[float], position: float) -> float:
    """values[k] sits at positions[k] (increasing), 0 at position 0; linear in between."""
    below = bisect.bisect_left(positions, position)
    if below < len(positions) and positions[below] == position:
        return values[below]
    low_position, low = (positions[below - 1], values[below - 1]) if below else (0, 0.0)
    if below >= len(positions):
        return values[-1]
    return low + (values[below] - low) * (position - low_position) / (positions[below] - low_position)
