"""On-disk layout of sharded features: a manifest, Parquet shards and commit markers.

``output_dir/manifest.json`` is written by the driver before any work starts.
It fixes the number of input rows, the featurizer settings that change the
output, and for every non-empty shard its row count and a digest of its rows
(row ids and texts). A shard is two files in ``output_dir/shards/``:

- ``shard-00012.parquet``: columns ``row`` (int64, the input row id) and
  ``features`` (fixed-size list of float32);
- ``shard-00012.json``: the commit marker, written after the Parquet file,
  recording its size, row count, digest and the featurizer's fitted state.

Both are written to a temporary name in the same folder and renamed with
:func:`os.replace` (atomic on POSIX filesystems), Parquet first. A shard
without a marker, or whose marker disagrees with the manifest or the file on
disk, is not finished: a rerun recomputes it and the loader refuses it. A
crash can therefore never leave a half-written shard that reads as valid.

This module needs pyarrow but not Ray, so features load on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

FORMAT = "rmkit-feature-shards-v1"
MANIFEST = "manifest.json"
# Settings of BackboneFeaturizer that change its output; the others (batch_size, cache, verbose,
# device, share_prompts) change only how fast it is computed.
OUTPUT_PARAMS = ("backbone", "layer", "pooling", "max_length", "dtype")
DIGEST_MOD = 1 << 62  # row digests are summed modulo this: order-free, exact in int64 and JSON


class IncompleteFeaturesError(RuntimeError):
    """Sharded features that are missing shards or do not match their manifest.

    Raised by :func:`load_features` (and at the end of a run that left shards
    unfinished); rerunning :func:`rmkit.distributed.featurize` with the same
    arguments finishes them.

    Examples
    --------
    >>> from rmkit.distributed import IncompleteFeaturesError
    >>> issubclass(IncompleteFeaturesError, RuntimeError)
    True
    """


def shard_name(shard):
    return f"shard-{int(shard):05d}"


def shard_paths(output_dir, shard):
    base = Path(output_dir) / "shards" / shard_name(shard)
    return base.with_suffix(".parquet"), base.with_suffix(".json")


def atomic_write_bytes(path, write):
    """Call ``write(tmp_path)`` then rename the result onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write_bytes(path, write)


def row_digests(row_ids, text_columns):
    """One integer per row hashing its id and texts (``text_columns``: list of lists of str)."""
    out = np.empty(len(row_ids), dtype=np.int64)
    for i, rid in enumerate(row_ids):
        h = hashlib.blake2b(str(int(rid)).encode(), digest_size=8)
        for col in text_columns:
            h.update(b"\x1f")
            h.update(col[i].encode())
        out[i] = int.from_bytes(h.digest(), "little") % DIGEST_MOD
    return out


def combine_digests(digests):
    return int(sum(int(d) for d in digests) % DIGEST_MOD)


def read_manifest(output_dir):
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {output_dir} holds no sharded features "
                                "(write them with rmkit.distributed.featurize).")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise IncompleteFeaturesError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}.")
    return manifest


def write_shard(output_dir, shard, rows, values, marker):
    """Write one shard's features, then its commit marker (both atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = np.ascontiguousarray(values, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    if values.ndim != 2 or len(values) != len(rows):
        raise ValueError(f"shard {shard}: expected a 2-D feature array with {len(rows)} rows, got {values.shape}.")
    width = values.shape[1]
    feats = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.float32()), width)
    table = pa.table({"row": pa.array(rows), "features": feats})
    table = table.replace_schema_metadata({b"rmkit": json.dumps({"shard": int(shard), "width": width}).encode()})
    parquet, marker_path = shard_paths(output_dir, shard)
    atomic_write_bytes(parquet, lambda tmp: pq.write_table(table, tmp))
    marker = dict(marker, shard=int(shard), rows=len(rows), width=width, bytes=parquet.stat().st_size,
                  file=parquet.name)
    atomic_write_json(marker_path, marker)
    return marker


def read_marker(output_dir, shard, expected):
    """The shard's commit marker if the shard is finished and matches ``expected``, else None."""
    parquet, marker_path = shard_paths(output_dir, shard)
    try:
        marker = json.loads(marker_path.read_text())
        size = parquet.stat().st_size
    except (OSError, ValueError):
        return None
    if (marker.get("bytes") != size or marker.get("rows") != expected["rows"]
            or marker.get("digest") != expected["digest"]):
        return None
    return marker


def finished_shards(output_dir, manifest):
    """``{shard: marker}`` of the manifest's shards that are finished."""
    out = {}
    for key, expected in manifest["shards"].items():
        marker = read_marker(output_dir, int(key), expected)
        if marker is not None:
            out[int(key)] = marker
    return out


def _check_consistent(markers):
    """Every shard must come from the same fitted featurizer (same weights, layer, width, names)."""
    fields = ("fingerprint", "layer", "width", "columns", "kind")
    first = next(iter(markers.values()))
    for shard, m in markers.items():
        for f in fields:
            if m.get(f) != first.get(f):
                raise IncompleteFeaturesError(
                    f"Shards {first['shard']} and {shard} disagree on {f!r} ({first.get(f)!r} vs {m.get(f)!r}): "
                    "they were written by different featurizers. Rewrite the features with overwrite=True.")


def load_features(output_dir, *, with_names=None):
    """Load sharded features as one matrix aligned with the input rows.

    Parameters
    ----------
    output_dir : str or Path
        The folder given to :func:`rmkit.distributed.featurize`.
    with_names : bool, optional
        Return a DataFrame with the featurizer's column names. By default a
        DataFrame is returned when the featurizer's ``transform`` returned
        one (its column names are stored with the shards), else an array.

    Returns
    -------
    ndarray of shape (n_rows, n_features) or DataFrame
        Row ``i`` holds the features of input row ``i``.

    Raises
    ------
    IncompleteFeaturesError
        When a shard is missing, unfinished, or does not match the manifest,
        or when a row is missing or present twice.

    Examples
    --------
    >>> import tempfile
    >>> from rmkit import BackboneFeaturizer
    >>> from rmkit.distributed import featurize, load_features
    >>> from rmkit.testing import tiny_backbone
    >>> rows = [{"prompt": "2+2?", "response": r} for r in ("4", "5", "four")]
    >>> feats = BackboneFeaturizer(tiny_backbone(), cache=False, verbose=0)
    >>> out = featurize(rows, feats, tempfile.mkdtemp(), backend="local", verbose=0)
    >>> load_features(out.output_dir).shape
    (3, 130)
    """
    import pandas as pd
    import pyarrow.parquet as pq

    manifest = read_manifest(output_dir)
    markers = finished_shards(output_dir, manifest)
    missing = sorted(set(map(int, manifest["shards"])) - set(markers))
    if missing:
        raise IncompleteFeaturesError(
            f"{len(missing)} of {len(manifest['shards'])} shards in {output_dir} are missing or unfinished "
            f"(first: {shard_name(missing[0])}); rerun rmkit.distributed.featurize with the same arguments to "
            "finish them.")
    n = manifest["n_rows"]
    if not markers:
        raise IncompleteFeaturesError(f"{output_dir} holds no shards.")
    _check_consistent(markers)
    first = next(iter(markers.values()))
    out = np.empty((n, first["width"]), dtype=np.float32)
    seen = np.zeros(n, dtype=np.int64)
    for shard in sorted(markers):
        parquet, _ = shard_paths(output_dir, shard)
        table = pq.read_table(parquet)
        rows = table.column("row").to_numpy()
        feats = table.column("features").combine_chunks()
        values = feats.values.to_numpy(zero_copy_only=False).reshape(len(rows), first["width"])
        if len(rows) != markers[shard]["rows"] or rows.min(initial=0) < 0 or rows.max(initial=0) >= n:
            raise IncompleteFeaturesError(f"{parquet} does not hold the rows its marker records.")
        out[rows] = values
        np.add.at(seen, rows, 1)
    bad = np.flatnonzero(seen != 1)
    if len(bad):
        raise IncompleteFeaturesError(
            f"{len(bad)} rows are missing or duplicated across the shards of {output_dir} "
            f"(first: row {bad[0]}, seen {seen[bad[0]]} times).")
    names = first.get("columns")
    if with_names is None:
        with_names = names is not None
    if with_names:
        if names is None:
            raise ValueError("These features were stored without column names (the featurizer returned an array).")
        return pd.DataFrame(out, columns=names)
    return out
