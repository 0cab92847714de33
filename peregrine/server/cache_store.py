"""The semantic cache's storage: entries in SQLite, their vectors in faiss, bounded by count,
bytes and age.

SQLite (WAL mode, one transaction per change) is the record: an entry is in the file whole
or not at all, whatever moment the process dies at, and a restart rebuilds the in-memory
side from it. Each row also carries a SHA-256 of its fields, checked when the file is
read, so a row damaged outside SQLite's control is dropped, never served. Without a path
the same code runs on an in-memory database.

The vectors of each exact key (model, API key, parameters, context) live in their own faiss
`IndexIDMap2(IndexFlatIP)`: exact inner-product search (the vectors are unit length, so
it is the cosine), which at the few thousand entries the limits allow costs microseconds,
needs no training, and supports removal by id (eviction); an approximate index (IVF, HNSW)
would buy nothing at this size and HNSW cannot remove. Eviction is least-recently-used
(a hit refreshes an entry), after dropping entries older than the TTL."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

logger = logging.getLogger("peregrine.server")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    query TEXT NOT NULL,
    vector BLOB NOT NULL,
    payload TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Entry:
    """One cached answer: the question it answered and the answer (an opaque JSON text)."""

    id: int
    key: str
    query: str
    vector: np.ndarray
    payload: str
    created: float
    last_used: float

    @property
    def nbytes(self) -> int:
        """What the entry counts against max_bytes: its texts and its vector."""
        return len(self.query.encode()) + len(self.payload.encode()) + self.vector.nbytes


def _digest(key: str, query: str, vector: bytes, payload: str, created: float) -> str:
    h = hashlib.sha256()
    for part in (key.encode(), query.encode(), vector, payload.encode(), repr(created).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class CacheStore:
    """Entries by exact key, searchable by vector; thread-safe (one lock)."""

    def __init__(self, path: str | None, dim: int, model: str, max_entries: int,
                 max_bytes: int, ttl: float, clock: Callable[[], float] = time.time,
                 on_evict: Callable[[str, int], None] | None = None) -> None:
        self.path, self.dim, self.model = path, dim, model
        self.max_entries, self.max_bytes, self.ttl = max_entries, max_bytes, ttl
        self.clock = clock
        self.on_evict = on_evict or (lambda reason, count: None)
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._by_created: dict[int, Entry] = {}  # oldest first: the TTL's order
        self._exact: dict[tuple[str, str], int] = {}
        self._indexes: dict[str, faiss.IndexIDMap2] = {}
        self.nbytes = 0
        self.dropped_on_load = 0
        """Rows found damaged (digest mismatch) when the file was read, and deleted."""
        self._db = self._connect()
        self._load()

    # --- the file ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        target = self.path or ":memory:"
        try:
            db = self._open(target)
        except sqlite3.DatabaseError as e:  # not a database (or damaged beyond SQLite's repair)
            assert self.path is not None
            aside = f"{self.path}.corrupt-{int(time.time())}"
            logger.warning("semantic cache %s is unreadable (%s); moved to %s, starting empty",
                           self.path, e, aside)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            db = self._open(target)
        return db

    def _open(self, target: str) -> sqlite3.Connection:
        if target != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a killed process loses no committed transaction; only a
            # power cut may lose the last few, and the file stays consistent either way.
            db.execute("PRAGMA synchronous=NORMAL")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _load(self) -> None:
        meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        same = meta.get("dim") == str(self.dim) and meta.get("model") == self.model
        with self._transaction():
            if not same:  # vectors of another embedding model mean nothing here
                if meta:
                    logger.warning("semantic cache: the file's entries were embedded by %s; "
                                   "dropping them", meta.get("model"))
                self._db.execute("DELETE FROM entries")
                self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                     [("dim", str(self.dim)), ("model", self.model)])
            bad = []
            rows = self._db.execute("SELECT id, key, query, vector, payload, created, last_used,"
                                    " digest FROM entries ORDER BY last_used, id").fetchall()
            for id_, key, query, vector, payload, created, last_used, digest in rows:
                if (not isinstance(vector, bytes) or len(vector) != 4 * self.dim
                        or _digest(key, query, vector, payload, created) != digest):
                    bad.append(id_)
                    continue
                self._insert(Entry(id_, key, query, np.frombuffer(vector, np.float32).copy(),
                                   payload, created, last_used))
            self._by_created = dict(sorted(self._by_created.items(),
                                           key=lambda item: item[1].created))
            if bad:
                self._db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in bad])
                self.dropped_on_load = len(bad)
                logger.warning("semantic cache: dropped %d damaged entries", len(bad))
            self._evict()

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db)

    # --- memory -----------------------------------------------------------------------------
    def _insert(self, e: Entry) -> None:
        self._entries[e.id] = e
        self._by_created[e.id] = e
        self._exact[(e.key, e.query)] = e.id
        index = self._indexes.get(e.key)
        if index is None:
            index = self._indexes[e.key] = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        index.add_with_ids(e.vector.reshape(1, -1), np.array([e.id], dtype=np.int64))
        self.nbytes += e.nbytes

    def _drop(self, ids: list[int], reason: str) -> None:
        """Forget `ids` (in memory and in the file; the caller holds a transaction)."""
        by_key: dict[str, list[int]] = {}
        for i in ids:
            e = self._entries.pop(i)
            del self._by_created[i]
            self._exact.pop((e.key, e.query), None)
            self.nbytes -= e.nbytes
            by_key.setdefault(e.key, []).append(i)
        for key, key_ids in by_key.items():
            index = self._indexes[key]
            index.remove_ids(np.array(key_ids, dtype=np.int64))
            if index.ntotal == 0:
                del self._indexes[key]
        self._db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in ids])
        if reason != "replaced":
            self.on_evict(reason, len(ids))

    def _expired(self, e: Entry, now: float) -> bool:
        return self.ttl > 0 and now - e.created >= self.ttl

    def _evict(self) -> None:
        now = self.clock()
        old = []
        for e in self._by_created.values():
            if not self._expired(e, now):
                break
            old.append(e.id)
        if old:
            self._drop(old, "ttl")
        if len(self._entries) <= self.max_entries and self.nbytes <= self.max_bytes:
            return
        lru = iter(self._entries.values())  # only read here: the drops come after
        by_count = [next(lru) for _ in range(len(self._entries) - self.max_entries)]
        size = self.nbytes - sum(e.nbytes for e in by_count)
        by_size = []
        for e in lru:
            if size <= self.max_bytes:
                break
            by_size.append(e)
            size -= e.nbytes
        for reason, gone in (("entries", by_count), ("bytes", by_size)):
            if gone:
                self._drop([e.id for e in gone], reason)

    # --- the API ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def search(self, key: str, vector: np.ndarray, k: int, min_similarity: float
               ) -> list[tuple[Entry, float]]:
        """Up to `k` live entries under `key` at least `min_similarity` (cosine) from
        `vector`, closest first."""
        with self._lock:
            index = self._indexes.get(key)
            if index is None:
                return []
            sims, ids = index.search(vector.reshape(1, -1).astype(np.float32),
                                     min(k, index.ntotal))
            now = self.clock()
            out = []
            for sim, i in zip(sims[0], ids[0]):
                e = self._entries.get(int(i))
                if e is not None and sim >= min_similarity and not self._expired(e, now):
                    out.append((e, float(sim)))
            return out

    def exact(self, key: str, query: str) -> Entry | None:
        """The live entry under `key` whose question is exactly `query`."""
        with self._lock:
            i = self._exact.get((key, query))
            e = None if i is None else self._entries.get(i)
            return None if e is None or self._expired(e, self.clock()) else e

    def touch(self, entry_id: int) -> None:
        """Mark an entry used now (it moves to the back of the eviction order)."""
        with self._lock:
            e = self._entries.get(entry_id)
            if e is None:
                return
            e.last_used = self.clock()
            self._entries.move_to_end(entry_id)
            with self._transaction():
                self._db.execute("UPDATE entries SET last_used = ? WHERE id = ?",
                                 (e.last_used, entry_id))

    def add(self, key: str, query: str, vector: np.ndarray, payload: str) -> int | None:
        """Store an answer (replacing one to the same exact question), then evict what
        the limits and the TTL want gone; the new entry's id, or None if it alone is over
        max_bytes."""
        vec = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        now = self.clock()
        with self._lock:
            with self._transaction():
                old = self._exact.get((key, query))
                if old is not None:
                    self._drop([old], "replaced")
                blob = vec.tobytes()
                cur = self._db.execute(
                    "INSERT INTO entries (key, query, vector, payload, created, last_used, "
                    "digest) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, query, blob, payload, now, now,
                     _digest(key, query, blob, payload, now)))
                entry = Entry(int(cur.lastrowid), key, query, vec.copy(), payload, now, now)
                self._insert(entry)
                self._evict()
            return entry.id if entry.id in self._entries else None

    def close(self) -> None:
        """Close the file (a checkpoint folds the WAL into it)."""
        with self._lock:
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception. Entries enter memory only
    after their INSERT and leave it before their DELETE, so after a rollback memory holds
    at most what the file does: a failed write costs a miss, never a wrong answer."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
