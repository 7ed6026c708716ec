"""``save`` and ``load``: the public entry points of the save format."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ._allowlist import qualified_name
from ._format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TENSORS,
    BackboneMismatchError,
    IntegrityError,
    PersistenceError,
)
from ._reader import Reader, backbone_allowed, refuse_backbone
from ._swap import (
    TMP_MARK,
    current_umask,
    fsync_dir,
    fsync_file,
    host_tag,
    remove_stale_temps,
    save_in_flight,
    sha256,
    swap_into_place,
    temp_prefix,
)
from ._writer import Writer

__all__ = ["load", "save"]


def _library_versions():
    import importlib.metadata as md

    out = {}
    for name in ("rmkit", "scikit-learn", "torch", "skorch", "numpy", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def save(model, directory):
    """Save a fitted (or unfitted) model to ``directory`` as safetensors + JSON.

    The save is atomic: everything is written to a temporary folder beside
    ``directory``, flushed to disk, and swapped into place in one step, so an
    interrupted save leaves the previous contents of ``directory`` intact.
    An existing ``directory`` is replaced only if it is empty or an earlier
    rmkit save.

    Parameters
    ----------
    model : estimator
        rmkit estimators, scikit-learn pipelines of them, skorch nets, torch
        modules, or anything built from allowlisted classes (see
        :func:`register_safe_class`).
    directory : str or Path

    Returns
    -------
    Path
        The directory written.

    Raises
    ------
    PersistenceError
        If part of the model cannot be written without pickle (a function, an
        unknown class); the message names the attribute path.

    Examples
    --------
    >>> import numpy as np, tempfile, rmkit
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from sklearn.linear_model import Ridge
    >>> X, y = np.arange(12.0).reshape(6, 2), np.arange(6.0)
    >>> model = make_pipeline(StandardScaler(), Ridge()).fit(X, y)
    >>> path = rmkit.save(model, tempfile.mkdtemp() + "/ridge")
    >>> sorted(p.name for p in path.iterdir())
    ['README.md', 'rmkit.json', 'tensors.safetensors']
    >>> bool(np.array_equal(rmkit.load(path).predict(X), model.predict(X)))
    True
    """
    from safetensors.torch import save_file

    target = Path(directory).expanduser().absolute()
    remove_stale_temps(target)
    if target.exists():
        if not target.is_dir():
            raise PersistenceError(f"{target} exists and is not a directory.")
        if any(target.iterdir()) and not (target / MANIFEST).is_file():
            raise PersistenceError(f"{target} exists and is not an rmkit save; refusing to replace its contents.")
    writer = Writer()
    root = writer.encode(model, "model")  # before touching the disk: errors leave everything as it was
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_versions": _library_versions(),
        "class": qualified_name(type(model)),
        "backbones": [{"name": n, "sha256": fp} for n, fp in writer.backbones.items()],
        "tensors": None,
        "model": root,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(target)}{os.getpid()}-{host_tag()}-", dir=target.parent))
    try:
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a save is an ordinary folder
        tensor_path = tmp / TENSORS
        save_file(writer.tensors, str(tensor_path), metadata={"format": "pt", "producer": FORMAT})
        os.chmod(tensor_path, 0o666 & ~umask)
        fsync_file(tensor_path)
        manifest["tensors"] = {"file": TENSORS, "bytes": tensor_path.stat().st_size, "sha256": sha256(tensor_path)}
        text = json.dumps(manifest, indent=1, allow_nan=False)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        from ._model_card import (
            write_card_on_save,  # README.md model card beside the weights (documentation only)
        )
        write_card_on_save(tmp, model, manifest)
        fsync_dir(tmp)
        swap_into_place(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous save, or a half-written one
    return target


def _read_inside(directory, name):
    """Bytes of ``directory/name``, refusing a symlink or anything that leads outside ``directory``."""
    path = directory / name
    if path.is_symlink() or (path.exists() and os.path.realpath(path.parent) != os.path.realpath(directory)):
        raise PersistenceError(f"{path} is a symbolic link; rmkit.load reads only files inside the save folder.")
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return f.read()


def _parse_manifest(directory, raw):
    path = directory / MANIFEST

    def refuse_constant(value):
        raise ValueError(f"non-standard JSON constant {value}")

    try:
        manifest = json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
    except RecursionError:
        raise IntegrityError(f"{path} nests too deeply to be a saved model.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid JSON (truncated or edited?): {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PersistenceError(f"{path} is not an rmkit save manifest (no \"format\": \"{FORMAT}\").")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise PersistenceError(
            f"{directory} uses save format version {version!r}, but this rmkit reads version {FORMAT_VERSION}"
            + (": it was written by a newer rmkit; upgrade rmkit to load it." if newer else
               ": re-save the model with a matching rmkit version.")
        )
    return manifest


def _read_manifest(directory):
    if not directory.is_dir():
        raise FileNotFoundError(f"No saved model at {directory}: the directory does not exist.")
    raw = _read_inside(directory, MANIFEST)
    if raw is None:
        raise PersistenceError(f"{directory} is not an rmkit save: it has no {MANIFEST}.")
    return _parse_manifest(directory, raw)


def _check_tensors(directory, manifest, data):
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    info = manifest.get("tensors")
    if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or not isinstance(info.get("sha256"), str):
        raise IntegrityError(f"{directory / MANIFEST} does not record the size and SHA-256 of {TENSORS}.")
    path = directory / TENSORS  # fixed name: the manifest never chooses which file is read
    if data is None:
        raise IntegrityError(f"{path} is missing.")
    if len(data) != info["bytes"]:
        raise IntegrityError(
            f"{path} is {len(data)} bytes but was saved as {info['bytes']} bytes: the file is truncated or altered."
        )
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise IntegrityError(f"{path} does not match the SHA-256 recorded when it was saved: the file was altered "
                             "(tampered with or corrupted).")
    try:
        return load_bytes(data)  # the very bytes that were hashed: no second read that a save could change
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise IntegrityError(f"{path} is not a readable safetensors file: {exc}") from None


def _read_save(directory, *, wait=30.0):
    """``(manifest, tensors)`` of one consistent save at ``directory``.

    A concurrent :func:`save` replaces the folder with two renames; a reader
    that sees the folder missing, or a tensors file that does not match the
    manifest it read, retries while the manifest changes under it or a live
    process is saving there, so it returns the old or the new save, never a
    mix, and raises only for a save that stays broken.
    """
    import time

    directory = Path(directory)
    if TMP_MARK in directory.name:
        raise PersistenceError(f"{directory} is the temporary folder of an unfinished rmkit.save, not a save.")
    remove_stale_temps(directory.absolute())
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        raw = None
        try:
            if not directory.is_dir():
                raise FileNotFoundError(f"No saved model at {directory}: the directory does not exist.")
            raw = _read_inside(directory, MANIFEST)
            if raw is None:
                raise PersistenceError(f"{directory} is not an rmkit save: it has no {MANIFEST}.")
            manifest = _parse_manifest(directory, raw)
            tensors = _check_tensors(directory, manifest, _read_inside(directory, TENSORS))
            if _read_inside(directory, MANIFEST) == raw:
                return manifest, tensors
            error = None  # the save was replaced while reading: read again
        except (FileNotFoundError, IntegrityError) as exc:
            error = exc
            try:
                changed = raw is not None and _read_inside(directory, MANIFEST) != raw
            except (OSError, PersistenceError):
                changed = True
            if not changed and not save_in_flight(directory.absolute()):
                raise
        except PersistenceError:
            raise
        except OSError as exc:  # a file vanished between the check and the read: a save in flight?
            error = PersistenceError(f"{directory} cannot be read: {exc}")
            if not save_in_flight(directory.absolute()):
                raise error from None
        if time.monotonic() > deadline:
            if error is not None:
                raise error
            raise PersistenceError(f"{directory} kept changing for {wait:.0f} s while loading (saves in a loop?).")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _check_backbones(manifest, remap):
    from rmkit.backbones._loading import weights_fingerprint

    entries = manifest.get("backbones") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                and isinstance(e.get("sha256"), str) for e in entries):
        raise IntegrityError(f"{MANIFEST}: 'backbones' must be a list of {{name, sha256}} strings.")
    for entry in entries:
        name, saved = entry.get("name"), entry.get("sha256")
        if not backbone_allowed(name, remap):
            refuse_backbone(name)
        where = os.fspath(remap.get(name, name))
        try:
            if os.path.isabs(where) and not os.path.isdir(where):
                raise FileNotFoundError(f"there is no folder {where}")
            current = weights_fingerprint(where)
        except Exception as exc:  # missing folder, broken conversion, ...
            raise BackboneMismatchError(
                f"The model was fitted on backbone {name!r}, which cannot be loaded here ({exc}). "
                f"Pass backbones={{{name!r}: '<folder with the same weights>'}} to rmkit.load."
            ) from exc
        if current != saved:
            raise BackboneMismatchError(
                f"The model was fitted on backbone {name!r} with weights sha256 {str(saved)[:12]}..., but "
                f"{where!r} now has different weights: its features would not match what the "
                "model learned. Point the name at the original weights with "
                f"backbones={{{name!r}: '<folder>'}} or refit the model."
            )


def load(directory, *, device=None, backbones=None, check_backbones=True):
    """Load a model written by :func:`save`; never runs code named by the files.

    Parameters
    ----------
    directory : str or Path
    device : str, optional
        Overrides every ``device`` parameter in the model (e.g. ``"cpu"`` for
        a model saved on a GPU). By default saved devices are kept, except
        that CUDA devices fall back to ``"cpu"`` with a warning when CUDA is
        not available.
    backbones : dict, optional
        Maps backbone names recorded at save time to where the same weights
        are now (their fingerprint is still checked).
    check_backbones : bool, default=True
        Verify that every referenced backbone has the weights the model was
        fitted on.

    Returns
    -------
    The rebuilt model.

    Raises
    ------
    UnsafeClassError
        The JSON names a class that is not on the allowlist.
    IntegrityError
        A file is missing, truncated, not matching its recorded hash, or the
        JSON is malformed.
    BackboneMismatchError
        A referenced backbone has different weights than at save time.
    PersistenceError
        Not an rmkit save, or a different format version (all the errors
        above are PersistenceErrors too).

    Examples
    --------
    >>> import numpy as np, tempfile, rmkit
    >>> from sklearn.linear_model import LogisticRegression
    >>> X, y = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([0, 0, 1, 1])
    >>> path = rmkit.save(LogisticRegression().fit(X, y), tempfile.mkdtemp() + "/clf")
    >>> rmkit.load(path).predict([[0.2], [2.8]])
    array([0, 1])
    """
    directory = Path(directory).expanduser()
    manifest, tensors = _read_save(directory)
    remap = {str(k): v for k, v in (backbones or {}).items()}
    if check_backbones:
        _check_backbones(manifest, remap)
    reader = Reader(tensors, device=device, backbones=remap)
    try:
        return reader.decode(manifest.get("model"))
    except PersistenceError:
        raise
    except RecursionError:
        raise IntegrityError(f"{directory / MANIFEST} nests too deeply to be a saved model.") from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError, OverflowError,
            MemoryError, AssertionError, OSError) as exc:
        # Whatever a crafted or damaged file makes the rebuilding code raise is reported as one error type.
        raise IntegrityError(f"{directory / MANIFEST} is malformed or describes a model that cannot be rebuilt: "
                             f"{type(exc).__name__}: {exc}") from exc
