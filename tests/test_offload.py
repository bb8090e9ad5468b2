"""Slicing with blocks kept on disk gives the same model as in memory, in a bounded amount of memory."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

import lmslice
import tiny_models
from lmslice.calibration import ActivationStore
from lmslice.cli import main
from lmslice.io.offload import slice_offloaded
from lmslice.slicing import slice_model
from test_adapters import SLICEABLE


@pytest.mark.parametrize("family", SLICEABLE)
def test_offloaded_slicing_matches_in_memory(family: str, tmp_path: Path) -> None:
    dense = tiny_models.build(family, torch.float32)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="100KB")  # several shards
    batches = tiny_models.random_batches()
    in_memory = copy.deepcopy(dense)
    slice_model(in_memory, batches, 0.25, progress=False)
    slice_offloaded(tmp_path / "dense", tmp_path / "sliced", batches, 0.25, progress=False)
    offloaded = lmslice.load(tmp_path / "sliced")
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        expected = in_memory(ids, attention_mask=mask).logits
        assert (offloaded(ids, attention_mask=mask).logits - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_activations_on_disk_give_the_same_model(family: str, tmp_path: Path, monkeypatch) -> None:
    dense = tiny_models.build(family, torch.float32)
    batches = tiny_models.random_batches()
    in_memory, on_disk = copy.deepcopy(dense), copy.deepcopy(dense)
    slice_model(in_memory, batches, 0.25, progress=False)
    written = set()
    put = ActivationStore.put

    def recording_put(store: ActivationStore, name: str, tensor: torch.Tensor) -> None:
        put(store, name, tensor)
        assert not store.tensors, "a stream held in memory"
        written.add(name)

    monkeypatch.setattr(ActivationStore, "put", recording_put)
    slice_model(on_disk, batches, 0.25, progress=False, activations=tmp_path)
    # one file per batch for the stream and one for the block outputs, all removed once done
    assert written == {f"{kind}-{index}" for kind in ("stream", "output") for index in range(len(batches))}
    assert not list(tmp_path.iterdir())
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        assert torch.equal(on_disk(ids, attention_mask=mask).logits, in_memory(ids, attention_mask=mask).logits)


def test_cli_offload_writes_a_loadable_model(tmp_path: Path, tiny_tokenizer, text_file: Path, capsys) -> None:
    dense = tiny_models.build("llama", torch.float32)
    dense.save_pretrained(tmp_path / "dense")
    tiny_tokenizer.save_pretrained(tmp_path / "dense")
    code = main(["slice", str(tmp_path / "dense"), "--sparsity", "0.25", "--calib", str(text_file), "-o",
                 str(tmp_path / "out"), "--calib-samples", "4", "--calib-seqlen", "32", "--offload",
                 "--offload-activations", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    model = lmslice.load(tmp_path / "out")
    assert sum(p.numel() for p in model.parameters()) == summary["parameters_sliced"]
    assert model.get_input_embeddings().weight.shape == (tiny_models.VOCAB, 48)
    assert not list(tmp_path.glob(".lmslice-activations-*"))  # removed once slicing is done


MEASURE = textwrap.dedent("""
    import json, re, sys, torch
    sys.path.insert(0, {tests!r})
    import tiny_models
    import lmslice
    from lmslice.io.offload import slice_offloaded
    from lmslice.slicing import slice_model
    def high_water_kib():
        # VmHWM belongs to this process's own address space; ru_maxrss would include the pytest parent's peak.
        with open("/proc/self/status") as status:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
    from lmslice.io.offload import open_offloaded, save_offloaded
    from lmslice.pipeline import Prune, PruneConfig, compress
    def run(dense, out):
        if sys.argv[1] == "offload":
            slice_offloaded(dense, out, batches, 0.25, progress=False)
        elif sys.argv[1] == "prune-offload":
            model, storage = open_offloaded(dense, out, dtype=torch.float32, device="cpu")
            result = compress(model, batches, [Prune(PruneConfig(0.8))], progress=False, placement=storage)
            save_offloaded(result.model, storage, None, out, overwrite=False)
        elif sys.argv[1] == "prune-memory":  # the model in memory, measured the same way
            compress(lmslice.load(dense), batches, [Prune(PruneConfig(0.8))], progress=False)
        else:
            slice_model(lmslice.load(dense), batches, 0.25, progress=False)
    batches = tiny_models.random_batches(count=2, batch_size=1, seqlen=32)
    # A warm-up on a tiny model loads the code paths, so the growth measured next is the model's own.
    tiny_models.build("llama", torch.float32).save_pretrained({out!r} + "-warmup")
    run({out!r} + "-warmup", {out!r} + "-warmup-sliced")
    baseline = high_water_kib()
    run({dense!r}, {out!r})
    peak = high_water_kib()
    print(json.dumps({{"growth_bytes": (peak - baseline) * 1024}}))
""")


def peak_growth(mode: str, dense: Path, out: Path) -> int:
    script = MEASURE.format(tests=str(Path(__file__).parent), dense=str(dense), out=str(out))
    # A real model's tensors exceed glibc's largest mmap threshold (32 MiB), so freed blocks go back to the
    # system; this model's 4 MiB matrices would otherwise stay in fragmented heap arenas and read as growth.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    process = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                             env=env)
    return json.loads(process.stdout.strip().splitlines()[-1])["growth_bytes"]


@pytest.fixture(scope="module")
def deep_dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A 16-block Llama of 512 wide blocks (MLP 2048) on disk, and the bytes of one block in float32."""
    config = transformers.LlamaConfig(vocab_size=tiny_models.VOCAB, hidden_size=512, intermediate_size=2048,
                                      num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("deep") / "dense"
    dense.save_pretrained(path)
    return path, sum(p.numel() for p in dense.model.layers[0].parameters()) * 4


# Bounds, in block sizes, whatever the depth. Slicing: a block in float32, its float64 copies while rotating
# (2x), the rotated result, the pages of the shard being read and written (mapped files count in the resident
# set) and allocator slack. Pruning also holds the MLP's Gram matrix (2048² in float64: two block sizes here),
# its float32 copy and inverse while choosing channels, and G[S, S] while refitting.
BOUNDS = {"offload": 8, "prune-offload": 12}


@pytest.mark.parametrize("mode", ["offload", "prune-offload"])
def test_offloaded_peak_memory_is_about_one_block(mode: str, deep_dense: tuple[Path, int], tmp_path: Path) -> None:
    """The model has 16 blocks, so holding it whole (the in-memory path, measured the same way) must exceed
    the bound."""
    dense, block_bytes = deep_dense
    bound = BOUNDS[mode] * block_bytes
    offloaded = peak_growth(mode, dense, tmp_path / "out")
    assert offloaded < bound, f"{mode} grew by {offloaded / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
    in_memory = peak_growth(mode.replace("offload", "memory"), dense, tmp_path / "unused")
    assert in_memory > bound, f"in memory, {mode} grew by only {in_memory / 2**20:.0f} MiB"
