"""A content-addressed on-disk store of feature vectors (one SQLite file).

Keys are SHA-256 digests of everything that determines a feature: the
backbone's weight fingerprint, every featurizer setting that changes the
output, and the exact token ids. A hit therefore returns exactly the array the
backbone would have produced; any changed setting misses.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np

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
        self.path = Path(directory) / "features.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS features (key BLOB PRIMARY KEY, value BLOB NOT NULL)")

    def _connect(self):
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("PRAGMA journal_mode=WAL")
        return con

    def get_many(self, keys):
        """Return ``{key: vector}`` for the keys present."""
        found = {}
        with self._connect() as con:
            for i in range(0, len(keys), 500):
                part = keys[i : i + 500]
                marks = ",".join("?" * len(part))
                for key, value in con.execute(f"SELECT key, value FROM features WHERE key IN ({marks})", part):
                    found[bytes(key)] = np.frombuffer(value, dtype=np.float32)
        return found

    def put_many(self, items):
        with self._connect() as con:
            con.executemany(
                "INSERT OR REPLACE INTO features (key, value) VALUES (?, ?)",
                [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items],
            )
