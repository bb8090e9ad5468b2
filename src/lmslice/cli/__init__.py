"""The `lmslice` command: one module per subcommand, each adding its parser here."""

from __future__ import annotations

import argparse
import sys

from lmslice import __version__
from lmslice.cli import bench_command, eval_command, finetune_command, ppl, report_command, slice_command
from lmslice.errors import LmsliceError

SUBCOMMANDS = (slice_command, ppl, eval_command, finetune_command, report_command, bench_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmslice",
        description="Make language models smaller and faster by slicing them (SliceGPT).",
    )
    parser.add_argument("--version", action="version", version=f"lmslice {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except LmsliceError as error:
        print(f"lmslice: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmslice: interrupted", file=sys.stderr)
        return 130
