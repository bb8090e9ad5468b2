"""Cutting one block: its query heads, then its MLP channels, chosen and refit on the block's stream,
which moves on to the pruned block's output."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmslice.adapters import Attention, Experts, Mlp
from lmslice.calibration import BlockInput, run_block
from lmslice.modeling import (experts_of, get_module, remove_attention, set_expert_count, set_experts,
                              set_head_counts)
from lmslice.prune.measure import (consumer_input, consumer_weight, expert_removal, observe_consumer, observe_experts,
                                   observe_router_inputs, sensitivity_weighted, silent_inputs)
from lmslice.prune.shapes import HeadShape, check_consumer, spans
from lmslice.prune.solvers import (DEFAULT_CRITERION, DEFAULT_DAMPING, REFIT_DAMPING, head_elimination,
                                   keep_channels, refit)


@torch.no_grad()
def prune_block_heads(block: nn.Module, attention: Attention, streams: list[BlockInput], keep: int, *,
                      damping: float = DEFAULT_DAMPING, refit_damping: float = REFIT_DAMPING,
                      output_weights: torch.Tensor | None = None, removable: bool = False) -> list[int]:
    """Keeps `keep` query heads of the block's attention (as many in every key/value group, or, below
    one per group, `keep` whole groups; none, where `removable`, replaces the attention by
    `AttentionFree`), chosen from `streams` (the block's input, left where they are) along the shape's
    elimination path by the output projection's error (weighted by `output_weights`), which is refit by
    least squares on the heads kept. Returns them."""
    shape = HeadShape.of(block, attention, removable)
    if keep >= shape.heads:
        return list(range(shape.heads))
    output = get_module(block, attention.output)
    matrix = observe_consumer(block, attention.output, streams, advance=False)
    weight = consumer_weight(output)
    channels = shape.heads * shape.head_dim
    kept = head_elimination(sensitivity_weighted(weight, output_weights), matrix, shape, shape.steps_to(keep),
                            damping)[0]
    if not kept:  # only a bias can be left: the refit makes it what the attention wrote on average
        nothing = torch.zeros(0, dtype=torch.long, device=weight.device)
        remove_attention(block, attention, None if output.bias is None else
                         refit(weight, matrix, nothing, channels, refit_damping)[:, 0].to(output.bias.dtype))
        return kept
    columns = shape.columns(kept, weight.device)
    new_weight = refit(weight, matrix, columns, channels, refit_damping)
    _set_linear(output, new_weight[:, :len(columns)].to(output.weight.dtype),
                None if output.bias is None else new_weight[:, len(columns)].to(output.bias.dtype))
    groups = sorted({head // shape.per_group for head in kept})
    if attention.fused:  # query, key and value rows of each head side by side
        _keep_rows(get_module(block, attention.queries), spans(kept, 3 * shape.head_dim, weight.device))
    elif attention.stacked:  # every query head's rows, then every key head's, then every value head's
        groups_kept = shape.columns(groups, weight.device)
        _keep_rows(get_module(block, attention.queries),
                   torch.cat([columns, channels + groups_kept, channels + shape.groups * shape.head_dim + groups_kept]))
    else:
        _keep_rows(get_module(block, attention.queries), columns)
        for path in (attention.keys, attention.values):
            if path is not None and len(groups) < shape.groups:
                _keep_rows(get_module(block, path), shape.columns(groups, weight.device))
    for path, features in ((attention.query_norm, columns), (attention.key_norm, shape.columns(groups, weight.device))):
        if path is not None:  # a norm over the whole projection: the pruned heads' features leave it too
            norm = get_module(block, path)
            norm.weight = nn.Parameter(norm.weight[features].contiguous(), norm.weight.requires_grad)
    set_head_counts(block, attention, len(kept), len(groups))
    return kept


@torch.no_grad()
def prune_block_mlp(block: nn.Module, mlp: Mlp, streams: list[BlockInput], keep: int, *,
                    criterion: str = DEFAULT_CRITERION, damping: float = DEFAULT_DAMPING,
                    refit_damping: float = REFIT_DAMPING, refit_consumer: bool = True,
                    output_weights: torch.Tensor | None = None, notes: list[str] | None = None,
                    name: str = "block", experts: int | None = None) -> torch.Tensor:
    """Keeps `keep` channels of the block's MLP (in a block of experts, of each of the `experts` it keeps),
    chosen and refit on `streams` (the block's input), and
    carries `streams` on to the pruned block's output (with none kept, the MLP writes only its consumer's
    bias, where it has one, refit to what the MLP wrote on average). Returns the kept channel indices. Without
    `refit_consumer` the consumer's columns are only deleted. `output_weights` (one per output feature,
    e.g. `output_sensitivity`) weigh the output error by which channels are chosen; the refit, a
    least-squares fit per output feature, does not depend on them. What a user should know (an MLP
    silent on the calibration text) is added to `notes`, naming the block by `name`."""
    if experts_of(block, mlp) is not None:
        return prune_block_experts(block, mlp.experts, streams, keep, criterion=criterion, damping=damping,
                                   refit_damping=refit_damping, refit_consumer=refit_consumer,
                                   output_weights=output_weights, notes=notes, name=name, experts=experts)
    consumer = check_consumer(block, mlp)
    channels = consumer.in_features
    # Where the consumer's output is added to the residual stream as it is, the pruned block's output is
    # the dense block's plus the change in the consumer's output: one pass measures G and carries the
    # stream. Where a norm or a scale comes between (`Mlp.writes_stream`), G is measured up to the
    # consumer and the pruned block is run again.
    matrix = observe_consumer(block, mlp.consumer, streams, keep_inputs=mlp.writes_stream,
                              advance=mlp.writes_stream)
    weight = consumer_weight(consumer)
    if notes is not None and keep < channels and silent_inputs(matrix, channels):
        notes.append(f"{name}: the MLP's input is zero on every calibration token (G = 0): damping from the floor "
                     f"λ = {refit_damping:g}, its down projection's kept columns left as they were")
    if keep >= channels:
        kept, new_weight = torch.arange(channels, device=weight.device), weight
    else:
        kept = keep_channels(sensitivity_weighted(weight, output_weights), matrix, channels, keep, criterion, damping)
        if refit_consumer:
            new_weight = refit(weight, matrix, kept, channels, refit_damping)
        else:
            new_weight = torch.cat([weight[:, kept], weight[:, channels:]], dim=1)
    kept = kept.to(consumer.weight.device)
    new_bias = None if consumer.bias is None else new_weight[:, len(kept)].to(consumer.bias.dtype)
    new_weight = new_weight[:, :len(kept)].to(consumer.weight.dtype)
    for stream in streams if mlp.writes_stream else ():
        inputs = stream.store.take(consumer_input(stream))
        if len(kept) < channels:
            change = (F.linear(inputs[..., kept], new_weight, new_bias)
                      - F.linear(inputs, consumer.weight, consumer.bias))
            hidden = stream.hidden
            stream.hidden = hidden + change.view_as(hidden)  # OPT's MLP reads the tokens flattened
    _set_linear(consumer, new_weight, new_bias)
    rows = torch.cat([kept + part * channels for part in range(mlp.fused)])
    for path in mlp.producers:
        producer = get_module(block, path)
        _keep_rows(producer, rows)
    for stream in () if mlp.writes_stream else streams:  # they are still the block's input
        stream.hidden = run_block(block, stream, stream.hidden)
    return kept.cpu()


@torch.no_grad()
def prune_block_experts(block: nn.Module, paths: Experts, streams: list[BlockInput], keep: int, *,
                        criterion: str = DEFAULT_CRITERION, damping: float = DEFAULT_DAMPING,
                        refit_damping: float = REFIT_DAMPING, refit_consumer: bool = True,
                        output_weights: torch.Tensor | None = None, notes: list[str] | None = None,
                        name: str = "block", experts: int | None = None) -> torch.Tensor:
    """`prune_block_mlp` for a block of experts: first only `experts` of its experts stay (default: all),
    those whose removal, with the router routing among the rest, least changes what they write
    (`expert_removal` on `streams`, weighted by `output_weights`), their router rows with them; then every
    expert keeps `keep` channels (one width for all, as the 3-D weights hold them), each chosen on the
    tokens routed to it, weighted by their routing weights (`gram_of_experts`), and its down projection
    refit by least squares on them; then the pruned block is run again to carry `streams`. Returns the
    kept channels, one row per expert kept."""
    module = get_module(block, paths.module)
    removals = 0 if experts is None else getattr(module, paths.count_attribute) - experts
    if removals > 0:
        order, _ = expert_removal(block, paths, observe_router_inputs(block, paths, streams), output_weights, steps=0)
        keep_experts(block, paths, sorted(order[removals:]))
    producers, consumer = getattr(module, paths.producers), getattr(module, paths.consumer)
    count, _, channels = consumer.shape
    if keep >= channels:  # nothing to cut, but the streams still move on to the block's output
        for stream in streams:
            stream.hidden = run_block(block, stream, stream.hidden)
        return torch.arange(channels).expand(count, channels).clone()
    matrices = observe_experts(block, paths, streams)
    silent = [expert for expert in range(count) if silent_inputs(matrices[expert], channels)]
    if notes is not None and silent:
        notes.append(f"{name}: no calibration token was routed to expert{'s' * (len(silent) > 1)} "
                     f"{', '.join(map(str, silent))}: damping from the floor λ = {refit_damping:g}, their down "
                     "projections' kept columns left as they were")
    kept_rows, new_producers, new_consumers = [], [], []
    for expert in range(count):
        weight = consumer[expert].double()
        kept = keep_channels(sensitivity_weighted(weight, output_weights), matrices[expert], channels, keep, criterion,
                             damping)
        new_weight = refit(weight, matrices[expert], kept, channels, refit_damping) if refit_consumer \
            else weight[:, kept]
        kept = kept.to(consumer.device)
        kept_rows.append(kept.cpu())
        new_consumers.append(new_weight.to(consumer.dtype))
        new_producers.append(producers[expert][torch.cat([kept + part * channels for part in range(paths.fused)])])
    set_experts(module, paths, torch.stack(new_producers), torch.stack(new_consumers))
    for stream in streams:
        stream.hidden = run_block(block, stream, stream.hidden)
    return torch.stack(kept_rows)


def keep_experts(block: nn.Module, paths: Experts, kept: list[int]) -> None:
    """Keeps only the experts `kept` of the block and their router rows, in place. No refit: what a removed
    expert wrote is no kept expert's function of its input, and refitting the kept experts' down
    projections together to stand in for it is one least-squares system over all their channels; their
    channels, where pruned after this, are refit on the tokens routed to them by the pruned router."""
    module, router = get_module(block, paths.module), get_module(block, paths.router)
    set_expert_count(block, paths, getattr(module, paths.producers)[kept], getattr(module, paths.consumer)[kept],
                     router.weight[kept])


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    _set_linear(linear, linear.weight[rows], None if linear.bias is None else linear.bias[rows])


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    requires_grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad)
    linear.out_features, linear.in_features = weight.shape
