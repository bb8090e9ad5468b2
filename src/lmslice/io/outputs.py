"""Where lmslice writes: one rule for every output path (a model directory, a GGUF file, a report, the
calibration activations spilled beside an output), checked before any work.

An output never replaces or deletes what the run reads (the source model, the teacher, the calibration
and evaluation texts, task files) nor the working directory, and an existing output is replaced (with
`overwrite`) only if lmslice wrote it: a directory whose config.json carries an `lmslice` record or that
holds an lmslice report, an empty one, or a file of the output's own type (a GGUF file). Anything else is
refused in one line, `overwrite` or not. Directories above an output that do not exist yet are created
when it is written (`make_parents`), for a file as for a directory; the nearest one that exists must
accept a new entry (probed, not guessed) and, once
the size is known, have room for it (`check_room`). What killed runs left beside an output is cleared
(`clear_leftovers`), but for the staging directory a resumable run keeps for the run that resumes it
(`resumable_staging`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmslice.errors import LmsliceError

logger = logging.getLogger("lmslice")

# What a run reads, as (what it is, where): "the source model", Path("dense").
Reads = Iterable[tuple[str, "str | os.PathLike[str] | None"]]
# What `lmslice report` writes, by which its output directory is recognised.
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class FileKind:
    """An output that is one file: its name's suffix and the bytes every such file starts with."""

    name: str
    suffix: str
    magic: bytes


GGUF = FileKind("GGUF", ".gguf", b"GGUF")


def check_output(path: str | os.PathLike[str], overwrite: bool, reads: Reads = (), *,
                 kind: FileKind | None = None, resuming: bool = False) -> Path:
    """Refuses, in one line and before any work, an output at `path` (a directory, or a file of `kind`)
    that would replace or delete something `reads` names or the working directory, replace what lmslice
    did not write, or cannot be written; clears what killed runs left beside it (`resuming`: but the
    staging directory of an interrupted resumable run). Returns `path`."""
    out = Path(path)
    target = out.resolve()
    if kind is not None:
        _check_file_name(out, kind)
    cwd = Path.cwd().resolve()
    if kind is None and (target == cwd or target in cwd.parents):
        raise LmsliceError(f"output {out} is the working directory or holds it; replacing it would delete it: "
                           "choose another output directory")
    for what, read in ((what, Path(read)) for what, read in reads if read is not None):
        held = kind is None and read.exists() and target in read.resolve().parents
        if target == read.resolve() or held or (out.exists() and read.exists() and os.path.samefile(out, read)):
            raise LmsliceError(f"output {out} is {what} {read} or holds it: writing it would destroy what this run "
                               "reads; choose another output")
    if kind is None and out.exists() and not out.is_dir():
        raise LmsliceError(f"output path {out} exists and is not a directory")
    _check_writable(out, kind)
    clear_leftovers(out, keep_resumable=resuming)
    if out.exists() and not overwrite:
        what = "directory" if kind is None else "file"
        raise LmsliceError(f"output {what} {out} already exists; choose another or pass --overwrite")
    if out.exists() and not _written_by_lmslice(out, kind):
        what = ("a directory that is not an lmslice output (no config.json with an lmslice record, no lmslice "
                "report)" if kind is None else f"not a {kind.name} file")
        raise LmsliceError(f"output {out} is {what}; lmslice replaces only its own outputs, --overwrite or not: "
                           "choose another output, or move it away yourself")
    return out


def _check_file_name(out: Path, kind: FileKind) -> None:
    if out.is_dir():
        raise LmsliceError(f"{out} is a directory: give a file name ending in {kind.suffix} (such as "
                           f"{out / ('model' + kind.suffix)})")
    if out.suffix != kind.suffix:
        raise LmsliceError(f"{out}: a {kind.name} file name ends in {kind.suffix}")


def _written_by_lmslice(out: Path, kind: FileKind | None) -> bool:
    """Whether the existing `out` is what lmslice writes there (so replacing it loses nothing of the user's)."""
    if kind is not None:
        try:
            with out.open("rb") as handle:
                return handle.read(len(kind.magic)) in (kind.magic, b"")
        except OSError:
            return False
    if not any(out.iterdir()):
        return True
    if _json_object(out / "config.json").get("lmslice") is not None:
        return True
    return {"model", "rows"} <= set(_json_object(out / REPORT_FILE))


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def nearest_existing(path: Path) -> Path:
    """`path`'s nearest existing ancestor (itself if it exists): where a new output lands on disk."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return existing


def make_parents(out: Path) -> None:
    """Creates the directories above `out` that do not exist yet, when it is written (`check_output`
    probed the nearest existing one)."""
    out.absolute().parent.mkdir(parents=True, exist_ok=True)


def _check_writable(out: Path, kind: FileKind | None) -> None:
    """The nearest existing directory above `out` (where its missing parents would be created) accepts a
    new entry: a directory, or for a file a file (probed)."""
    existing = nearest_existing(out.absolute().parent)
    if not existing.is_dir():
        raise LmsliceError(f"cannot create output {out}: {existing} is a file, not a directory")
    try:
        if kind is None:
            Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=existing)).rmdir()
        else:
            descriptor, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=existing)
            os.close(descriptor)
            os.unlink(probe)
    except OSError as error:
        raise LmsliceError(f"cannot write output {out}: {existing} is not writable ({error.strerror}); choose "
                           "another output") from error


def check_room(sizes: Iterable[tuple[str | os.PathLike[str], float]]) -> None:
    """Refuses outputs of about the given sizes in bytes, (path, size), where a file system they land on
    says it has less room free than they need together."""
    by_device: dict[int, list[tuple[Path, float]]] = {}
    for out, size in sizes:
        by_device.setdefault(nearest_existing(Path(out)).stat().st_dev, []).append((Path(out), size))
    for outputs in by_device.values():
        existing = nearest_existing(outputs[0][0])
        total = sum(size for _, size in outputs)
        try:
            free = shutil.disk_usage(existing).free
        except OSError:  # the file system does not say
            continue
        if free < total:
            names = " and ".join(str(out) for out, _ in outputs)
            raise LmsliceError(f"not enough room for {names}: about {_megabytes(total)} to write, {_megabytes(free)} "
                               f"free on the file system of {existing}; free some space or choose another output")


def _megabytes(size: float) -> str:
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


# Leftovers beside an output, each named with `process_tag()` of the process that made it: staging
# directories and partial GGUF files (`.NAME.partial-`), an output set aside by `--overwrite` (`.NAME.old-`)
# and spilled calibration activations.
LEFTOVER_PATTERNS = (".{name}.partial-", ".{name}.old-", ".lmslice-activations-")


def process_tag() -> str:
    """This process's id and host: on a shared file system, a leftover is judged dead only by its own host."""
    return f"{os.getpid()}-{socket.gethostname()}"


def resumable_staging(out: Path) -> Path:
    """Where a resumable run stages `out`: named after the output alone, so the run that resumes it finds it."""
    return out.parent / f".{out.name}.partial-resumable"


# The record a resumable run keeps in its staging directory (`lmslice.io.resume`), which names its process.
RESUME_RECORD = Path("resume") / "record.json"


def process_alive(tag: str) -> bool:
    """Whether the process a `process_tag()` names may still run: one on another host, or a name that is no
    tag, is taken to run."""
    pid, _, host = tag.partition("-")
    same_host = host == socket.gethostname() or host.startswith(socket.gethostname() + "-")
    return not pid.isdigit() or not same_host or _process_alive(int(pid))


def clear_leftovers(out: Path, keep_resumable: bool = False) -> None:
    """Removes the staging directories, partial files and activation directories of processes that no
    longer run (a SIGKILL or power loss leaves them), and puts back an output a killed `--overwrite` had
    set aside. The staging directory of an interrupted resumable run goes too, unless `keep_resumable`
    (the run resuming it reads it) or another process that still runs is writing it."""
    if not out.parent.is_dir():
        return
    resumable = resumable_staging(out)
    owner = _json_object(resumable / RESUME_RECORD).get("process")
    running = isinstance(owner, str) and owner != process_tag() and process_alive(owner)
    if not keep_resumable and resumable.is_dir() and not running:
        shutil.rmtree(resumable, ignore_errors=True)
    for pattern in LEFTOVER_PATTERNS:
        prefix = pattern.format(name=out.name)
        for path in out.parent.glob(f"{glob.escape(prefix)}*"):
            if process_alive(path.name[len(prefix):]):
                continue
            if pattern == ".{name}.old-" and not out.exists():
                path.rename(out)
                logger.warning(f"lmslice: restored {out} from {path.name}, set aside by a run that was killed")
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
