"""The structure of a sliced model, in terms any `transformers` model already has.

A sliced model is its base architecture (say `LlamaForCausalLM`) with three changes:

* every norm is a weightless RMSNorm (its scale and shift were fused into the linear layers that read
  it) that still divides by the *original* width, so deleting small principal components does not
  rescale the signal;
* every matrix that reads or writes the residual stream is narrower: D' instead of D on that side;
* each residual connection carries a D'xD' matrix S = Q_inᵀ Q_out (the paper's shortcut), because the
  blocks on either side of it are rotated by different Q.

The base block's `forward` computes `residual + sublayer(norm(residual))`. Rather than copying that
forward to insert `residual @ S`, the norm hands its input to the sublayer's output projection through a
`ResidualChannel`, and the projection adds `residual @ (S - I)`; the block's own `+ residual` completes
`residual @ S`. The forward code of `transformers` is used unchanged, so this keeps working as it
evolves.

This file imports only torch, transformers and `lmslice.layout` (standard library only): it is copied
next to every saved model as `modeling_lmslice.py`, the layout module beside it as `lmslice_layout.py`
(the import below is rewritten to that sibling), so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads lmslice's models without lmslice installed.
"""

from __future__ import annotations

import copy

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmslice.layout import AttentionPaths, ExpertsPaths, Layout, MlpPaths, Modules


class ResidualChannel:
    """Carries the residual stream from a norm to the projection that closes its residual connection.

    Not a module: it holds no weights and must not appear twice in the module tree. It holds state only
    within one forward of its block, and every block forward starts by clearing it (`clear_channels`):
    a forward cut short (an exception, a checkpointed block recomputed without early stop) must not leak
    into the next one.
    """

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None
        self.tail: torch.Tensor | None = None

    def clear(self) -> None:
        self.residual = self.tail = None

    def take_residual(self) -> torch.Tensor:
        residual, self.residual = self.residual, None
        if residual is None:
            raise RuntimeError("shortcut projection called before the norm that feeds it")
        return residual

    def add_tail(self, tail: torch.Tensor) -> None:
        """Adds one writer's surplus features (a parallel block's last connection has several writers)."""
        self.tail = tail if self.tail is None else self.tail + tail

    def take_tail(self) -> torch.Tensor | None:
        tail, self.tail = self.tail, None
        return tail


class SlicedRMSNorm(nn.Module):
    """Weightless RMSNorm over `width` features that normalises as if the signal had `norm_dim`."""

    def __init__(self, width: int, eps: float, norm_dim: int) -> None:
        super().__init__()
        self.width = width
        self.eps = eps
        self.norm_dim = norm_dim
        self.channel: ResidualChannel | None = None
        self.widening: ResidualChannel | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.channel is not None:
            self.channel.residual = hidden_states
        if self.widening is not None:
            tail = self.widening.take_tail()
            if tail is not None:
                tail = tail.to(hidden_states.device).reshape(*hidden_states.shape[:-1], -1)
                hidden_states = torch.cat([hidden_states, tail], dim=-1)
        compute_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        x = hidden_states.to(compute_dtype)
        mean_square = x.pow(2).sum(-1, keepdim=True) / self.norm_dim
        return (x * torch.rsqrt(mean_square + self.eps)).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{self.width}, eps={self.eps}, norm_dim={self.norm_dim}"


class StreamWriter(nn.Linear):
    """A linear layer that writes the residual stream, built on the weights of the one it replaces.

    When it writes more features than the stream has (the last block when the head keeps its full
    width), it keeps the stream's width and hands the surplus to the final norm through `widening`.
    A subclass of `nn.Linear`, so tools that adapt linear layers (PEFT's LoRA) treat it as one.
    """

    def __init__(self, linear: nn.Linear, residual_width: int, widening: ResidualChannel | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.residual_width = residual_width
        self.widening = widening

    def to_stream_width(self, out: torch.Tensor) -> torch.Tensor:
        if self.widening is None:
            return out
        self.widening.add_tail(out[..., self.residual_width:])
        return out[..., : self.residual_width]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.to_stream_width(F.linear(hidden_states, self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, residual_width={self.residual_width}"


class ShortcutLinear(StreamWriter):
    """A block's output projection that also applies the residual connection's rotation.

    Returns `linear(h) + residual @ (S - I)`; the block then adds `residual`.
    """

    def __init__(self, linear: nn.Linear, residual_width: int, channel: ResidualChannel) -> None:
        super().__init__(linear, residual_width)
        self.channel = channel
        self.shortcut_minus_identity = nn.Parameter(
            linear.weight.new_zeros(residual_width, linear.out_features), requires_grad=linear.weight.requires_grad
        )

    def set_shortcut(self, shortcut: torch.Tensor) -> None:
        """Stores S (residual_width x out_features) as S - [I 0]."""
        delta = shortcut.to(self.shortcut_minus_identity).clone()
        delta.diagonal().sub_(1)
        self.shortcut_minus_identity.data = delta

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.channel.take_residual()
        out = F.linear(hidden_states, self.weight, self.bias)
        shortcut = (residual.reshape(-1, self.residual_width), self.shortcut_minus_identity)
        if out.requires_grad:
            # out of place: a gradient hook on an output changed in place through a view crashed torch
            # (segmentation fault in register_hook: the Fisher pass of a sliced GPT-NeoX with sequential blocks)
            return self.to_stream_width(torch.addmm(out.view(-1, self.out_features), *shortcut).view_as(out))
        # In place: no second activation-sized buffer (F.linear does not keep its output for backward).
        out.view(-1, self.out_features).addmm_(*shortcut)
        return self.to_stream_width(out)


class AttentionFree(nn.Module):
    """A block's attention once its last head is pruned: it adds nothing to the residual stream but a
    constant, its output projection's bias refit to what the attention wrote on average (where it has
    one). Decoder layers call their attention module and take the first item it returns; it caches no
    keys, so transformers' cache (which counts tokens in the first block) needs block 0's attention."""

    def __init__(self, width: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.width = width
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], self.width)
        return (out if self.bias is None else out + self.bias), None

    def extra_repr(self) -> str:
        return f"{self.width}, bias={self.bias is not None}"


class WideningLinear(StreamWriter):
    """A further writer of the last block's last connection (parallel blocks have several) when the head
    reads more features than the stream has."""


def clear_channels(block: nn.Module, *_: Any) -> None:
    """Forward pre-hook of every sliced block: empties the channels its modules share."""
    for module in block.modules():
        if isinstance(module, (SlicedRMSNorm, StreamWriter)):
            for channel in (getattr(module, "channel", None), module.widening):
                if channel is not None:
                    channel.clear()


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(root, parent_path), name, module)


def resize_linear(linear: nn.Module, in_features: int | None = None, out_features: int | None = None) -> None:
    """Gives `linear` new, uninitialised sizes in place, keeping its class (works on meta tensors too)."""
    weight = linear.weight
    rows = out_features if out_features is not None else weight.shape[0]
    cols = in_features if in_features is not None else weight.shape[1]
    if (rows, cols) == tuple(weight.shape):
        return
    linear.weight = nn.Parameter(weight.new_empty(rows, cols), requires_grad=weight.requires_grad)
    if getattr(linear, "bias", None) is not None and linear.bias.shape[0] != rows:
        linear.bias = nn.Parameter(linear.bias.new_empty(rows), requires_grad=linear.bias.requires_grad)
    if hasattr(linear, "in_features"):
        linear.in_features, linear.out_features = cols, rows


def resize_embedding(embedding: nn.Embedding, width: int) -> None:
    weight = embedding.weight
    if weight.shape[1] == width:
        return
    embedding.weight = nn.Parameter(weight.new_empty(weight.shape[0], width), requires_grad=weight.requires_grad)
    embedding.embedding_dim = width


def apply_layout(model: nn.Module, layout: Layout) -> None:
    """Turns a freshly built base model into the structure `layout` describes: each block's MLP width
    and query heads where they were pruned, then, where the residual stream was sliced, its weightless
    norms, narrower readers and writers, shortcuts, and the linear layers that gained a bias when
    LayerNorm shifts were folded into them. The weights are left uninitialised: they come from the
    checkpoint."""
    modules = layout.modules
    blocks = get_module(model, modules.blocks)
    for index, mlp_width in enumerate(layout.mlp_widths or ()):
        resize_mlp(blocks[index], modules.mlp, mlp_width)
    for index, heads in enumerate(layout.attention_heads or ()):
        resize_attention(blocks[index], modules.attention, heads)
    for index, count in enumerate(layout.expert_counts or ()):
        resize_experts(blocks[index], modules.mlp, count)
    stream = layout.stream
    if stream is None or layout.standard:
        return
    hidden, width, head_width, eps = layout.hidden_size, stream.width, stream.head_width, stream.eps
    for path in stream.added_biases:
        linear = get_module(model, path)
        linear.bias = nn.Parameter(linear.weight.new_empty(linear.weight.shape[0]))
    for path in modules.embeddings:
        resize_embedding(get_module(model, path), width)
    for index, block in enumerate(blocks):
        out_width = head_width if index == len(blocks) - 1 else width
        install_block(block, modules, width, out_width, hidden, eps)
    resize_linear(get_module(model, modules.head), in_features=head_width)
    install_final_norm(model, modules, width, head_width, hidden, eps)


def experts_of(block: nn.Module, mlp: MlpPaths) -> nn.Module | None:
    """The block's mixture of experts, where the family has them and this block holds them (Qwen3-MoE may
    keep a dense MLP in some blocks), else None."""
    if mlp.experts is None:
        return None
    try:
        return get_module(block, mlp.experts.module)
    except AttributeError:
        return None


def set_experts(module: nn.Module, experts: ExpertsPaths, producers: torch.Tensor, consumer: torch.Tensor) -> None:
    """Gives the experts these 3-D weights (their width: the consumer's last dimension), in place."""
    requires_grad = getattr(module, experts.consumer).requires_grad
    setattr(module, experts.producers, nn.Parameter(producers.contiguous(), requires_grad))
    setattr(module, experts.consumer, nn.Parameter(consumer.contiguous(), requires_grad))
    setattr(module, experts.width_attribute, consumer.shape[-1])


def set_expert_count(block: nn.Module, experts: ExpertsPaths, producers: torch.Tensor, consumer: torch.Tensor,
                     router: torch.Tensor) -> None:
    """Gives the block's experts and their router these weights, one expert (and router row) each along
    the first dimension, in place, and the count the forwards of both read."""
    module, gate = get_module(block, experts.module), get_module(block, experts.router)
    set_experts(module, experts, producers, consumer)
    gate.weight = nn.Parameter(router.contiguous(), gate.weight.requires_grad)
    for part in (module, gate):
        setattr(part, experts.count_attribute, router.shape[0])


def resize_experts(block: nn.Module, mlp: MlpPaths, count: int) -> None:
    """The block's mixture with `count` experts (uninitialised: the weights come from the checkpoint); a
    block without experts is left as it is."""
    module = experts_of(block, mlp)
    if module is None or getattr(module, mlp.experts.count_attribute) == count:
        return
    producers, consumer = getattr(module, mlp.experts.producers), getattr(module, mlp.experts.consumer)
    router = get_module(block, mlp.experts.router).weight
    set_expert_count(block, mlp.experts, producers.new_empty(count, *producers.shape[1:]),
                     consumer.new_empty(count, *consumer.shape[1:]), router.new_empty(count, router.shape[1]))


def resize_mlp(block: nn.Module, mlp: MlpPaths, width: int) -> None:
    """The block's MLP with `width` channels: producers write them (`fused` rows each), the consumer reads
    them; in a block of experts, every expert's."""
    experts = experts_of(block, mlp)
    if experts is not None:
        producers, consumer = getattr(experts, mlp.experts.producers), getattr(experts, mlp.experts.consumer)
        if consumer.shape[-1] != width:
            set_experts(experts, mlp.experts, producers.new_empty(producers.shape[0], mlp.experts.fused * width,
                                                                  producers.shape[2]),
                        consumer.new_empty(*consumer.shape[:2], width))
        return
    for path in mlp.producers:
        resize_linear(get_module(block, path), out_features=width * mlp.fused)
    resize_linear(get_module(block, mlp.consumer), in_features=width)


def resize_attention(block: nn.Module, attention: AttentionPaths, heads: int) -> None:
    """The block's attention with `heads` query heads: as many for every key/value head, or, with fewer
    heads than key/value heads, that many whole key/value groups of one query head each; with none,
    `AttentionFree`."""
    if heads == 0:
        remove_attention(block, attention)
        return
    _, groups, head_dim = head_counts(block, attention)
    key_value_heads = min(heads, groups)
    rows = 3 * heads if attention.fused else heads + 2 * key_value_heads if attention.stacked else heads
    resize_linear(get_module(block, attention.queries), out_features=rows * head_dim)
    for path in (attention.keys, attention.values):
        if path is not None:
            resize_linear(get_module(block, path), out_features=key_value_heads * head_dim)
    resize_linear(get_module(block, attention.output), in_features=heads * head_dim)
    for path, width in ((attention.query_norm, heads * head_dim), (attention.key_norm, key_value_heads * head_dim)):
        if path is not None:
            resize_norm(get_module(block, path), width)
    set_head_counts(block, attention, heads, key_value_heads)


def resize_norm(norm: nn.Module, width: int) -> None:
    """Gives a norm's weight `width` uninitialised features, in place (works on meta tensors too)."""
    weight = norm.weight
    if weight.shape[0] != width:
        norm.weight = nn.Parameter(weight.new_empty(width), requires_grad=weight.requires_grad)


def remove_attention(block: nn.Module, attention: AttentionPaths, bias: torch.Tensor | None = None) -> None:
    """Replaces the block's attention by `AttentionFree`, adding `bias` (uninitialised where None and its
    output projection has one: it comes from the checkpoint)."""
    output = get_module(block, attention.output)
    if bias is None and output.bias is not None:
        bias = output.bias.new_empty(output.out_features)
    set_module(block, attention.module, AttentionFree(output.out_features, bias))


def head_counts(block: nn.Module, attention: AttentionPaths) -> tuple[int, int, int]:
    """The block's query heads, key/value heads and head dimension, as its projections hold them (0, 0,
    0 for a block without attention)."""
    module = get_module(block, attention.module)
    if isinstance(module, AttentionFree):
        return 0, 0, 0
    head_dim = getattr(module, attention.head_dim_attribute)
    rows = get_module(block, attention.queries).out_features // head_dim
    if attention.stacked:
        key_value_heads = getattr(module, attention.key_value_heads_attribute)
        return rows - 2 * key_value_heads, key_value_heads, head_dim
    heads = rows // (3 if attention.fused else 1)
    if attention.fused:
        return heads, heads, head_dim
    if attention.keys is not None:
        return heads, get_module(block, attention.keys).out_features // head_dim, head_dim
    return heads, heads // getattr(module, attention.groups_attribute), head_dim


def set_head_counts(block: nn.Module, attention: AttentionPaths, heads: int, key_value_heads: int) -> None:
    """Keeps the attention module's own counts (those its forward reads) in step with its projections."""
    module = get_module(block, attention.module)
    if attention.groups_attribute is not None:
        setattr(module, attention.groups_attribute, heads // key_value_heads)
    if attention.key_value_heads_attribute is not None:
        setattr(module, attention.key_value_heads_attribute, key_value_heads)
    if attention.heads_attribute is not None and attention.heads_attribute.startswith("config."):
        # the config is the model's, shared by every block: this block's count goes into a copy of its own
        module.config = copy.copy(module.config)
        setattr(module.config, attention.heads_attribute.removeprefix("config."), heads)
    elif attention.heads_attribute is not None:
        setattr(module, attention.heads_attribute, heads)


def install_final_norm(model: nn.Module, modules: Modules, width: int, head_width: int, hidden: int,
                       eps: float) -> None:
    """The head's norm; when the head reads more than the stream's width, it also takes the last
    block's surplus output (the sum of the surpluses of the last connection's writers)."""
    final_norm = SlicedRMSNorm(head_width, eps, hidden)
    set_module(model, modules.final_norm, final_norm)
    if head_width != width:
        blocks = get_module(model, modules.blocks)
        last_block = blocks[len(blocks) - 1]
        shortcut_path, *other_writers = modules.residuals[-1].writes
        final_norm.widening = get_module(last_block, shortcut_path).widening = ResidualChannel()
        for path in other_writers:
            set_module(last_block, path, WideningLinear(get_module(last_block, path), width, final_norm.widening))


def install_block(block: nn.Module, modules: Modules, width: int, out_width: int, hidden: int,
                  eps: float) -> None:
    """Norms become weightless taps, reading/writing matrices narrow, and shortcuts are added.

    Each of `modules.residuals` is one residual connection: `reads` pairs each norm that reads its input
    with the matrices that read that norm, `writes` lists the matrices that write its output. The first
    writer carries the shortcut.
    """
    residuals = modules.residuals
    for position, residual in enumerate(residuals):
        residual_out = out_width if position == len(residuals) - 1 else width
        channel = ResidualChannel()
        for norm_index, (norm_path, readers) in enumerate(residual.reads):
            norm = SlicedRMSNorm(width, eps, hidden)
            if norm_index == 0:
                norm.channel = channel
            set_module(block, norm_path, norm)
            for path in readers:
                resize_linear(get_module(block, path), in_features=width)
        for path in residual.writes:
            resize_linear(get_module(block, path), out_features=residual_out)
        shortcut_path = residual.writes[0]
        set_module(block, shortcut_path, ShortcutLinear(get_module(block, shortcut_path), width, channel))
    block.register_forward_pre_hook(clear_channels)


def base_key_mapping(base: type) -> dict[str, str]:
    """The parameter renamings `transformers` applies when it loads `base` checkpoints.

    `save_pretrained` writes a `base` model in its original on-disk names (GPT-NeoX's `lm_head` as
    `embed_out`) and renames them back on load, but not for a custom class like the sliced one.
    """
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # older transformers save names as they are
        return {}
    model_type = getattr(getattr(base, "config_class", None), "model_type", None)
    transforms = get_checkpoint_conversion_mapping(base.__name__) or (
        get_checkpoint_conversion_mapping(model_type) if model_type else None) or []
    return {source: target for transform in transforms if type(transform).__name__ == "WeightRenaming"
            for source, target in zip(transform.source_patterns, transform.target_patterns)}


# The model type a saved lmslice output's config.json names. No transformers knows it, so a plain
# `AutoModelForCausalLM.from_pretrained(dir)` stops with transformers' own request for
# trust_remote_code=True; under the base type it would build the dense structure and fail on sizes.
REMOTE_MODEL_TYPE = "lmslice"


def remote_classes(base: type) -> tuple[type, type]:
    """The config and model classes the saved modeling file exports: `base`'s, under REMOTE_MODEL_TYPE
    (transformers pairs a remote model with its config by the config class's name)."""

    class LmsliceConfig(base.config_class):
        model_type = REMOTE_MODEL_TYPE

    model = sliced_class(base)
    model.config_class = LmsliceConfig
    return LmsliceConfig, model


def sliced_class(base: type) -> type:
    """`base` (a `transformers` *ForCausalLM class) whose constructor builds the sliced structure."""

    class Sliced(base):
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            apply_layout(self, Layout.from_json(config.lmslice))

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            if "key_mapping" not in kwargs and base_key_mapping(base):
                kwargs["key_mapping"] = base_key_mapping(base)
            return super().from_pretrained(*args, **kwargs)

        def _init_weights(self, module: nn.Module) -> None:
            if not isinstance(module, (SlicedRMSNorm, StreamWriter, AttentionFree)):
                super()._init_weights(module)

    Sliced.__name__ = Sliced.__qualname__ = "LmsliceForCausalLM"
    return Sliced
