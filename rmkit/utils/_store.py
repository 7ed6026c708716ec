"""A persistent key-value table in one SQLite file, shared by the feature and judge caches."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["KeyValueStore"]

_CHUNK = 500  # keys per SELECT (SQLite's bound-parameter limit is 999 on old builds)


class KeyValueStore:
    """Maps keys to values in ``path`` (a table of one SQLite file in WAL mode).

    Writes are transactions, so a process killed mid-write leaves the
    committed rows readable and nothing half-written; several processes may
    read and write the same file.

    Parameters
    ----------
    path : path-like
        The SQLite file; its folder is created.
    table : str
        Table name.
    key_type, value_type : {"BLOB", "TEXT"}
        SQLite column types (bytes or str keys and values).
    value_column : str, default="value"
    timeout : float, default=60.0
        Seconds to wait for another process's write lock.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> store = KeyValueStore(pathlib.Path(tempfile.mkdtemp()) / "kv.sqlite", table="t",
    ...                       key_type="TEXT", value_type="TEXT")
    >>> store.put_many([("a", "1"), ("b", "2")])
    >>> store.get_many(["a", "c"])
    {'a': '1'}
    """

    def __init__(self, path, *, table, key_type="BLOB", value_type="BLOB", value_column="value", timeout=60.0):
        for name in (table, value_column):
            if not name.isidentifier():
                raise ValueError(f"Not an SQL identifier: {name!r}.")
        self.path = Path(path)
        self.table = table
        self.value_column = value_column
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} (key {key_type} PRIMARY KEY, "
                        f"{value_column} {value_type} NOT NULL)")

    def _connect(self):
        con = sqlite3.connect(self.path, timeout=self.timeout)
        con.execute("PRAGMA journal_mode=WAL")
        return con

    def get_many(self, keys):
        """``{key: value}`` for the keys present."""
        keys = list(keys)
        found = {}
        with self._connect() as con:
            for i in range(0, len(keys), _CHUNK):
                part = keys[i:i + _CHUNK]
                marks = ",".join("?" * len(part))
                query = f"SELECT key, {self.value_column} FROM {self.table} WHERE key IN ({marks})"
                for key, value in con.execute(query, part):
                    found[bytes(key) if isinstance(key, (bytes, memoryview)) else key] = value
        return found

    def put_many(self, items):
        """Insert or replace ``(key, value)`` pairs in one transaction."""
        with self._connect() as con:
            con.executemany(f"INSERT OR REPLACE INTO {self.table} (key, {self.value_column}) VALUES (?, ?)",
                            list(items))
