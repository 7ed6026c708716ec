"""The CUDA paths: the same answers on a GPU as on the CPU, and GPU-fitted models that load on a CPU.

Skipped where torch sees no GPU (CI); run on a GPU machine with ``python -m pytest tests/test_gpu.py``.
The other test modules also run on the GPU there: the featurizer and the LoRA estimators default to
``device="auto"``.
"""

import numpy as np
import pandas as pd
import pytest
import torch

import rmkit
from rmkit import BackboneFeaturizer, GatedScalarizer, LoRAExpertRegressor
from rmkit.backbones import resolve_dtype

from .test_gating import FAST, two_kinds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pairs(n=10):
    words = ["cat", "dog", "sun", "tree", "car", "book", "fish", "bird", "rain", "milk"]
    return pd.DataFrame({"prompt": [f"Tell me about the {w} " + "please " * (i % 4) for i, w in enumerate(words[:n])],
                         "chosen": [f"The {w} is " + "nice " * (1 + i % 5) for i, w in enumerate(words[:n])],
                         "rejected": [f"No {w}." + " Go." * (i % 3) for i, w in enumerate(words[:n])]})


def test_auto_dtype_is_bfloat16_on_a_bf16_gpu():
    assert resolve_dtype("auto", "cuda") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    assert resolve_dtype("auto", "auto") == resolve_dtype("auto", "cuda")  # "auto" picks the GPU


def test_gpu_features_match_the_cpu_and_ignore_batch_size(tiny):
    X = _pairs()
    cpu = BackboneFeaturizer(tiny, device="cpu", cache=False, verbose=0).fit_transform(X)
    gpu = [BackboneFeaturizer(tiny, device="cuda", batch_size=b, cache=False, verbose=0).fit_transform(X)
           for b in (1, 3, 16)]
    assert list(gpu[0].columns) == list(cpu.columns)
    for g in gpu:
        np.testing.assert_allclose(g.to_numpy(), cpu.to_numpy(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(g.to_numpy(), gpu[0].to_numpy(), rtol=1e-4, atol=1e-5)


def test_bf16_gpu_features_stay_close_to_float32(tiny):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    X = _pairs()
    f32 = BackboneFeaturizer(tiny, device="cuda", cache=False, verbose=0).fit_transform(X).to_numpy()
    bf16 = BackboneFeaturizer(tiny, device="cuda", dtype="auto", cache=False, verbose=0).fit_transform(X).to_numpy()
    h = slice(0, f32.shape[1] - 1)  # the last column is the prompt-group id
    cos = (f32[:, h] * bf16[:, h]).sum(1) / (np.linalg.norm(f32[:, h], axis=1) * np.linalg.norm(bf16[:, h], axis=1))
    assert cos.min() > 0.99 and not np.array_equal(f32, bf16)


def test_gate_trained_on_the_gpu_loads_and_predicts_on_the_cpu(tmp_path):
    train, _ = two_kinds(400, seed=0)
    test, _ = two_kinds(200, seed=1)
    gpu = GatedScalarizer(random_state=0, device="cuda", **FAST).fit(train)
    cpu = GatedScalarizer(random_state=0, device="cpu", **FAST).fit(train)
    assert next(gpu.module_.parameters()).device.type == "cuda"
    assert gpu.score(test) > 0.85 and abs(gpu.score(test) - cpu.score(test)) < 0.05
    loaded = rmkit.load(rmkit.save(gpu, tmp_path / "gate"), device="cpu")
    assert next(loaded.module_.parameters()).device.type == "cpu"
    np.testing.assert_allclose(loaded.predict_proba(test), gpu.predict_proba(test), rtol=1e-4, atol=1e-6)


def test_lora_trained_on_the_gpu_learns_and_loads_on_the_cpu(tiny, tmp_path):
    from .test_lora import make_pairs

    X, test = make_pairs(24), make_pairs(8, seed=5)
    gpu = LoRAExpertRegressor(tiny, rank=4, lr=5e-3, max_epochs=6, batch_size=4, device="cuda", random_state=0,
                              verbose=0).fit(X)
    assert gpu.score(test) >= 0.85
    loaded = rmkit.load(rmkit.save(gpu, tmp_path / "lora"), device="cpu")
    np.testing.assert_allclose(loaded.predict(test), gpu.predict(test), rtol=1e-3, atol=1e-4)
