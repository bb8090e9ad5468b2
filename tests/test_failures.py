"""Bad input and faults: no data is destroyed, no garbage is saved or loaded as a model, and every
problem is one line (`lmslice: error: ...`, exit 2) before the expensive work where it can be."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import lmslice
import tiny_models
from lmslice.bench import _gain_share
from lmslice.cli import main
from lmslice.errors import LmsliceError
from lmslice.io.data import load_text
from lmslice.io.models import staging_dir
from lmslice.io.outputs import check_output
from lmslice.slicing import slice_model, sliced_width

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture(scope="module")
def sliced_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    model = tiny_models.build("llama", torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    return lmslice.save_sliced(model, tiny_tokenizer, tmp_path_factory.mktemp("sliced") / "tiny-sliced")


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / directory.name))


def run_cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """Exit code and the one error line; fails the test on a traceback or a message of several lines."""
    code = main([str(arg) for arg in args])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("lmslice: error: ")]
    assert "Traceback" not in stderr
    return code, errors[-1] if errors else ""


def slice_args(model: Path, out: Path, corpus: Path, *extra: object) -> list[object]:
    return ["slice", model, "--sparsity", "0.25", "--calib", corpus, "-o", out, "--calib-samples", "4",
            "--calib-seqlen", "32", "--calib-batch-size", "2", *extra]


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


# ---------------------------------------------------------------- 1. the output never destroys data


def test_output_in_the_working_directory_is_refused_and_nothing_deleted(capsys, dense_dir, text_file, tmp_path,
                                                                       monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for output in (".", "..", str(work)):
        code, error = run_cli(capsys, *slice_args(dense_dir, Path(output), text_file, "--overwrite"))
        assert code == 2 and "working directory" in error
    assert (work / "precious.txt").read_text() == "keep me"


def test_output_on_the_source_model_is_refused(capsys, dense_dir, text_file, tmp_path) -> None:
    source = copy_of(dense_dir, tmp_path)
    before = sorted(path.name for path in source.iterdir())
    for output in (source, source.parent):
        code, error = run_cli(capsys, *slice_args(source, output, text_file, "--overwrite"))
        assert code == 2 and "the source" in error
    assert sorted(path.name for path in source.iterdir()) == before
    lmslice.load(source)


def test_unusable_output_locations_fail_before_any_work(capsys, dense_dir, text_file, tmp_path, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("lmslice.cli.slice_command.open_placed", no_loading)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for output, expected in ((a_file / "out", "is a file"), ("/proc/lmslice-out", "not writable"),
                             (a_file, "not a directory")):
        code, error = run_cli(capsys, *slice_args(dense_dir, output, text_file, "--overwrite"))
        assert code == 2 and expected in error


def test_outputs_create_their_missing_parent_directories(capsys, dense_dir, text_file, tmp_path) -> None:
    """-o and --gguf follow one rule: directories above the output that do not exist yet are created."""
    out, gguf = tmp_path / "a" / "b" / "out", tmp_path / "c" / "d" / "out.gguf"
    code, error = run_cli(capsys, "compress", dense_dir, "--keep", "0.8", "--mlp-widths", "uniform", "--calib",
                          text_file, "--calib-samples", "4", "--calib-seqlen", "32", "-o", out, "--gguf", gguf)
    assert code == 0, error
    assert (out / "model.safetensors").is_file() and gguf.is_file()
    exported = tmp_path / "e" / "f" / "exported.gguf"
    assert run_cli(capsys, "export", out, "-o", exported) == (0, "") and exported.is_file()


# --------------------------------------------------- 2. non-finite weights and signals are refused


def test_nan_weight_is_refused_with_its_name(capsys, dense_dir, text_file, tmp_path) -> None:
    source = copy_of(dense_dir, tmp_path)
    weights = load_file(source / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    for extra in ((), ("--offload",)):
        out = tmp_path / f"out{len(extra)}"
        code, error = run_cli(capsys, *slice_args(source, out, text_file, *extra))
        assert code == 2 and "model.layers.1.mlp.up_proj.weight has 1 NaN or inf" in error
        assert not out.exists() and leftovers(tmp_path) == []


def test_non_finite_calibration_signal_names_the_block() -> None:
    model = tiny_models.build("llama", torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(LmsliceError, match="output of block 1 has NaN or inf"):
        slice_model(model, tiny_models.random_batches(), 0.25, progress=False)


# ------------------------------------------------------------ 3. widths that cannot be saved


def test_round_to_wider_than_the_kept_width_is_refused(capsys, dense_dir, text_file, tmp_path) -> None:
    assert sliced_width(64, 0.25, 48) == 48 and sliced_width(64, 0, 1000) == 64
    for hidden, sparsity, round_to in ((64, 0.25, 65), (64, 0.25, 1000), (576, 0.999, 8)):
        with pytest.raises(LmsliceError, match="fewer than round_to"):
            sliced_width(hidden, sparsity, round_to)
    out = tmp_path / "out"
    code, error = run_cli(capsys, *slice_args(dense_dir, out, text_file, "--round-to", "65"))
    assert code == 2 and "keeps 48 of 64 features, fewer than --round-to 65" in error and not out.exists()


# ------------------------------------------------------- 4. damaged sliced directories are refused


def edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


LAYOUT_EDITS = {
    "format 99": (lambda c: c["lmslice"].update(format=99), "newer lmslice (format 99"),
    "not a mapping": (lambda c: c.update(lmslice=[1, 2]), "is not a mapping"),
    "no modules": (lambda c: c["lmslice"].pop("modules"), "lmslice.modules is missing"),
    "width": (lambda c: c["lmslice"].update(width=40, head_width=40), "do not match its config"),
    "hidden_size": (lambda c: c["lmslice"].update(hidden_size=56), "inconsistent lmslice widths"),
    "hidden_size and head": (lambda c: c["lmslice"].update(hidden_size=56, head_width=56),
                             "lmslice.hidden_size 56 differs from hidden_size 64"),
    "eps": (lambda c: c["lmslice"].update(eps=0.5), "lmslice.eps 0.5 differs"),
    "a block without MLP": (lambda c: c["lmslice"].update(mlp_widths=[112, 0, 112]), "needs an unsliced stream"),
}


@pytest.mark.parametrize("edit", sorted(LAYOUT_EDITS))
def test_inconsistent_lmslice_record_is_refused(edit: str, sliced_dir: Path, tmp_path: Path) -> None:
    damaged = copy_of(sliced_dir, tmp_path)
    change, expected = LAYOUT_EDITS[edit]
    edit_config(damaged, change)
    with pytest.raises(LmsliceError, match=expected.replace("(", r"\(")):
        lmslice.load(damaged)


def change_tensors(directory: Path, change: str, *, missing: str, extra: str) -> None:
    """Deletes the tensor `missing` ("missing") or adds a tensor `extra` (any other change) in the checkpoint."""
    weights = load_file(directory / "model.safetensors")
    if change == "missing":
        del weights[missing]
    else:
        weights[extra] = torch.zeros(3)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_sliced_directory_with_wrong_tensors_is_refused(change: str, sliced_dir: Path, tmp_path: Path) -> None:
    damaged = copy_of(sliced_dir, tmp_path)
    change_tensors(damaged, change, missing="model.layers.0.mlp.up_proj.weight", extra="model.layers.0.extra")
    with pytest.raises(LmsliceError, match=f"do not match its config \\({change}: model.layers.0"):
        lmslice.load(damaged)


# ---------------------------------------------- 5. every file is written before the output appears


def test_slice_report_is_written_before_the_output_appears(capsys, dense_dir, text_file, tmp_path,
                                                           monkeypatch) -> None:
    real_write_text = Path.write_text

    def disk_full_for_the_report(path: Path, *args, **kwargs):
        if path.name == "lmslice_report.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full_for_the_report)
    out = tmp_path / "out"
    code, error = run_cli(capsys, *slice_args(dense_dir, out, text_file))
    assert code == 2 and "cannot write" in error and "No space left on device" in error
    assert not out.exists() and leftovers(tmp_path) == []


def test_disk_full_while_saving_weights_is_one_line(capsys, dense_dir, text_file, tmp_path, monkeypatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", disk_full, raising=False)
    monkeypatch.setattr("lmslice.io.offload.save_file", disk_full)
    for extra in ((), ("--offload",)):
        out = tmp_path / f"out{len(extra)}"
        code, error = run_cli(capsys, *slice_args(dense_dir, out, text_file, *extra))
        assert code == 2 and "No space left on device" in error
        assert not out.exists() and leftovers(tmp_path) == []


def test_report_is_written_whole_or_not_at_all(capsys, dense_dir, text_file, tmp_path, monkeypatch) -> None:
    def broken_plot(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lmslice.report.plot_spectra", broken_plot)
    out = tmp_path / "report"
    code, error = run_cli(capsys, "report", dense_dir, "--sparsities", "0,0.25", "--calib", text_file,
                          "--eval-data", text_file, "--calib-samples", "2", "--calib-seqlen", "16",
                          "--eval-seqlen", "32", "--eval-max-windows", "1", "-o", out)
    assert code == 2 and "No space left on device" in error
    assert not out.exists() and leftovers(tmp_path) == []


# ------------------------------------------ 7. interrupted, killed and terminated runs leave nothing


def test_offload_creates_no_staging_before_calibration_is_valid(capsys, dense_dir, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    code, error = run_cli(capsys, *slice_args(dense_dir, out, empty, "--offload", "--offload-activations"))
    assert code == 2 and "empty" in error
    assert leftovers(tmp_path) == [] and not out.exists()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_processes_are_cleared_and_a_set_aside_output_restored(tmp_path: Path) -> None:
    host = socket.gethostname()
    tag = f"{dead_pid()}-{host}"
    alive, elsewhere = f".out.partial-{os.getpid()}-{host}", f".out.partial-{dead_pid()}-otherhost"
    out = tmp_path / "out"
    for name in (f".out.partial-{tag}", f".out.old-{tag}", f".lmslice-activations-{tag}-x1y2", alive, elsewhere):
        (tmp_path / name).mkdir()
        (tmp_path / name / "marker").write_text(name)
        (tmp_path / name / "config.json").write_text('{"lmslice": {}}')  # what lmslice writes, so it may replace it
    check_output(out, overwrite=True)
    assert (out / "marker").read_text() == f".out.old-{tag}"  # the old output, put back
    # only what a dead process of this host left is touched
    assert leftovers(tmp_path) == sorted([alive, elsewhere])


KILL_DURING_OVERWRITE = textwrap.dedent("""
    import json, os, shutil, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)  # no thread pool for the forked children to inherit
    sys.path.insert(0, sys.argv[2])
    import tiny_models, lmslice
    from lmslice.io.outputs import check_output
    from lmslice.slicing import slice_model
    model = tiny_models.build("llama", torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    root = Path(sys.argv[1])
    results = []
    for step in range(1, 6):
        out = root / f"step{step}" / "out"
        out.mkdir(parents=True)
        (out / "old-marker").write_text("old")
        (out / "config.json").write_text('{"lmslice": {}}')  # an lmslice output, which --overwrite replaces
        pid = os.fork()
        if pid == 0:  # dies (SIGKILL: no handler, no finally) at the step-th rename or delete near `out`
            calls = []
            def dies_at_step(real):
                def call(path, *args, **kwargs):
                    if Path(path).name == "out" or Path(path).name.startswith(".out."):
                        calls.append(path)
                        if len(calls) == step:
                            os.kill(os.getpid(), 9)
                    return real(path, *args, **kwargs)
                return call
            os.rename, shutil.rmtree = dies_at_step(os.rename), dies_at_step(shutil.rmtree)
            lmslice.save_sliced(model, None, out, overwrite=True)
            os._exit(0)
        killed = os.waitpid(pid, 0)[1] != 0
        check_output(out, overwrite=True)  # what the next run does first
        names = sorted(path.name for path in out.iterdir()) if out.exists() else []
        state = ("old" if names == ["config.json", "old-marker"] else
                 "new" if {"config.json", "model.safetensors"} <= set(names) and "old-marker" not in names else
                 f"broken: {names}")
        results.append({"step": step, "killed": killed, "state": state,
                        "leftovers": sorted(p.name for p in out.parent.iterdir() if p.name != "out")})
    print(json.dumps(results))
""")


def test_kill_during_overwrite_leaves_the_old_or_the_new_output(tmp_path: Path) -> None:
    """`save_sliced(..., overwrite=True)` killed with SIGKILL at each rename or delete it makes beside the
    output, and once after all of them: once the next run has started, the output is the complete old or
    new directory and nothing else is left."""
    process = subprocess.run([sys.executable, "-c", KILL_DURING_OVERWRITE, str(tmp_path), str(TESTS)],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(SRC)})
    results = json.loads(process.stdout.strip().splitlines()[-1])
    for result in results:
        assert result["state"] in ("old", "new") and result["leftovers"] == [], result
    # killed at each of the swap's four file operations, then a run that completes
    assert [result["killed"] for result in results] == [True] * 4 + [False]
    assert results[-1]["state"] == "new"


def test_failure_during_overwrite_keeps_the_old_output(tmp_path: Path, monkeypatch) -> None:
    from lmslice.io.models import move_into_place

    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    staging = staging_dir(out)
    (staging / "weights").write_text("new")
    real_rename = os.rename
    calls = []

    def second_rename_fails(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(*args)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(LmsliceError, match="cannot write .*Input/output error"):
        move_into_place(staging, out, overwrite=True)
    assert (out / "weights").read_text() == "old" and leftovers(tmp_path) == []


SIGTERM_DURING_SLICING = textwrap.dedent("""
    import os, signal, sys
    import lmslice.io.offload as offload
    store = offload.OffloadedBlocks.store
    def store_then_terminate(self, index, block, changed):
        store(self, index, block, changed)
        if index == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    offload.OffloadedBlocks.store = store_then_terminate
    from lmslice.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_removes_staging_and_activations(dense_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [str(arg) for arg in slice_args(dense_dir, out, text_file, "--offload", "--offload-activations")]
    process = subprocess.run([sys.executable, "-c", SIGTERM_DURING_SLICING, *args[0:]], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert process.returncode == 128 + signal.SIGTERM, process.stderr
    assert process.stderr.strip().splitlines()[-1] == "lmslice: terminated"
    assert not out.exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------ 8, 9. report and bench


def test_report_without_matplotlib_fails_before_any_work(capsys, dense_dir, text_file, tmp_path,
                                                         monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("lmslice.cli.report_command.load_with_tokenizer", pytest.fail)
    code, error = run_cli(capsys, "report", dense_dir, "--calib", text_file, "--eval-data", text_file,
                          "-o", tmp_path / "report")
    assert code == 2 and "pip install 'lmslice[plot]'" in error


def test_bench_refuses_models_that_are_not_a_dense_and_its_slice(capsys, sliced_dir, tmp_path) -> None:
    opt = tmp_path / "opt"
    tiny_models.build("opt", torch.float32).save_pretrained(opt)
    llama = tmp_path / "llama"
    tiny_models.build("llama", torch.float32).save_pretrained(llama)
    for dense, sliced, expected in ((opt, sliced_dir, "architecture OPTForCausalLM vs LlamaForCausalLM"),
                                    (sliced_dir, sliced_dir, "is itself a sliced model"),
                                    (llama, llama, "is not a sliced model")):
        code, error = run_cli(capsys, "bench", dense, sliced, "--repeats", "1")
        assert code == 2 and expected in error


def test_share_of_the_gain_is_not_divided_by_almost_zero() -> None:
    assert _gain_share(1.2, 1.4) == pytest.approx(0.5)
    assert _gain_share(1.3, 1.003) is None and _gain_share(0.97, 0.99) is None


# ------------------------------------------------------------- damaged files: one line each


def test_damaged_model_files_are_one_line(capsys, dense_dir, tmp_path) -> None:
    truncated = copy_of(dense_dir, tmp_path)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    bad_json = copy_of(dense_dir, tmp_path / "json")
    (bad_json / "config.json").write_text('{"model_type": "llama",')
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x05" * 92)
    bad_tokenizer = copy_of(dense_dir, tmp_path / "tokenizer")
    (bad_tokenizer / "tokenizer.json").write_text('{"model": ')
    for model, expected in ((truncated, "cannot load model"), (bad_json, "config.json is not valid JSON"),
                            (gguf, "cannot load model"), (bad_tokenizer, "tokenizer files in")):
        code, error = run_cli(capsys, "ppl", model, "--data", "pydoc")
        assert code == 2 and expected in error, (model, error)


def test_bad_text_files_are_one_line(capsys, dense_dir, tmp_path, caplog) -> None:
    cases = {
        "latin1.jsonl": ('{"text": "caf\xe9"}\n'.encode("latin-1"), "latin1.jsonl:1: not UTF-8"),
        "number.jsonl": (b'{"text": "fine"}\n{"text": 5}\n', 'number.jsonl:2: "text" must be a string'),
        "binary.txt": (bytes(range(256)) * 40, "is not UTF-8 text"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        code, error = run_cli(capsys, "ppl", dense_dir, "--data", tmp_path / name)
        assert code == 2 and expected in error
    # a few stray Latin-1 bytes in long UTF-8 text are read, with a warning, not silently
    (tmp_path / "mostly.txt").write_bytes(b"plain english text " * 100 + "na\xefve".encode("latin-1"))
    with caplog.at_level("WARNING", logger="lmslice"):
        assert "plain english" in load_text(str(tmp_path / "mostly.txt"))
    assert "1 byte sequences are not UTF-8" in caplog.text


@pytest.mark.parametrize("args, expected", [
    (["ppl", "{model}", "--data", "pydoc", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["ppl", "{model}", "--data", "pydoc", "--seqlen", "1"], "--seqlen must be at least 2"),
    (["ppl", "{model}", "--data", "pydoc", "--device", "foo"], "unknown device 'foo'"),
    (["eval", "{model}", "--limit", "0"], "--limit must be at least 1"),
    (["slice", "{model}", "--sparsity", "0.2", "--calib", "pydoc", "-o", "x", "--eval-seqlen", "1"],
     "--eval-seqlen must be at least 2"),
])
def test_bad_options_fail_before_loading(args: list[str], expected: str, capsys, dense_dir, monkeypatch) -> None:
    for command in ("ppl", "eval_command"):
        monkeypatch.setattr(f"lmslice.cli.{command}.load_with_tokenizer", pytest.fail)
    monkeypatch.setattr("lmslice.cli.slice_command.open_placed", pytest.fail)
    code, error = run_cli(capsys, *(arg.format(model=dense_dir) for arg in args))
    assert code == 2 and expected in error


# -------------------------------------------------------- the base install runs slice and ppl


BASE_ONLY = textwrap.dedent("""
    import json, sys
    OPTIONAL = json.loads(sys.argv[2])
    for name in OPTIONAL:
        sys.modules[name] = None  # import fails, importlib.util.find_spec says it is not installed
    from lmslice.cli import main
    codes = [main(command) for command in json.loads(sys.argv[1])]
    leaked = sorted(name for name in sys.modules if name.split(".")[0] in OPTIONAL and sys.modules[name])
    print(json.dumps({"codes": codes, "leaked": leaked}))
""")


def optional_modules() -> list[str]:
    """The import names of what pyproject.toml lists only among the extras."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[ ;]", requirement)[0].lower().replace("-", "_") for requirement in requirements}

    extras = set().union(*map(names, project["optional-dependencies"].values()))
    return sorted(extras - names(project["dependencies"]) - {"lmslice"})


def test_slice_and_ppl_run_with_only_the_base_dependencies(dense_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    commands = [
        [str(arg) for arg in slice_args(dense_dir, out, text_file, "--json")],
        ["ppl", str(out), "--data", str(text_file), "--seqlen", "32", "--max-windows", "2", "--json"],
        [str(arg) for arg in slice_args(dense_dir, tmp_path / "offloaded", text_file, "--offload")],
        ["report", str(dense_dir), "--calib", str(text_file), "--eval-data", str(text_file), "-o",
         str(tmp_path / "report")],
        ["finetune", str(out), "--data", str(text_file), "-o", str(tmp_path / "finetuned")],
        ["eval", str(out)],
        # the default calibration text, offline
        ["compress", str(dense_dir), "--keep", "0.8", "--mlp-widths", "uniform", "--calib-samples", "4",
         "--calib-seqlen", "32", "-o", str(tmp_path / "default-calibration")],
    ]
    hidden = optional_modules()
    assert {"peft", "lm_eval", "datasets", "matplotlib"} <= set(hidden)
    process = subprocess.run([sys.executable, "-c", BASE_ONLY, json.dumps(commands), json.dumps(hidden)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert process.stdout.strip(), process.stderr[-3000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0, 2, 2, 2, 0], "leaked": []}, process.stderr
    # the commands that need an extra say which, before any work (no output directory, no model loaded)
    errors = [line for line in process.stderr.splitlines() if line.startswith("lmslice: error:")]
    assert errors == ["lmslice: error: plotting the report needs matplotlib: pip install 'lmslice[plot]'",
                      "lmslice: error: recovery fine-tuning with LoRA needs peft: pip install 'lmslice[finetune]'",
                      "lmslice: error: zero-shot evaluation needs lm-eval: pip install 'lmslice[eval]'"]
    for sliced in (out, tmp_path / "offloaded"):
        assert lmslice.load(sliced).get_input_embeddings().weight.shape[1] == 48


# ------------------------------------- issue 17: the defects of the untyped layout, one test each


def pruned_dir(dense_dir: Path, tmp_path: Path, text_file: Path, *options: object) -> Path:
    out = tmp_path / "pruned"
    assert main(["slice", str(dense_dir), "--target-params", "0.8", *map(str, options), "--calib", str(text_file),
                 "-o", str(out), "--calib-samples", "4", "--calib-seqlen", "32", "--json"]) == 0
    return out


@pytest.mark.parametrize("source", ["uniform", "standard"])
def test_1_pruning_a_plain_output_per_block_writes_a_loadable_model(source: str, capsys, dense_dir, text_file,
                                                                    tmp_path) -> None:
    plain = tmp_path / source
    options = (["--target-params", "0.8", "--mlp-widths", "uniform"] if source == "uniform"
               else ["--sparsity", "0.25", "--format", "standard"])
    assert main(["slice", str(dense_dir), *options, "--calib", str(text_file), "-o", str(plain),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--json"]) == 0
    out = tmp_path / "again"
    code, error = run_cli(capsys, "slice", plain, "--target-params", "0.8", "--calib", text_file, "-o", out,
                          "--calib-samples", "4", "--calib-seqlen", "32", "--json")
    assert code == 0, error
    layout = json.loads((out / "config.json").read_text())["lmslice"]
    assert "export" not in layout and len(layout["mlp_widths"]) == 3 and layout["history"]
    assert (out / "modeling_lmslice.py").is_file()
    lmslice.load(out)


def test_2_offloaded_slicing_of_a_pruned_model_keeps_its_widths(capsys, dense_dir, text_file, tmp_path) -> None:
    pruned = pruned_dir(dense_dir, tmp_path, text_file)
    widths = json.loads((pruned / "config.json").read_text())["lmslice"]["mlp_widths"]
    capsys.readouterr()
    outs = {}
    for extra in ((), ("--offload",)):
        outs[extra] = tmp_path / f"sliced{len(extra)}"
        code, error = run_cli(capsys, *slice_args(pruned, outs[extra], text_file, *extra))
        assert code == 0, error
        assert json.loads((outs[extra] / "config.json").read_text())["lmslice"]["mlp_widths"] == widths
    ids, mask = tiny_models.padded_inputs()
    in_memory, offloaded = (lmslice.load(out)(input_ids=ids, attention_mask=mask).logits for out in outs.values())
    torch.testing.assert_close(offloaded, in_memory, rtol=1e-4, atol=1e-4)


def test_3_reloaded_outputs_are_cut_again_or_refused_with_the_reason(capsys, sliced_dir, dense_dir, text_file,
                                                                    tmp_path) -> None:
    pruned = pruned_dir(dense_dir, tmp_path, text_file)
    capsys.readouterr()
    code, error = run_cli(capsys, *slice_args(pruned, tmp_path / "re-sliced", text_file))
    assert code == 0, error
    code, error = run_cli(capsys, *slice_args(sliced_dir, tmp_path / "twice", text_file))
    assert code == 2 and "already sliced" in error and "dense model it came from" in error
    assert "unsupported architecture" not in error


PRUNED_EDITS = {
    "mlp_widths one too long": (lambda layout: layout["mlp_widths"].append(8), "3 blocks"),
    "a width as a string": (lambda layout: layout["mlp_widths"].__setitem__(0, "104"), "must be an integer"),
    "a width as a float": (lambda layout: layout["mlp_widths"].__setitem__(0, 104.0), "must be an integer"),
    "a width as a bool": (lambda layout: layout["mlp_widths"].__setitem__(0, True), "must be an integer"),
    "a negative width": (lambda layout: layout["mlp_widths"].__setitem__(0, -8), "must be at least 0, got -8"),
    "modules.mlp deleted": (lambda layout: layout["modules"].pop("mlp"), "needs lmslice.modules.mlp"),
    "heads not a multiple of the key/value heads": (lambda layout: layout["attention_heads"].__setitem__(0, 3),
                                                    "multiple of the 2 key/value heads"),
    "the first block without attention": (lambda layout: layout["attention_heads"].__setitem__(0, 0),
                                          "the first block keeps its attention"),
    "a block without attention, no key/value paths": (
        lambda layout: (layout["modules"]["attention"].pop("keys"), layout["modules"]["attention"].pop("values"),
                        layout["attention_heads"].__setitem__(1, 0)), "needs the attention's key/value paths"),
    "keys named without values": (lambda layout: layout["modules"]["attention"].pop("values"),
                                  "names keys without values"),
    "fused as a string": (lambda layout: layout["modules"]["attention"].__setitem__("fused", "yes"),
                          "modules.attention.fused must be true or false"),
    "stacked without its key/value head count": (
        lambda layout: layout["modules"]["attention"].__setitem__("stacked", True),
        "stacked needs fused false and a key_value_heads_attribute"),
    # a record from before whole groups could leave (no key/value paths) cannot describe one that did
    "one whole group without key/value paths": (
        lambda layout: (layout["modules"]["attention"].pop("keys"), layout["modules"]["attention"].pop("values"),
                        layout["attention_heads"].__setitem__(0, 1)), "multiple of the 2 key/value heads"),
}


@pytest.mark.parametrize("edit", sorted(PRUNED_EDITS))
def test_4_hand_edited_pruned_configs_are_one_line(edit: str, capsys, dense_dir, text_file, tmp_path) -> None:
    damaged = pruned_dir(dense_dir, tmp_path, text_file)
    change, expected = PRUNED_EDITS[edit]
    edit_config(damaged, lambda config: change(config["lmslice"]))
    with pytest.raises(LmsliceError, match=re.escape(expected)):
        lmslice.load(damaged)


@pytest.mark.parametrize("criterion", ["obs", "energy", "leverage"])
def test_5_a_block_whose_mlp_input_is_zero_is_pruned_finitely_and_said(criterion: str) -> None:
    from lmslice.prune import prune_to_budget

    model = tiny_models.build("llama", torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.zero_()  # the down projection reads zeros: G = 0
    result = prune_to_budget(model, tiny_models.random_batches(), 0.7, criterion=criterion, progress=False,
                             heads=False)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    assert any("block 1" in note and "G = 0" in note for note in result.notes)
    ids, mask = tiny_models.padded_inputs()
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()


def test_5_a_cut_that_leaves_nan_is_refused_naming_the_block_and_tensor(monkeypatch) -> None:
    import lmslice.prune.surgery as surgery
    from lmslice.prune import prune_to_budget

    real_refit = surgery.refit
    monkeypatch.setattr(surgery, "refit", lambda *args: real_refit(*args) * float("nan"))
    with pytest.raises(LmsliceError, match=r"pruning block 0 left \d+ NaN or inf values in "
                                           r"model\.layers\.0\.mlp\.down_proj\.weight"):
        prune_to_budget(tiny_models.build("llama", torch.float32), tiny_models.random_batches(), 0.8,
                        widths="uniform", progress=False)  # every block is cut, block 0 first


@pytest.mark.parametrize("round_to, widths", [(30, "measured"), (60, "measured"), (30, "uniform")])
def test_6_the_planner_stays_on_its_path_and_honours_round_to(round_to: int, widths: str) -> None:
    from lmslice.prune import prune_to_budget

    model = tiny_models.build("llama", torch.float32)  # MLPs of 112 channels
    result = prune_to_budget(model, tiny_models.random_batches(), 0.8, round_to=round_to, widths=widths,
                             progress=False)
    assert all(width == 112 or (width % round_to == 0 and width >= round_to) for width in result.plan.mlp_widths)
    assert result.plan.achieved <= 0.8


def test_6_a_narrow_mlp_is_never_cut_below_round_to(capsys, tmp_path, tiny_tokenizer, text_file) -> None:
    narrow = tmp_path / "narrow"
    model = transformers_llama(intermediate_size=12)
    model.save_pretrained(narrow)
    tiny_tokenizer.save_pretrained(narrow)
    out = tmp_path / "out"
    code, error = run_cli(capsys, "slice", narrow, "--target-params", "0.99", "--no-prune-heads", "--calib", text_file, "-o", out,
                          "--calib-samples", "4", "--calib-seqlen", "32", "--json")
    if code == 0:
        widths = json.loads((out / "config.json").read_text())["lmslice"].get("mlp_widths") or []
        assert all(width in (8, 12) for width in widths)
    else:
        assert code == 2 and "cannot reach 0.99" in error


def transformers_llama(intermediate_size: int):
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **tiny_models.COMMON, intermediate_size=intermediate_size, num_key_value_heads=2))


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_7_plain_directories_with_missing_or_extra_tensors_are_refused(change: str, dense_dir, tmp_path) -> None:
    source = copy_of(dense_dir, tmp_path)
    change_tensors(source, change, missing="model.layers.1.mlp.up_proj.weight", extra="model.layers.1.mlp.extra.weight")
    with pytest.raises(LmsliceError, match="do not match its config"):
        lmslice.load(source)


def test_8_calibration_text_that_cannot_calibrate_is_refused_with_numbers(capsys, dense_dir, tmp_path,
                                                                         monkeypatch) -> None:
    text = tmp_path / "aaaa.txt"
    text.write_text("a" * 20000)
    monkeypatch.setattr("lmslice.pipeline.slice_blocks", pytest.fail)
    for extra in (("--sparsity", "0.25"), ("--target-params", "0.8")):
        out = tmp_path / "out"
        code, error = run_cli(capsys, "slice", dense_dir, *extra, "--calib", text, "-o", out, "--calib-samples", "4",
                              "--calib-seqlen", "32")
        assert code == 2 and re.search(r"has \d distinct tokens \(128 in all\), too few", error) and not out.exists()


def test_9_disk_full_while_spilling_activations_is_one_line(capsys, dense_dir, text_file, tmp_path,
                                                             monkeypatch) -> None:
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr("lmslice.calibration.save_file", disk_full)
    out = tmp_path / "out"
    code, error = run_cli(capsys, *slice_args(dense_dir, out, text_file, "--offload-activations"))
    assert code == 2 and "cannot spill calibration activations" in error and "StorageFull" in error
    assert not out.exists() and leftovers(tmp_path) == []


def test_10_a_budget_the_sliced_model_cannot_meet_is_refused_before_slicing(capsys, dense_dir, text_file,
                                                                           tmp_path, monkeypatch) -> None:
    from lmslice.slicing import sliced_skeleton
    from lmslice.prune import channel_cost, mlp_width
    from lmslice.slicing import count_parameters

    dense = lmslice.load(dense_dir)

    def narrowest(model) -> int:
        blocks = list(model.model.layers)
        mlp = lmslice.adapters.find_adapter(model).mlp
        return count_parameters(model) - sum((mlp_width(block, mlp) - 8) * channel_cost(block, mlp)
                                             for block in blocks)

    dense_floor = narrowest(dense) / count_parameters(dense)
    sliced_floor = narrowest(sliced_skeleton(dense, 56)) / count_parameters(dense)
    assert sliced_floor > dense_floor  # shortcuts and the untied head: slicing a little adds parameters
    budget = (dense_floor + sliced_floor) / 2
    monkeypatch.setattr("lmslice.cli.slice_command.calibration_data", pytest.fail)
    code, error = run_cli(capsys, "slice", dense_dir, "--sparsity", "0.125", "--target-params", f"{budget:.4f}",
                          "--no-prune-heads", "--calib", text_file, "-o", tmp_path / "out")
    assert code == 2 and f"keeps {sliced_floor:.3f}" in error


def test_10_a_full_budget_on_an_mlp_narrower_than_round_to_keeps_it(capsys, tmp_path, tiny_tokenizer,
                                                                     text_file) -> None:
    narrow = tmp_path / "narrow"
    transformers_llama(intermediate_size=12).save_pretrained(narrow)
    tiny_tokenizer.save_pretrained(narrow)
    out = tmp_path / "out"
    code, error = run_cli(capsys, "slice", narrow, "--target-params", "1.0", "--round-to", "16", "--calib", text_file,
                          "-o", out, "--calib-samples", "4", "--calib-seqlen", "32", "--json")
    assert code == 0, error
    lmslice.load(out)


def test_10_lmslice_layouts_loaded_without_remote_code_ask_for_it(sliced_dir, tmp_path) -> None:
    """Plain `AutoModelForCausalLM.from_pretrained(dir)` of a sliced or a pruned output stops with
    transformers' request for trust_remote_code=True (it used to build the dense structure and fail on
    sizes); with it, and through lmslice, both still load."""
    from lmslice.prune import prune_to_budget

    pruned = tiny_models.build("llama", torch.float32)
    prune_to_budget(pruned, tiny_models.random_batches(), 0.8, progress=False)
    pruned_dir = lmslice.save_sliced(pruned, None, tmp_path / "pruned")
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"for directory in {[str(sliced_dir), str(pruned_dir)]!r}:\n"
            "    try:\n"
            "        AutoModelForCausalLM.from_pretrained(directory)\n"
            "    except Exception as error:\n"
            "        print('error:', repr(str(error)), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)  # transformers asks on a terminal, refuses without one
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 0 and len(errors) == 2, result.stderr[-2000:]
    for error in errors:
        assert "Please pass the argument `trust_remote_code=True`" in error, error
    for directory in (sliced_dir, pruned_dir):
        remote = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
        assert type(remote).__name__ == "LmsliceForCausalLM"
        assert type(lmslice.load(directory).config) is transformers.LlamaConfig


def test_10_bench_refuses_a_dense_model_with_other_key_value_heads() -> None:
    import transformers

    from lmslice.cli.bench_command import check_same_model

    sliced = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **tiny_models.COMMON, intermediate_size=112, num_key_value_heads=4))
    slice_model(sliced, tiny_models.random_batches(), 0.25, progress=False)
    with pytest.raises(LmsliceError, match="key/value heads 2 vs 4"):
        check_same_model(tiny_models.build("llama", torch.float32), sliced, "dense", "sliced")


def test_11_a_gguf_source_is_saved_in_float16_within_its_range(tmp_path) -> None:
    from lmslice.io.models import out_of_range, source_dtype

    assert source_dtype(tmp_path / "model.gguf") == torch.float16
    model = tiny_models.build("llama", torch.float32)
    assert out_of_range(model.state_dict().items(), torch.float16) is None
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 1] = 1e5
    assert out_of_range(model.state_dict().items(), torch.float16).startswith("model.layers.2.mlp.down_proj.weight")
    with pytest.raises(LmsliceError, match="do not fit the save dtype: model.layers.2.mlp.down_proj.weight"):
        lmslice.save_sliced(model, None, tmp_path / "half", dtype=torch.float16)
    assert not (tmp_path / "half").exists()


def scale_down_proj(loaded: torch.nn.Module) -> None:
    loaded.model.layers[0].mlp.down_proj.weight.mul_(2)


def widen_norm_eps(loaded: torch.nn.Module) -> None:
    loaded.model.norm.eps = 10.0  # the sliced final norm (SlicedRMSNorm)


@pytest.mark.parametrize("damage, expected", [
    (scale_down_proj, "holds another model.layers.0.mlp.down_proj.weight once loaded back"),
    (widen_norm_eps, "computes other logits once loaded back"),  # the same weights, another function
])
def test_a_saved_model_that_computes_otherwise_is_not_moved_into_place(tmp_path, monkeypatch, damage,
                                                                      expected: str) -> None:
    import lmslice.io.models as models

    model = tiny_models.build("llama", torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    real_load = models.load

    def damaged_load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        with torch.no_grad():
            damage(loaded)
        return loaded

    monkeypatch.setattr(models, "load", damaged_load)
    with pytest.raises(LmsliceError, match=re.escape(expected)):
        lmslice.save_sliced(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --------------------- issue 24: nothing lost, nothing late (one test per case; each fails on the code before)


def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if any command loads a model: what it refuses must be refused before."""
    for command in ("export_command", "finetune_command", "report_command"):
        monkeypatch.setattr(f"lmslice.cli.{command}.load_with_tokenizer", pytest.fail)
    for loader in ("load_with_tokenizer", "open_offloaded"):  # slice opens its model where it places the blocks
        monkeypatch.setattr(f"lmslice.io.placement.{loader}", pytest.fail)


def fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 16)
    return path


def test_24_1_the_gguf_output_is_never_the_source(capsys, text_file, tmp_path, monkeypatch) -> None:
    no_model_loading(monkeypatch)
    source = fake_gguf(tmp_path / "dense.gguf")
    before = source.read_bytes()
    for args in (["export", source, "--gguf", source, "--overwrite"],
                 [*slice_args(source, tmp_path / "s", text_file, "--overwrite", "--gguf", source)]):
        code, error = run_cli(capsys, *args)
        assert code == 2 and f"is the source model {source}" in error, error
    assert source.read_bytes() == before and not (tmp_path / "s").exists()


def test_24_1_the_gguf_of_an_export_is_not_the_model_its_source_records(capsys, tmp_path, monkeypatch) -> None:
    recorded = fake_gguf(tmp_path / "dense.gguf")
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "config.json").write_text(json.dumps({"lmslice": {"source_model": str(recorded)}}))
    no_model_loading(monkeypatch)
    code, error = run_cli(capsys, "export", pruned, "--gguf", recorded, "--overwrite")
    assert code == 2 and "is the model it was compressed from" in error


def test_24_2_overwrite_never_deletes_what_the_run_reads(capsys, dense_dir, text_file, tmp_path, monkeypatch) -> None:
    no_model_loading(monkeypatch)
    holder = tmp_path / "imp"
    holder.mkdir()
    corpus = Path(shutil.copy(text_file, holder / "a.txt"))
    for args in (slice_args(dense_dir, holder, corpus, "--overwrite"),
                 slice_args(dense_dir, holder, text_file, "--overwrite", "--eval-data", corpus),
                 ["finetune", dense_dir, "--data", corpus, "-o", holder, "--overwrite", "--full-parameters"],
                 ["finetune", dense_dir, "--data", text_file, "-o", holder, "--overwrite", "--full-parameters",
                  "--distill-from", holder / "teacher"]):
        if "--distill-from" in args:
            shutil.copytree(dense_dir, holder / "teacher")
        code, error = run_cli(capsys, *args)
        assert code == 2 and "writing it would destroy what this run reads" in error, error
    assert corpus.read_text() == text_file.read_text()
    lmslice.load(holder / "teacher")


def test_24_2_overwrite_replaces_only_what_lmslice_wrote(capsys, dense_dir, text_file, tmp_path, monkeypatch) -> None:
    no_model_loading(monkeypatch)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    plain = copy_of(dense_dir, tmp_path / "plain")  # a dense save_pretrained directory: no lmslice record
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_text("a text file someone named .gguf")
    cases = ((slice_args(dense_dir, notes, text_file, "--overwrite"), "is a directory that is not an lmslice output"),
             (slice_args(dense_dir, plain, text_file, "--overwrite"), "is a directory that is not an lmslice output"),
             (["export", dense_dir, "--gguf", not_gguf, "--overwrite"], "is not a GGUF file"),
             (["report", dense_dir, "--calib", text_file, "--eval-data", text_file, "-o", notes, "--overwrite"],
              "is a directory that is not an lmslice output"))
    for args, expected in cases:
        code, error = run_cli(capsys, *args)
        assert code == 2 and expected in error and "--overwrite or not" in error, error
    assert (notes / "thesis.tex").read_text() == "years of work" and not_gguf.read_text().startswith("a text")
    lmslice.load(plain)


def test_24_2_outputs_lmslice_wrote_are_recognised(tmp_path: Path) -> None:
    for name, files in {"model": {"config.json": '{"lmslice": {"family": "llama"}}', "model.safetensors": ""},
                        "report": {"report.json": '{"model": "m", "rows": []}', "report.md": ""},
                        "empty": {}}.items():
        (tmp_path / name).mkdir()
        for file, text in files.items():
            (tmp_path / name / file).write_text(text)
        assert check_output(tmp_path / name, overwrite=True) == tmp_path / name
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(LmsliceError, match="not an lmslice output"):
        check_output(tmp_path / "model", overwrite=True)


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "64k", read_only: bool = False) -> Iterator[bool]:
    """A tmpfs of `size` mounted at `path` (read-only if asked); yields False where none can be mounted
    (not root, no mount), and the caller simulates the file system instead."""
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_24_3_an_output_on_a_read_only_file_system_is_refused_before_any_work(capsys, dense_dir, text_file, tmp_path,
                                                                              monkeypatch) -> None:
    read_only = tmp_path / "ro"
    with small_filesystem(read_only, read_only=True) as mounted:
        if not mounted:
            def refused(*args, **kwargs):
                raise OSError(errno.EROFS, "Read-only file system")

            monkeypatch.setattr("tempfile.mkstemp", refused)
            monkeypatch.setattr("tempfile.mkdtemp", refused)
        monkeypatch.setattr("lmslice.cli.slice_command.calibration_data", pytest.fail)
        no_model_loading(monkeypatch)
        for args in (["export", dense_dir, "--gguf", read_only / "model.gguf"],
                     slice_args(dense_dir, tmp_path / "out", text_file, "--target-params", "0.8", "--gguf",
                                read_only / "model.gguf"),
                     slice_args(dense_dir, read_only / "out", text_file)):
            code, error = run_cli(capsys, *args)
            assert code == 2 and "is not writable (Read-only file system)" in error, error
    assert not (tmp_path / "out").exists()


def test_24_3_an_output_without_room_is_refused_before_calibration(capsys, dense_dir, text_file, tmp_path,
                                                                   monkeypatch) -> None:
    small = tmp_path / "small"
    with small_filesystem(small, size="64k") as mounted:
        if not mounted:
            monkeypatch.setattr("lmslice.io.outputs.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(
                64 * 1024, 0, 64 * 1024))
        monkeypatch.setattr("lmslice.cli.slice_command.calibration_data", pytest.fail)
        monkeypatch.setattr("lmslice.cli.export_command.write_gguf", pytest.fail)
        for args in (slice_args(dense_dir, small / "out", text_file),  # 164,352 float32 weights
                     ["export", dense_dir, "--gguf", small / "model.gguf"]):
            code, error = run_cli(capsys, *args)
            room = re.search(r"not enough room for .*: about 0\.\d MB to write, 0\.\d MB free", error)
            assert code == 2 and room, error
        assert list(small.iterdir()) == []


def test_24_3_a_gguf_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, tiny_tokenizer,
                                                                           monkeypatch) -> None:
    import gguf

    from lmslice.export.gguf import export_gguf

    def disk_full(self, **_) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    real_unlink = Path.unlink

    def read_only_unlink(path: Path, *args, **kwargs) -> None:  # the clean-up on a file system gone read-only
        if path.name.endswith(f"{os.getpid()}-{socket.gethostname()}"):
            real_unlink(path)
            raise OSError(errno.EROFS, "Read-only file system")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    monkeypatch.setattr(Path, "unlink", read_only_unlink)
    with pytest.raises(LmsliceError, match=r"cannot write .*\.gguf: .*No space left on device \(nothing was written"):
        export_gguf(tiny_models.build("llama", torch.float32), tmp_path / "model.gguf", tiny_tokenizer)
    assert list(tmp_path.iterdir()) == []


def mlp_free_model() -> torch.nn.Module:
    """The tiny Llama pruned with block 1's whole MLP deleted."""
    from lmslice.prune import WidthPlan
    from lmslice.prune.passes import prune_model

    model = tiny_models.build("llama", torch.float32)
    prune_model(model, tiny_models.random_batches(), WidthPlan(0.8, 1, 1, mlp_widths=[112, 0, 112], round_to=8))
    return model


def test_24_4_slicing_a_block_without_mlp_is_refused_before_calibration(capsys, tiny_tokenizer, text_file, tmp_path,
                                                                        monkeypatch) -> None:
    from lmslice.pipeline import Prune, PruneConfig, Slice, SliceConfig, check_steps, compress

    expected = "a block of this model has no MLP left (pruned away)"
    pruned = lmslice.save_sliced(mlp_free_model(), tiny_tokenizer, tmp_path / "pruned")
    monkeypatch.setattr("lmslice.cli.slice_command.calibration_data", pytest.fail)
    code, error = run_cli(capsys, *slice_args(pruned, tmp_path / "out", text_file))
    assert code == 2 and expected in error and not (tmp_path / "out").exists()
    with pytest.raises(LmsliceError, match=re.escape(expected)):
        check_steps(lmslice.load(pruned), [Slice(SliceConfig(0.25, slice_head=True))])
    # pruned in the same run, which deletes block 2's MLP here: refused, not a model that cannot be saved
    with pytest.raises(LmsliceError, match=re.escape(expected)):
        compress(tiny_models.build("llama", torch.float32), tiny_models.random_batches(),
                 [Prune(PruneConfig(0.3)), Slice(SliceConfig(0.25, slice_head=True))], progress=False)


def test_24_5_a_rounding_step_as_wide_as_an_mlp_is_refused_before_calibration(capsys, dense_dir, text_file,
                                                                              tmp_path, monkeypatch) -> None:
    from lmslice.pipeline import Prune, PruneConfig, check_steps

    monkeypatch.setattr("lmslice.cli.slice_command.calibration_data", pytest.fail)
    for option in (["--align", "gguf-k"], ["--round-to", "112"]):  # the tiny MLPs have 112 channels
        code, error = run_cli(capsys, "slice", dense_dir, "--target-params", "0.8", *option, "--calib", text_file,
                              "-o", tmp_path / "out")
        assert code == 2 and "no narrower than the MLP of blocks 0, 1, 2 (112 channels)" in error, error
        assert "lower --round-to" in error
    with pytest.raises(LmsliceError, match="round_to 256 is no narrower than the MLP"):
        check_steps(tiny_models.build("llama", torch.float32), [Prune(PruneConfig(0.8, round_to=256))])


@pytest.mark.parametrize("batches, expected", [
    ([{"ids": torch.zeros(1, 8, dtype=torch.long)}], "calibration batch 0 must be a dict whose input_ids"),
    ([{"input_ids": torch.zeros(8, dtype=torch.long)}], "a 2-D tensor of token ids"),
    ([{"input_ids": torch.zeros(1, 8)}], "a 2-D tensor of token ids"),
    ([{"input_ids": torch.full((1, 8), 300)}], "token ids from 300 to 300; the model's vocabulary is 0 to 299"),
    ([{"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 7)}],
     "attention_mask must be a tensor of input_ids' shape (2, 8)"),
    (torch.zeros(2, 8, dtype=torch.long), "must be a list of dicts with input_ids"),
    ([torch.zeros(2, 8, dtype=torch.long)], "calibration batch 0 must be a dict"),
])
def test_24_api_refuses_malformed_batches_in_one_line(batches, expected: str) -> None:
    from lmslice.pipeline import Prune, PruneConfig, Slice, SliceConfig, compress

    for step in (Slice(SliceConfig(0.25)), Prune(PruneConfig(0.8))):
        model = tiny_models.build("llama", torch.float32)
        with pytest.raises(LmsliceError, match=re.escape(expected)):
            compress(model, batches, [step], progress=False)
    with pytest.raises(LmsliceError, match=re.escape(expected)):
        slice_model(tiny_models.build("llama", torch.float32), batches, 0.25, progress=False)
    from lmslice.finetune import TrainingConfig, finetune

    sliced = tiny_models.build("llama", torch.float32)
    slice_model(sliced, tiny_models.random_batches(), 0.25, progress=False)
    with pytest.raises(LmsliceError, match=re.escape(expected.replace("calibration", "training"))):
        finetune(sliced, batches, TrainingConfig(full_parameters=True), progress=False)


@pytest.mark.parametrize("steps, expected", [
    ("slice", "steps must be a list of steps"),
    (["slice"], "step 0 is a str, not a step"),
    ([lmslice.SliceConfig(0.25)], "step 0 is a SliceConfig, not a step"),
    ([lmslice.Slice], "step 0 is a type, not a step"),
])
def test_24_api_refuses_malformed_steps_in_one_line(steps, expected: str) -> None:
    with pytest.raises(LmsliceError, match=re.escape(expected)):
        lmslice.compress(tiny_models.build("llama", torch.float32), tiny_models.random_batches(), steps,
                         progress=False)


def sliced_model_dir(tmp_path: Path, tokenizer) -> Path:
    model = tiny_models.build("llama", torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    return lmslice.save_sliced(model, tokenizer, tmp_path / "sliced")


def test_24_7_training_that_diverges_is_reported_at_its_step_and_nothing_saved(capsys, tmp_path, tiny_tokenizer,
                                                                               text_file) -> None:
    from lmslice.finetune import TrainingConfig, finetune

    model = lmslice.load(sliced_model_dir(tmp_path, tiny_tokenizer))
    with pytest.raises(LmsliceError, match=r"training diverged at step \d+: "):
        finetune(model, tiny_models.random_batches(count=6), TrainingConfig(lr=1e30, full_parameters=True),
                 progress=False)
    code, error = run_cli(capsys, "finetune", tmp_path / "sliced", "--data", text_file, "-o", tmp_path / "out",
                          "--full-parameters", "--lr", "1e30", "--samples", "6", "--seqlen", "32", "--eval-seqlen",
                          "32", "--eval-max-windows", "1")
    assert code == 2 and re.search(r"training diverged at step \d+: .*nothing was saved", error), error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, expected", [
    ("--lm-weight", "inf", "--lm-weight must be a number of at least 0, got inf"),
    ("--lm-weight", "nan", "--lm-weight must be a number of at least 0, got nan"),
    ("--temperature", "inf", "--temperature must be a positive number, got inf"),
    ("--lr", "nan", "the learning rate must be a positive number, got nan"),
    ("--lr", "inf", "the learning rate must be a positive number, got inf"),
    ("--lora-alpha", "inf", "LoRA needs a rank of at least 1, a positive alpha"),
    ("--time-budget", "nan", "the time budget must be a number of seconds, at least 0, got nan"),
])
def test_24_7_non_finite_training_settings_are_refused_before_loading(option: str, value: str, expected: str, capsys,
                                                                      dense_dir, text_file, tmp_path,
                                                                      monkeypatch) -> None:
    no_model_loading(monkeypatch)
    code, error = run_cli(capsys, "finetune", dense_dir, "--data", text_file, "-o", tmp_path / "out",
                          "--distill-from", dense_dir, option, value)
    assert code == 2 and expected in error, error


KILLED_EXPORT = textwrap.dedent("""
    import os, sys
    import gguf, torch
    sys.path.insert(0, sys.argv[2])
    import tiny_models
    from lmslice.export.gguf import export_gguf
    from transformers import AutoTokenizer
    write = gguf.GGUFWriter.write_tensors_to_file
    def killed_midway(self, **kwargs):
        os.kill(os.getpid(), 9)
    gguf.GGUFWriter.write_tensors_to_file = killed_midway
    export_gguf(tiny_models.build("llama", torch.float32), sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[3]))
""")


def test_24_8_a_killed_export_leaves_a_partial_file_the_next_run_removes(capsys, dense_dir, tmp_path) -> None:
    out = tmp_path / "model.gguf"
    process = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(out), str(TESTS), str(dense_dir)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    partial = leftovers(tmp_path)
    assert len(partial) == 1 and partial[0].startswith(".model.gguf.partial-")
    assert main(["export", str(dense_dir), "--gguf", str(out)]) == 0
    assert leftovers(tmp_path) == [] and out.read_bytes()[:4] == b"GGUF"


def test_24_9_a_directory_given_as_gguf_is_named_so(capsys, dense_dir, text_file, tmp_path, monkeypatch) -> None:
    no_model_loading(monkeypatch)
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    for args in (["export", dense_dir, "--gguf", folder, "--overwrite"],
                 slice_args(dense_dir, tmp_path / "out", text_file, "--overwrite", "--gguf", folder)):
        code, error = run_cli(capsys, *args)
        assert code == 2 and f"{folder} is a directory: give a file name ending in .gguf" in error, error


def test_24_9_missing_and_empty_text_files_are_named_before_the_model_loads(capsys, dense_dir, text_file, tmp_path,
                                                                           monkeypatch) -> None:
    no_model_loading(monkeypatch)
    monkeypatch.setattr("lmslice.cli.ppl.load_with_tokenizer", pytest.fail)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = (("missing.txt", "text file not found: missing.txt"),
             (f"{text_file}:0.5,{tmp_path / 'typo.txt'}:0.5", f"text file not found: {tmp_path / 'typo.txt'}"),
             (f"{text_file},{empty}", f"text file {empty} is empty"),
             ("wikitxt2", "unknown text source 'wikitxt2'"))
    for calib, expected in cases:
        code, error = run_cli(capsys, *slice_args(dense_dir, tmp_path / "out", calib))
        assert code == 2 and expected in error, error
    code, error = run_cli(capsys, "ppl", dense_dir, "--data", "missing.txt")
    assert code == 2 and "text file not found: missing.txt" in error


def test_24_9_a_text_of_whitespace_inside_a_mix_is_named(capsys, dense_dir, text_file, tmp_path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    code, error = run_cli(capsys, *slice_args(dense_dir, tmp_path / "out", f"{text_file},{blank}"))
    assert code == 2 and f"the text source {blank} is empty" in error, error


def test_24_9_a_mistyped_local_path_is_refused_without_asking_the_hub(tmp_path, monkeypatch) -> None:
    import transformers.utils.hub

    asked = []

    def offline_hub(repo_id, *args, **kwargs):  # the network boundary: no network in tests
        asked.append(repo_id)
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {repo_id}")

    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", offline_hub)
    (tmp_path / "models").mkdir()
    (tmp_path / "pruned").mkdir()
    monkeypatch.chdir(tmp_path)
    for source, expected in (("models/pruned-0.8", "the local directory models has no pruned-0.8"),
                             ("smolm2-135m", "did you mean smollm2-135m?"),
                             ("prunde", "did you mean pruned?"),
                             ("out/pruned/model.safetensors", "model not found"),
                             ("./out", "model not found")):
        with pytest.raises(LmsliceError, match=re.escape(expected)):
            lmslice.load(source)
    assert asked == []
    with pytest.raises(LmsliceError, match="cannot load model from HuggingFaceTB/SmolLM2-135M: We couldn't connect"):
        lmslice.load("HuggingFaceTB/SmolLM2-135M")
    assert asked and set(asked) == {"HuggingFaceTB/SmolLM2-135M"}


INTERRUPTED_IMPORT = textwrap.dedent("""
    import sys
    class CtrlC:  # Ctrl-C while torch is being imported
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                raise KeyboardInterrupt
    sys.meta_path.insert(0, CtrlC())
    from lmslice.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_24_9_ctrl_c_during_the_imports_is_one_line(dense_dir) -> None:
    process = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, "ppl", str(dense_dir), "--data", "pydoc"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert process.returncode == 130 and process.stderr.strip() == "lmslice: interrupted", process.stderr[-2000:]


def test_24_note_a_result_larger_than_its_source_says_why(capsys, dense_dir, text_file, tmp_path) -> None:
    summaries = []
    for extra in ((), ("--slice-head",)):  # sparsity 0.25 of the tied tiny Llama
        assert main([str(arg) for arg in slice_args(dense_dir, tmp_path / f"out{len(extra)}", text_file, *extra,
                                                    "--json")]) == 0
        summaries.append(json.loads(capsys.readouterr().out))
    larger, smaller = summaries
    assert larger["parameters_sliced"] > larger["parameters_dense"] > smaller["parameters_sliced"]
    assert not any("of the source's parameters" in note for note in smaller["notes"])
    note = next(note for note in larger["notes"] if "of the source's parameters" in note)
    assert re.fullmatch(r"the result holds 10\d% of the source's parameters \(the head keeps its full width, no longer "
                        r"tied to the \(sliced\) embedding it shared; each block adds shortcut matrices between its "
                        r"bases\): slice the head too \(--slice-head\) or prune to a real budget \(--keep\) "
                        r"for a smaller model", note), note
