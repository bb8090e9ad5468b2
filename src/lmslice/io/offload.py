"""Compressing a model larger than memory: blocks stay in safetensors files until their turn.

The model is built with its blocks on the meta device (no memory); everything else (embeddings, final
norm, head, rotary buffers) is loaded. Each walk over the blocks reads one block from the checkpoint
(or from the shard of the output an earlier pass wrote), measures or changes it, writes it to its own
shard of the output if it changed, and frees it, so peak memory is about one block plus the calibration
activations and the embeddings/head, whatever the depth. Because the finished blocks are on disk before
the end, such a run can be resumed where it was interrupted (`lmslice.io.resume`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmslice.errors import LmsliceError
from lmslice.adapters import find_adapter
from lmslice.io.models import (cast_floating, check_finite, discarded_on_failure, finish_output, open_skeleton,
                               record_saved_dtype, source_dtype, staging_dir, stored_once)
from lmslice.io.outputs import check_output, resumable_staging
from lmslice.io.resume import ResumeRecord
from lmslice.layout import layout_of
from lmslice.modeling import base_key_mapping
from lmslice.slicing import SliceResult, check_can_slice, slice_model

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """Tensor names → files of a (possibly sharded) safetensors checkpoint.

    Names are the model's: `key_mapping` ({regex: replacement}, see `modeling.base_key_mapping`) renames
    those stored under another name, as loading does (GPT-NeoX stores its head as `embed_out`)."""

    def __init__(self, directory: Path, key_mapping: dict[str, str] | None = None) -> None:
        index = directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            stored = {name: directory / file for name, file in weight_map.items()}
        elif (directory / "model.safetensors").is_file():
            with safe_open(directory / "model.safetensors", framework="pt") as handle:
                stored = {name: directory / "model.safetensors" for name in handle.keys()}
        else:
            raise LmsliceError(f"--offload reads safetensors checkpoints; {directory} has none "
                               "(convert it with save_pretrained, or slice without --offload)")
        self.directory = directory
        self.stored_names = {_renamed(name, key_mapping or {}): name for name in stored}
        self.files = {name: stored[stored_name] for name, stored_name in self.stored_names.items()}

    @classmethod
    def shard(cls, path: Path) -> Checkpoint:
        """One safetensors file lmslice wrote, its tensors under the model's own names."""
        checkpoint = cls.__new__(cls)
        checkpoint.directory = path.parent
        with safe_open(path, framework="pt") as handle:
            checkpoint.stored_names = {name: name for name in handle.keys()}
        checkpoint.files = {name: path for name in checkpoint.stored_names}
        return checkpoint

    def read(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        if name not in self.files:
            raise LmsliceError(f"the checkpoint has no tensor {name}; it does not match its config")
        with safe_open(self.files[name], framework="pt", device=str(device)) as handle:
            return handle.get_tensor(self.stored_names[name]).to(dtype)


def _renamed(name: str, key_mapping: dict[str, str]) -> str:
    for pattern, replacement in key_mapping.items():
        name = re.sub(pattern, replacement, name)
    return name


def materialise(module: nn.Module, prefix: str, checkpoint: Checkpoint, dtype: torch.dtype,
                device: torch.device | str, skip: nn.Module | None = None, tied: dict[str, str] | None = None,
                ) -> None:
    """Replaces the meta parameters under `module` (except under `skip`) by the checkpoint's tensors.
    `tied` maps a tensor name missing from the checkpoint to the name it is tied to."""
    if module is skip:
        return
    for name, parameter in list(module.named_parameters(recurse=False)):
        if parameter.device.type == "meta":
            full_name = prefix + name
            if full_name not in checkpoint.files and tied:
                full_name = tied.get(full_name, full_name)
            setattr(module, name, nn.Parameter(checkpoint.read(full_name, dtype, device), requires_grad=False))
    for name, child in module.named_children():
        materialise(child, f"{prefix}{name}.", checkpoint, dtype, device, skip, tied)


class OffloadedBlocks:
    """A `Placement` for a model larger than memory: its blocks live in safetensors files, the source
    checkpoint until a pass changes them, then each block's own shard of the output (`out`'s staging
    directory), one block in memory at a time. Blocks are read in `dtype` onto `device`; a changed block
    is written in `dtype` while later steps may read it again, and in `save_dtype` (by default `dtype`) by
    the last step (`last_step`). The staging directory is created with the first shard, so a run that
    fails before any block changes leaves nothing behind; a failed run removes it, unless it is to be
    resumed (`resume`): then it is `resumable_staging(out)`, kept, and holds the run's `record`
    (`open_record`)."""

    def __init__(self, checkpoint: Checkpoint, blocks_path: str, out: Path, dtype: torch.dtype,
                 device: torch.device | str, save_dtype: torch.dtype | None = None, resume: bool = False) -> None:
        self.checkpoint = checkpoint
        self.blocks_path = blocks_path
        self.out = out
        self.staging: Path | None = None
        self.dtype = dtype
        self.device = torch.device(device)
        self.save_dtype = save_dtype or dtype
        self.final = False
        self.weight_map: dict[str, str] = {}
        self.written: set[int] = set()  # blocks whose current weights are in their own shard
        self.resume = resume
        self.record: ResumeRecord | None = None
        self.pending: int | None = None  # the block whose new shard waits for the record to count it

    def load(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.blocks_path}.{index}."
        source = Checkpoint.shard(self.staging_path() / shard_name(index)) if index in self.written else self.checkpoint
        materialise(block, prefix, source, self.dtype, self.device)
        check_finite(block, prefix)

    def store(self, index: int, block: nn.Module, changed: bool) -> None:
        if changed:
            self.write_shard(shard_name(index), {f"{self.blocks_path}.{index}.{name}": tensor
                                                 for name, tensor in block.state_dict().items()},
                             self.save_dtype if self.final else self.dtype, pending=self.record is not None)
            if self.record is None:
                self.written.add(index)
            else:
                self.pending = index
        block.to("meta")

    def commit(self) -> None:
        """The pending shard (`write_shard`) replaces the block's earlier one."""
        if self.pending is not None:
            filename = shard_name(self.pending)
            path = self.staging_path() / filename
            os.replace(_partial(path), path)
            self._mapped(filename)
            self.written.add(self.pending)
            self.pending = None

    def open_record(self, identity: dict[str, Any]) -> ResumeRecord:
        """The record of this resumable run (`ResumeRecord.open`), identified by `identity` and by where
        the blocks come from and how they are computed and saved; the blocks an interrupted run wrote are
        read from their shards from now on."""
        identity = {**identity, "source": str(self.checkpoint.directory.resolve()), "device": str(self.device),
                    "dtype": str(self.dtype).removeprefix("torch."),
                    "save_dtype": str(self.save_dtype).removeprefix("torch.")}
        self.record = ResumeRecord.open(self.staging_path(), identity, self)
        return self.record

    def resume_writes(self, written: list[int], pending: int | None) -> None:
        """Takes over the shards an interrupted run wrote: `written` hold their blocks' weights, `pending`'s
        counted by its record but not yet in place; any other partial shard was never counted."""
        staging = self.staging_path()
        for partial in staging.glob(".*.partial"):
            if pending is None or partial != _partial(staging / shard_name(pending)):
                partial.unlink()
        if pending is not None and _partial(staging / shard_name(pending)).exists():
            self.pending = pending
            self.commit()
        for index in written:
            self._mapped(shard_name(index))
        self.written = set(written)

    def close_record(self) -> None:
        """Every walk is done: what was kept to resume the run goes; what is written from now is final."""
        if self.record is not None:
            self.record.discard()
            self.record = None

    def last_step(self) -> None:
        self.final = True

    def staging_path(self) -> Path:
        """The staging directory, created on first use (a resumable run's by `open_record`)."""
        if self.staging is None:
            self.staging = resumable_staging(self.out) if self.resume else staging_dir(self.out)
        return self.staging

    def write_shard(self, filename: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                    pending: bool = False) -> None:
        """Writes `tensors` (cast to `dtype`) as the shard `filename`, whole or not at all (written beside it
        and renamed, so a shard being replaced stays readable until then; left beside it if `pending`,
        until `commit`)."""
        written = {name: cast_floating(tensor, dtype).contiguous().cpu() for name, tensor in tensors.items()}
        path = self.staging_path() / filename
        with discarded_on_failure(self.staging_path(), self.out, keep=self.resume):
            save_file(written, _partial(path), metadata={"format": "pt"})
            if not pending:
                os.replace(_partial(path), path)
        if not pending:
            self._mapped(filename)

    def _mapped(self, filename: str) -> None:
        """The weight map names the shard `filename` for the tensors it holds."""
        self.weight_map = {name: file for name, file in self.weight_map.items() if file != filename}
        self.weight_map.update({name: filename for name in Checkpoint.shard(self.staging_path() / filename).files})


def shard_name(index: int) -> str:
    return f"block-{index:05d}.safetensors"


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def load_skeleton(source: str | os.PathLike[str], dtype: torch.dtype, device: torch.device | str,
                  blocks_path_of: Callable[[nn.Module], str]) -> tuple[nn.Module, Checkpoint]:
    """The model with every block on the meta device and the rest loaded from the checkpoint."""
    directory = Path(source)
    if not (directory / "config.json").is_file():
        raise LmsliceError(f"--offload needs a local model directory with config.json, got {source}")
    model = open_skeleton(directory, dtype)  # an lmslice output with its pruned blocks' shapes
    if layout_of(model.config) is not None:  # an lmslice output: a sliced stream is refused
        check_can_slice(model)
    config = model.config
    checkpoint = Checkpoint(directory, base_key_mapping(type(model)))
    blocks = model.get_submodule(blocks_path_of(model))
    tied = {}
    if getattr(config, "tie_word_embeddings", False):
        # by module: the skeleton's head already shares the embedding's parameter, so names cannot tell them apart
        tied = {f"{_module_name(model, model.get_output_embeddings())}.weight":
                f"{_module_name(model, model.get_input_embeddings())}.weight"}
    materialise(model, "", checkpoint, dtype, device, skip=blocks, tied=tied)
    check_finite(model)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model.eval(), checkpoint


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def save_offloaded(model: nn.Module, storage: OffloadedBlocks, tokenizer: PreTrainedTokenizerBase | None,
                   out: str | os.PathLike[str], overwrite: bool, extra_files: dict[str, str] | None = None) -> Path:
    """Writes what is not a block (and any block no pass changed, copied from the source), the shard index
    and the side files (`extra_files`: name -> text), then moves the output in place."""
    blocks = model.get_submodule(storage.blocks_path)
    storage.last_step()
    for index, block in enumerate(blocks):
        if index not in storage.written:  # a copy: a resumed run copies it again
            storage.load(index, block)
            storage.store(index, block, True)
            storage.commit()
    storage.close_record()
    block_names = {f"{storage.blocks_path}.{name}" for name in blocks.state_dict()}
    rest = {name: tensor for name, tensor in stored_once(model.state_dict()).items() if name not in block_names}
    staging = storage.staging_path()
    with discarded_on_failure(staging, out):
        storage.write_shard("model-rest.safetensors", rest, storage.save_dtype)
        total = sum(os.path.getsize(staging / file) for file in set(storage.weight_map.values()))
        (staging / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(storage.weight_map.items()))}, indent=2))
        model.config.save_pretrained(staging)
        record_saved_dtype(staging, storage.save_dtype)
    return finish_output(model, tokenizer, staging, Path(out), overwrite, extra_files)


def open_offloaded(source: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: torch.dtype,
                   device: torch.device | str, overwrite: bool = False, save_dtype: torch.dtype | None = None,
                   resume: bool = False) -> tuple[nn.Module, OffloadedBlocks]:
    """The model skeleton of the checkpoint in `source` and the storage that streams its blocks to `out`
    in `save_dtype` (by default the dtype `source` stores); with `resume`, a run `compress` can resume
    where it was interrupted, which continues an interrupted one."""
    output = check_output(out, overwrite, [("the source model", source)], resuming=resume)
    model, checkpoint = load_skeleton(source, dtype, device, lambda skeleton: find_adapter(skeleton).blocks)
    return model, OffloadedBlocks(checkpoint, find_adapter(model).blocks, output, dtype, device,
                                  save_dtype or source_dtype(source), resume)


def slice_offloaded(source: str | os.PathLike[str], out: str | os.PathLike[str],
                    batches: list[dict[str, torch.Tensor]], sparsity: float, *,
                    tokenizer: PreTrainedTokenizerBase | None = None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", overwrite: bool = False,
                    save_dtype: torch.dtype | None = None, **slice_options: Any) -> tuple[nn.Module, SliceResult]:
    """Slices the checkpoint in `source` into `out` holding one block in memory at a time, saved in
    `save_dtype` (by default the dtype `source` stores).

    Returns the model skeleton (blocks on the meta device) and what slicing did."""
    model, storage = open_offloaded(source, out, dtype=dtype, device=device, overwrite=overwrite,
                                    save_dtype=save_dtype)
    with partial_output_removed_on_failure(storage):
        result = slice_model(model, batches, sparsity, placement=storage, **slice_options)
    save_offloaded(model, storage, tokenizer, Path(out), overwrite)
    return model, result


@contextlib.contextmanager
def partial_output_removed_on_failure(storage: OffloadedBlocks) -> Iterator[None]:
    """Removes what `storage` has written of the output if the body fails (and it is not to be resumed)."""
    try:
        yield
    except BaseException:
        if storage.staging is not None and not storage.resume:
            shutil.rmtree(storage.staging, ignore_errors=True)
        raise
