"""Structured pruning of MLP channels (and attention query heads) with a least-squares refit of the
layer that reads them.

A channel of an MLP is one output row of each producer (gate and up projections, or fc1) and the
matching input column of the consumer (down projection, or fc2). Deleting channels makes the MLP
narrower; the model stays the family's own architecture with a smaller intermediate size. A query
head is head_dim rows of the query projection and the matching columns of the output projection, its
consumer; heads leave one from every key/value group at a time, so keys and values stay.

Blocks are pruned in order on the already-pruned calibration stream: for each block, the Gram matrix
G = Σ hᵀh (float64) of the consumer's input is accumulated over the calibration tokens, channels are
chosen from it, the consumer is refit by damped least squares to reproduce what it wrote with every
channel (W·G[:, S]·(G[S, S] + λI)⁻¹), and the stream is carried on to the *finished* block's output, so
the next block sees what the pruned model will really feed it.

The output error is weighted per feature by the diagonal Fisher of what the consumer writes into the
residual stream (one backward pass of the dense model on the calibration text), which makes it an
estimate of the loss a cut costs: it chooses the channels and heads, and, comparable across blocks and
kinds of cut, it spends a budget on per-block widths.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lmslice.adapters import Attention, Mlp, ModelAdapter, find_adapter
from lmslice.calibration import ActivationStore, BlockInput, StopForward, capture_block_inputs, run_block, walk
from lmslice.errors import LmsliceError
from lmslice.io.models import check_finite
from lmslice.layout import STANDARD
from lmslice.modeling import get_module
from lmslice.slicing import count_parameters, layout_before, skeleton_of

CRITERIA = ("obs", "energy", "leverage")
DEFAULT_CRITERION = "obs"
# λ = DEFAULT_DAMPING · mean diag G where channels and heads are chosen (OBS on G + λI), REFIT_DAMPING · mean
# diag G[S, S] in the consumer's refit toward its own weights (`refit`): the objective ‖ΔY‖² + λ‖ΔW‖².
# SmolLM2-135M at 0.8 of its parameters, calibrated on WikiText-2 (32 x 256), perplexity ratio to dense on
# WikiText-2 / pydoc (benchmarks/cross_domain.py), choice / refit λ: 1.680 / 2.161 at 0.1 / 0.3; 1.694 /
# 2.163 at 0.3 / 0.3, 1.695 / 2.216 at 0.1 / 0.1, 1.922 / 2.234 at 1 / 1, 1.783 / 3.310 at 0.01 / 0.3; the
# ridge toward zero at 0.01 (the default before) 1.929 / 4.026. A larger λ makes the choice see less of
# the calibration text's own correlations. In-domain at 0.6 / 0.9: 3.687 / 1.244 (before 3.839 / 1.323;
# 0.3 / 0.3: 4.000 / 1.273). Calibrated on pydoc, at 0.8, WikiText-2 / pydoc: 3.046 / 1.182 (before 4.219 / 1.178).
DEFAULT_DAMPING = 0.1
REFIT_DAMPING = 0.3
WIDTHS = ("uniform", "measured")


def mlp_of(adapter: ModelAdapter) -> Mlp:
    if adapter.mlp is None:
        raise LmsliceError(f"lmslice does not know where the MLP channels of {adapter.family} models are")
    return adapter.mlp


def mlp_width(block: nn.Module, mlp: Mlp) -> int:
    return get_module(block, mlp.consumer).in_features


def channel_cost(block: nn.Module, mlp: Mlp) -> int:
    """Parameters one MLP channel of `block` holds: a row (and bias entry) of each producer, a consumer column."""
    cost = get_module(block, mlp.consumer).out_features
    for path in mlp.producers:
        producer = get_module(block, path)
        cost += mlp.fused * (producer.in_features + (producer.bias is not None))
    return cost


@dataclass
class WidthPlan:
    """How a parameter budget is spent: the MLP width of every block. Stored in the output's config."""

    target_params: float  # fraction of the dense model's parameters to keep
    parameters_dense: int
    parameters_planned: int
    mlp_widths: list[int]
    round_to: int
    attention_heads: list[int] | None = None  # query heads per block, where heads are pruned too

    @property
    def achieved(self) -> float:
        return self.parameters_planned / self.parameters_dense

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "achieved": self.achieved}


def narrowest_width(width: int, round_to: int) -> int:
    """The narrowest MLP a plan leaves a block of `width` channels: `round_to` channels, or all of them
    where the MLP is no wider than that."""
    return min(width, round_to)


def check_pruning(model: nn.Module, target_params: float, round_to: int = 8, *, widths: str = "measured",
                  heads: bool = False, parameters_dense: int | None = None) -> None:
    """Refuses, before any calibration, what pruning cannot do to this model: a budget out of range or
    below what the narrowest MLPs (and, with `heads`, one query head per key/value group) keep, a family
    whose channels are unknown, a sliced model whose head was not sliced, or uniform widths for blocks
    that differ (an output pruned per block). `parameters_dense` is what `target_params` is a fraction of
    (default: the model's own parameters)."""
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
    full = [mlp_width(block, mlp) for block in blocks]
    if widths == "uniform" and len(set(full)) > 1:
        raise LmsliceError(f"the blocks' MLPs differ in width ({min(full)}-{max(full)}: pruned per block); uniform "
                           "pruning needs equal widths: use measured mlp_widths, or start from the dense model")
    dense = parameters_dense or count_parameters(model)
    removable = sum((width - narrowest_width(width, round_to)) * channel_cost(block, mlp)
                    for width, block in zip(full, blocks))
    if heads:
        attention = attention_of(adapter)
        for block in blocks:
            shape = HeadShape.of(block, attention)
            removable += (shape.heads // shape.groups - 1) * shape.step_cost(block, attention)
    smallest = count_parameters(model) - removable
    if smallest > target_params * dense:
        what = f"the narrowest MLP ({round_to} channels)" + (" and one query head per key/value group" if heads else "")
        raise LmsliceError(f"pruning MLP channels cannot reach {target_params:g} of the parameters: {what} keeps "
                           f"{smallest / dense:.3f}")


def per_block_skeleton(model: nn.Module, heads: bool) -> nn.Module:
    """A weightless copy of `model` recorded as pruned per block (its current MLP widths, and query heads
    with `heads`): what a measured plan leaves, for the checks of the steps after it."""
    adapter = find_adapter(model)
    blocks = get_module(model, adapter.blocks)
    before = layout_before(model, adapter)
    attention_heads = tuple(HeadShape.of(block, attention_of(adapter)).heads for block in blocks) if heads \
        else before.attention_heads
    return skeleton_of(model, before.replace(export=None, mlp_widths=tuple(mlp_width(block, mlp_of(adapter))
                                                                             for block in blocks),
                                             attention_heads=attention_heads))


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
    full = mlp_width(blocks[0], mlp)
    per_channel = sum(channel_cost(block, mlp) for block in blocks)
    budget = target_params * dense
    if current <= budget:
        width = full
    else:  # reachable (checked above), so at least round_to
        width = min(math.floor((budget - current + full * per_channel) / per_channel) // round_to * round_to,
                    full // round_to * round_to)
    planned = current - (full - width) * per_channel
    return WidthPlan(target_params, dense, planned, [width] * len(blocks), round_to)


def observe_consumer(block: nn.Module, path: str, streams: list[BlockInput], *, keep_inputs: bool = False,
                     advance: bool = True) -> torch.Tensor:
    """Runs the block on every stream, which moves on to the block's output, and returns G = Σ h hᵀ
    (float64) of the input h of the block's linear layer at `path` (the consumer) over the calibration
    tokens, with a constant 1 appended to h when the consumer has a bias (so a refit can move the bias
    too). With `keep_inputs`, each stream keeps h beside it (`consumer_input`), so that a pruned
    consumer's change can be added to the output without running the block again. Without `advance`,
    the block runs only up to the consumer and the streams stay where they are.

    Each batch's product is taken in float32 and summed in float64: on SmolLM2-135M that is 3.7x
    faster than float64 throughout, at a relative difference of 5e-8 in G."""
    consumer = get_module(block, path)
    width = consumer.in_features + (consumer.bias is not None)
    matrix = torch.zeros(width, width, dtype=torch.float64, device=consumer.weight.device)

    def accumulate(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], stream: BlockInput) -> None:
        hidden = args[0]
        rows = hidden.reshape(-1, hidden.shape[-1])[stream.mask.reshape(-1).to(hidden.device)].float()
        if consumer.bias is not None:
            rows = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
        matrix.add_(rows.T @ rows)
        if not advance:
            raise StopForward
        if keep_inputs:
            stream.store.put(consumer_input(stream), hidden)

    def forward(stream: BlockInput) -> None:
        stream.hidden = run_block(block, stream, stream.hidden)

    walk(streams, forward, [(consumer, accumulate)])
    return matrix


def consumer_input(stream: BlockInput) -> str:
    return f"{stream.name}-consumer-input"


def output_sensitivity(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                       ) -> list[torch.Tensor]:
    """`consumer_sensitivity` of every block's MLP consumer."""
    consumer = mlp_of(adapter).consumer
    return consumer_sensitivity(model, adapter, batches, [consumer])[consumer]


@torch.no_grad()
def consumer_sensitivity(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                         paths: list[str]) -> dict[str, list[torch.Tensor]]:
    """For each linear layer `path` of every block that writes the residual stream, Σ over the
    calibration tokens of (∂L/∂y)² for each feature y it writes (L: the mean next-token loss of the
    model), float64, from one backward pass: the diagonal Fisher that turns an error in what the layer
    writes into an estimate of the loss it costs, comparable across blocks. For an MLP consumer of a
    dense model this is the Fisher of the block's output."""
    blocks = get_module(model, adapter.blocks)
    sums: dict[str, list[torch.Tensor | None]] = {path: [None] * len(blocks) for path in paths}

    def track(path: str, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            def accumulate(gradient: torch.Tensor) -> None:
                squares = gradient.double().pow(2).reshape(-1, gradient.shape[-1]).sum(dim=0)
                total = sums[path][index]
                sums[path][index] = squares if total is None else total + squares

            output.register_hook(accumulate)
        return hook

    def make_differentiable(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.requires_grad_()

    handles = [get_module(block, path).register_forward_hook(track(path, index))
               for path in paths for index, block in enumerate(blocks)]
    handles.append(blocks[0].register_forward_pre_hook(make_differentiable, with_kwargs=True))
    device = model.get_input_embeddings().weight.device
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:  # gradients flow to the activations only
        parameter.requires_grad_(False)
    try:
        with torch.enable_grad():
            # One window at a time: the vocabulary-wide logits and their gradient dominate the memory
            # (SmolLM2-135M, batches of 8 x 256: 5.5 GiB peak). The loss is summed over tokens, so the
            # result does not depend on how the windows are batched.
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask", torch.ones_like(ids)).to(device)
                for row, row_mask in zip(ids.split(1), mask.split(1)):
                    labels = row.masked_fill(row_mask == 0, -100)
                    loss = model(input_ids=row, attention_mask=row_mask, labels=labels, use_cache=False).loss
                    (loss * (labels[:, 1:] != -100).sum()).backward()
    finally:
        for handle in handles:
            handle.remove()
        for parameter in trainable:
            parameter.requires_grad_(True)
    return sums


def consumer_weight(consumer: nn.Linear) -> torch.Tensor:
    """[W b] in float64: the bias is the weight of the constant channel that `observe_consumer` appends."""
    weight = consumer.weight.double()
    return weight if consumer.bias is None else torch.cat([weight, consumer.bias.double()[:, None]], dim=1)


def damping_shift(matrix: torch.Tensor, channels: int, damping: float) -> torch.Tensor:
    """λ = damping · the mean of the first `channels` diagonal entries of G (not the constant one's), or
    λ = damping where that mean is 0: an MLP whose input is all zero (G = 0) then refits its consumer to
    its own weights (it wrote zero and still does) instead of inverting a zero matrix."""
    mean = matrix.diagonal()[:channels].mean()
    return damping * (mean if mean > 0 else torch.ones_like(mean))


def damped(matrix: torch.Tensor, channels: int, damping: float) -> torch.Tensor:
    """G + λI on the first `channels` entries (`damping_shift`)."""
    result = matrix.clone()
    result.diagonal()[:channels] += damping_shift(matrix, channels, damping)
    return result


def silent_inputs(matrix: torch.Tensor, channels: int) -> bool:
    """Whether the consumer's input was zero on every calibration token (G = 0)."""
    return not bool(matrix.diagonal()[:channels].any())


def keep_channels(weight: torch.Tensor, matrix: torch.Tensor, channels: int, keep: int, criterion: str,
                  damping: float) -> torch.Tensor:
    """The sorted indices of the `keep` channels to keep out of `channels`.

    - "energy": what each channel writes, alone: G_jj · ‖W[:, j]‖².
    - "leverage": ridge leverage of each channel's activations, diag(G (G + λI)⁻¹) (as MoDeGPT);
      blind to the consumer's weights.
    - "obs": greedy backward elimination, optimal-brain-surgeon style: remove the channels whose
      deletion, with the others refit by least squares, raises the output error least
      (‖W[:, j]‖² / (G⁻¹)_jj), update W and G⁻¹, repeat.
    """
    if criterion not in CRITERIA:
        raise LmsliceError(f"unknown channel criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if keep >= channels:
        return torch.arange(channels, device=matrix.device)
    regularised = damped(matrix, channels, damping)
    if criterion == "energy":
        scores = matrix.diagonal()[:channels] * weight[:, :channels].pow(2).sum(0)
    elif criterion == "leverage":
        inverse = torch.linalg.inv(regularised)
        scores = (matrix @ inverse).diagonal()[:channels]
    else:
        return _obs_keep(weight, regularised, channels, keep)
    return torch.sort(torch.topk(scores, keep).indices).values


def _obs_keep(weight: torch.Tensor, regularised: torch.Tensor, channels: int, keep: int) -> torch.Tensor:
    # Channels leave in steps of about 1/16 of the cut: 16 block updates instead of one per channel.
    # SmolLM2-135M, 1536 -> 1016 channels: output error within 0.15% of 64 steps, in half the time.
    return obs_elimination(weight, regularised, channels, channels - keep, max(1, math.ceil((channels - keep) / 16)))[0]


def obs_elimination(weight: torch.Tensor, regularised: torch.Tensor, channels: int, remove: int, step: int,
                    ) -> tuple[torch.Tensor, list[float]]:
    """Removes `remove` channels, `step` at a time: each step the cheapest by their single-channel cost
    ‖W[:, j]‖² / (G⁻¹)_jj, then W and G⁻¹ are updated jointly for the removed set and shrunk to the
    channels left (so later steps cost less). Returns the kept channels and the output error
    (tr ΔW G ΔWᵀ) after each step."""
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(regularised))
    weight = weight.clone()
    alive = torch.arange(len(inverse), device=inverse.device)  # the channels the rows of `inverse` stand for
    errors: list[float] = []
    error = 0.0
    while remove > 0:
        costs = weight.pow(2).sum(0) / inverse.diagonal().clamp_min(torch.finfo(inverse.dtype).tiny)
        costs[alive >= channels] = math.inf  # the constant channel of a bias is never removed
        removed = torch.topk(costs, min(step, remove), largest=False).indices
        error += remove_jointly(weight, inverse, removed)
        errors.append(error)
        left = torch.ones(len(alive), dtype=torch.bool, device=alive.device)
        left[removed] = False
        alive, weight, inverse = alive[left], weight[:, left], inverse[left][:, left]
        remove -= len(removed)
    return alive[alive < channels], errors


def remove_jointly(weight: torch.Tensor, inverse: torch.Tensor, removed: torch.Tensor) -> float:
    """Removes the input columns `removed` of W with the others refit by least squares: updates W and
    G⁻¹ in place (the removed entries become zero) and returns the output error that adds,
    tr(W_S ((G⁻¹)_SS)⁻¹ W_Sᵀ)."""
    pivot = torch.linalg.inv(inverse[removed][:, removed])
    added = torch.trace(weight[:, removed] @ pivot @ weight[:, removed].T).item()
    weight -= weight[:, removed] @ pivot @ inverse[removed]
    inverse -= inverse[:, removed] @ pivot @ inverse[removed]
    return added


def attention_of(adapter: ModelAdapter) -> Attention:
    if adapter.attention is None:
        raise LmsliceError(f"lmslice does not know where the query heads of {adapter.family} models are")
    return adapter.attention


@dataclass(frozen=True)
class HeadShape:
    """A block's query heads: `heads` of `head_dim` features, in `groups` key/value groups (HF orders
    the heads group by group)."""

    heads: int
    head_dim: int
    groups: int

    @classmethod
    def of(cls, block: nn.Module, attention: Attention) -> HeadShape:
        module = get_module(block, attention.module)
        heads = get_module(block, attention.queries).out_features // module.head_dim
        return cls(heads, module.head_dim, heads // module.num_key_value_groups)

    def columns(self, heads: list[int], device: torch.device) -> torch.Tensor:
        return torch.cat([torch.arange(head * self.head_dim, (head + 1) * self.head_dim, device=device)
                          for head in heads])

    def step_cost(self, block: nn.Module, attention: Attention) -> int:
        """Parameters one query head from every group holds: rows of the query projection (and bias),
        columns of the output projection."""
        queries = get_module(block, attention.queries)
        output = get_module(block, attention.output)
        return self.groups * self.head_dim * (queries.in_features + (queries.bias is not None) + output.out_features)


def head_elimination(weight: torch.Tensor, regularised: torch.Tensor, shape: HeadShape, steps: int,
                     ) -> tuple[list[int], list[float]]:
    """Removes one query head from every key/value group, `steps` times: in each group the head whose
    removal (its columns of the output projection W, the others refit by least squares) costs least
    alone, tr(W_S ((G⁻¹)_SS)⁻¹ W_Sᵀ); then W and G⁻¹ are updated jointly, as in `obs_elimination`.
    Returns the kept heads and the output error after each step."""
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(regularised))
    weight = weight.clone()
    per_group = shape.heads // shape.groups
    alive = [list(range(group * per_group, (group + 1) * per_group)) for group in range(shape.groups)]
    errors: list[float] = []
    error = 0.0

    def cost(head: int) -> torch.Tensor:
        columns = shape.columns([head], weight.device)
        return torch.trace(weight[:, columns] @ torch.linalg.inv(inverse[columns][:, columns]) @ weight[:, columns].T)

    for _ in range(steps):
        removed = [group.pop(min(range(len(group)), key=lambda i: cost(group[i]))) for group in alive]
        error += remove_jointly(weight, inverse, shape.columns(removed, weight.device))
        errors.append(error)
    return sorted(head for group in alive for head in group), errors


@torch.no_grad()
def prune_block_heads(block: nn.Module, attention: Attention, streams: list[BlockInput], keep: int, *,
                      damping: float = DEFAULT_DAMPING, refit_damping: float = REFIT_DAMPING,
                      output_weights: torch.Tensor | None = None) -> list[int]:
    """Keeps `keep` query heads of the block's attention (as many in every key/value group), chosen
    from `streams` (the block's input, left where they are) by the output projection's error
    (weighted by `output_weights`), which is refit by least squares on the heads kept. Returns them."""
    shape = HeadShape.of(block, attention)
    if keep >= shape.heads:
        return list(range(shape.heads))
    output = get_module(block, attention.output)
    queries = get_module(block, attention.queries)
    matrix = observe_consumer(block, attention.output, streams, advance=False)
    weight = consumer_weight(output)
    channels = shape.heads * shape.head_dim
    selection = weight if output_weights is None else weight * output_weights.sqrt()[:, None].to(weight)
    kept = head_elimination(selection, damped(matrix, channels, damping), shape,
                            (shape.heads - keep) // shape.groups)[0]
    columns = shape.columns(kept, weight.device)
    new_weight = refit(weight, matrix, columns, channels, refit_damping)
    _set_linear(output, new_weight[:, :len(columns)].to(output.weight.dtype),
                None if output.bias is None else new_weight[:, len(columns)].to(output.bias.dtype))
    _set_linear(queries, queries.weight[columns], None if queries.bias is None else queries.bias[columns])
    get_module(block, attention.module).num_key_value_groups = keep // shape.groups
    return kept


def refit(weight: torch.Tensor, matrix: torch.Tensor, kept: torch.Tensor, channels: int,
          damping: float) -> torch.Tensor:
    """W' = (W G[:, S] + λ W[:, S]) (G[S, S] + λI)⁻¹ = argmin ‖W'X_S − WX‖² + λ‖W' − W[:, S]‖²: the
    consumer on the kept channels S (and the constant one, if any, which is not damped) closest in
    output, over the calibration tokens, to the consumer on all channels, pulled toward its own weights
    on S (λ = `damping_shift`; λ → ∞ deletes the other channels' columns, λ = 0 is plain least squares).
    At the same λ it is the update OBS elimination (`obs_elimination`, `head_elimination`) makes with
    the damped G + λI (there λ is from every channel's mean diagonal). The ridge toward zero,
    W G[:, S] (G[S, S] + λI)⁻¹, learns the calibration text instead: see REFIT_DAMPING.

    Measured against a target of the dense model's consumer output on the dense stream (which would
    also undo the earlier blocks' error): SmolLM2-135M at 0.8 of its parameters, perplexity ratio
    2.008 instead of 1.330; reproducing the block's own dense output generalises better."""
    columns = torch.cat([kept, torch.arange(channels, len(matrix), device=kept.device)])
    sub = matrix[columns][:, columns]
    shift = damping_shift(sub, len(kept), damping)
    rhs = weight @ matrix[:, columns]
    rhs[:, :len(kept)] += shift * weight[:, kept]
    return torch.linalg.solve(damped(sub, len(kept), damping), rhs.T).T


@torch.no_grad()
def plan_by_importance(model: nn.Module, batches: list[dict[str, torch.Tensor]], target_params: float, *,
                       round_to: int = 8, sensitivity: list[torch.Tensor] | None = None,
                       head_sensitivity: list[torch.Tensor] | None = None, heads: bool = False,
                       damping: float = DEFAULT_DAMPING, activations: ActivationStore | None = None,
                       parameters_dense: int | None = None) -> WidthPlan:
    """Per-block MLP widths (and with `heads`, query heads) within `target_params`, spent where they
    cost least.

    On the dense model's calibration stream, each block's output error as a function of its cut is
    measured along the least-squares elimination path (`obs_elimination`, `round_to` channels a step;
    `head_elimination`, one query head per key/value group a step), weighted by `sensitivity` and
    `head_sensitivity` (the diagonal Fisher of what the MLP and the attention write: the error then
    estimates the loss it costs, comparable across blocks and kinds of cut). Steps are then taken
    greedily, the cheapest marginal error per parameter first, until the budget is met.
    """
    check_pruning(model, target_params, round_to, heads=heads, parameters_dense=parameters_dense)
    adapter = find_adapter(model)
    mlp = mlp_of(adapter)
    attention = attention_of(adapter) if heads else None
    blocks = get_module(model, adapter.blocks)
    dense = parameters_dense or count_parameters(model)
    streams = capture_block_inputs(model, adapter, batches, activations or ActivationStore())
    # one cut per block's MLP, then one per block's attention: the error after each step of its path, the
    # parameters each step removes, and the width (channels or heads) each step leaves
    paths: list[tuple[list[float], list[int], list[int]]] = []
    head_paths = []
    for index, block in enumerate(blocks):
        if attention is not None:
            shape = HeadShape.of(block, attention)
            output = get_module(block, attention.output)
            weight = consumer_weight(output)
            if head_sensitivity is not None:
                weight = weight * head_sensitivity[index].sqrt()[:, None].to(weight)
            matrix = observe_consumer(block, attention.output, streams, advance=False)
            regularised = damped(matrix, shape.heads * shape.head_dim, damping)
            errors = head_elimination(weight, regularised, shape, shape.heads // shape.groups - 1)[1]
            head_paths.append((errors, [shape.step_cost(block, attention)] * len(errors),
                               [shape.heads - shape.groups * (step + 1) for step in range(len(errors))]))
        consumer = get_module(block, mlp.consumer)
        channels = consumer.in_features
        weight = consumer_weight(consumer)
        if sensitivity is not None:
            weight = weight * sensitivity[index].sqrt()[:, None].to(weight)
        regularised = damped(observe_consumer(block, mlp.consumer, streams), channels, damping)
        paths.append(mlp_path(weight, regularised, channels, round_to, channel_cost(block, mlp)))
    paths += head_paths
    steps = [0] * len(paths)

    def marginal(cut: int) -> float:
        """The error per parameter of the cut's next step (inf once its path has none left)."""
        errors, costs, _ = paths[cut]
        if steps[cut] >= len(errors):
            return math.inf
        before = errors[steps[cut] - 1] if steps[cut] else 0.0
        return (errors[steps[cut]] - before) / costs[steps[cut]]

    current = count_parameters(model)
    excess = current - target_params * dense
    removed = 0
    while removed < excess:
        cheapest = min(range(len(paths)), key=marginal)
        if marginal(cheapest) == math.inf:  # every path is at its end (check_pruning makes this unreachable)
            raise LmsliceError(f"pruning cannot reach {target_params:g} of the parameters: every block is at its "
                               "narrowest")
        removed += paths[cheapest][1][steps[cheapest]]
        steps[cheapest] += 1

    def width(cut: int, full: int) -> int:
        return paths[cut][2][steps[cut] - 1] if steps[cut] else full

    widths = [width(cut, mlp_width(block, mlp)) for cut, block in enumerate(blocks)]
    attention_heads = [width(len(blocks) + cut, HeadShape.of(block, attention).heads)
                       for cut, block in enumerate(blocks)] if attention is not None else []
    return WidthPlan(target_params, dense, current - removed, widths, round_to, attention_heads or None)


def mlp_path(weight: torch.Tensor, regularised: torch.Tensor, channels: int, round_to: int,
             cost: int) -> tuple[list[float], list[int], list[int]]:
    """One MLP's elimination path at the widths a plan may leave: the multiples of `round_to` below
    `channels`, down to `round_to`. Returns the output error at each, the parameters each step removes
    (`cost` per channel) and the widths. The path is measured in about 32 steps and interpolated."""
    widths = list(range((channels - 1) // round_to * round_to, round_to - 1, -round_to))
    if not widths:
        return [], [], []
    remove = channels - widths[-1]
    chunk = math.ceil(remove / round_to / 32) * round_to
    errors = obs_elimination(weight, regularised, channels, remove, chunk)[1]
    positions = [min((step + 1) * chunk, remove) for step in range(len(errors))]
    curve = [_interpolate(positions, errors, channels - kept) for kept in widths]
    costs = [(before - kept) * cost for before, kept in zip([channels] + widths, widths)]
    return curve, costs, widths


def _interpolate(positions: list[int], values: list[float], position: float) -> float:
    """values[k] sits at positions[k] (increasing), 0 at position 0; linear in between."""
    below = bisect.bisect_left(positions, position)
    if below < len(positions) and positions[below] == position:
        return values[below]
    low_position, low = (positions[below - 1], values[below - 1]) if below else (0, 0.0)
    if below >= len(positions):
        return values[-1]
    return low + (values[below] - low) * (position - low_position) / (positions[below] - low_position)


@torch.no_grad()
def prune_block_mlp(block: nn.Module, mlp: Mlp, streams: list[BlockInput], keep: int, *,
                    criterion: str = DEFAULT_CRITERION, damping: float = DEFAULT_DAMPING,
                    refit_damping: float = REFIT_DAMPING, refit_consumer: bool = True,
                    output_weights: torch.Tensor | None = None, notes: list[str] | None = None,
                    name: str = "block") -> torch.Tensor:
    """Keeps `keep` channels of the block's MLP, chosen and refit on `streams` (the block's input), and
    carries `streams` on to the pruned block's output. Returns the kept channel indices. Without
    `refit_consumer` the consumer's columns are only deleted. `output_weights` (one per output feature,
    e.g. `output_sensitivity`) weigh the output error by which channels are chosen; the refit, a
    least-squares fit per output feature, does not depend on them. What a user should know (an MLP
    silent on the calibration text) is added to `notes`, naming the block by `name`."""
    consumer = check_consumer(block, mlp)
    channels = consumer.in_features
    # The consumer's output is added to the residual stream (it is one of the block's writers), so the
    # pruned block's output is the dense block's plus the change in the consumer's output: one pass
    # measures G and carries the stream.
    matrix = observe_consumer(block, mlp.consumer, streams, keep_inputs=True)
    weight = consumer_weight(consumer)
    if notes is not None and keep < channels and silent_inputs(matrix, channels):
        notes.append(f"{name}: the MLP's input is zero on every calibration token (G = 0): damping from the floor "
                     f"λ = {refit_damping:g}, its down projection's kept columns left as they were")
    if keep >= channels:
        kept, new_weight = torch.arange(channels, device=weight.device), weight
    else:
        selection_weight = weight if output_weights is None else weight * output_weights.sqrt()[:, None].to(weight)
        kept = keep_channels(selection_weight, matrix, channels, keep, criterion, damping)
        if refit_consumer:
            new_weight = refit(weight, matrix, kept, channels, refit_damping)
        else:
            new_weight = torch.cat([weight[:, kept], weight[:, channels:]], dim=1)
    kept = kept.to(consumer.weight.device)
    new_bias = None if consumer.bias is None else new_weight[:, len(kept)].to(consumer.bias.dtype)
    new_weight = new_weight[:, :len(kept)].to(consumer.weight.dtype)
    for stream in streams:
        inputs = stream.store.take(consumer_input(stream))
        if len(kept) < channels:
            change = F.linear(inputs[..., kept], new_weight, new_bias) - F.linear(inputs, consumer.weight, consumer.bias)
            hidden = stream.hidden
            stream.hidden = hidden + change.view_as(hidden)  # OPT's MLP reads the tokens flattened
    _set_linear(consumer, new_weight, new_bias)
    rows = torch.cat([kept + part * channels for part in range(mlp.fused)])
    for path in mlp.producers:
        producer = get_module(block, path)
        _set_linear(producer, producer.weight[rows], None if producer.bias is None else producer.bias[rows])
    return kept.cpu()


def check_consumer(block: nn.Module, mlp: Mlp) -> nn.Linear:
    """The block's MLP consumer, if it writes just the residual stream. In a model sliced without its
    head, the last block's also writes the extra features the head reads (through the final norm),
    which neither the Fisher pass nor the one-pass stream update follows."""
    consumer = get_module(block, mlp.consumer)
    if getattr(consumer, "residual_width", consumer.out_features) != consumer.out_features:
        raise LmsliceError("pruning MLP channels of a sliced model needs its head sliced too: slice with "
                           "slice_head")
    return consumer


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    requires_grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad)
    linear.out_features, linear.in_features = weight.shape


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
    batches = list(batches)
    if not batches:
        raise LmsliceError("no calibration batches: give at least one calibration sample")
    streams = capture_block_inputs(model, adapter, batches, activations or ActivationStore())
    kept_channels: list[list[int]] = []
    notes: list[str] = []
    for index, block in enumerate(tqdm(blocks, desc="pruning", unit="block", disable=not progress)):
        name = f"block {index}"
        if plan.attention_heads:
            prune_block_heads(block, attention_of(adapter), streams, plan.attention_heads[index], damping=damping,
                              output_weights=None if head_sensitivity is None else head_sensitivity[index])
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


# Windows the plan (Fisher and per-block widths) is measured on; the pruning itself uses every window.
# SmolLM2-135M at 0.8 of its parameters, calibration 32 x 256: perplexity 22.408 with the plan from the
# first 8 windows, 22.423 from all 32, for a quarter of the planning time.
PLANNING_WINDOWS = 8


def first_windows(batches: list[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` calibration windows (rows), batched as given."""
    taken = []
    for batch in batches:
        if count <= 0:
            break
        taken.append({key: value[:count] for key, value in batch.items()})
        count -= len(batch["input_ids"])
    return taken


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
    batches = list(batches)
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
