"""What differs between model families, as data: where each part of the network lives.

The method code (fuse, calibrate, rotate) only ever asks an adapter for module paths; it never tests a
model type. A family is one `ModelAdapter` value in its own file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmslice.layout import AttentionPaths, ExpertsPaths, MlpPaths, Modules, ResidualPaths


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
    # Norms applied to what the writers write before it joins the stream (Gemma 2/3, OLMo 2 normalise each
    # sublayer's output): `x + post_norm(f(norm(x)))`. Such a block cannot be sliced (`ModelAdapter.cannot_slice`).
    # A reads entry keyed "" lists readers of the stream itself, with no norm before them (OLMo 2).
    output_norms: tuple[str, ...] = ()


Experts = ExpertsPaths


@dataclass(frozen=True)
class Mlp:
    """The MLP's channels: `producers` write them (each output row of a producer is one channel, or
    `fused` stacked rows per channel: Phi-3's gate_up_proj holds gate and up in two halves), `consumer`
    reads them (one input column per channel). `width_config` is the config field giving their number."""

    producers: tuple[str, ...]
    consumer: str
    width_config: str = "intermediate_size"
    fused: int = 1
    # Whether the consumer's output is added to the residual stream as it is; False where a norm or a
    # scale comes between (Gemma 2, OLMo 2, Granite): pruning then runs the pruned block again to carry
    # the stream, instead of adding the change in the consumer's output.
    writes_stream: bool = True
    # Where a block holds a mixture of experts instead (each expert's channels are pruned on its own tokens,
    # every expert of a block keeping the same number); `producers` and `consumer` then name the dense MLP of
    # the blocks that have one (Qwen3-MoE's mlp_only_layers).
    experts: Experts | None = None


# Where the heads are is the same record an adapter holds and a saved layout stores.
Attention = AttentionPaths


@dataclass(frozen=True)
class Gguf:
    """How llama.cpp runs the family, as its own `convert_hf_to_gguf.py` writes it.

    `architecture` is llama.cpp's architecture for a model whose blocks are all equal. `per_block`: the
    block is Llama's (SiLU-gated MLP, optional q/k/v/o biases, rope in every layer, nothing between a
    sublayer and the stream), which llama.cpp's `deci` builds with per-block widths; no other llama.cpp
    architecture sizes its tensors per block. `norm_shift` is added to every stored norm weight (Gemma
    computes x·(1 + w)); `tied_head`: llama.cpp reads the head from the embedding. `metadata(config)` gives
    the architecture's further keys (without the "<architecture>." prefix: softcaps, sliding windows,
    multipliers); `refuse(config)` why this config is not what llama.cpp's architecture computes, or None.
    """

    architecture: str
    per_block: bool = False
    norm_shift: float = 0.0
    tied_head: bool = False
    metadata: Callable[[Any], dict[str, Any]] = field(default=lambda config: {})
    refuse: Callable[[Any], str | None] = field(default=lambda config: None)


@dataclass(frozen=True)
class ModelAdapter:
    """Where the parts of one model family are, by `transformers` attribute path.

    `embeddings` are the modules whose outputs are summed into the residual stream before the first
    block (token and learned position embeddings); `norm_kind` is "rms", "layer" (LayerNorm: the stream
    is mean-centred before fusing) or "rms_plus_one" (Gemma: the scale is 1 + weight).
    `unsupported` returns why a particular config of the family cannot be used, or None. `mlp` says
    where the MLP's channels are, for pruning them (None: the family's MLP cannot be pruned);
    `attention` where the query heads are (None: the family's heads cannot be pruned).
    `residual_scale` names the attribute of each block, and the config field it comes from, that scales
    what every sublayer writes (Granite's residual_multiplier): slicing folds it into the writers (and
    sets it to 1), since the shortcut added inside the first writer must not be scaled. `gguf` says how
    llama.cpp runs the family (None: lmslice does not write it).
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
    residual_scale: str | None = None
    gguf: Gguf | None = None

    @property
    def parallel(self) -> bool:
        return len(self.residuals) == 1

    def cannot_slice(self) -> str | None:
        """Why the family's residual stream cannot be rotated and sliced, or None.

        A norm on a sublayer's output (Gemma 2/3, OLMo 2) breaks the rotation's invariance: slicing needs
        every writer W to become QᵀW, but there the stream receives g ⊙ y/rms(y) (y = Wh), and that norm
        sits between the writer and the residual stream, so the writer cannot absorb Q; nor can the norm
        carry it, since an RMSNorm with a per-feature scale g is not rotation-equivariant ((g ⊙ y/rms(y))Q
        ≠ g' ⊙ yQ/rms(yQ) for any per-feature g' unless g is constant), and once features are deleted
        rms(yQ) is not rms(y)."""
        if self.mlp is not None and self.mlp.experts is not None:
            return (f"{self.family} cannot be sliced: lmslice does not rotate a mixture of experts' 3-D weights and "
                    "router; prune it with --target-params instead")
        output_norms = [norm for residual in self.residuals for norm in residual.output_norms]
        if not output_norms:
            return None
        return (f"{self.family} cannot be sliced: its norms on each sublayer's output ({', '.join(output_norms)}) sit "
                "between the writer and the residual stream, so the writer cannot absorb the rotation, and an "
                "RMSNorm with a per-feature scale is not rotation-equivariant; prune it with --keep instead")

    def modules(self) -> Modules:
        """The paths, as the layout record of a saved model stores them."""
        mlp = None if self.mlp is None else MlpPaths(self.mlp.producers, self.mlp.consumer, self.mlp.fused,
                                                      self.mlp.width_config, self.mlp.experts)
        return Modules(self.embeddings, self.blocks,
                       tuple(ResidualPaths(tuple(r.reads.items()), r.writes) for r in self.residuals),
                       self.final_norm, self.head, mlp, self.attention)

    def module_map(self) -> dict[str, Any]:
        """The paths, in the JSON form stored in a sliced model's config."""
        return self.modules().to_json()
