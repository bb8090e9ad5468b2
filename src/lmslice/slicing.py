"""SliceGPT end to end on a loaded model: fuse → (calibrate → rotate → slice) block by block."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lmslice import __version__
from lmslice.adapters import ModelAdapter, find_adapter
from lmslice.calibration import Covariance, block_signals, capture_block_inputs
from lmslice.errors import LmsliceError
from lmslice.layout import ROTATIONS, Layout, Stream, layout_of
from lmslice.fuse import fuse_block, fuse_embeddings, fuse_head, norm_eps
from lmslice.io.data import check_batches
from lmslice.modeling import apply_layout, get_module, install_final_norm
from lmslice.rotate import rotate_block, rotate_reader, rotate_writer
from lmslice.shared_basis import WEIGHTINGS, shared_basis
from lmslice.walk import InMemory, Placement, Run, RunProgress, walk_blocks


def check_sparsity(sparsity: float, round_to: int) -> None:
    """The range of both options, checkable before the model (and its width) is known."""
    if not 0 <= sparsity < 1:
        raise LmsliceError(f"sparsity must be in [0, 1), got {sparsity}")
    if round_to < 1:
        raise LmsliceError(f"round_to must be a positive integer, got {round_to}")


def sliced_width(hidden: int, sparsity: float, round_to: int = 8) -> int:
    """D' = (1 - s)·D rounded down to a multiple of `round_to`; refused where that leaves nothing."""
    check_sparsity(sparsity, round_to)
    if sparsity == 0:
        return hidden
    kept = int((1 - sparsity) * hidden)
    if kept < round_to:
        raise LmsliceError(f"sparsity {sparsity} keeps {kept} of {hidden} features, fewer than round_to {round_to}: "
                           "lower the sparsity or round_to")
    return kept // round_to * round_to


@dataclass
class SliceResult:
    """What slicing did: widths, the eigenvalue spectra of every signal, and the time it took."""

    family: str
    hidden_size: int
    width: int
    head_width: int
    seconds: float
    spectra: dict[str, list[float]] = field(default_factory=dict)
    head_input: torch.Tensor | None = None  # shared basis: the head's input second moment, in kept coordinates


def fresh_layout(model: nn.Module, adapter: ModelAdapter) -> Layout:
    """The layout of a model no lmslice pass has cut (or one in its family's own architecture, whose
    record becomes history): family, base class, module paths and its residual width."""
    previous = layout_of(model.config)
    history = () if previous is None else (previous.to_json(),) + previous.history
    return Layout(adapter.family, type(model).__name__, adapter.modules(),
                  get_module(model, adapter.embeddings[0]).weight.shape[1], version=__version__, history=history)


def layout_before(model: nn.Module, adapter: ModelAdapter) -> Layout:
    """What a further pass starts from: the model's own record if it is in lmslice's layout, else a fresh one."""
    layout = layout_of(model.config)
    if layout is None or layout.standard:
        return fresh_layout(model, adapter)
    return layout.replace(version=__version__)


def residual_width(model: nn.Module) -> int:
    return get_module(model, find_adapter(model).embeddings[0]).weight.shape[1]


def skeleton_of(model: nn.Module, layout: Layout) -> nn.Module:
    """A weightless (meta-device) copy of `model`'s family with the structure `layout` describes, recorded
    in its config: what the checks of a further step, and parameter counts, read."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    apply_layout(skeleton, layout)
    skeleton.config.lmslice = layout.to_json()
    return skeleton


def sliced_skeleton(model: nn.Module, width: int, rotation: str = "per-block", slice_head: bool = True,
                    round_to: int | None = None) -> nn.Module:
    """`skeleton_of` `model` sliced to `width` (an output pruned per block keeps its widths), the head
    sliced too where `slice_head` or the basis is shared. The norm epsilon (the model's own) shapes no
    parameter, and the few bias vectors that folding a LayerNorm adds are not counted."""
    adapter = find_adapter(model)
    eps = norm_eps(get_module(model, adapter.final_norm))
    head_width = width if slice_head or rotation == "shared" else residual_width(model)
    stream = Stream(width, head_width, eps, rotation, round_to=round_to)
    return skeleton_of(model, layout_before(model, adapter).replace(stream=stream))


def check_can_slice(model: nn.Module) -> None:
    """Refuses, before any calibration, a model whose residual stream lmslice has already sliced per block
    (its shortcuts and weightless norms cannot be sliced again), or whose family's blocks are not
    rotation-invariant; plain outputs and pruned ones can be."""
    reason = find_adapter(model).cannot_slice()
    if reason:
        raise LmsliceError(reason)
    layout = layout_of(model.config)
    if layout is not None and not layout.standard and layout.stream is not None:
        source = f" ({layout.source_model})" if layout.source_model else ""
        raise LmsliceError("this model's residual stream is already sliced (lmslice's layout); slice the dense "
                           f"model it came from{source} instead, or prune this one to target_params")
    if layout is not None and 0 in (layout.attention_heads or ()):
        raise LmsliceError("a block of this model has no attention left (pruned away), so no output projection "
                           "to carry its shortcut; slice the model it was pruned from, or prune this one further")
    if layout is not None and 0 in (layout.mlp_widths or ()):
        raise LmsliceError("a block of this model has no MLP left (pruned away), so no down projection to carry "
                           "its shortcut; slice the model it was pruned from (slice before pruning), or prune this "
                           "one further")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True)
class SliceConfig:
    """SliceGPT: rotate the residual stream into its principal components and delete the trailing
    `sparsity` of its width (rounded down to a multiple of `round_to`). `rotation` "per-block" gives every
    block its own basis, joined by shortcut matrices; "shared" one basis for the whole stream, weighted as
    `weighting` says (see `shared_basis`), which the standard format needs. The head keeps its full input
    width unless `slice_head` (always sliced with a shared basis). `centre_embeddings` (RMSNorm families;
    None: when components are deleted) removes the embeddings' mean, which is not exact but slices better."""

    sparsity: float
    round_to: int = 8
    slice_head: bool = False
    rotation: str = "per-block"
    weighting: str = "unit-rms"
    centre_embeddings: bool | None = None

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, self.round_to)
        if self.rotation not in ROTATIONS:
            raise LmsliceError(f"unknown rotation {self.rotation!r}; choose one of {', '.join(ROTATIONS)}")
        if self.weighting not in WEIGHTINGS:
            raise LmsliceError(f"unknown basis weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")

    @property
    def passes(self) -> int:
        """The walks over the blocks it takes: a shared basis is measured on the dense model first."""
        return 2 if self.rotation == "shared" else 1


def slice_model(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], sparsity: float, *,
                round_to: int = 8, slice_head: bool = False, progress: bool = True,
                placement: Placement | None = None, activations: str | Path | None = None,
                centre_embeddings: bool | None = None, rotation: str = "per-block",
                weighting: str = "unit-rms") -> SliceResult:
    """`slice_blocks` with its settings as keywords (see `SliceConfig`): slices `model` in place, its blocks
    where `placement` keeps them (default: in memory), the calibration stream waiting between blocks where
    `activations` says (None: where it was computed, "cpu", or a directory)."""
    config = SliceConfig(sparsity, round_to, slice_head, rotation, weighting, centre_embeddings)
    run = Run(0, placement or InMemory(model.get_input_embeddings().weight.device), str(activations)
              if activations is not None else None, RunProgress(progress))
    run.progress.expect(config.passes * len(get_module(model, find_adapter(model).blocks)))
    try:
        return slice_blocks(model, batches, config, run)
    finally:
        run.progress.close()


@torch.no_grad()
def slice_blocks(model: nn.Module, batches: list[dict[str, torch.Tensor]], config: SliceConfig,
                 run: Run) -> SliceResult:
    """Slices `model` in place and records its new structure in `model.config.lmslice` (`compress` adds
    the run's record: calibration, source, steps).

    `batches` are calibration batches (`input_ids`, optional `attention_mask`). The head keeps its full
    input width unless `config.slice_head` (as in the reference implementation); the last block then
    writes the full width. Blocks are fused, calibrated, rotated and sliced one at a time, in one walk
    over the blocks wherever `run` places them.

    The rotation plan is "per-block" (each block rotated into the principal components of its own input,
    joined by shortcut matrices) or "shared" (one basis for the whole stream from a dense walk first,
    weighted as `config.weighting` says, see `shared_basis`): every shortcut is then the identity and the
    head is sliced too, which `lmslice.export.standard_model` turns into the family's own architecture.
    """
    shared = config.rotation == "shared"
    start = time.perf_counter()
    check_can_slice(model)
    adapter = find_adapter(model)
    before = layout_before(model, adapter)
    model.eval()
    embedding = get_module(model, adapter.embeddings[0]).weight
    tied_embeddings = embedding is get_module(model, adapter.head).weight
    hidden = embedding.shape[1]
    width = sliced_width(hidden, config.sparsity, config.round_to)
    head_width = width if config.slice_head or shared else hidden
    batches = check_batches(batches, embedding.shape[0])

    eps = norm_eps(get_module(model, adapter.final_norm))
    # Centring the embeddings of an RMSNorm family changes its function a little but spares the PCA a
    # component for the mean, as the reference implementation does; sliced, the model is then a little
    # better (docs/method.md). At sparsity 0 nothing is deleted, so the model is left exact.
    centre_embeddings = config.centre_embeddings
    if centre_embeddings is None:
        centre_embeddings = width < hidden
    fuse_embeddings(model, adapter, centre=centre_embeddings)
    blocks = get_module(model, adapter.blocks)
    head_input = None
    if shared:
        plan = run.remembered("shared basis", lambda: shared_basis(
            model, adapter, capture_block_inputs(model, adapter, batches, run.store()), config.weighting, run),
            visits=len(blocks))
        streams = []  # every block is rotated into the one basis: no block needs its input
        spectra = {"shared": plan.eigenvalues.tolist()}
        basis = plan.eigenvectors[:, :width]
        head_input = basis.T @ plan.head_input @ basis
    else:
        streams = capture_block_inputs(model, adapter, batches, run.store())
        covariance = Covariance(hidden, embedding.device, "output of the embeddings")
        for stream in streams:
            covariance.add(stream.hidden, stream.mask)
        eigenvalues, eigenvectors = covariance.principal_components()
        spectra = {"embeddings": eigenvalues.tolist()}
        basis = eigenvectors[:, :width]
    for path in adapter.embeddings:
        rotate_writer(get_module(model, path), basis)
    for stream in streams:
        stream.hidden = stream.hidden @ basis.to(embedding.dtype)

    # what each block's visit leaves the next: the basis it reads, and what the layout and result record
    carried = {"basis": basis, "spectra": spectra, "added_biases": []}

    def slice_block(index: int, block: nn.Module) -> bool:
        carried["added_biases"].extend(f"{adapter.blocks}.{index}.{path}" for path in fuse_block(block, adapter))
        if shared:
            rotate_block(block, adapter, [basis] * (len(adapter.residuals) + 1), hidden, eps)
            return True
        out_width = head_width if index == len(blocks) - 1 else width
        signals = block_signals(block, adapter, streams, carried["basis"], width, name=f"block {index}")
        block_bases = [carried["basis"]] + [vectors[:, :width] for _, vectors in signals.inner]
        block_bases.append(signals.output[1][:, :out_width])
        for position, (values, _) in enumerate(signals.inner, start=1):
            carried["spectra"][f"block{index}.residual{position}"] = values.tolist()
        carried["spectra"][f"block{index}.output"] = signals.output[0].tolist()
        rotate_block(block, adapter, block_bases, hidden, eps)
        carried["basis"] = block_bases[-1]
        down = carried["basis"].to(embedding.dtype)
        for stream, output in zip(streams, signals.outputs):
            stream.hidden = output.store.take(output.name) @ down
        return True

    walk_blocks(model, run, slice_block, "slicing", streams=streams, carried=carried)
    for stream in streams:
        stream.store.forget(stream.name)
    basis, spectra, added_biases = carried["basis"], carried["spectra"], carried["added_biases"]
    added_biases += fuse_head(model, adapter)
    rotate_reader(get_module(model, adapter.head), basis)
    install_final_norm(model, adapter.modules(), width, head_width, hidden, eps)

    model.config.lmslice = before.replace(
        stream=Stream(width, head_width, eps, config.rotation, config.sparsity, config.round_to, centre_embeddings,
                      tied_embeddings, tuple(added_biases), config.weighting if shared else None),
    ).to_json()
    return SliceResult(adapter.family, hidden, width, head_width, time.perf_counter() - start, spectra, head_input)
