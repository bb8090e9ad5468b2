"""lmslice: make language models smaller and faster by slicing them (SliceGPT, Ashkboos et al. 2024) and
pruning them to a real parameter budget.

    from lmslice import Prune, PruneConfig, compress
    compress(model, calibration_batches, [Prune(PruneConfig(target_params=0.8))])
"""

__version__ = "0.1.0"

from lmslice.errors import LmsliceError  # noqa: E402
from lmslice.io.models import load, load_with_tokenizer, save_sliced  # noqa: E402
from lmslice.pipeline import (Prune, PruneConfig, Slice, SliceConfig, StandardFormat,  # noqa: E402
                              StandardFormatConfig, check_steps, compress)
from lmslice.slicing import SliceResult, count_parameters, slice_model, sliced_width  # noqa: E402

__all__ = ["LmsliceError", "Prune", "PruneConfig", "Slice", "SliceConfig", "SliceResult", "StandardFormat",
           "StandardFormatConfig", "__version__", "check_steps", "compress", "count_parameters", "load",
           "load_with_tokenizer", "save_sliced", "slice_model", "sliced_width"]
