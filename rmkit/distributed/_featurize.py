"""Sharded, resumable featurisation on Ray Data (or in this process)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from . import _shards

__all__ = ["featurize", "FeatureShards"]

_ROW, _SHARD, _KEY, _DIGEST = "_rmkit_row", "_rmkit_shard", "_rmkit_key", "_rmkit_digest"
_SUMMARY = ["shard", "rows", "seconds", "cpu_seconds", "items", "real_tokens", "padded_tokens", "truncated", "cache_hits"]
_READ_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json"}


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised without the extra only
        raise ImportError("rmkit.distributed needs Ray Data: pip install 'rmkit[ray]' "
                          "(or pip install 'ray[data]').") from exc
    return ray


class FeatureShards:
    """What :func:`featurize` wrote, and how the run went.

    Attributes
    ----------
    output_dir : Path
    n_rows : int
        Input rows; :meth:`load` returns this many feature rows.
    n_shards : int
        Non-empty shards of the dataset.
    computed_shards, skipped_shards : list of int
        Shards computed by this call, and shards already finished by an
        earlier call (resumed).
    stats : dict
        Rows, texts and backbone tokens computed by this call, summed over
        workers, with the wall-clock ``seconds`` of the call and ``worker_seconds``
        (the summed time workers spent in ``transform``) and ``worker_cpu_seconds``
        (their CPU time there, all threads).

    Examples
    --------
    >>> import tempfile
    >>> from rmkit import BackboneFeaturizer
    >>> from rmkit.distributed import featurize
    >>> from rmkit.testing import tiny_backbone
    >>> rows = [{"prompt": "hi", "response": r} for r in ("hello", "hey")]
    >>> feats = BackboneFeaturizer(tiny_backbone(), cache=False, verbose=0)
    >>> out = featurize(rows, feats, tempfile.mkdtemp(), backend="local", verbose=0)
    >>> out.n_rows, out.stats["rows"], out.load().shape
    (2, 2, (2, 130))
    """

    def __init__(self, output_dir, n_rows, n_shards, computed_shards, skipped_shards, stats):
        self.output_dir = Path(output_dir)
        self.n_rows = n_rows
        self.n_shards = n_shards
        self.computed_shards = computed_shards
        self.skipped_shards = skipped_shards
        self.stats = stats

    def load(self, **kwargs):
        """Load the features (see :func:`rmkit.distributed.load_features`)."""
        return _shards.load_features(self.output_dir, **kwargs)

    def __repr__(self):
        return (f"FeatureShards({str(self.output_dir)!r}, n_rows={self.n_rows}, n_shards={self.n_shards}, "
                f"computed={len(self.computed_shards)}, skipped={len(self.skipped_shards)})")


# ---------------------------------------------------------------------------------------------- input


def _text_columns(columns):
    """The columns the featurizer reads, in a fixed order, and the kind of input."""
    columns = list(columns)
    conv = "messages" if "messages" in columns else "prompt"
    if conv not in columns:
        raise ValueError(f"The data has no 'prompt' (or 'messages') column; it has {columns}.")
    if "chosen" in columns or "rejected" in columns:
        missing = [c for c in ("chosen", "rejected") if c not in columns]
        if missing:
            raise ValueError(f"Preference pairs need 'chosen' and 'rejected'; the data lacks {missing}.")
        if "response" in columns:
            raise ValueError("The data has both 'response' and 'chosen'/'rejected' columns: featurize pointwise "
                             "rows and preference pairs separately.")
        return [conv, "chosen", "rejected"], "pairs"
    if "response" not in columns:
        raise ValueError(f"The data has no 'response' column (pointwise) nor 'chosen'/'rejected' (pairs); "
                         f"it has {columns}.")
    return [conv, "response"], "pointwise"


def _conversation_key(value):
    """A string standing for a prompt or a ``messages`` list (the prompt group of a row)."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""  # the featurizer rejects it with a clear message
    msgs = list(value) if isinstance(value, (list, tuple, np.ndarray)) else value
    try:
        return json.dumps([[m["role"], m["content"]] for m in msgs])
    except (TypeError, KeyError):
        return repr(value)


def _as_text(value):
    return value if isinstance(value, str) else repr(value)


def _expand_paths(data):
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _reader(f, strict=False))
            if not found:
                raise FileNotFoundError(f"{p} holds no .jsonl, .json(.gz) or .parquet files.")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist.")
    kinds = {_reader(f) for f in files}
    if len(kinds) > 1:
        raise ValueError(f"Mixed input formats {sorted(kinds)}: pass JSONL files or Parquet files, not both.")
    return [str(f) for f in files], kinds.pop()


def _reader(path, strict=True):
    name = Path(path).name.lower()
    for suffix, kind in _READ_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    if strict:
        raise ValueError(f"Cannot read {path}: expected .jsonl, .json, .jsonl.gz or .parquet.")
    return None


def _is_path_input(data):
    return isinstance(data, (str, Path)) or (
        isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(d, (str, Path)) for d in data))


def _read_local(data):
    """The input as a pandas DataFrame (backend="local")."""
    from rmkit.utils._validation import as_frame

    if _is_path_input(data):
        files, kind = _expand_paths(data)
        if kind == "parquet":
            return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        return pd.concat([pd.read_json(f, lines=True, dtype=False, convert_dates=False) for f in files], ignore_index=True)
    if type(data).__module__.startswith("datasets"):
        return data.to_pandas()
    if type(data).__module__.startswith("ray.data"):
        return data.to_pandas()
    return as_frame(data, name="data").reset_index(drop=True)


def _read_ray(data, ray, block_rows):
    """The input as a Ray Dataset with a row-id column, in input order."""
    rd = ray.data
    if isinstance(data, pd.DataFrame) or isinstance(data, dict) or (
            isinstance(data, (list, tuple)) and not _is_path_input(data)):
        df = _read_local(data)
        df = df.assign(**{_ROW: np.arange(len(df), dtype=np.int64)})
        parts = [df.iloc[i:i + block_rows] for i in range(0, len(df), block_rows)] or [df]
        return rd.from_pandas(parts), len(df)
    if _is_path_input(data):
        files, kind = _expand_paths(data)
        ds = rd.read_parquet(files) if kind == "parquet" else rd.read_json(files, lines=True)
    elif type(data).__module__.startswith("datasets"):
        ds = rd.from_huggingface(data)
    elif isinstance(data, rd.Dataset):
        ds = data
    else:
        raise TypeError(f"data must be a DataFrame, a list of dicts, a dict of lists, a path (JSONL/Parquet, "
                        f"file or folder), a Hugging Face dataset or a Ray Dataset; got {type(data).__name__}.")
    text_cols, _ = _text_columns(ds.columns())
    ds = ds.select_columns(text_cols)
    n = ds.count()
    # zip is positional: with preserve_order set, row ids follow the file order, then the line order.
    ids = rd.range(n).rename_columns({"id": _ROW})
    return ds.zip(ids), n


def _annotate(df, text_cols, n_shards):
    """Add the prompt-group key, the shard of the group, and each row's digest."""
    keys = [_conversation_key(v) for v in df[text_cols[0]]]
    texts = [keys] + [[_as_text(v) for v in df[c]] for c in text_cols[1:]]
    shard = np.fromiter((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") % n_shards
                         for k in keys), dtype=np.int64, count=len(keys))
    return df.assign(**{_KEY: keys, _SHARD: shard, _DIGEST: _shards.row_digests(df[_ROW].to_numpy(), texts)})


# -------------------------------------------------------------------------------------------- workers


class ShardWorker:
    """Featurizes one shard (one Ray Data group) and writes it; one backbone per instance.

    Ray Data creates one instance per actor: the backbone loads once in the
    actor's process and serves every shard the actor receives.
    """

    def __init__(self, featurizer, output_dir, text_cols, manifest_shards, num_threads=None):
        if num_threads:
            import torch

            torch.set_num_threads(int(num_threads))
        self.featurizer = featurizer
        self.output_dir = output_dir
        self.text_cols = text_cols
        self.expected = manifest_shards
        self.fitted = None

    def _fitted(self, texts):
        from sklearn.base import clone
        from sklearn.exceptions import NotFittedError
        from sklearn.utils.validation import check_is_fitted

        if self.fitted is None:
            try:
                check_is_fitted(self.featurizer, "hidden_size_")
                f = copy.deepcopy(self.featurizer)
            except NotFittedError:
                f = clone(self.featurizer).fit(texts)
            f.set_params(verbose=0)
            if hasattr(f, "_model"):
                f._model()  # load the weights now, so the per-shard timings measure the forward passes only
            self.fitted = f
        return self.fitted

    def __call__(self, df):
        """Featurize and write every shard in ``df`` (whole shards only); one summary row per shard."""
        return pd.concat([self._shard(int(s), part) for s, part in df.groupby(_SHARD, sort=True)] or
                         [pd.DataFrame(columns=_SUMMARY)], ignore_index=True)

    def _shard(self, shard, df):
        expected = self.expected[str(shard)]
        # Sorting by prompt group puts a prompt's responses side by side, so they share its prefix pass.
        df = df.sort_values([_KEY, _ROW], kind="stable").reset_index(drop=True)
        digest = _shards.combine_digests(df[_DIGEST])
        if len(df) != expected["rows"] or digest != expected["digest"]:
            raise RuntimeError(f"Shard {shard} arrived with {len(df)} rows (digest {digest}), but the manifest "
                               f"expects {expected['rows']} rows (digest {expected['digest']}): a shard must reach "
                               "one worker whole.")
        texts = df[self.text_cols]
        f = self._fitted(texts)
        start, cpu = time.perf_counter(), time.process_time()
        out = f.transform(texts)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        names = getattr(out, "columns", None)
        values = np.asarray(out, dtype=np.float32)
        stats = getattr(f, "last_stats_", {}) or {}
        counts = {k: int(stats.get(k, 0)) for k in ("items", "real_tokens", "padded_tokens", "truncated", "cache_hits")}
        marker = dict(digest=digest, columns=None if names is None else [str(c) for c in names],
                      fingerprint=getattr(f, "backbone_fingerprint_", None), layer=getattr(f, "layer_", None),
                      kind=getattr(f, "input_kind_", None), seconds=seconds, cpu_seconds=cpu, **counts)
        _shards.write_shard(self.output_dir, shard, df[_ROW].to_numpy(), values, marker)
        return pd.DataFrame([dict(shard=shard, rows=len(df), seconds=seconds, cpu_seconds=cpu, **counts)],
                            columns=_SUMMARY)


# ------------------------------------------------------------------------------------------- manifest


def _output_settings(featurizer):
    params = featurizer.get_params(deep=False)
    return {"class": type(featurizer).__qualname__,
            **{k: repr(params[k]) for k in _shards.OUTPUT_PARAMS if k in params}}


def _prepare_manifest(output_dir, n_rows, rows_per_shard, n_shards, kind, featurizer, shard_table, overwrite):
    manifest = dict(format=_shards.FORMAT, n_rows=int(n_rows), rows_per_shard=int(rows_per_shard),
                    n_shards=int(n_shards), kind=kind, featurizer=_output_settings(featurizer),
                    shards=shard_table)
    path = Path(output_dir) / _shards.MANIFEST
    if path.is_file() and not overwrite:
        old = _shards.read_manifest(output_dir)
        diff = [k for k in ("n_rows", "rows_per_shard", "kind", "featurizer", "shards") if old.get(k) != manifest[k]]
        if diff:
            raise ValueError(
                f"{output_dir} holds features of a different run (differs in {', '.join(diff)}): "
                "use a new output_dir, or overwrite=True to discard them.")
        return old
    if overwrite and (Path(output_dir) / "shards").is_dir():
        for f in (Path(output_dir) / "shards").iterdir():
            f.unlink()
    _shards.atomic_write_json(path, manifest)
    return manifest


def _shard_table(shard_ids, digests):
    """``{shard: {"rows", "digest"}}`` of the non-empty shards."""
    table = {}
    frame = pd.DataFrame({"s": shard_ids, "d": digests})
    for s, group in frame.groupby("s", sort=True):
        table[str(int(s))] = {"rows": int(len(group)), "digest": _shards.combine_digests(group["d"])}
    return table


# ----------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def _data_context(ray, verbose):
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    if not verbose:
        ctx.enable_progress_bars = False
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def featurize(data, featurizer, output_dir, *, backend="ray", num_actors=1, rows_per_shard=2048,
              num_cpus_per_actor=1, num_gpus_per_actor=0, overwrite=False, verbose=1):
    """Featurize a dataset in shards on a Ray actor pool, resumably, into ``output_dir``.

    The rows are grouped by prompt (or ``messages``) and each prompt group is
    hashed to one of ``ceil(n_rows / rows_per_shard)`` shards, so a pair's two
    responses (one row) and all responses to one prompt land in the same
    shard, sorted together: the featurizer's prefix sharing runs each prompt
    once. Ray Data hash-partitions the rows by shard (a shard is never split
    across blocks; the workers check it) and ``map_batches`` hands whole
    blocks to a pool of ``num_actors`` actors; each actor loads the backbone
    once and writes its shards as Parquet files (row ids + features) with a
    commit marker.

    A rerun with the same arguments skips the finished shards, so a crashed
    run (a killed worker, node or driver) resumes where it stopped; a shard
    is finished only once its marker is written, after its data (both by
    atomic rename), so a half-written shard never reads as valid.

    Parameters
    ----------
    data : DataFrame, list of dicts, dict of lists, path, Hugging Face dataset or Ray Dataset
        Pointwise rows (``prompt``/``messages`` + ``response``) or preference
        pairs (``prompt``/``messages`` + ``chosen`` + ``rejected``); other
        columns are ignored. A path is a JSONL (``.jsonl``, ``.json``,
        ``.jsonl.gz``) or Parquet file, a list of them, or a folder of them
        (read in sorted order). Row ``i`` is the ``i``-th row in that order.
    featurizer : BackboneFeaturizer
        Fitted or not; an unfitted one is fitted in each actor (``fit`` needs
        no training, only the backbone), so the driver never loads the
        backbone.
    output_dir : str or Path
        Where the manifest and the shards go. On a multi-node cluster it must
        be a filesystem every node sees (NFS, a mounted bucket).
    backend : {"ray", "local"}, default="ray"
        ``"local"`` runs the same shards in this process without Ray (small
        data, debugging; same files, same resumption).
    num_actors : int, default=1
        Size of the actor pool: backbones held at once.
    rows_per_shard : int, default=2048
        Target rows per shard (shards vary around it: whole prompt groups are
        hashed). The unit of work, of resumption and of loss on a crash.
    num_cpus_per_actor : float, default=1
        CPUs reserved per actor; also its torch thread count (at least 1).
    num_gpus_per_actor : float, default=0
        GPUs per actor; the featurizer's ``device="auto"`` then picks the GPU
        Ray assigns. Fractions pack several small backbones on one GPU.
    overwrite : bool, default=False
        Discard what ``output_dir`` holds instead of resuming.
    verbose : int, default=1
        ``0`` silences Ray Data's progress and the per-shard progress bar.

    Returns
    -------
    FeatureShards
        ``.load()`` returns the features aligned with the input rows.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from rmkit import BackboneFeaturizer
    >>> from rmkit.distributed import featurize
    >>> from rmkit.testing import tiny_backbone
    >>> pairs = [{"prompt": p, "chosen": "yes", "rejected": "no"} for p in ("a?", "b?", "a?")]
    >>> feats = BackboneFeaturizer(tiny_backbone(), cache=False, verbose=0)
    >>> out = featurize(pairs, feats, tempfile.mkdtemp(), backend="local", rows_per_shard=2, verbose=0)
    >>> out.n_rows, len(out.computed_shards) == out.n_shards, out.skipped_shards
    (3, True, [])
    >>> X = out.load()
    >>> bool(np.allclose(X, feats.fit(pairs).transform(pairs), atol=1e-5))
    True

    With ``backend="ray"`` (the default) the same call runs on the Ray
    cluster of ``ray.init`` (a local one when none is running).
    """
    if backend not in ("ray", "local"):
        raise ValueError(f"backend must be 'ray' or 'local', got {backend!r}.")
    if not isinstance(rows_per_shard, (int, np.integer)) or rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}.")
    if not isinstance(num_actors, (int, np.integer)) or num_actors < 1:
        raise ValueError(f"num_actors must be a positive integer, got {num_actors!r}.")
    if not hasattr(featurizer, "transform") or not hasattr(featurizer, "get_params"):
        raise TypeError(f"featurizer must be a BackboneFeaturizer (or a transformer like it), "
                        f"got {type(featurizer).__name__}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if backend == "local":
        return _featurize_local(data, featurizer, output_dir, rows_per_shard, overwrite, verbose, started)
    ray = require_ray()
    with _data_context(ray, verbose) as ctx:
        ds, n_rows = _read_ray(data, ray, block_rows=max(1, min(rows_per_shard, 10_000)))
        if n_rows == 0:
            raise ValueError("data is empty: expected at least one row.")
        text_cols, kind = _text_columns([c for c in ds.columns() if c != _ROW])
        n_shards = max(1, math.ceil(n_rows / rows_per_shard))
        ds = ds.select_columns(text_cols + [_ROW]).map_batches(
            _annotate, batch_format="pandas", fn_kwargs=dict(text_cols=text_cols, n_shards=n_shards)).materialize()
        cols = {c: [] for c in (_SHARD, _DIGEST)}
        for batch in ds.select_columns(list(cols)).iter_batches(batch_format="numpy", batch_size=None):
            for c in cols:
                cols[c].append(batch[c])
        table = _shard_table(np.concatenate(cols[_SHARD]), np.concatenate(cols[_DIGEST]))
        manifest = _prepare_manifest(output_dir, n_rows, rows_per_shard, n_shards, kind, featurizer, table, overwrite)
        done = _shards.finished_shards(output_dir, manifest)
        todo = sorted(set(map(int, table)) - set(done))
        stats = []
        if todo:
            ctx.execution_options.preserve_order = False  # shards finish in any order
            todo_set = set(todo)
            pending = ds.filter(lambda row: row[_SHARD] in todo_set) if done else ds
            # Hash-partition by shard (a shard's rows, hence its prompt groups, end up in one block) and
            # materialize before the actors start, so the shuffle never waits for CPUs the actors hold.
            pending = pending.repartition(len(todo), keys=[_SHARD]).materialize()
            results = pending.map_batches(
                ShardWorker, batch_size=None, batch_format="pandas",
                fn_constructor_kwargs=dict(featurizer=featurizer, output_dir=str(output_dir), text_cols=text_cols,
                                           manifest_shards=manifest["shards"],
                                           num_threads=max(1, int(num_cpus_per_actor))),
                compute=ray.data.ActorPoolStrategy(size=int(num_actors)), num_cpus=num_cpus_per_actor,
                num_gpus=num_gpus_per_actor or None)
            stats = _collect(results.iter_batches(batch_format="pandas", batch_size=None), todo, table, verbose)
    return _finish(output_dir, manifest, todo, sorted(done), stats, started, verbose)


def _collect(batches, todo, table, verbose):
    from tqdm.auto import tqdm

    total = sum(table[str(s)]["rows"] for s in todo)
    stats = []
    with tqdm(total=total, desc=f"featurize {len(todo)} shards", unit="row", disable=not verbose) as bar:
        for batch in batches:
            stats.append(batch)
            bar.update(int(batch["rows"].sum()))
    return stats


def _finish(output_dir, manifest, todo, skipped, stats, started, verbose):
    frame = pd.concat(stats, ignore_index=True) if stats else pd.DataFrame(columns=_SUMMARY)
    done = _shards.finished_shards(output_dir, manifest)
    missing = sorted(set(map(int, manifest["shards"])) - set(done))
    if missing:
        raise _shards.IncompleteFeaturesError(
            f"The run ended with {len(missing)} shards unfinished (first: {_shards.shard_name(missing[0])}); "
            "rerun featurize with the same arguments to finish them.")
    truncated = int(frame["truncated"].sum())
    if truncated and verbose:
        warnings.warn(f"{truncated} texts exceeded the featurizer's max_length and were truncated.", stacklevel=3)
    stats = dict(rows=int(frame["rows"].sum()), items=int(frame["items"].sum()),
                 real_tokens=int(frame["real_tokens"].sum()), padded_tokens=int(frame["padded_tokens"].sum()),
                 worker_seconds=float(frame["seconds"].sum()), worker_cpu_seconds=float(frame["cpu_seconds"].sum()),
                 seconds=time.perf_counter() - started)
    return FeatureShards(output_dir, manifest["n_rows"], len(manifest["shards"]), list(todo), list(skipped), stats)


def _featurize_local(data, featurizer, output_dir, rows_per_shard, overwrite, verbose, started):
    df = _read_local(data)
    if len(df) == 0:
        raise ValueError("data is empty: expected at least one row.")
    text_cols, kind = _text_columns(df.columns)
    n_rows = len(df)
    n_shards = max(1, math.ceil(n_rows / rows_per_shard))
    df = _annotate(df[text_cols].assign(**{_ROW: np.arange(n_rows, dtype=np.int64)}), text_cols, n_shards)
    table = _shard_table(df[_SHARD].to_numpy(), df[_DIGEST].to_numpy())
    manifest = _prepare_manifest(output_dir, n_rows, rows_per_shard, n_shards, kind, featurizer, table, overwrite)
    done = _shards.finished_shards(output_dir, manifest)
    todo = sorted(set(map(int, table)) - set(done))
    worker = ShardWorker(featurizer, str(output_dir), text_cols, manifest["shards"])
    groups = dict(tuple(df[df[_SHARD].isin(todo)].groupby(_SHARD, sort=True)))
    stats = _collect((worker(groups[s]) for s in todo), todo, table, verbose)  # one shard per call
    return _finish(output_dir, manifest, todo, sorted(done), stats, started, verbose)
