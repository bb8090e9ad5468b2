"""The `lmslice` command: one module per subcommand, each adding its parser here.

The subcommands (and torch, transformers) are imported inside `main`, so a Ctrl-C during those imports
is one line like any other interrupt; importing this module (what the console script does first) is cheap.
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import threading
from typing import Any

from lmslice import __version__
from lmslice.errors import LmsliceError

SUBCOMMANDS = ("slice_command", "ppl", "eval_command", "finetune_command", "report_command", "bench_command",
               "export_command")

# The library names settings as its configs do (`round_to`); on the command line they are flags.
FLAGS = {"measured mlp_widths": "--mlp-widths measured", "round_to": "--round-to",
         "target_params": "--keep", "slice_head": "--slice-head"}
_SETTING = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, FLAGS)) + r")\b")


def in_flags(message: str) -> str:
    """`message` with the settings it names as the flags that set them (a record's `lmslice.` keys stay)."""
    return _SETTING.sub(lambda match: FLAGS[match[1]], message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmslice",
        description="Structured compression of language models: pruning to a real parameter budget (compress --keep) "
                    "and SliceGPT slicing as published (compress --sparsity). The results are dense models that run "
                    "in transformers and llama.cpp.",
    )
    parser.add_argument("--version", action="version", version=f"lmslice {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"lmslice.cli.{name}").add_parser(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, Slurm and docker send) unwinds like Ctrl-C, so partial outputs are removed."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        args = build_parser().parse_args(argv)
        return args.run(args) or 0
    except LmsliceError as error:
        print(f"lmslice: error: {in_flags(str(error))}", file=sys.stderr)
        return 2
    except Terminated:
        print("lmslice: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("lmslice: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread and previous is not None:  # None: the old handler was not set from Python
            signal.signal(signal.SIGTERM, previous)
