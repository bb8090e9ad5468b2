"""The command line: bad input gives one clear line and a non-zero exit; good input a summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmslice.cli import main


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def slice_args(model: Path, out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["slice", str(model), "--sparsity", "0.25", "--calib", str(corpus), "-o", str(out),
            "--calib-samples", "4", "--calib-seqlen", "32", "--calib-batch-size", "2", *extra]


def test_slice_prints_summary_and_saves(capsys, dense_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sliced"
    code, stdout, _ = run_cli(capsys, *slice_args(dense_dir, out, text_file, "--eval-data", str(text_file),
                                                  "--eval-seqlen", "64", "--eval-max-windows", "3",
                                                  "--slice-head"))
    assert code == 0
    assert "64 -> 48" in stdout and "head reads" not in stdout and "parameters" in stdout and "perplexity" in stdout
    report = json.loads((out / "lmslice_report.json").read_text())
    assert report["perplexity_sliced"]["windows"] == 3
    assert report["parameters_sliced"] < report["parameters_dense"]
    code, stdout, _ = run_cli(capsys, "ppl", out, "--data", text_file, "--seqlen", "64", "--max-windows", "3",
                              "--json")
    assert code == 0
    measured = json.loads(stdout)
    assert measured["perplexity"] == pytest.approx(report["perplexity_sliced"]["perplexity"], rel=1e-6)
    assert measured["tokens"] == 3 * 63 and measured["seqlen"] == 64


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("sparsity-high", "sparsity must be in [0, 1)"),
        ("sparsity-negative", "sparsity must be in [0, 1)"),
        ("missing-model", "model not found"),
        ("short-corpus", "calibration text too short"),
        ("existing-output", "already exists"),
        ("unknown-architecture", "unsupported architecture GPT2LMHeadModel"),
        ("unknown-source", "unknown text source"),
    ],
)
def test_bad_input_gives_one_clear_line(case: str, expected: str, capsys, dense_dir: Path, text_file: Path,
                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = slice_args(dense_dir, out, text_file)
    if case == "sparsity-high":
        args[args.index("--sparsity") + 1] = "1.0"
    elif case == "sparsity-negative":
        args[args.index("--sparsity") + 1] = "-0.1"
    elif case == "missing-model":
        args[1] = str(tmp_path / "no-such-model")
    elif case == "short-corpus":
        short = tmp_path / "short.txt"
        short.write_text("just a few words")
        args[args.index("--calib") + 1] = str(short)
    elif case == "existing-output":
        out.mkdir()
    elif case == "unknown-architecture":
        import transformers

        gpt2 = tmp_path / "gpt2"
        transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)
                                     ).save_pretrained(gpt2)
        args[1] = str(gpt2)
    elif case == "unknown-source":
        args[args.index("--calib") + 1] = "no-such-corpus"
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("lmslice: error: ") and expected in lines[-1]
    assert "Traceback" not in stderr
    if case != "existing-output":
        assert not out.exists()


def test_installed_command_reports_errors_without_traceback(tmp_path: Path) -> None:
    process = subprocess.run([sys.executable, "-m", "lmslice", "ppl", str(tmp_path / "missing"), "--data", "pydoc"],
                             capture_output=True, text=True)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [f"lmslice: error: model not found: {tmp_path / 'missing'} "
                                                   "(give a directory, a .gguf file or a hub id like org/name)"]


def test_every_subcommand_has_help(capsys) -> None:
    from lmslice.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, subparser in commands.items():
        text = subparser.format_help()
        assert subparser.description, name
        for action in subparser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
        assert "usage" in text


def test_errors_name_the_flags_that_set_what_the_library_calls_settings() -> None:
    from lmslice.cli import in_flags

    assert in_flags("fewer than round_to 8: lower the sparsity or round_to") == \
        "fewer than --round-to 8: lower the sparsity or --round-to"
    assert in_flags("needs per-block widths (measured mlp_widths)") == "needs per-block widths (--mlp-widths measured)"
    # a saved record's keys are not settings
    assert in_flags("lmslice.mlp_widths has 3 entries; lmslice.round_to") == "lmslice.mlp_widths has 3 entries; lmslice.round_to"
