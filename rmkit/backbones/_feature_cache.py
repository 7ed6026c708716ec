"""A content-addressed on-disk store of feature vectors (one SQLite file).

Keys are SHA-256 digests of everything that determines a feature: the
backbone's weight fingerprint, every featurizer setting that changes the
output, and the exact token ids. A hit therefore returns exactly the array the
backbone would have produced; any changed setting misses.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from rmkit.utils._store import KeyValueStore

__all__ = ["FeatureCache", "feature_key"]


def feature_key(namespace, prefix, suffix):
    h = hashlib.sha256(namespace.encode())
    h.update(np.asarray(prefix, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(suffix, dtype=np.int64).tobytes())
    return h.digest()


class FeatureCache:
    """Maps 32-byte keys to float32 vectors, persisted in ``directory/features.sqlite``."""

    def __init__(self, directory):
        self.store = KeyValueStore(Path(directory) / "features.sqlite", table="features")
        self.path = self.store.path

    def get_many(self, keys):
        """Return ``{key: vector}`` for the keys present."""
        return {k: np.frombuffer(v, dtype=np.float32) for k, v in self.store.get_many(keys).items()}

    def put_many(self, items):
        self.store.put_many((k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items)
