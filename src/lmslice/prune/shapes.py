"""Where a family's prunable groups are and what they cost: MLP channels, query heads, their consumers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmslice.adapters import Attention, Mlp, ModelAdapter
from lmslice.errors import LmsliceError
from lmslice.layout import Layout
from lmslice.modeling import experts_of, get_module, head_counts


def mlp_of(adapter: ModelAdapter) -> Mlp:
    if adapter.mlp is None:
        raise LmsliceError(f"lmslice does not know where the MLP channels of {adapter.family} models are")
    return adapter.mlp


def mlp_writers(mlp: Mlp) -> list[str]:
    """What writes a block's MLP output, whose Fisher weighs its cuts: the dense consumer, and where the
    family has them the experts (each block holds one of them)."""
    return [mlp.consumer] + ([mlp.experts.module] if mlp.experts is not None else [])


def mlp_width_configs(blocks: nn.ModuleList, mlp: Mlp) -> list[str]:
    """The config field each block's MLP width is (its experts' or its dense MLP's)."""
    return [mlp.width_config if experts_of(block, mlp) is None else mlp.experts.width_config for block in blocks]


def mlp_width(block: nn.Module, mlp: Mlp) -> int:
    """The block's MLP channels; in a block of experts, each expert's."""
    experts = experts_of(block, mlp)
    if experts is not None:
        return getattr(experts, mlp.experts.consumer).shape[-1]
    return get_module(block, mlp.consumer).in_features


def expert_count(block: nn.Module, mlp: Mlp) -> int:
    """How many experts the block's mixture holds (0: it has none)."""
    experts = experts_of(block, mlp)
    return 0 if experts is None else getattr(experts, mlp.experts.count_attribute)


def channel_cost(block: nn.Module, mlp: Mlp) -> int:
    """Parameters one MLP channel of `block` holds: a row (and bias entry) of each producer, a consumer column;
    in a block of experts, one channel of every expert (rows of its gate and up, a column of its down)."""
    experts = experts_of(block, mlp)
    if experts is not None:
        count, hidden, _ = getattr(experts, mlp.experts.consumer).shape
        return count * (mlp.experts.fused * getattr(experts, mlp.experts.producers).shape[-1] + hidden)
    cost = get_module(block, mlp.consumer).out_features
    for path in mlp.producers:
        producer = get_module(block, path)
        cost += mlp.fused * (producer.in_features + (producer.bias is not None))
    return cost


def mlp_removable_in(block: nn.Module, mlp: Mlp, layout: Layout) -> bool:
    """`mlp_removable`, for a block whose MLP is not a mixture of experts (experts keep `round_to` channels)."""
    return mlp_removable(layout) and experts_of(block, mlp) is None


def narrowest_width(width: int, round_to: int, removable: bool = False) -> int:
    """The narrowest MLP a plan leaves a block of `width` channels: none where the whole MLP may go
    (`mlp_removable`), else `round_to` channels, or all of them where the MLP is no wider than that."""
    return 0 if removable else min(width, round_to)


def mlp_removable(layout: Layout) -> bool:
    """Whether a block's whole MLP may go (its consumer then writing only its bias, where it has one,
    refit): not in a sliced stream, where the consumer carries its residual connection's shortcut."""
    return layout.stream is None


def attention_of(adapter: ModelAdapter) -> Attention:
    if adapter.attention is None:
        raise LmsliceError(f"lmslice does not know where the query heads of {adapter.family} models are")
    return adapter.attention


def spans(indices: list[int], size: int, device: torch.device) -> torch.Tensor:
    """The positions of slots `indices` of `size` consecutive features each."""
    return torch.cat([torch.arange(index * size, (index + 1) * size, device=device) for index in indices])


@dataclass(frozen=True)
class HeadShape:
    """A block's query heads: `heads` of `head_dim` features, in `groups` key/value groups (HF orders
    the heads group by group). Its elimination path takes one query head from every group at a time
    down to one in each, then, where the family's key/value heads are known (`whole_groups`), whole
    groups, down to one, or with `removable` to none (the block's attention gone)."""

    heads: int
    head_dim: int
    groups: int
    whole_groups: bool = False
    removable: bool = False

    @classmethod
    def of(cls, block: nn.Module, attention: Attention, removable: bool = False) -> HeadShape:
        heads, groups, head_dim = head_counts(block, attention)
        return cls(heads, head_dim, groups, attention.whole_groups, removable and attention.whole_groups)

    @property
    def per_group(self) -> int:
        return self.heads // self.groups if self.groups else 0

    @property
    def steps(self) -> int:
        """The steps of the elimination path (none where the attention is gone)."""
        if not self.heads:
            return 0
        return self.per_group - 1 + (self.groups - 1 + self.removable if self.whole_groups else 0)

    def heads_after(self, steps: int) -> int:
        """The query heads left after `steps` steps of the path."""
        if steps < self.per_group:
            return self.heads - steps * self.groups
        return self.groups - (steps - self.per_group + 1)

    def steps_to(self, heads: int) -> int:
        """The steps of the path that leave `heads` query heads."""
        if heads == self.heads:
            return 0
        steps = (self.heads - heads) // self.groups if heads >= self.groups else self.per_group - 1 + self.groups - heads
        if not 0 <= steps <= self.steps or self.heads_after(steps) != heads:
            raise LmsliceError(f"a block of {self.heads} query heads in {self.groups} key/value groups cannot keep "
                               f"{heads}: its path keeps {', '.join(map(str, self.path()))}")
        return steps

    def path(self) -> list[int]:
        """The query heads each step of the path leaves, the first the block's own."""
        return [self.heads_after(step) for step in range(self.steps + 1)]

    def columns(self, heads: list[int], device: torch.device) -> torch.Tensor:
        """The features of `heads` (or of key/value groups) in a projection's head_dim-wide slots."""
        return spans(heads, self.head_dim, device)

    def step_costs(self, block: nn.Module, attention: Attention) -> list[int]:
        """The parameters each step of the path removes: one query head from every group (its rows of
        the query projection, with bias, and columns of the output projection), or one whole group (its
        one query head, and its key and value rows), the last of them the block's whole attention."""
        if not self.steps:
            return []
        queries = get_module(block, attention.queries)
        output = get_module(block, attention.output)
        row = queries.in_features + (queries.bias is not None)
        query_head = self.head_dim * (row + output.out_features)
        per_group_steps = [self.groups * query_head] * (self.per_group - 1)
        if not self.whole_groups:
            return per_group_steps
        if attention.fused or attention.stacked:
            key_value = 2 * self.head_dim * row
        else:
            key_value = self.head_dim * sum(linear.in_features + (linear.bias is not None) for linear in
                                            (get_module(block, attention.keys), get_module(block, attention.values)))
        return per_group_steps + [query_head + key_value] * (self.steps - len(per_group_steps))


def attention_removable(index: int, layout: Layout) -> bool:
    """Whether block `index` of a model with `layout` may lose its whole attention: not the first block
    (transformers counts the cached tokens there), and not in a sliced stream (its output projection
    carries the shortcut)."""
    return index > 0 and layout.stream is None


def check_consumer(block: nn.Module, mlp: Mlp) -> nn.Module:
    """The block's MLP consumer (its experts, in a block of experts), if it writes just the residual stream.
    In a model sliced without its head, the last block's also writes the extra features the head reads
    (through the final norm), which neither the Fisher pass nor the one-pass stream update follows."""
    experts = experts_of(block, mlp)
    if experts is not None:  # a model of experts is never sliced
        return experts
    consumer = get_module(block, mlp.consumer)
    if getattr(consumer, "residual_width", consumer.out_features) != consumer.out_features:
        raise LmsliceError("pruning MLP channels of a sliced model needs its head sliced too: slice with "
                           "slice_head")
    return consumer
