"""lmslice: make language models smaller and faster by slicing them (SliceGPT, Ashkboos et al. 2024)."""

__version__ = "0.1.0"

from lmslice.errors import LmsliceError  # noqa: E402
from lmslice.io.models import load, load_with_tokenizer, save_sliced  # noqa: E402
from lmslice.slicing import SliceResult, slice_model, sliced_width  # noqa: E402

__all__ = ["LmsliceError", "SliceResult", "__version__", "load", "load_with_tokenizer", "save_sliced",
           "slice_model", "sliced_width"]
