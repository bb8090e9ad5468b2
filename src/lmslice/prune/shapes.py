"""Where a family's prunable groups are and what they cost: MLP channels, query heads, their consumers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmslice.adapters import Attention, Mlp, ModelAdapter
from lmslice.errors import LmsliceError
from lmslice.modeling import get_module


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


def narrowest_width(width: int, round_to: int) -> int:
    """The narrowest MLP a plan leaves a block of `width` channels: `round_to` channels, or all of them
    where the MLP is no wider than that."""
    return min(width, round_to)


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


def check_consumer(block: nn.Module, mlp: Mlp) -> nn.Linear:
    """The block's MLP consumer, if it writes just the residual stream. In a model sliced without its
    head, the last block's also writes the extra features the head reads (through the final norm),
    which neither the Fisher pass nor the one-pass stream update follows."""
    consumer = get_module(block, mlp.consumer)
    if getattr(consumer, "residual_width", consumer.out_features) != consumer.out_features:
        raise LmsliceError("pruning MLP channels of a sliced model needs its head sliced too: slice with "
                           "slice_head")
    return consumer
