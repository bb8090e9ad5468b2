"""lmslice: make language models smaller and faster by slicing them (SliceGPT, Ashkboos et al. 2024)."""

__version__ = "0.1.0"
