"""rmkit.distributed: sharded featurisation (local and on a local Ray cluster) and searches on Ray."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rmkit import BackboneFeaturizer
from rmkit.datasets import make_preference_pairs
from rmkit.distributed import IncompleteFeaturesError, featurize, load_features
from rmkit.distributed._shards import shard_paths

TOL = dict(rtol=1e-4, atol=1e-4)  # batch composition changes float rounding, not values


def pairs_frame(n=24):
    """Preference pairs where several rows share a prompt (prefix sharing within a shard)."""
    df = make_preference_pairs(n, random_state=0)[["prompt", "chosen", "rejected"]]
    return pd.concat([df, df.iloc[: n // 3].assign(chosen=lambda d: d["chosen"] + " Indeed.")], ignore_index=True)


def pointwise_frame():
    pairs = pairs_frame(12)
    return pd.concat([pairs[["prompt", "chosen"]].rename(columns={"chosen": "response"}),
                      pairs[["prompt", "rejected"]].rename(columns={"rejected": "response"})], ignore_index=True)


@pytest.fixture
def featurizer(tiny):
    return BackboneFeaturizer(tiny, cache=False, verbose=0, batch_size=4)


def reference(featurizer, df):
    from sklearn.base import clone

    return clone(featurizer).fit(df).transform(df)


class FailingFeaturizer(BackboneFeaturizer):
    """A featurizer that crashes mid-run (set the attributes on a fitted one: workers copy it)."""

    fail_after = None  # (output_dir, k): transform raises once k shards of output_dir are committed
    kill_flag = None  # a path: the first transform that finds it missing creates it and kills its process

    def transform(self, X):
        if self.kill_flag is not None and not os.path.exists(self.kill_flag):
            Path(self.kill_flag).write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies, as on an OOM kill or a lost node
        if self.fail_after is not None:
            folder, k = self.fail_after
            if len(list((Path(folder) / "shards").glob("shard-*.json"))) >= k:
                raise RuntimeError("simulated crash")
        return super().transform(X)


class FrameFeaturizer(BackboneFeaturizer):
    """``transform`` returns a DataFrame with named columns (a future BackboneFeaturizer may)."""

    def transform(self, X):
        return pd.DataFrame(super().transform(X), columns=self.get_feature_names_out())


# --------------------------------------------------------------------------- in-process backend (fast)


def test_local_shards_equal_transform_and_rerun_skips_everything(featurizer, tmp_path):
    df = pairs_frame()
    out = featurize(df, featurizer, tmp_path, backend="local", rows_per_shard=5, verbose=0)
    assert out.n_rows == len(df) and out.n_shards > 2
    assert sorted(out.computed_shards) == sorted(map(int, json.loads((tmp_path / "manifest.json").read_text())["shards"]))
    X = out.load()
    np.testing.assert_allclose(X, reference(featurizer, df), **TOL)
    again = featurize(df, featurizer, tmp_path, backend="local", rows_per_shard=5, verbose=0)
    assert again.computed_shards == [] and sorted(again.skipped_shards) == sorted(out.computed_shards)
    np.testing.assert_array_equal(again.load(), X)


def test_prompt_groups_stay_in_one_shard(featurizer, tmp_path):
    import pyarrow.parquet as pq

    df = pointwise_frame()
    out = featurize(df, featurizer, tmp_path, backend="local", rows_per_shard=4, verbose=0)
    shard_of = {}
    for s in out.computed_shards:
        for r in pq.read_table(shard_paths(tmp_path, s)[0]).column("row").to_numpy():
            shard_of[int(r)] = s
    assert len(shard_of) == len(df)
    for prompt, rows in df.groupby("prompt").groups.items():
        assert len({shard_of[r] for r in rows}) == 1, prompt
    assert len(set(shard_of.values())) > 1


def test_crash_mid_run_then_rerun_gives_every_row_once(featurizer, tmp_path):
    df = pairs_frame()
    crashing = FailingFeaturizer(**featurizer.get_params())
    crashing.fit(df).fail_after = (tmp_path, 2)  # fitted: workers copy it (an unfitted one is cloned, losing this)
    with pytest.raises(RuntimeError, match="simulated crash"):
        featurize(df, crashing, tmp_path, backend="local", rows_per_shard=4, verbose=0)
    with pytest.raises(IncompleteFeaturesError, match="missing or unfinished"):
        load_features(tmp_path)
    # The rerun must use a featurizer with the same output settings; its class differs here, so say so.
    with pytest.raises(ValueError, match="different run"):
        featurize(df, featurizer, tmp_path, backend="local", rows_per_shard=4, verbose=0)
    crashing.fail_after = None
    out = featurize(df, crashing, tmp_path, backend="local", rows_per_shard=4, verbose=0)
    assert len(out.skipped_shards) == 2 and len(out.computed_shards) == out.n_shards - 2
    np.testing.assert_allclose(out.load(), reference(featurizer, df), **TOL)


def test_half_written_shard_never_reads_as_valid(featurizer, tmp_path):
    df = pairs_frame()
    out = featurize(df, featurizer, tmp_path, backend="local", rows_per_shard=6, verbose=0)
    good = out.load()
    a, b = sorted(out.computed_shards)[:2]
    shard_paths(tmp_path, a)[1].unlink()  # crash between the data file and its commit marker
    parquet_b = shard_paths(tmp_path, b)[0]
    parquet_b.write_bytes(parquet_b.read_bytes()[:100])  # a torn data file behind a marker
    (tmp_path / "shards" / ".shard-00000.parquet.tmp-x").write_bytes(b"partial")  # a leftover temp file
    with pytest.raises(IncompleteFeaturesError, match="2 of"):
        load_features(tmp_path)
    again = featurize(df, featurizer, tmp_path, backend="local", rows_per_shard=6, verbose=0)
    assert sorted(again.computed_shards) == [a, b]
    np.testing.assert_allclose(again.load(), good, **TOL)


def test_rerun_with_changed_data_or_settings_is_refused(featurizer, tmp_path):
    df = pairs_frame()
    featurize(df, featurizer, tmp_path, backend="local", rows_per_shard=8, verbose=0)
    changed = df.assign(chosen=df["chosen"].where(df.index != 3, "something else"))
    with pytest.raises(ValueError, match="different run.*shards"):
        featurize(changed, featurizer, tmp_path, backend="local", rows_per_shard=8, verbose=0)
    with pytest.raises(ValueError, match="different run.*featurizer"):
        featurize(df, featurizer.set_params(layer=-2), tmp_path, backend="local", rows_per_shard=8, verbose=0)
    out = featurize(changed, featurizer, tmp_path, backend="local", rows_per_shard=8, overwrite=True, verbose=0)
    np.testing.assert_allclose(out.load(), reference(featurizer, changed), **TOL)


def test_named_columns_are_kept(tiny, tmp_path):
    df = pointwise_frame()
    feats = FrameFeaturizer(tiny, cache=False, verbose=0)
    X = featurize(df, feats, tmp_path, backend="local", rows_per_shard=8, verbose=0).load()
    ref = reference(feats, df)
    assert isinstance(X, pd.DataFrame) and list(X.columns) == list(ref.columns)
    np.testing.assert_allclose(X.to_numpy(), ref.to_numpy(), **TOL)
    assert isinstance(load_features(tmp_path, with_names=False), np.ndarray)


def test_files_are_read_in_sorted_order(featurizer, tmp_path):
    df = pairs_frame()
    data = tmp_path / "data"
    data.mkdir()
    df.iloc[:10].to_json(data / "b.jsonl", orient="records", lines=True)
    df.iloc[10:].assign(extra=1).to_json(data / "a.jsonl", orient="records", lines=True)
    ordered = pd.concat([df.iloc[10:], df.iloc[:10]], ignore_index=True)
    X = featurize(data, featurizer, tmp_path / "out", backend="local", rows_per_shard=8, verbose=0).load()
    np.testing.assert_allclose(X, reference(featurizer, ordered), **TOL)


def test_bad_input_is_named(featurizer, tmp_path):
    with pytest.raises(ValueError, match="no 'response' column"):
        featurize(pd.DataFrame({"prompt": ["a"], "answer": ["b"]}), featurizer, tmp_path, backend="local")
    with pytest.raises(ValueError, match="backend"):
        featurize(pairs_frame(), featurizer, tmp_path, backend="spark")
    with pytest.raises(FileNotFoundError, match="holds no sharded features"):
        load_features(tmp_path / "nothing")


def test_import_needs_neither_ray_nor_torch():
    code = ("import sys, rmkit, rmkit.distributed; "
            "print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------- a local Ray cluster (slow)


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report over the network
    # Ray binds to the machine's address unless this is 0 (read when ray is imported): loopback only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = pytest.importorskip("ray")
    cloudpickle = pytest.importorskip("ray.cloudpickle")

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test file

    def timeout(*_):
        raise TimeoutError("a Ray test ran past its 300 s bound")

    import builtins

    previous = signal.signal(signal.SIGALRM, timeout)
    real_print = builtins.print  # ray.init wraps print; pickles made later (skorch's PrintLog) need the real one
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1", "Ray was imported before the loopback setting"
        yield ray
    finally:
        signal.alarm(0)
        ray.shutdown()
        builtins.print = real_print
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def bounded(ray_cluster):
    signal.alarm(300)
    yield ray_cluster
    signal.alarm(0)


@pytest.mark.slow
def test_ray_shards_equal_local_features(bounded, featurizer, tmp_path):
    df = pairs_frame()
    data = tmp_path / "data"
    data.mkdir()
    df.iloc[:15].to_json(data / "part-0.jsonl", orient="records", lines=True)
    df.iloc[15:].to_parquet(data / "part-1.parquet")  # mixed formats are refused; check then use JSONL only
    with pytest.raises(ValueError, match="Mixed input formats"):
        featurize(data, featurizer, tmp_path / "out")
    (data / "part-1.parquet").unlink()
    df.iloc[15:].to_json(data / "part-1.jsonl", orient="records", lines=True)
    out = featurize(data, featurizer, tmp_path / "out", num_actors=2, num_cpus_per_actor=0.5, rows_per_shard=6,
                    verbose=0)
    assert out.n_rows == len(df) and len(out.computed_shards) == out.n_shards > 2
    np.testing.assert_allclose(out.load(), reference(featurizer, df), **TOL)


@pytest.mark.slow
def test_ray_worker_killed_then_job_crash_then_rerun(bounded, featurizer, tmp_path):
    df = pairs_frame()
    out_dir = tmp_path / "out"
    dying = FailingFeaturizer(**featurizer.get_params()).fit(df)
    dying.kill_flag = str(tmp_path / "killed")  # the first shard's worker process dies; Ray restarts it
    dying.fail_after = (out_dir, 2)  # then the job fails once two shards are committed
    with pytest.raises(Exception, match="simulated crash"):
        featurize(df, dying, out_dir, rows_per_shard=4, verbose=0)
    assert Path(dying.kill_flag).is_file()  # a worker process really died mid-run
    committed = len(list((out_dir / "shards").glob("shard-*.json")))
    with pytest.raises(IncompleteFeaturesError):
        load_features(out_dir)
    dying.fail_after = None
    out = featurize(df, dying, out_dir, rows_per_shard=4, verbose=0)
    assert len(out.skipped_shards) == committed >= 2 and len(out.computed_shards) == out.n_shards - committed > 0
    np.testing.assert_allclose(load_features(out_dir), reference(featurizer, df), **TOL)  # each row exactly once


@pytest.mark.slow
def test_gridsearch_on_ray_backend_matches_local(bounded, featurizer, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from rmkit import split_feature_blocks
    from rmkit.distributed import ray_backend
    from rmkit.model_selection import prompt_groups

    # Features computed once (in shards), then a search over an array-level model: no worker touches the backbone.
    pairs = make_preference_pairs(60, random_state=1)[["prompt", "chosen", "rejected"]]
    X = featurize(pairs, featurizer, tmp_path, backend="local", verbose=0).load()
    blocks = split_feature_blocks(X)
    groups = np.tile(prompt_groups(pairs), 2)  # both sides of a pair, and every pair of a prompt, in one fold
    Xr = np.vstack([np.hstack([blocks["chosen"], blocks["prompt"]]), np.hstack([blocks["rejected"], blocks["prompt"]])])
    y = np.r_[np.ones(len(pairs)), np.zeros(len(pairs))]
    grid = {"logisticregression__C": [1e-3, 1e-1, 10.0]}
    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)), grid,
                          cv=GroupKFold(3))
    local = search.fit(Xr, y, groups=groups)
    local_best, local_scores = local.best_params_, local.cv_results_["mean_test_score"]
    assert len(set(np.round(local_scores, 6))) > 1  # the grid matters, so agreeing on the best is informative
    with ray_backend():  # joins the running cluster and leaves it up
        remote = search.set_params(n_jobs=2).fit(Xr, y, groups=groups)
    assert bounded.is_initialized()
    assert remote.best_params_ == local_best
    np.testing.assert_allclose(remote.cv_results_["mean_test_score"], local_scores)
