"""What a model lmslice wrote *is*: one typed record, stored under "lmslice" in its config.json.

Every writer builds a `Layout` and stores `to_json()`; every reader gets it back with `from_json`, which
refuses a record whose types, lengths or ranges are wrong, and `validate(config)` checks it against the
model's own config. Standard library only: this file is copied beside every saved model as
`lmslice_layout.py`, and the model's remote code (`modeling_lmslice.py`) imports it from there.

The JSON is flat (format 1, as earlier lmslice wrote it): the module paths, then the residual stream's
slice (`width`, `head_width`, `eps`, ...) if it was sliced, the per-block MLP widths and query heads if
they were pruned, and what the model was made from (calibration, source, the steps and their configs,
the plan, fine-tuning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

FORMAT_VERSION = 1
STANDARD = "standard"  # `export`: the family's own architecture (no remote code); None: lmslice's layout
ROTATIONS = ("per-block", "shared")
CONFIG_EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")


class LayoutError(ValueError):
    """The record cannot describe a model: the message names the entry (readers add the file)."""


def _integer(value: Any, name: str, least: int = 1) -> int:
    # bool is an int in Python, and "104" or 104.0 are not widths: a width is a JSON integer
    if isinstance(value, bool) or not isinstance(value, int):
        raise LayoutError(f"lmslice.{name} must be an integer, got {value!r}")
    if value < least:
        raise LayoutError(f"lmslice.{name} must be at least {least}, got {value}")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise LayoutError(f"lmslice.{name} must be a non-empty string, got {value!r}")
    return value


def _texts(value: Any, name: str, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise LayoutError(f"lmslice.{name} must be a {'' if allow_empty else 'non-empty '}list of paths, got {value!r}")
    return tuple(_text(item, f"{name}[{index}]") for index, item in enumerate(value))


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise LayoutError(f"lmslice.{name} must be a mapping, got {value!r}")
    return value


def _require(record: dict[str, Any], key: str, prefix: str = "") -> Any:
    if key not in record:
        raise LayoutError(f"lmslice.{prefix}{key} is missing")
    return record[key]


@dataclass(frozen=True)
class ResidualPaths:
    """One residual connection: the norms reading its input (each with the layers reading that norm; the
    norm "" is none, the layers read the stream itself) and the layers writing its output, the first of
    which carries the shortcut."""

    reads: tuple[tuple[str, tuple[str, ...]], ...]
    writes: tuple[str, ...]


@dataclass(frozen=True)
class ExpertsPaths:
    """A mixture of experts in place of a block's MLP (in the blocks that hold `module`): every expert's MLP
    in 3-D parameters of `module`, `producers` [experts, fused x width, hidden] (gate and up stacked) and
    `consumer` [experts, hidden, width], one width for every expert of a block (the module attribute
    `width_attribute`, the config field `width_config`), the consumer reading activation(gate) x up (the
    module attribute `activation_attribute`); `router` scores the experts (one weight row each) and routes
    every token to its `top_k_attribute` best (the config field `top_k_config`). How many experts the
    experts module and the router hold is their module attribute `count_attribute` (what their forwards
    read) and the config field `count_config`."""

    module: str
    router: str
    producers: str = "gate_up_proj"
    consumer: str = "down_proj"
    fused: int = 2
    width_attribute: str = "intermediate_dim"
    width_config: str = "moe_intermediate_size"
    activation_attribute: str = "act_fn"
    count_attribute: str = "num_experts"
    count_config: str = "num_local_experts"
    top_k_attribute: str = "top_k"
    top_k_config: str = "num_experts_per_tok"


EXPERTS_KEYS = tuple(item.name for item in fields(ExpertsPaths))
EXPERTS_DEFAULTS = {item.name: item.default for item in fields(ExpertsPaths)}
LATER_EXPERTS_KEYS = ("count_attribute", "count_config", "top_k_attribute", "top_k_config")


@dataclass(frozen=True)
class MlpPaths:
    producers: tuple[str, ...]
    consumer: str
    fused: int = 1
    width_config: str | None = None  # the config field of the dense MLP width
    experts: ExpertsPaths | None = None  # where a block holds experts instead (its MLP width: each expert's)


@dataclass(frozen=True)
class AttentionPaths:
    """Where a block's attention heads are. `queries` writes the query heads (`head_dim` rows each, the
    module attribute `head_dim_attribute`), `output` reads them (`head_dim` columns each). `keys` and
    `values` write the key/value heads; with them known a whole key/value group can leave, once it has one
    query head left. `fused` (GPT-NeoX): `queries` writes query, key and value of each head in turn and
    there are no separate key/value projections (every head its own group). `stacked` (Phi-3): `queries`
    writes every query head, then every key head, then every value head. The module attributes
    `heads_attribute` (query heads; `config.NAME` where the forward reads the count from its config,
    which each block then holds a copy of), `groups_attribute` (query heads per key/value head) and
    `key_value_heads_attribute` are kept current where the family's forward reads them. Query heads
    otherwise leave one from every key/value group at a time. `query_norm` and `key_norm` name norms whose
    weight spans the whole query or key projection (OLMo 2's q_norm, k_norm): a pruned head's features
    leave them too."""

    module: str
    queries: str
    output: str
    keys: str | None = None
    values: str | None = None
    fused: bool = False
    head_dim_attribute: str = "head_dim"
    heads_attribute: str | None = None
    groups_attribute: str | None = "num_key_value_groups"
    stacked: bool = False
    key_value_heads_attribute: str | None = None
    query_norm: str | None = None
    key_norm: str | None = None

    @property
    def whole_groups(self) -> bool:
        return self.fused or self.stacked or (self.keys is not None and self.values is not None)


@dataclass(frozen=True)
class Modules:
    """Where the parts are, as `transformers` attribute paths (block parts relative to the block)."""

    embeddings: tuple[str, ...]
    blocks: str
    residuals: tuple[ResidualPaths, ...]
    final_norm: str
    head: str
    mlp: MlpPaths | None = None
    attention: AttentionPaths | None = None

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "embeddings": list(self.embeddings), "blocks": self.blocks,
            "residuals": [{"reads": {norm: list(readers) for norm, readers in r.reads}, "writes": list(r.writes)}
                          for r in self.residuals],
            "final_norm": self.final_norm, "head": self.head}
        if self.mlp is not None:
            record["mlp"] = {"producers": list(self.mlp.producers), "consumer": self.mlp.consumer,
                             "fused": self.mlp.fused,
                             **({"width_config": self.mlp.width_config} if self.mlp.width_config else {})}
            if self.mlp.experts is not None:
                record["mlp"]["experts"] = {key: getattr(self.mlp.experts, key) for key in EXPERTS_KEYS}
        if self.attention is not None:
            record["attention"] = {key: getattr(self.attention, key) for key in ATTENTION_KEYS
                                   if getattr(self.attention, key) != ATTENTION_DEFAULTS[key]}
        return record

    @classmethod
    def from_json(cls, record: Any) -> Modules:
        keys = ("embeddings", "blocks", "residuals", "final_norm", "head")
        if not isinstance(record, dict) or any(key not in record for key in keys):
            raise LayoutError(f"lmslice.modules must be a mapping with {', '.join(keys)}")
        residuals = record["residuals"]
        if not isinstance(residuals, list) or not residuals:
            raise LayoutError("lmslice.modules.residuals must be a non-empty list")
        parsed = []
        for index, residual in enumerate(residuals):
            name = f"modules.residuals[{index}]"
            reads = _mapping(_require(_mapping(residual, name), "reads", f"{name}."), f"{name}.reads")
            if not reads:
                raise LayoutError(f"lmslice.{name}.reads is empty")
            parsed.append(ResidualPaths(
                tuple((norm if norm == "" else _text(norm, f"{name}.reads"), _texts(readers, f"{name}.reads.{norm}"))
                      for norm, readers in reads.items()),
                _texts(_require(residual, "writes", f"{name}."), f"{name}.writes")))
        mlp = attention = None
        if "mlp" in record:
            entry = _mapping(record["mlp"], "modules.mlp")
            width_config = entry.get("width_config")
            experts = None
            if "experts" in entry:
                experts_entry = _mapping(entry["experts"], "modules.mlp.experts")
                # the count and top-k entries came later: a record written before them has the defaults
                entries = {**{key: EXPERTS_DEFAULTS[key] for key in LATER_EXPERTS_KEYS}, **experts_entry}
                experts = ExpertsPaths(**{
                    key: _integer(_require(entries, key, "modules.mlp.experts."), f"modules.mlp.experts.{key}")
                    if key == "fused" else
                    _text(_require(entries, key, "modules.mlp.experts."), f"modules.mlp.experts.{key}")
                    for key in EXPERTS_KEYS})
            mlp = MlpPaths(_texts(_require(entry, "producers", "modules.mlp."), "modules.mlp.producers"),
                           _text(_require(entry, "consumer", "modules.mlp."), "modules.mlp.consumer"),
                           _integer(entry.get("fused", 1), "modules.mlp.fused"),
                           None if width_config is None else _text(width_config, "modules.mlp.width_config"),
                           experts)
        if "attention" in record:
            entry = _mapping(record["attention"], "modules.attention")
            attention = _attention(entry)
        return cls(_texts(record["embeddings"], "modules.embeddings"), _text(record["blocks"], "modules.blocks"),
                   tuple(parsed), _text(record["final_norm"], "modules.final_norm"),
                   _text(record["head"], "modules.head"), mlp, attention)


ATTENTION_KEYS = tuple(item.name for item in fields(AttentionPaths))
ATTENTION_DEFAULTS = {item.name: item.default for item in fields(AttentionPaths)}


def _attention(entry: dict[str, Any]) -> AttentionPaths:
    values: dict[str, Any] = {}
    for key in ATTENTION_KEYS:
        name = f"modules.attention.{key}"
        if key in ("module", "queries", "output"):
            values[key] = _text(_require(entry, key, "modules.attention."), name)
        elif key in ("fused", "stacked"):
            values[key] = entry.get(key, False)
            if not isinstance(values[key], bool):
                raise LayoutError(f"lmslice.{name} must be true or false, got {values[key]!r}")
        elif entry.get(key, ATTENTION_DEFAULTS[key]) is not None:
            values[key] = _text(entry.get(key, ATTENTION_DEFAULTS[key]), name)
        else:
            values[key] = None
    if (values["keys"] is None) != (values["values"] is None):
        raise LayoutError("lmslice.modules.attention names keys without values, or values without keys")
    if values["stacked"] and (values["fused"] or values["key_value_heads_attribute"] is None):
        raise LayoutError("lmslice.modules.attention.stacked needs fused false and a key_value_heads_attribute")
    return AttentionPaths(**values)


@dataclass(frozen=True)
class Stream:
    """The residual stream's slice: `width` features between blocks (of `Layout.hidden_size`), the head
    reading `head_width`, weightless norms with epsilon `eps` dividing by the original width."""

    width: int
    head_width: int
    eps: float
    rotation: str = "per-block"
    sparsity: float | None = None
    round_to: int | None = None
    centred_embeddings: bool = False
    tied_embeddings: bool = False
    added_biases: tuple[str, ...] = ()
    basis_weighting: str | None = None


STREAM_KEYS = tuple(item.name for item in fields(Stream))


@dataclass(frozen=True)
class Layout:
    """Everything a saved model is beyond its family's config. `stream` is None where the residual stream
    keeps its width; `mlp_widths` / `attention_heads` are None where every block keeps the config's (a
    block with fewer query heads than the config's key/value heads keeps that many whole groups; with
    none, its attention is gone: `AttentionFree`);
    `expert_counts` is None where every block of experts keeps the config's count (else the experts each
    block keeps, 0 in a block without experts);
    `export` is STANDARD where the model *is* its family's architecture (config widths changed, no
    remote code needed)."""

    family: str
    base_architecture: str
    modules: Modules
    hidden_size: int  # the residual width the stream's norms divide by (the dense model's)
    stream: Stream | None = None
    mlp_widths: tuple[int, ...] | None = None
    attention_heads: tuple[int, ...] | None = None
    expert_counts: tuple[int, ...] | None = None
    export: str | None = None
    format: int = FORMAT_VERSION
    version: str = ""
    calibration: dict[str, Any] | None = None
    source_model: str | None = None
    mlp_pruning: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    steps: tuple[dict[str, Any], ...] = ()  # the recipe of the run that made it: each step and its config
    history: tuple[dict[str, Any], ...] = ()  # the records of the lmslice outputs this one was made from
    notes: dict[str, Any] = field(default_factory=dict)  # further descriptive entries (shape nothing)

    @property
    def standard(self) -> bool:
        return self.export == STANDARD

    @property
    def needs_remote_code(self) -> bool:
        """Whether the config alone cannot build the model (lmslice's own structure)."""
        return not self.standard and (self.stream is not None or self.mlp_widths is not None
                                      or self.attention_heads is not None or self.expert_counts is not None)

    def replace(self, **changes: Any) -> Layout:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"format": self.format, "version": self.version, "family": self.family,
                                  "base_architecture": self.base_architecture, "modules": self.modules.to_json(),
                                  "hidden_size": self.hidden_size}
        if self.stream is not None:
            for key in STREAM_KEYS:
                value = getattr(self.stream, key)
                if value is not None:
                    record[key] = list(value) if isinstance(value, tuple) else value
        for key in PER_BLOCK_KEYS:
            if getattr(self, key) is not None:
                record[key] = list(getattr(self, key))
        for key in ("export", "calibration", "source_model", "mlp_pruning", "finetune"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        for key in ("steps", "history"):
            if getattr(self, key):
                record[key] = list(getattr(self, key))
        return {**self.notes, **record}

    @classmethod
    def from_json(cls, record: Any) -> Layout:
        """The record as written in config.json, every entry checked for type and range."""
        if not isinstance(record, dict):
            raise LayoutError("the \"lmslice\" entry is not a mapping")
        version = record.get("format")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
                raise LayoutError(f"written by a newer lmslice (format {version}; this one reads format "
                                  f"{FORMAT_VERSION}): pip install --upgrade lmslice")
            raise LayoutError(f"unknown lmslice format {version!r} (expected {FORMAT_VERSION})")
        for key in ("family", "base_architecture", "modules", "hidden_size"):
            _require(record, key)
        stream = None
        if any(key in record for key in ("width", "head_width", "eps", "rotation", "added_biases")):
            for key in ("width", "head_width", "eps"):  # a sliced stream is described by all three
                _require(record, key)
            stream = _stream(record)
        hidden = _integer(record["hidden_size"], "hidden_size")
        if stream is not None:
            sizes = {"hidden_size": hidden, "width": stream.width, "head_width": stream.head_width}
            if stream.width > hidden or stream.head_width not in (stream.width, hidden):
                raise LayoutError(f"inconsistent lmslice widths {sizes}")
        export = record.get("export")
        if export not in (None, STANDARD):
            raise LayoutError(f"lmslice.export must be {STANDARD!r} or absent, got {export!r}")
        layout = cls(
            family=_text(record["family"], "family"),
            base_architecture=_text(record["base_architecture"], "base_architecture"),
            modules=Modules.from_json(record["modules"]),
            hidden_size=hidden,
            stream=stream,
            mlp_widths=_widths(record.get("mlp_widths"), "mlp_widths", least=0),
            attention_heads=_widths(record.get("attention_heads"), "attention_heads", least=0),
            expert_counts=_widths(record.get("expert_counts"), "expert_counts", least=0),
            export=export,
            format=version,
            version=str(record.get("version", "")),
            calibration=_optional_mapping(record, "calibration"),
            source_model=None if record.get("source_model") is None else str(record["source_model"]),
            mlp_pruning=_optional_mapping(record, "mlp_pruning"),
            finetune=_optional_mapping(record, "finetune"),
            steps=tuple(_mapping(item, "steps[]") for item in record.get("steps") or ()),
            history=tuple(_mapping(item, "history[]") for item in record.get("history") or ()),
            notes={key: value for key, value in record.items() if key not in KNOWN_KEYS},
        )
        if layout.mlp_widths is not None and layout.modules.mlp is None:
            raise LayoutError("lmslice.mlp_widths needs lmslice.modules.mlp (where the MLP channels are)")
        if layout.attention_heads is not None and layout.modules.attention is None:
            raise LayoutError("lmslice.attention_heads needs lmslice.modules.attention (where the heads are)")
        if layout.expert_counts is not None and (layout.modules.mlp is None or layout.modules.mlp.experts is None):
            raise LayoutError("lmslice.expert_counts needs lmslice.modules.mlp.experts (where the experts are)")
        if layout.standard and any(getattr(layout, key) is not None for key in PER_BLOCK_KEYS):
            raise LayoutError("lmslice.export 'standard' (the family's own architecture) cannot hold per-block "
                              "mlp_widths, attention_heads or expert_counts")
        return layout

    def validate(self, config: dict[str, Any]) -> None:
        """Refuses a record that disagrees with the model's config (`config.json` as a dict): block count,
        widths, heads, the norm epsilon."""
        blocks = config.get("num_hidden_layers")
        for key in PER_BLOCK_KEYS:
            values = getattr(self, key)
            if values is not None and isinstance(blocks, int) and len(values) != blocks:
                raise LayoutError(f"lmslice.{key} has {len(values)} entries for {blocks} blocks")
        mlp = self.modules.mlp
        dense_mlp = config.get(mlp.width_config) if mlp is not None and mlp.width_config else None
        if self.mlp_widths is not None and isinstance(dense_mlp, int):
            wide = [width for width in self.mlp_widths if width > dense_mlp]
            if wide:
                raise LayoutError(f"lmslice.mlp_widths {wide[0]} exceeds the config's {mlp.width_config} {dense_mlp}")
        if self.mlp_widths is not None and 0 in self.mlp_widths and self.stream is not None:
            raise LayoutError("lmslice.mlp_widths has a block without MLP, which needs an unsliced stream")
        experts = mlp.experts if mlp is not None else None
        if self.expert_counts is not None and experts is not None:
            dense_count, top_k = config.get(experts.count_config), config.get(experts.top_k_config)
            for count in self.expert_counts:
                if isinstance(dense_count, int) and count > dense_count:
                    raise LayoutError(f"lmslice.expert_counts {count} exceeds the config's {experts.count_config} "
                                      f"{dense_count}")
                if isinstance(top_k, int) and 0 < count < top_k:
                    raise LayoutError(f"lmslice.expert_counts {count} is fewer than the {top_k} experts every token "
                                      "is routed to ({experts.top_k_config})")
        if self.attention_heads is not None:
            heads, groups = config.get("num_attention_heads"), config.get("num_key_value_heads")
            groups = groups if isinstance(groups, int) and groups > 0 else heads
            whole_groups = self.modules.attention.whole_groups
            if self.attention_heads[0] == 0:
                raise LayoutError("lmslice.attention_heads[0] is 0: the first block keeps its attention "
                                  "(transformers counts the cached tokens there)")
            if 0 in self.attention_heads and (not whole_groups or self.stream is not None):
                raise LayoutError("lmslice.attention_heads has a block without attention, which needs the "
                                  "attention's key/value paths and an unsliced stream")
            for count in self.attention_heads:
                if isinstance(heads, int) and count > heads:
                    raise LayoutError(f"lmslice.attention_heads {count} exceeds num_attention_heads {heads}")
                # fewer query heads than key/value heads: whole groups left, one query head in each kept one
                if isinstance(groups, int) and count % groups and not (whole_groups and count < groups):
                    raise LayoutError(f"lmslice.attention_heads {count} is not a multiple of the "
                                      f"{groups} key/value heads")
        if self.standard:
            return  # the config itself says the widths of the family's own model
        configured = config.get("hidden_size", self.hidden_size)
        if configured != self.hidden_size:
            raise LayoutError(f"lmslice.hidden_size {self.hidden_size} differs from hidden_size {configured}")
        if self.stream is not None:
            config_eps = next((config[key] for key in CONFIG_EPS_KEYS
                               if isinstance(config.get(key), (int, float))), None)
            if config_eps is not None and not math.isclose(self.stream.eps, config_eps, rel_tol=1e-6):
                raise LayoutError(f"lmslice.eps {self.stream.eps} differs from the model's norm epsilon {config_eps}")


PER_BLOCK_KEYS = ("mlp_widths", "attention_heads", "expert_counts")
KNOWN_KEYS = frozenset({"format", "version", "family", "base_architecture", "modules", "hidden_size", *STREAM_KEYS,
                        *PER_BLOCK_KEYS, "export", "calibration", "source_model", "mlp_pruning",
                        "finetune", "steps", "history"})


def _optional_mapping(record: dict[str, Any], key: str) -> dict[str, Any] | None:
    return None if record.get(key) is None else _mapping(record[key], key)


def _widths(value: Any, name: str, least: int = 1) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise LayoutError(f"lmslice.{name} must be a non-empty list of integers, got {value!r}")
    return tuple(_integer(item, f"{name}[{index}]", least) for index, item in enumerate(value))


def _stream(record: dict[str, Any]) -> Stream:
    eps = record["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not eps > 0:
        raise LayoutError(f"lmslice.eps must be a positive number, got {eps!r}")
    sizes = {key: record[key] for key in ("hidden_size", "width", "head_width")}
    if not all(isinstance(value, int) and not isinstance(value, bool) and value > 0 for value in sizes.values()):
        raise LayoutError(f"lmslice widths must be positive integers, got {sizes}")
    rotation = record.get("rotation", "per-block")
    if rotation not in ROTATIONS:
        raise LayoutError(f"lmslice.rotation must be one of {', '.join(ROTATIONS)}, got {rotation!r}")
    sparsity = record.get("sparsity")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                 or not 0 <= sparsity < 1):
        raise LayoutError(f"lmslice.sparsity must be a number in [0, 1), got {sparsity!r}")
    flags = {}
    for key in ("centred_embeddings", "tied_embeddings"):
        flags[key] = record.get(key, False)
        if not isinstance(flags[key], bool):
            raise LayoutError(f"lmslice.{key} must be true or false, got {flags[key]!r}")
    weighting = record.get("basis_weighting")
    return Stream(record["width"], record["head_width"], float(eps), rotation, sparsity,
                  None if record.get("round_to") is None else _integer(record["round_to"], "round_to"),
                  added_biases=_texts(record.get("added_biases", []), "added_biases", allow_empty=True),
                  basis_weighting=None if weighting is None else _text(weighting, "basis_weighting"), **flags)


def layout_of(config: Any) -> Layout | None:
    """The layout a model's config (a `PretrainedConfig` or its dict) carries, or None for a plain model."""
    record = config.get("lmslice") if isinstance(config, dict) else getattr(config, "lmslice", None)
    return None if record is None else Layout.from_json(record)
