"""The pruning passes over a model: blocks in order on the already-pruned stream (`prune_model`), and the
whole run from a budget (`prune_to_budget`: Fisher, plan, prune)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from lmslice.adapters import find_adapter
from lmslice.calibration import ActivationStore, capture_block_inputs
from lmslice.errors import LmsliceError
from lmslice.io.data import check_batches
from lmslice.io.models import check_finite
from lmslice.layout import STANDARD
from lmslice.modeling import get_module
from lmslice.prune.measure import PLANNING_WINDOWS, consumer_sensitivity, first_windows
from lmslice.prune.plan import WidthPlan, check_pruning, plan_by_importance, plan_uniform
from lmslice.prune.shapes import attention_of, attention_removable, mlp_of
from lmslice.prune.solvers import DEFAULT_CRITERION, DEFAULT_DAMPING, REFIT_DAMPING
from lmslice.prune.surgery import prune_block_heads, prune_block_mlp
from lmslice.slicing import layout_before


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
                progress: bool = True, activations: ActivationStore | None = None) -> PruneResult:
    """Prunes every block's MLP to the widths of `plan` (and its attention to the plan's query heads,
    first), in place, in order, each on the stream the pruned blocks before it produce. With equal MLP
    widths and no heads pruned the model stays its own architecture (the config's intermediate size is
    updated); the plan is recorded in `model.config.lmslice`. `sensitivity` and `head_sensitivity`
    (`consumer_sensitivity`) weigh the output errors when choosing channels and heads."""
    start = time.perf_counter()
    adapter = find_adapter(model)
    mlp = mlp_of(adapter)
    before = layout_before(model, adapter)
    model.eval()
    blocks = get_module(model, adapter.blocks)
    if len(plan.mlp_widths) != len(blocks):
        raise LmsliceError(f"the plan has {len(plan.mlp_widths)} MLP widths for {len(blocks)} blocks")
    batches = check_batches(batches, model.get_input_embeddings().weight.shape[0])
    streams = capture_block_inputs(model, adapter, batches, activations or ActivationStore())
    kept_channels: list[list[int]] = []
    notes: list[str] = []
    for index, block in enumerate(tqdm(blocks, desc="pruning", unit="block", disable=not progress)):
        name = f"block {index}"
        if plan.attention_heads:
            prune_block_heads(block, attention_of(adapter), streams, plan.attention_heads[index], damping=damping,
                              output_weights=None if head_sensitivity is None else head_sensitivity[index],
                              removable=attention_removable(index, before))
        kept = prune_block_mlp(block, mlp, streams, plan.mlp_widths[index], criterion=criterion, damping=damping,
                               refit_consumer=refit_consumer,
                               output_weights=None if sensitivity is None else sensitivity[index],
                               notes=notes, name=name)
        check_finite(block, f"{adapter.blocks}.{index}.", after=f"pruning {name}")
        kept_channels.append(kept.tolist())
    pruning = {"criterion": criterion, "damping": damping, "refit": refit_consumer, "refit_damping": REFIT_DAMPING,
               "fisher_weighted": sensitivity is not None, **plan.as_dict()}
    heads = tuple(plan.attention_heads) if plan.attention_heads else before.attention_heads
    layout = before.replace(mlp_pruning=pruning)
    if len(set(plan.mlp_widths)) == 1 and heads is None:
        setattr(model.config, mlp.width_config, plan.mlp_widths[0])
    if len(set(plan.mlp_widths)) == 1 and heads is None and layout.stream is None:
        # equal widths are the family's own config: no remote code needed
        layout = layout.replace(export=STANDARD, mlp_widths=None, attention_heads=None)
    else:  # per-block widths (or a sliced stream) need lmslice's layout (remote code)
        layout = layout.replace(export=None, mlp_widths=tuple(plan.mlp_widths), attention_heads=heads)
    model.config.lmslice = layout.to_json()
    return PruneResult(adapter.family, plan, time.perf_counter() - start, criterion, damping, kept_channels, notes)


def prune_to_budget(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], target_params: float, *,
                    widths: str = "measured", round_to: int = 8, criterion: str = DEFAULT_CRITERION,
                    damping: float = DEFAULT_DAMPING, progress: bool = True,
                    activations: ActivationStore | None = None, parameters_dense: int | None = None,
                    planning_windows: int = PLANNING_WINDOWS, heads: bool | None = None) -> PruneResult:
    """Keeps `target_params` of the model's real parameters by pruning MLP channels: the same width in
    every block ("uniform": the family's own architecture), or per-block widths from the measured cost
    of each block's cut ("measured": lmslice's layout). Channels are chosen by their Fisher-weighted
    output error either way; the Fisher and the widths are measured on the first `planning_windows`
    windows. `parameters_dense` is what `target_params` is a fraction of (default: the model's own
    parameters; give the dense model's when `model` was sliced first). With `heads` (measured widths
    only; by default wherever the family's heads are known), query heads compete with MLP channels for
    the budget too: SmolLM2-135M at 0.9 / 0.8 / 0.7 / 0.6 of its parameters (pydoc calibration, with the
    damping before DEFAULT_DAMPING's), perplexity 1.050 / 1.178 / 1.477 / 1.953 x dense with heads, 1.050 /
    1.201 / 1.505 / 2.008 without."""
    start = time.perf_counter()
    adapter = find_adapter(model)
    if heads is None:
        heads = widths == "measured" and adapter.attention is not None
    if heads and widths != "measured":
        raise LmsliceError("pruning attention heads needs per-block widths (measured mlp_widths)")
    if planning_windows < 1:
        raise LmsliceError(f"planning needs at least one calibration window, got {planning_windows}")
    batches = check_batches(batches, model.get_input_embeddings().weight.shape[0])
    check_pruning(model, target_params, round_to, widths=widths, heads=heads, parameters_dense=parameters_dense)
    plan = plan_uniform(model, target_params, round_to, parameters_dense=parameters_dense) if widths == "uniform" \
        else None
    consumers = [mlp_of(adapter).consumer] + ([attention_of(adapter).output] if heads else [])
    planning = first_windows(batches, planning_windows)
    sensitivities = consumer_sensitivity(model, adapter, planning, consumers)
    sensitivity = sensitivities[consumers[0]]
    head_sensitivity = sensitivities[consumers[1]] if heads else None
    if widths == "measured":
        plan = plan_by_importance(model, planning, target_params, round_to=round_to, sensitivity=sensitivity,
                                  head_sensitivity=head_sensitivity, heads=heads, damping=damping,
                                  activations=activations, parameters_dense=parameters_dense)
    result = prune_model(model, batches, plan, criterion=criterion, damping=damping, sensitivity=sensitivity,
                         head_sensitivity=head_sensitivity, progress=progress, activations=activations)
    return replace(result, seconds=time.perf_counter() - start)  # the plan's passes count too
