"""Text for calibration and evaluation: the paper's hub datasets by name, or local files."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from lmslice.errors import LmsliceError

# name -> (dataset, config, field, separator per split); the paper's sources, read from the hub.
HUB_SOURCES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", "\n\n"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence", "\n\n"),
    "c4": ("allenai/c4", None, "text", "\n\n"),
    "alpaca": ("tatsu-lab/alpaca", None, "text", "\n\n"),
}
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
BUILTIN_SOURCES = ("pydoc",)
# The default calibration: Python's documentation, which ships with Python, so that the base install
# calibrates offline. Calibrating on one domain fits that domain best; give text like the model's use
# (a local file, or a mix such as wikitext2,pydoc) for other domains. docs/results.md has the measured
# trade-off.
DEFAULT_CALIBRATION = "pydoc"
# Above this share of undecodable bytes a .txt file is not UTF-8 text (binary, or another encoding such as
# Latin-1 outside ASCII) and calibrating on it would calibrate on replacement characters.
MAX_UNDECODABLE = 0.01
logger = logging.getLogger("lmslice")


def describe_sources() -> str:
    return (f"{', '.join(HUB_SOURCES)} (Hugging Face hub), pydoc (Python's documentation, offline), or a .txt/.jsonl "
            "path")


def load_text(source: str, split: str = "train") -> str:
    """The whole corpus as one string. `split` is "train" for calibration, "test" for evaluation."""
    path = check_text_source(source)
    if path is not None:
        return _read_local(path)
    if source == "pydoc":
        return _pydoc_text(split)
    return _read_hub(source, split)


def check_text_source(source: str) -> Path | None:
    """The local file `source` names (None for a built-in or hub name); a missing or empty file, or an
    unknown name, is refused in one line, before any model is loaded."""
    path = Path(source)
    if path.is_file():
        if path.stat().st_size == 0:
            raise LmsliceError(f"text file {path} is empty")
        return path
    if source in BUILTIN_SOURCES or source in HUB_SOURCES:
        return None
    if path.exists():
        raise LmsliceError(f"text source {path} is a directory: give a .txt or .jsonl file")
    if path.suffix or len(path.parts) > 1:  # a file name or a path, not a source name
        raise LmsliceError(f"text file not found: {path}")
    raise LmsliceError(f"unknown text source {source!r}: give {describe_sources()}")


def _read_local(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line.decode("utf-8"))["text"]
            except UnicodeDecodeError as error:
                raise LmsliceError(f"{path}:{number}: not UTF-8 text; convert the file to UTF-8") from error
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise LmsliceError(f"{path}:{number}: each line must be a JSON object with a \"text\" field") from error
            if not isinstance(text, str):
                raise LmsliceError(f"{path}:{number}: \"text\" must be a string, got {type(text).__name__}")
            texts.append(text)
        return "\n\n".join(texts)
    text = data.decode("utf-8", errors="replace")
    undecodable = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if undecodable > MAX_UNDECODABLE * max(len(text), 1):
        raise LmsliceError(f"{path} is not UTF-8 text ({undecodable} undecodable byte sequences in {len(data)} "
                           "bytes): give a text file, converted to UTF-8 if it uses another encoding (iconv -t UTF-8)")
    if undecodable:
        logger.warning(f"lmslice: warning: {path}: {undecodable} byte sequences are not UTF-8; read as U+FFFD")
    return text


def _pydoc_text(split: str) -> str:
    """Python's own documentation topics: ~450 KB of English prose that ships with every Python.

    The topics are split in two fixed halves so calibration ("train") and evaluation ("test") never
    share text.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    half = names[::2] if split == "train" else names[1::2]
    return "\n\n".join(topics[name] for name in half)


def _read_hub(source: str, split: str) -> str:
    try:
        import datasets
    except ImportError as error:
        raise LmsliceError(f"reading {source!r} needs the datasets package: pip install 'lmslice[data]'") from error
    name, config, field, separator = HUB_SOURCES[source]
    if source == "alpaca":
        split = "train"  # alpaca has no held-out split
    try:
        if source == "c4":
            hub_split = "validation" if split != "train" else "train"
            data = datasets.load_dataset(name, data_files={hub_split: C4_FILES[hub_split]}, split=hub_split)
        else:
            data = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # noqa: BLE001 - network and hub errors come in many types
        raise LmsliceError(
            f"cannot download {source!r} from the Hugging Face hub ({type(error).__name__}); "
            "without network access give a local .txt or .jsonl file instead"
        ) from error
    return separator.join(data[field])


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, source: str | None = None) -> torch.Tensor:
    """The corpus (read from `source`, named in errors) as one long row of token ids."""
    if not text.strip():
        raise LmsliceError(f"the text source {source} is empty" if source else "the text source is empty")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    return ids


def calibration_batches(tokens: torch.Tensor, samples: int, seqlen: int, batch_size: int, seed: int,
                        ) -> list[dict[str, torch.Tensor]]:
    """`samples` random windows of `seqlen` tokens, grouped into batches, as in the paper."""
    if samples < 1 or seqlen < 2 or batch_size < 1:
        raise LmsliceError("calibration samples, batch size must be >= 1 and sequence length >= 2")
    return _batched(_random_windows(tokens, samples, seqlen, random.Random(seed)), batch_size)


def check_batches(batches: Iterable[Mapping[str, torch.Tensor]], vocabulary: int, what: str = "calibration",
                  ) -> list[Mapping[str, torch.Tensor]]:
    """`batches` (of `what`: calibration, training) as a list, each checked: a mapping with `input_ids`, a
    2-D integer tensor of token ids below `vocabulary`, and optionally an `attention_mask` of its shape.
    Anything else is one line, not a KeyError or an IndexError deep inside a forward pass."""
    if isinstance(batches, (torch.Tensor, Mapping, str)) or not isinstance(batches, Iterable):
        raise LmsliceError(f"{what} batches must be a list of dicts with input_ids (and attention_mask), got a "
                           f"{type(batches).__name__}")
    batches = list(batches)
    if not batches:
        raise LmsliceError(f"no {what} batches: give at least one {what} sample")
    for index, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() \
                or not ids.numel():
            raise LmsliceError(f"{what} batch {index} must be a dict whose input_ids is a 2-D tensor of token ids "
                               f"(batch x sequence), got {_describe(batch)}")
        if ids.min() < 0 or ids.max() >= vocabulary:
            raise LmsliceError(f"{what} batch {index} has token ids from {int(ids.min())} to {int(ids.max())}; the "
                               f"model's vocabulary is 0 to {vocabulary - 1} (tokenized for another model?)")
        mask = batch.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
            raise LmsliceError(f"{what} batch {index}: attention_mask must be a tensor of input_ids' shape "
                               f"{tuple(ids.shape)}, got {_describe(mask)}")
    return batches


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return "a dict with " + (", ".join(map(repr, value)) or "no keys") + " " + (
            f"(input_ids: {_describe(value['input_ids'])})" if "input_ids" in value else "")
    return f"a {type(value).__name__}"


def _random_windows(tokens: torch.Tensor, samples: int, seqlen: int, generator: random.Random,
                    source: str | None = None) -> list[torch.Tensor]:
    starts = len(tokens) - seqlen + 1
    if starts < samples:
        raise LmsliceError(
            f"calibration text{f' {source}' if source else ''} too short: {len(tokens)} tokens cannot give "
            f"{samples} distinct windows of {seqlen} tokens; give more text, fewer --calib-samples or a shorter "
            "--calib-seqlen"
        )
    return [tokens[start:start + seqlen] for start in generator.sample(range(starts), samples)]


def _batched(windows: list[torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    stacked = torch.stack(windows)
    return [{"input_ids": stacked[i:i + batch_size], "attention_mask": torch.ones_like(stacked[i:i + batch_size])}
            for i in range(0, len(windows), batch_size)]


@dataclass(frozen=True)
class MixPart:
    source: str
    share: float  # of the calibration windows; the shares of a mix sum to 1


def parse_mix(spec: str) -> list[MixPart]:
    """`--calib`'s sources: one (`pydoc`), several in equal shares (`wikitext2,pydoc`) or in stated ones
    (`a.txt:0.7,pydoc:0.3`; weights, normalised to sum to 1). An existing file's path is one source."""
    if Path(spec).is_file():
        return [MixPart(spec, 1.0)]
    parts: list[tuple[str, float | None]] = []
    for item in (item.strip() for item in spec.split(",")):
        source, _, weight = item.rpartition(":")
        try:
            parts.append((source, float(weight)) if source else (item, None))
        except ValueError:  # a colon that is part of the name
            parts.append((item, None))
    names = [source for source, _ in parts]
    if not all(names):
        raise LmsliceError(f"--calib {spec!r} has an empty source; give e.g. wikitext2,pydoc or a.txt:0.7,pydoc:0.3")
    if len(set(names)) < len(names):
        raise LmsliceError(f"--calib {spec!r} names a source twice")
    weights = [weight for _, weight in parts]
    if None in weights:
        if any(weight is not None for weight in weights):
            raise LmsliceError(f"--calib {spec!r}: give a share for every source or for none (equal shares)")
        weights = [1.0] * len(parts)
    if not all(0 < weight < math.inf for weight in weights):  # also refuses nan
        raise LmsliceError(f"--calib {spec!r}: every share must be a positive number")
    total = sum(weights)
    return [MixPart(name, weight / total) for name, weight in zip(names, weights)]


def local_text_files(spec: str) -> list[Path]:
    """The local files `spec` (one source or a mix, see `parse_mix`) reads, each checked (`check_text_source`)."""
    return [path for part in parse_mix(spec) if (path := check_text_source(part.source)) is not None]


def mix_windows(mix: list[MixPart], samples: int) -> list[int]:
    """Each source's number of windows: its share of `samples`, rounded so they sum to `samples`
    (largest remainders first); every source gets at least one."""
    exact = [part.share * samples for part in mix]
    counts = [int(value) for value in exact]
    by_remainder = sorted(range(len(mix)), key=lambda index: counts[index] - exact[index])
    for index in by_remainder[:samples - sum(counts)]:
        counts[index] += 1
    if min(counts) < 1:
        raise LmsliceError(f"{samples} calibration windows cannot give every one of {len(mix)} sources a window; "
                           "give more --calib-samples")
    return counts


def mix_record(spec: str, samples: int) -> list[dict[str, str | float | int]]:
    """What a summary or config records of the mix: each source, its share and its windows."""
    mix = parse_mix(spec)
    return [{"source": part.source, "share": round(part.share, 6), "windows": count}
            for part, count in zip(mix, mix_windows(mix, samples))]


def mixed_calibration_batches(tokenizer: PreTrainedTokenizerBase, spec: str, samples: int, seqlen: int,
                              batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Calibration batches from `--calib` `spec` (see `parse_mix`): each source's train split gives its
    share of the `samples` random windows, and the windows are shuffled together so every batch mixes
    them. One source gives exactly `calibration_batches`'s windows."""
    mix = parse_mix(spec)
    if len(mix) == 1:
        return calibration_batches(tokenize(tokenizer, load_text(mix[0].source, split="train"), mix[0].source),
                                   samples, seqlen, batch_size, seed)
    if samples < 1 or seqlen < 2 or batch_size < 1:
        raise LmsliceError("calibration samples, batch size must be >= 1 and sequence length >= 2")
    windows: list[torch.Tensor] = []
    for index, (part, count) in enumerate(zip(mix, mix_windows(mix, samples))):
        tokens = tokenize(tokenizer, load_text(part.source, split="train"), part.source)
        windows += _random_windows(tokens, count, seqlen, random.Random(seed + index), part.source)
    random.Random(seed).shuffle(windows)
    return _batched(windows, batch_size)
