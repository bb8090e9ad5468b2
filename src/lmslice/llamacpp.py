"""Where llama.cpp is: the build `scripts/build-llamacpp` makes (cached outside the repository) and the
Python binding vendored beside it in the llama-cpp-python sdist, which loads that build's libllama.

`LMSLICE_LLAMACPP` names the build directory (the one with `bin/`); otherwise the newest finished build
under `${LMSLICE_LLAMACPP_HOME:-~/.cache/lmslice}` is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

from lmslice.errors import LmsliceError

COMPLETE = ".lmslice-complete"  # written by scripts/build-llamacpp when the build has finished


def find_build() -> Path | None:
    """The llama.cpp build directory, or None where there is none."""
    if os.environ.get("LMSLICE_LLAMACPP"):
        build = Path(os.environ["LMSLICE_LLAMACPP"])
        return build if (build / "bin").is_dir() else None
    home = Path(os.environ.get("LMSLICE_LLAMACPP_HOME") or Path.home() / ".cache" / "lmslice")
    builds = sorted(home.glob(f"llama_cpp_python-*/vendor/llama.cpp/build/{COMPLETE}"))
    return builds[-1].parent if builds else None


def require_build() -> Path:
    build = find_build()
    if build is None:
        raise LmsliceError("no llama.cpp build found: run scripts/build-llamacpp (or set LMSLICE_LLAMACPP to a "
                           "llama.cpp build directory)")
    return build


def tool(name: str) -> Path:
    """A llama.cpp program of the build (llama-perplexity, llama-bench, llama-quantize)."""
    path = require_build() / "bin" / name
    if not path.is_file():
        raise LmsliceError(f"the llama.cpp build has no {name}: build it with cmake --build BUILD --target {name}")
    return path


def binding() -> ModuleType:
    """The `llama_cpp` module of the sdist the build came from, bound to the build's libllama."""
    build = require_build()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(build / "bin")
    sdist = build.parents[2]  # .../llama_cpp_python-VERSION/vendor/llama.cpp/build
    if (sdist / "llama_cpp").is_dir() and str(sdist) not in sys.path:
        sys.path.insert(0, str(sdist))
    try:
        import llama_cpp
    except ImportError as error:
        raise LmsliceError(f"cannot import llama-cpp-python's binding from {sdist}: {error}") from error
    return llama_cpp
