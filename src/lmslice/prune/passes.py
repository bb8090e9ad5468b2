"""The pruning passes over a model: blocks in order on the already-pruned stream (`prune_model`), and the
whole run from a budget (`prune_to_budget`: Fisher, plan, prune)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lmslice.adapters import find_adapter
from lmslice.calibration import capture_block_inputs
from lmslice.errors import LmsliceError
from lmslice.io.data import check_batches
from lmslice.layout import STANDARD
from lmslice.modeling import get_module
from lmslice.prune.config import PruneConfig
from lmslice.prune.measure import PLANNING_WINDOWS, consumer_sensitivity, first_windows, mlp_sensitivity
from lmslice.prune.plan import WidthPlan, check_pruning, plan_by_importance, plan_uniform
from lmslice.prune.shapes import (attention_of, attention_removable, expert_count, mlp_of, mlp_width_configs,
                                  mlp_writers)
from lmslice.prune.solvers import DEFAULT_CRITERION, DEFAULT_DAMPING, REFIT_DAMPING
from lmslice.prune.surgery import prune_block_heads, prune_block_mlp
from lmslice.slicing import layout_before
from lmslice.walk import Run, RunProgress, walk_blocks

# The walks over the blocks a budget takes: the Fisher forward, its backward (measuring the plan's paths
# with measured widths), and the pruning itself.
PASSES = 3


@dataclass
class PruneResult:
    family: str
    plan: WidthPlan
    seconds: float
    criterion: str
    damping: float
    kept_channels: list[list[int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the summary should say (blocks silent on the text)


@torch.no_grad()
def prune_model(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], plan: WidthPlan, *,
                criterion: str = DEFAULT_CRITERION, damping: float = DEFAULT_DAMPING, refit_consumer: bool = True,
                sensitivity: list[torch.Tensor] | None = None, head_sensitivity: list[torch.Tensor] | None = None,
                run: Run | None = None) -> PruneResult:
    """Prunes every block's MLP to the widths of `plan` (and its attention to the plan's query heads,
    first), in place, in order, each on the stream the pruned blocks before it produce (one walk over the
    blocks, wherever `run` places them); in a mixture of experts, the block's whole experts the plan
    removes go first. With equal MLP widths (and expert counts) and no heads pruned the model stays its own
    architecture (the config's intermediate size, and expert count, are updated); the plan is recorded in
    `model.config.lmslice`. `sensitivity` and `head_sensitivity` (`consumer_sensitivity`) weigh the output
    errors when choosing channels and heads."""
    start = time.perf_counter()
    run = run or Run(0)
    adapter = find_adapter(model)
    mlp = mlp_of(adapter)
    before = layout_before(model, adapter)
    model.eval()
    blocks = get_module(model, adapter.blocks)
    if len(plan.mlp_widths) != len(blocks):
        raise LmsliceError(f"the plan has {len(plan.mlp_widths)} MLP widths for {len(blocks)} blocks")
    batches = check_batches(batches, model.get_input_embeddings().weight.shape[0])
    streams = capture_block_inputs(model, adapter, batches, run.store())
    carried: dict[str, list] = {"kept_channels": [], "notes": []}  # what the result reports, block by block

    def prune_block(index: int, block: nn.Module) -> bool:
        if plan.attention_heads:
            prune_block_heads(block, attention_of(adapter), streams, plan.attention_heads[index], damping=damping,
                              output_weights=None if head_sensitivity is None else head_sensitivity[index],
                              removable=attention_removable(index, before))
        kept = prune_block_mlp(block, mlp, streams, plan.mlp_widths[index], criterion=criterion, damping=damping,
                               refit_consumer=refit_consumer,
                               experts=None if plan.expert_counts is None else plan.expert_counts[index],
                               output_weights=None if sensitivity is None else sensitivity[index],
                               notes=carried["notes"], name=f"block {index}")
        carried["kept_channels"].append(kept.tolist())
        return True

    walk_blocks(model, run, prune_block, "pruning", streams=streams, carried=carried)
    for stream in streams:
        stream.store.forget(stream.name)
    pruning = {"criterion": criterion, "damping": damping, "refit": refit_consumer, "refit_damping": REFIT_DAMPING,
               "fisher_weighted": sensitivity is not None, **plan.as_dict()}
    heads = tuple(plan.attention_heads) if plan.attention_heads else before.attention_heads
    layout = before.replace(mlp_pruning=pruning)
    # equal widths (and expert counts) where the config holds one (experts and a dense MLP each have their
    # own width field)
    configured: dict[str, set[int]] = {}
    for field_name, width in zip(mlp_width_configs(blocks, mlp), plan.mlp_widths):
        configured.setdefault(field_name, set()).add(width)
    expert_counts = [expert_count(block, mlp) for block in blocks] if mlp.experts is not None else []
    if any(expert_counts):
        configured[mlp.experts.count_config] = {count for count in expert_counts if count}
    equal = all(len(widths) == 1 for widths in configured.values())
    if equal and heads is None:
        for field_name, widths in configured.items():
            setattr(model.config, field_name, next(iter(widths)))
    if equal and heads is None and layout.stream is None:
        # equal widths are the family's own config: no remote code needed
        layout = layout.replace(export=STANDARD, mlp_widths=None, attention_heads=None, expert_counts=None)
    else:  # per-block widths or expert counts (or a sliced stream) need lmslice's layout (remote code)
        layout = layout.replace(export=None, mlp_widths=tuple(plan.mlp_widths), attention_heads=heads,
                                expert_counts=tuple(expert_counts) if any(expert_counts) else None)
    model.config.lmslice = layout.to_json()
    return PruneResult(adapter.family, plan, time.perf_counter() - start, criterion, damping,
                       carried["kept_channels"], carried["notes"])


def prune_blocks_to_budget(model: nn.Module, batches: list[dict[str, torch.Tensor]], config: PruneConfig,
                           run: Run) -> PruneResult:
    """Keeps `config.target_params` of `run.parameters_dense` (the dense model's real parameters; 0: the
    model's own) by pruning MLP channels (and query heads): the same width in every block ("uniform": the
    family's own architecture), or per-block widths from the measured cost of each block's cut
    ("measured": lmslice's layout). Channels are chosen by their Fisher-weighted output error either way;
    the Fisher and the widths are measured on the first `planning_windows` windows, block by block
    (`consumer_sensitivity`), then the blocks are pruned in one more walk."""
    start = time.perf_counter()
    adapter = find_adapter(model)
    heads = config.prunes_heads(model)
    parameters_dense = run.parameters_dense or None
    check_pruning(model, config.target_params, config.round_to, widths=config.widths, heads=heads,
                  parameters_dense=parameters_dense)
    batches = check_batches(batches, model.get_input_embeddings().weight.shape[0])
    mlp = mlp_of(adapter)
    attention = [attention_of(adapter).output] if heads else []
    consumers = mlp_writers(mlp) + attention
    planning = first_windows(batches, config.planning_windows)
    fisher_visits = 2 * len(get_module(model, adapter.blocks))  # its forward and backward walks
    if config.widths == "measured":
        plan, sensitivities = run.remembered("pruning plan", lambda: plan_by_importance(
            model, planning, config.target_params, round_to=config.round_to, heads=heads, damping=config.damping,
            parameters_dense=parameters_dense, run=run, whole_experts=config.whole_experts), visits=fisher_visits)
    else:
        plan = plan_uniform(model, config.target_params, config.round_to, parameters_dense=parameters_dense)
        sensitivities = run.remembered("fisher sensitivities", lambda: consumer_sensitivity(model, adapter, planning, consumers, run),
                                       visits=fisher_visits)
    result = prune_model(model, batches, plan, criterion=config.criterion, damping=config.damping,
                         sensitivity=mlp_sensitivity(sensitivities, mlp),
                         head_sensitivity=sensitivities[attention[0]] if heads else None, run=run)
    return replace(result, seconds=time.perf_counter() - start)  # the plan's passes count too


def prune_to_budget(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], target_params: float, *,
                    widths: str = "measured", round_to: int = 8, criterion: str = DEFAULT_CRITERION,
                    damping: float = DEFAULT_DAMPING, progress: bool = True, parameters_dense: int | None = None,
                    planning_windows: int = PLANNING_WINDOWS, heads: bool | None = None,
                    whole_experts: bool = False) -> PruneResult:
    """`prune_blocks_to_budget` with its settings as keywords (see `PruneConfig`), on a model in memory:
    keeps `target_params` of `parameters_dense` (default: the model's own parameters; give the dense
    model's when `model` was sliced first)."""
    config = PruneConfig(target_params, widths, heads, round_to, criterion, damping, planning_windows, whole_experts)
    run = Run(parameters_dense or 0, progress=RunProgress(progress))
    run.progress.expect(PASSES * len(get_module(model, find_adapter(model).blocks)))
    try:
        return prune_blocks_to_budget(model, batches, config, run)
    finally:
        run.progress.close()
