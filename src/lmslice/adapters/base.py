"""What differs between model families, as data: where each part of the network lives.

The method code (fuse, calibrate, rotate) only ever asks an adapter for module paths; it never tests a
model type. A family is one `ModelAdapter` value in its own file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmslice.layout import AttentionPaths, MlpPaths, Modules, ResidualPaths


@dataclass(frozen=True)
class Residual:
    """One residual connection of a block: `x + f(norm(x))`.

    `reads` maps each norm that reads the connection's input to the linear layers that read that norm's
    output (paths relative to the block). `writes` lists the linear layers whose outputs are added to
    the residual stream; the first one carries the shortcut matrix. A sequential block (attention,
    then MLP) has two connections; a parallel block (Phi-2, GPT-NeoX) has one, read by all its norms.
    """

    reads: dict[str, tuple[str, ...]]
    writes: tuple[str, ...]


@dataclass(frozen=True)
class Mlp:
    """The MLP's channels: `producers` write them (each output row of a producer is one channel, or
    `fused` stacked rows per channel: Phi-3's gate_up_proj holds gate and up in two halves), `consumer`
    reads them (one input column per channel). `width_config` is the config field giving their number."""

    producers: tuple[str, ...]
    consumer: str
    width_config: str = "intermediate_size"
    fused: int = 1


# Where the heads are is the same record an adapter holds and a saved layout stores.
Attention = AttentionPaths


@dataclass(frozen=True)
class ModelAdapter:
    """Where the parts of one model family are, by `transformers` attribute path.

    `embeddings` are the modules whose outputs are summed into the residual stream before the first
    block (token and learned position embeddings); `norm_kind` is "rms", "layer" (LayerNorm: the stream
    is mean-centred before fusing) or "rms_plus_one" (Gemma: the scale is 1 + weight).
    `unsupported` returns why a particular config of the family cannot be sliced, or None. `mlp` says
    where the MLP's channels are, for pruning them (None: the family's MLP cannot be pruned);
    `attention` where the query heads are (None: the family's heads cannot be pruned).
    """

    family: str
    architectures: tuple[str, ...]
    embeddings: tuple[str, ...]
    blocks: str
    residuals: tuple[Residual, ...]
    final_norm: str
    head: str
    norm_kind: str = "rms"
    unsupported: Callable[[Any], str | None] = field(default=lambda config: None)
    mlp: Mlp | None = None
    attention: Attention | None = None

    @property
    def parallel(self) -> bool:
        return len(self.residuals) == 1

    def modules(self) -> Modules:
        """The paths, as the layout record of a saved model stores them."""
        mlp = None if self.mlp is None else MlpPaths(self.mlp.producers, self.mlp.consumer, self.mlp.fused,
                                                      self.mlp.width_config)
        return Modules(self.embeddings, self.blocks,
                       tuple(ResidualPaths(tuple(r.reads.items()), r.writes) for r in self.residuals),
                       self.final_norm, self.head, mlp, self.attention)

    def module_map(self) -> dict[str, Any]:
        """The paths, in the JSON form stored in a sliced model's config."""
        return self.modules().to_json()
