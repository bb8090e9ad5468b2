"""A killed `--offload` run resumes (`--resume`) from what it finished and gives the model an uninterrupted
run gives, weight for weight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_models
from lmslice.errors import LmsliceError
from lmslice.io.offload import OffloadedBlocks, open_offloaded, save_offloaded
from lmslice.io.outputs import RESUME_RECORD, check_output, process_tag, resumable_staging
from lmslice.io.resume import ResumeRecord
from lmslice.pipeline import Prune, PruneConfig, Slice, SliceConfig, StandardFormat, StandardFormatConfig, compress
from test_failures import SRC, leftovers, run_cli, slice_args

RECIPES = {
    "slice": [Slice(SliceConfig(0.25))],
    "prune with heads": [Prune(PruneConfig(0.7, heads=True))],
    "slice+prune": [Slice(SliceConfig(0.25, slice_head=True)), Prune(PruneConfig(0.8, heads=True))],
    "standard": [Slice(SliceConfig(0.25, rotation="shared")), Prune(PruneConfig(0.8, widths="uniform")),
                 StandardFormat(StandardFormatConfig(False))],
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "dense"
    tiny_models.build("llama", torch.float64).save_pretrained(path)
    return path


def compress_offloaded(dense: Path, out: Path, steps: list, resume: bool, batches: list | None = None,
                       ) -> list[str]:
    """Compresses `dense` into `out` with offloaded blocks, as `lmslice compress --offload [--resume]` does;
    returns the run's notes."""
    model, storage = open_offloaded(dense, out, dtype=torch.float64, device="cpu", resume=resume)
    result = compress(model, batches or tiny_models.random_batches(), steps, progress=False, placement=storage)
    save_offloaded(result.model, storage, None, out, overwrite=False)
    return result.notes


def interrupted_at_visit(monkeypatch: pytest.MonkeyPatch, visit: int) -> None:
    """Ctrl-C as the run brings its `visit`-th block (counting from 1) to the compute device."""
    load, visits = OffloadedBlocks.load, []

    def counting_load(storage: OffloadedBlocks, index: int, block: torch.nn.Module) -> None:
        visits.append(index)
        if len(visits) == visit:
            raise KeyboardInterrupt
        load(storage, index, block)

    monkeypatch.setattr(OffloadedBlocks, "load", counting_load)


def saved(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    weights = {name: tensor for file in out.glob("*.safetensors") for name, tensor in load_file(file).items()}
    return weights, json.loads((out / "config.json").read_text())


def assert_same_model(out: Path, expected: Path) -> None:
    weights, config = saved(out)
    expected_weights, expected_config = saved(expected)
    assert config == expected_config
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected_weights[name]), name


def assert_only_resumable_staging(out: Path) -> None:
    """Nothing that looks like a finished output: no `out`, only the staging directory with its record."""
    assert not out.exists()
    assert leftovers(out.parent) == [resumable_staging(out).name]
    assert (resumable_staging(out) / RESUME_RECORD).is_file()


@pytest.fixture(scope="module")
def uninterrupted(dense: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    outs = {}
    for recipe, steps in RECIPES.items():
        outs[recipe] = tmp_path_factory.mktemp("uninterrupted") / "out"
        compress_offloaded(dense, outs[recipe], steps, resume=False)
    return outs


# (recipe, the block visit interrupted, the visits the resumed run makes). Each walk visits the 3 blocks of
# the tiny model: slicing 1 walk (2 with a shared basis, measured first), pruning 3 (the Fisher's forward
# and backward, which measure the plan, then the pruning), the standard format 1. A measurement cut short
# is made again; the blocks a walk finished are not visited again.
INTERRUPTIONS = [
    ("slice", 3, 1),  # in slicing's block 2
    ("prune with heads", 8, 2),  # in the pruning of block 1: the plan is read back
    ("slice+prune", 5, 6 + 3),  # in the Fisher's forward walk, once slicing is done
    ("standard", 17, 2),  # in the standard format's block 1: the shared basis and the Fisher are read back
]


@pytest.mark.parametrize("recipe, visit, visits_resumed", INTERRUPTIONS)
def test_a_resumed_run_gives_the_uninterrupted_runs_model(recipe: str, visit: int, visits_resumed: int, dense: Path,
                                                          tmp_path: Path, uninterrupted: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as patched:
        interrupted_at_visit(patched, visit)
        with pytest.raises(KeyboardInterrupt):
            compress_offloaded(dense, out, RECIPES[recipe], resume=True)
    assert_only_resumable_staging(out)
    visits = []
    load = OffloadedBlocks.load
    monkeypatch.setattr(OffloadedBlocks, "load", lambda storage, index, block: visits.append(index)
                        or load(storage, index, block))
    notes = compress_offloaded(dense, out, RECIPES[recipe], resume=True)
    assert notes[0].startswith("resumed the interrupted run")
    assert len(visits) == visits_resumed
    assert_same_model(out, uninterrupted[recipe])
    assert leftovers(tmp_path) == []


def test_a_resumed_run_interrupted_again_resumes_too(dense: Path, tmp_path: Path, uninterrupted: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    for visit in (2, 9):  # in slicing's block 1; resumed, in the pruning of block 0 (after slicing and the plan)
        with monkeypatch.context() as patched:
            interrupted_at_visit(patched, visit)
            with pytest.raises(KeyboardInterrupt):
                compress_offloaded(dense, out, RECIPES["slice+prune"], resume=True)
        assert_only_resumable_staging(out)
    notes = compress_offloaded(dense, out, RECIPES["slice+prune"], resume=True)
    assert "read back: slicing 3 of 3 blocks; the pruning plan)" in notes[0]
    assert_same_model(out, uninterrupted["slice+prune"])


@pytest.mark.parametrize("killed", ["before the record counts the block", "after the record, before the rename"])
def test_a_shard_replaces_the_earlier_steps_only_once_the_record_counts_it(
        killed: str, dense: Path, tmp_path: Path, uninterrupted: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning block 1 replaces the shard slicing wrote: a run killed between the two writes still resumes."""
    out = tmp_path / "out"
    pruning_block_1 = {"walk": "1.pruning", "index": 1}
    real_save, real_commit = ResumeRecord.save, OffloadedBlocks.commit

    def save(record: ResumeRecord) -> None:
        if killed.startswith("before") and record.storage.pending == pruning_block_1["index"] and record.walks.get(
                pruning_block_1["walk"], {}).get("blocks") == 2:
            raise KeyboardInterrupt
        real_save(record)

    def commit(storage: OffloadedBlocks) -> None:
        if killed.startswith("after") and storage.pending == pruning_block_1["index"] and storage.final:
            raise KeyboardInterrupt
        real_commit(storage)

    with monkeypatch.context() as patched:
        patched.setattr(ResumeRecord, "save", save)
        patched.setattr(OffloadedBlocks, "commit", commit)
        with pytest.raises(KeyboardInterrupt):
            compress_offloaded(dense, out, RECIPES["slice+prune"], resume=True)
    staging = resumable_staging(out)
    assert (staging / ".block-00001.safetensors.partial").is_file()  # the pruned block 1, not yet in place
    compress_offloaded(dense, out, RECIPES["slice+prune"], resume=True)
    assert_same_model(out, uninterrupted["slice+prune"])


def test_a_run_that_differs_is_refused_and_without_resume_the_staging_is_cleared(
        dense: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as patched:
        interrupted_at_visit(patched, 2)
        with pytest.raises(KeyboardInterrupt):
            compress_offloaded(dense, out, RECIPES["slice"], resume=True)
    with pytest.raises(LmsliceError, match=r"differs from this one in steps \(.*0\.25.*now .*0\.3"):
        compress_offloaded(dense, out, [Slice(SliceConfig(0.3))], resume=True)
    with pytest.raises(LmsliceError, match="differs from this one in calibration_tokens"):
        compress_offloaded(dense, out, RECIPES["slice"], resume=True, batches=tiny_models.random_batches(seed=5))
    assert_only_resumable_staging(out)  # a refusal keeps it for the right command
    compress_offloaded(dense, out, RECIPES["slice"], resume=False)
    assert out.is_dir() and leftovers(tmp_path) == []


def test_only_a_dead_runs_resumable_staging_is_cleared_and_only_without_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = resumable_staging(out)
    (staging / RESUME_RECORD).parent.mkdir(parents=True)
    host = process_tag().split("-", 1)[1]
    running, dead = f"{os.getppid()}-{host}", f"999999999-{host}"
    for owner, resuming, kept in ((running, False, True), (dead, True, True), (dead, False, False)):
        (staging / RESUME_RECORD).write_text(json.dumps({"process": owner}))
        check_output(out, overwrite=False, resuming=resuming)
        assert staging.is_dir() == kept, (owner, resuming)


def test_resume_without_offload_is_refused_before_any_work(capsys, dense_dir: Path, text_file: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmslice.cli.slice_command.open_placed", pytest.fail)
    code, error = run_cli(capsys, *slice_args(dense_dir, tmp_path / "out", text_file, "--resume"))
    assert code == 2 and error.startswith("lmslice: error: --resume continues an --offload run")


KILLED_AFTER_BLOCK_1 = textwrap.dedent("""
    import os, signal, sys
    import lmslice.io.resume as resume
    block_finished = resume.ResumeRecord.block_finished
    def block_finished_then_killed(self, walk, finished, index, *args):
        block_finished(self, walk, finished, index, *args)
        if index == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    resume.ResumeRecord.block_finished = block_finished_then_killed
    from lmslice.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_cli_resumes_a_killed_run(dense_dir: Path, text_file: Path, tmp_path: Path) -> None:
    def compress_command(out: Path, *extra: str) -> list[str]:
        return [str(arg) for arg in slice_args(dense_dir, out, text_file, "--offload", *extra)]

    environment = {**os.environ, "PYTHONPATH": str(SRC)}
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_BLOCK_1, *compress_command(tmp_path / "out", "--resume")],
                            capture_output=True, text=True, env=environment)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_only_resumable_staging(tmp_path / "out")
    for out, extra in ((tmp_path / "out", ["--resume", "--json"]), (tmp_path / "uninterrupted", ["--json"])):
        process = subprocess.run([sys.executable, "-m", "lmslice", *compress_command(out, *extra)],
                                 capture_output=True, text=True, env=environment)
        assert process.returncode == 0, process.stderr
        notes = json.loads(process.stdout)["notes"]
        assert ("resumed the interrupted run in .out.partial-resumable (read back: slicing 2 of 3 blocks)" in notes) \
            == (out.name == "out")
    weights, _ = saved(tmp_path / "out")
    expected, _ = saved(tmp_path / "uninterrupted")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[name], expected[name]) for name in weights)
    assert leftovers(tmp_path) == []
