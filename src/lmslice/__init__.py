"""lmslice: make language models smaller and faster by slicing them (SliceGPT, Ashkboos et al. 2024) and
pruning them to a real parameter budget.

    from lmslice import Prune, PruneConfig, compress
    compress(model, calibration_batches, [Prune(PruneConfig(target_params=0.8))])
"""

__version__ = "0.1.0"

import importlib  # noqa: E402
from typing import Any  # noqa: E402

# What `lmslice.NAME` gives, imported on first use: importing the package (as the command line does first)
# loads neither torch nor transformers, so a Ctrl-C while they load is the command's one-line interrupt.
EXPORTS = {
    "LmsliceError": "lmslice.errors",
    **dict.fromkeys(["load", "load_with_tokenizer", "save_sliced"], "lmslice.io.models"),
    **dict.fromkeys(["Prune", "PruneConfig", "Slice", "SliceConfig", "StandardFormat", "StandardFormatConfig",
                     "check_steps", "compress"], "lmslice.pipeline"),
    **dict.fromkeys(["SliceResult", "count_parameters", "slice_model", "sliced_width"], "lmslice.slicing"),
}

__all__ = sorted([*EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in EXPORTS:
        value = getattr(importlib.import_module(EXPORTS[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")  # a submodule: lmslice.adapters
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value
