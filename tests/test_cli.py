"""The command line: bad input gives one clear line and a non-zero exit; good input a summary."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models
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


# ------------------------------------------------- one verb, one budget, one name per concept (issue 26)

def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_compress_is_slice_and_keep_is_target_params(capsys, dense_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """The verb `compress` and its alias `slice`, with --keep and its alias --target-params, write the same model."""
    outputs = {}
    for verb, budget in (("compress", "--keep"), ("slice", "--target-params")):
        outputs[verb] = tmp_path / verb
        code, _, stderr = run_cli(capsys, verb, dense_dir, budget, "0.8", "--mlp-widths", "uniform", "--calib",
                                  text_file, "--calib-samples", "4", "--calib-seqlen", "32", "-o", outputs[verb])
        assert code == 0, stderr
    compressed, sliced = (saved_tensors(outputs[verb]) for verb in ("compress", "slice"))
    assert compressed.keys() == sliced.keys()
    assert all(torch.equal(compressed[name], sliced[name]) for name in compressed)
    assert sum(t.numel() for t in compressed.values()) < sum(t.numel() for t in saved_tensors(dense_dir).values())
    configs = [json.loads((outputs[verb] / "config.json").read_text()) for verb in ("compress", "slice")]
    assert configs[0] == configs[1]


def test_every_spelling_of_an_option_sets_the_same_setting() -> None:
    from lmslice.cli import build_parser

    parser = build_parser()

    def parsed(*args: str) -> argparse.Namespace:
        return parser.parse_args(list(args))

    for verb in ("compress", "slice"):
        assert parsed(verb, "M", "--keep", "0.7", "-o", "O").target_params == 0.7
        assert parsed(verb, "M", "--target-params", "0.6", "-o", "O").target_params == 0.6
    assert parsed("report", "M", "--keep", "0.9,0.8", "--eval-data", "pydoc", "-o", "O").target_params == "0.9,0.8"
    for verb in ("compress", "report"):  # the text fitted on, as finetune names its training text
        fitted = parsed(verb, "M", "--data", "a.txt", "--samples", "16", "--seqlen", "256", "--eval-data", "b.txt",
                        "-o", "O")
        assert (fitted.calib, fitted.calib_samples, fitted.calib_seqlen, fitted.eval_data) == ("a.txt", 16, 256, "b.txt")
    assert parsed("export", "M", "-o", "a.gguf").gguf == parsed("export", "M", "--gguf", "a.gguf").gguf == "a.gguf"
    assert parsed("export", "M", "--output", "b.gguf").gguf == "b.gguf"
    ppl = parsed("ppl", "M", "--eval-data", "pydoc", "--eval-seqlen", "64", "--eval-max-windows", "3")
    assert (ppl.data, ppl.seqlen, ppl.max_windows) == ("pydoc", 64, 3)


def test_export_writes_the_same_file_with_o_as_with_gguf(capsys, dense_dir: Path, tmp_path: Path) -> None:
    written = []
    for flag in ("-o", "--gguf"):
        path = tmp_path / f"model{flag.strip('-')}.gguf"
        code, _, stderr = run_cli(capsys, "export", dense_dir, flag, path)
        assert code == 0, stderr
        written.append(path.read_bytes())
    assert written[0] == written[1] and len(written[0]) > 0


def test_finetune_takes_a_dense_model(capsys, dense_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """A dense model is fine-tuned, not refused, and stays a plain checkpoint of its family."""
    import transformers

    out = tmp_path / "tuned"
    code, stdout, stderr = run_cli(capsys, "finetune", dense_dir, "--data", text_file, "-o", out, "--samples", "4",
                                   "--seqlen", "32", "--batch-size", "2", "--lr", "5e-3", "--lora-r", "4",
                                   "--eval-seqlen", "64", "--eval-max-windows", "1", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["lora"]["target_modules"]
    assert "lmslice" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "lmslice_finetune.json").read_text())["steps"] == 2
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out)  # no lmslice code needed
    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
    tuned_state, dense_state = tuned.state_dict(), dense.state_dict()
    assert {name: t.shape for name, t in tuned_state.items()} == {name: t.shape for name, t in dense_state.items()}
    changed = [name for name in dense_state if not torch.equal(tuned_state[name], dense_state[name])]
    assert changed and all(".layers." in name for name in changed)  # LoRA merged into the blocks' linears


def test_device_and_dtype_auto(capsys, dense_dir: Path, text_file: Path, tmp_path: Path, monkeypatch) -> None:
    from lmslice.cli import build_parser
    from lmslice.cli.common import resolve_model_options

    for command in (["compress", "M", "--keep", "0.8", "-o", "O"], ["ppl", "M", "--data", "pydoc"],
                    ["finetune", "M", "--data", "pydoc", "-o", "O"], ["eval", "M"], ["bench", "D", "S"],
                    ["report", "M", "--eval-data", "pydoc", "-o", "O"]):
        args = build_parser().parse_args(command)
        assert (args.device, args.dtype) == ("auto", "auto"), command
    half = tmp_path / "half"
    tiny_models.build("llama", torch.bfloat16).save_pretrained(half)

    def resolved(source: Path, cuda: bool, **given: str) -> tuple[str, str]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        args = argparse.Namespace(**{"device": "auto", "dtype": "auto", **given})
        resolve_model_options(args, str(source))
        return args.device, args.dtype

    assert resolved(half, cuda=False) == ("cpu", "float32")  # the CPU computes in float32 whatever is stored
    assert resolved(half, cuda=True) == ("cuda", "bfloat16")  # an accelerator keeps the checkpoint's half dtype
    assert resolved(dense_dir, cuda=True) == ("cuda", "float32")
    assert resolved(half, cuda=True, device="cpu") == ("cpu", "float32")
    assert resolved(half, cuda=False, dtype="float64") == ("cpu", "float64")
    monkeypatch.undo()

    here = "cuda" if torch.cuda.is_available() else "cpu"
    for extra, dtype in (((), "float32"), (("--dtype", "float64"), "float64")):
        out = tmp_path / f"out-{dtype}"
        code, stdout, stderr = run_cli(capsys, *slice_args(dense_dir, out, text_file, "--slice-head", "--json", *extra))
        assert code == 0, stderr
        summary = json.loads(stdout)
        assert (summary["device"], summary["dtype"]) == (here, dtype)


# The groups of each subcommand's --help, and options that must be in them.
HELP_GROUPS = {
    "compress": {"budget": {"--keep", "--sparsity", "--target-size", "--target-format", "--prune-criterion",
                            "--prune-experts"},
                 "calibration": {"--calib", "--calib-samples"},
                 "placement": {"--offload", "--stream-blocks", "--offload-activations", "--device", "--dtype"},
                 "output": {"-o", "--overwrite", "--format", "--save-dtype", "--gguf", "--align", "--json"},
                 "evaluation": {"--eval-data", "--eval-seqlen"}},
    "report": {"budget": {"--keep", "--sparsities"}, "calibration": {"--calib"}, "placement": {"--device"},
               "output": {"-o"}, "evaluation": {"--eval-data", "--tasks"}},
    "finetune": {"training": {"--data", "--samples"}, "placement": {"--device", "--dtype"}, "output": {"-o"},
                 "evaluation": {"--eval-data"}},
    "ppl": {"evaluation": {"--data"}, "placement": {"--dtype"}, "output": {"--json"}},
    "export": {"output": {"-o", "--outtype"}},
}
# Choices that name themselves (dtypes); every other choice is defined in its option's help.
SELF_EXPLANATORY = {"--dtype", "--save-dtype"}


def test_help_is_grouped_defines_every_choice_and_quotes_no_measurements() -> None:
    import re

    from lmslice.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        groups = {group.title: {option for action in group._group_actions for option in action.option_strings}
                  for group in parser._action_groups}
        for title, options in HELP_GROUPS.get(name, {}).items():
            assert options <= groups.get(title, set()), (name, title, options - groups.get(title, set()))
        ungrouped = groups.get("options", set()) - {"-h", "--help"}
        assert ungrouped == set(), (name, ungrouped)
        for action in parser._actions:
            if action.choices and not set(action.option_strings) & SELF_EXPLANATORY:
                undefined = [choice for choice in action.choices if choice not in action.help]
                assert undefined == [], (name, action.option_strings, undefined)
            assert not re.search(r"SmolLM|perplexity ratio|\d\.\d+x\b", action.help or ""), (name, action.help)
    assert commands["slice"] is commands["compress"]
