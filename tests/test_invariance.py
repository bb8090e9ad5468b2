"""Fusion + rotation at sparsity 0 must not change what the model computes."""

from __future__ import annotations

import copy

import pytest
import torch

import tiny_models
from lmslice.adapters import find_adapter
from test_adapters import SLICEABLE
from lmslice.calibration import Covariance
from lmslice.fuse import fuse_norms
from lmslice.slicing import slice_model

TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def exact_rms_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' RMSNorms round through float32 even in a float64 model, which would make the float64
    reference itself inexact at 1e-8; give the dense reference exact arithmetic."""

    def exact(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (hidden_states * scale)

    def exact_plus_one(self, hidden_states: torch.Tensor) -> torch.Tensor:  # Gemma: scale is 1 + weight
        scale = torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return (1 + self.weight) * (hidden_states * scale)

    import importlib

    for family in ("llama", "mistral", "ministral", "ministral3", "qwen2", "qwen3", "smollm3", "granite", "phi3",
                   "olmo2"):
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        norm_class = next(value for name, value in vars(module).items() if name.endswith("RMSNorm"))
        monkeypatch.setattr(norm_class, "forward", exact)
    for family in ("gemma", "gemma2", "gemma3"):
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        norm_class = next(value for name, value in vars(module).items() if name.endswith("RMSNorm"))
        monkeypatch.setattr(norm_class, "forward", exact_plus_one)


def logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("family", SLICEABLE)
def test_fusion_keeps_logits(family: str, dtype: torch.dtype) -> None:
    dense = tiny_models.build(family, dtype)
    ids, mask = tiny_models.padded_inputs()
    fused = copy.deepcopy(dense)
    fuse_norms(fused, find_adapter(fused))
    assert (logits(fused, ids, mask) - logits(dense, ids, mask)).abs().max() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("family", SLICEABLE)
@pytest.mark.parametrize("slice_head", [False, True], ids=["full-head", "sliced-head"])
def test_rotation_at_sparsity_zero_keeps_logits(family: str, dtype: torch.dtype, slice_head: bool) -> None:
    dense = tiny_models.build(family, dtype)
    ids, mask = tiny_models.padded_inputs()
    rotated = copy.deepcopy(dense)
    slice_model(rotated, tiny_models.random_batches(), 0.0, slice_head=slice_head, progress=False)
    difference = (logits(rotated, ids, mask) - logits(dense, ids, mask)).abs().max()
    assert difference <= TOLERANCE[dtype], f"max |Δlogit| = {difference:.3g}"


@pytest.mark.parametrize("family", SLICEABLE)
def test_rotation_is_not_the_identity(family: str) -> None:
    """Guards the test above: the rotated model's weights really differ from the dense ones."""
    dense = tiny_models.build(family)
    rotated = copy.deepcopy(dense)
    slice_model(rotated, tiny_models.random_batches(), 0.0, progress=False)
    dense_embedding = dense.get_input_embeddings().weight
    rotated_embedding = rotated.get_input_embeddings().weight
    assert dense_embedding.shape == rotated_embedding.shape
    assert (dense_embedding - rotated_embedding).abs().max() > 1e-2


def test_slicing_changes_the_model_by_a_bounded_amount() -> None:
    """At 25% the tiny model still predicts much like the dense one, unlike a random model would."""
    dense = tiny_models.build("llama")
    ids, mask = tiny_models.padded_inputs()
    sliced = copy.deepcopy(dense)
    slice_model(sliced, tiny_models.random_batches(count=4), 0.25, progress=False)
    reference = logits(dense, ids, mask)
    error = (logits(sliced, ids, mask) - reference).norm() / reference.norm()
    unrelated = tiny_models.build("llama", seed=5)
    assert error < 0.5 * ((logits(unrelated, ids, mask) - reference).norm() / reference.norm())


@pytest.mark.parametrize("sparsity", [0.0, 0.25])
def test_embeddings_are_centred_only_when_slicing(sparsity: float) -> None:
    """An RMSNorm model's embeddings lose their mean when components are deleted (the PCA then finds the
    all-ones direction empty), and keep it at sparsity 0, where the model must stay exact."""
    model = tiny_models.build("llama")
    result = slice_model(model, tiny_models.random_batches(), sparsity, progress=False)
    spectrum = torch.tensor(result.spectra["embeddings"])
    smallest = (spectrum.min() / spectrum.max()).item()
    if sparsity:
        assert abs(smallest) < 1e-12
    else:
        assert smallest > 1e-6


def test_principal_components_reconstruct_the_covariance_and_keep_the_thread_count() -> None:
    covariance = Covariance(32, torch.device("cpu"))
    hidden = torch.randn(2, 50, 32, dtype=torch.float64)
    covariance.add(hidden, torch.ones(2, 50, dtype=torch.bool))
    threads = torch.get_num_threads()
    eigenvalues, eigenvectors = covariance.principal_components()
    assert torch.get_num_threads() == threads
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])
    expected = hidden.reshape(-1, 32).T @ hidden.reshape(-1, 32) / 100
    assert torch.allclose(eigenvectors @ torch.diag(eigenvalues) @ eigenvectors.T, expected, atol=1e-10)
