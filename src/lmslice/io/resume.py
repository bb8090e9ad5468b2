"""Resuming an interrupted `--offload` run (`--resume`) from what it finished, to the same result.

A resumable run stages its output where the next run for the same output finds it
(`lmslice.io.outputs.resumable_staging`) and keeps it when interrupted (Ctrl-C, an error, SIGKILL); it
never looks like a finished output. Beside the blocks' shards, `resume/` holds its record (`record.json`,
replaced whole after every finished block): what identifies the run (source, steps and their configs,
the calibration tokens, dtypes, device), the blocks whose shards hold their current weights, the results
of measurements a later pass reads (the pruning plan and its Fisher, the shared basis), and, for every
walk that changes blocks, how many blocks it has finished with a snapshot of where it got: the
calibration streams entering the next block and what the visit carries from block to block (the basis,
the spectra, the channels kept). Each finished block's structure (its modules as the visit left them,
weightless) is kept too.

Resumed, the run repeats what is not a walk over blocks (the embeddings' rotation, capturing the
streams: cheap and deterministic), reads back remembered measurements instead of making them, and in
each walk skips the blocks finished: their structure is put back, their weights stay in their shards,
and the streams and the visit's state are read back from the snapshot, so the next block is visited on
exactly what the uninterrupted run had. A measurement interrupted midway (the Fisher's two walks keep no
snapshot) is made again from its start. A block's new shard replaces the one an earlier step wrote only
once the record counts the block (it waits beside it as pending until then), so a run killed between the
two still finds the block's earlier weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmslice.calibration import BlockInput
from lmslice.errors import LmsliceError, first_line
from lmslice.io.outputs import RESUME_RECORD, process_alive, process_tag

if TYPE_CHECKING:
    from lmslice.io.offload import OffloadedBlocks


class ResumeRecord:
    """The record of a resumable run, kept in `staging`/resume beside the blocks `storage` writes there.
    Walks call `restore` before their first block and `block_finished` after each block they change; a
    measurement is `remember`ed once made."""

    def __init__(self, staging: Path, identity: dict[str, Any], storage: OffloadedBlocks) -> None:
        self.staging = staging
        self.directory = staging / RESUME_RECORD.parent
        self.identity = identity
        self.storage = storage
        self.walks: dict[str, dict[str, Any]] = {}  # walk -> {"blocks": finished, "snapshot": its directory}
        self.results: dict[str, str] = {}  # measurement -> its file
        self.resumed = False
        self.read_back: list[str] = []  # what this run read back instead of redoing it

    @classmethod
    def open(cls, staging: Path, identity: dict[str, Any], storage: OffloadedBlocks) -> ResumeRecord:
        """The record an interrupted run left in `staging`, if any, checked against this run's `identity`;
        else a new one (a staging directory without a record, left by a run killed while it moved its
        output into place, is cleared)."""
        record = cls(staging, json.loads(json.dumps(identity)), storage)
        try:
            saved = json.loads((staging / RESUME_RECORD).read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved is None:
            shutil.rmtree(staging, ignore_errors=True)
            record.directory.mkdir(parents=True)
            record.save()
            return record
        if saved["process"] != process_tag() and process_alive(saved["process"]):
            raise LmsliceError(f"another lmslice run (process {saved['process']}) is writing {staging}; wait for "
                               "it to end or stop it before resuming")
        difference = _first_difference(saved["identity"], record.identity)
        if difference:
            raise LmsliceError(f"--resume: the interrupted run in {staging} differs from this one in {difference}; "
                               "repeat its command to resume it, or drop --resume to start afresh")
        record.walks, record.results, record.resumed = saved["walks"], saved["results"], True
        storage.resume_writes(saved["written"], saved["pending"])
        record.save()  # names this process
        return record

    def save(self) -> None:
        """Replaces the record whole (written beside it, then renamed)."""
        pending = self.storage.pending
        record = {"identity": self.identity, "process": process_tag(),
                  "written": sorted(self.storage.written | ({pending} if pending is not None else set())),
                  "pending": pending, "walks": self.walks, "results": self.results}
        path = self.staging / RESUME_RECORD
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, path)

    def remembers(self, measurement: str) -> bool:
        return measurement in self.results

    def recall(self, measurement: str) -> Any:
        self.read_back.append(f"the {measurement.partition('.')[2]}")
        return torch.load(self.directory / self.results[measurement], weights_only=False)  # written by lmslice

    def remember(self, measurement: str, value: Any) -> None:
        name = f"result-{_slug(measurement)}.pt"
        partial = self.directory / f".{name}.partial"
        with self._writing():
            torch.save(value, partial)
            os.replace(partial, self.directory / name)
            self.results[measurement] = name
            self.save()

    def restore(self, walk: str, blocks: nn.ModuleList, order: Sequence[int], streams: Sequence[BlockInput],
                carried: dict[str, Any]) -> int:
        """Puts `walk` where the interrupted run got: returns how many blocks of `order` it had finished,
        whose structures are put back in `blocks`; the `streams` then enter the next block, and `carried`
        holds what the visit had carried that far."""
        state = self.walks.get(walk)
        if state is None:
            return 0
        finished = state["blocks"]
        for index in order[:finished]:
            blocks[index] = torch.load(self._structure(walk, index), weights_only=False)  # written by lmslice
        snapshot = self.directory / state["snapshot"]
        for stream in streams:
            stream.hidden = load_file(snapshot / f"{stream.name}.safetensors",
                                      device=str(stream.store.devices[stream.name]))["hidden"]
            stream.at = order[finished - 1] + 1
        carried.update(torch.load(snapshot / "carried.pt", weights_only=False))
        self.read_back.append(f"{walk.partition('.')[2]} {finished} of {len(order)} blocks")
        return finished

    def block_finished(self, walk: str, finished: int, index: int, block: nn.Module, streams: Sequence[BlockInput],
                       carried: dict[str, Any]) -> None:
        """Records that `walk` has finished `finished` blocks, the last `index` (`block`, weightless, as the
        visit left it), with the `streams` entering the next and what the visit `carried`; then the
        block's shard replaces the one it had."""
        name = f"{_slug(walk)}-{finished:05d}"
        snapshot = self.directory / name
        previous = self.walks.get(walk)
        with self._writing():
            torch.save(block, self._structure(walk, index))
            shutil.rmtree(snapshot, ignore_errors=True)  # half written by a run killed here
            snapshot.mkdir()
            for stream in streams:
                save_file({"hidden": stream.hidden.contiguous()}, snapshot / f"{stream.name}.safetensors")
            torch.save(carried, snapshot / "carried.pt")
            self.walks[walk] = {"blocks": finished, "snapshot": name}
            self.save()
            self.storage.commit()
        if previous is not None:
            shutil.rmtree(self.directory / previous["snapshot"], ignore_errors=True)

    def discard(self) -> None:
        """The run is done: what it kept to be resumed goes before the staging directory becomes the output."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def notes(self) -> list[str]:
        """What the summary says about resuming."""
        if not self.resumed:
            return ["--resume found no interrupted run for this output: started afresh"]
        read = "; ".join(self.read_back) or "nothing finished"
        return [f"resumed the interrupted run in {self.staging.name} (read back: {read})"]

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (disk full, mostly) is one line; what is written so far stays resumable."""
        try:
            yield
        except (OSError, SafetensorError) as error:
            raise LmsliceError(f"cannot write the record of this resumable run in {self.staging}: "
                               f"{first_line(error)}; free disk space there and resume it") from error

    def _structure(self, walk: str, index: int) -> Path:
        return self.directory / f"{_slug(walk)}-block-{index:05d}.pt"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first setting two runs' identities differ in, with both values, or None."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"{key} ({_short(saved.get(key))}, now {_short(current.get(key))})"
    return None


def _short(value: Any, length: int = 120) -> str:
    text = json.dumps(value)
    return text if len(text) <= length else text[:length - 3] + "..."
