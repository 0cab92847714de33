"""The semantic cache's store: search finds entries by key and vector; eviction keeps the
entry count and the bytes within bounds, least recently used first; entries expire after
the TTL; the SQLite file brings every entry back after a restart, survives a writer killed
mid-write, and a damaged row is dropped rather than served."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from peregrine.server.cache_store import CacheStore

DIM = 8


def unit(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i % DIM] = 1.0
    return v


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(path: str | None = None, **limits: float) -> tuple[CacheStore, Clock, list]:
    clock, evicted = Clock(), []
    kw = dict(max_entries=100, max_bytes=10**9, ttl=0.0) | limits
    store = CacheStore(path, DIM, "test-model", clock=clock,
                       on_evict=lambda reason, n: evicted.append((reason, n)), **kw)
    return store, clock, evicted


def queries(store: CacheStore, key: str = "k") -> set[str]:
    return {e.query for e in store._entries.values() if e.key == key}


def test_search_finds_the_closest_entries_under_the_same_key_only() -> None:
    store, _, _ = make()
    store.add("k", "q0", unit(0), "a0")
    store.add("k", "q1", unit(1), "a1")
    store.add("other", "q0b", unit(0), "b0")
    near = unit(0) * 0.9 + unit(1) * 0.1
    near /= np.linalg.norm(near)
    found = store.search("k", near, 4, 0.5)
    assert [e.query for e, _ in found] == ["q0"]
    assert found[0][1] == pytest.approx(0.9939, abs=1e-3)
    assert store.search("none", unit(0), 4, 0.0) == []
    assert store.exact("k", "q1").payload == "a1"
    assert store.exact("other", "q1") is None


def test_storing_the_same_question_again_replaces_its_answer() -> None:
    store, _, evicted = make()
    store.add("k", "q", unit(0), "old")
    store.add("k", "q", unit(0), "new")
    assert len(store) == 1 and store.exact("k", "q").payload == "new"
    assert [e.payload for e, _ in store.search("k", unit(0), 4, 0.5)] == ["new"]
    assert evicted == []  # a replacement is not an eviction


def test_the_least_recently_used_entry_goes_first_when_entries_are_over() -> None:
    store, clock, evicted = make(max_entries=3)
    for i in range(3):
        clock.now += 1
        store.add("k", f"q{i}", unit(i), "a")
    store.touch(store.exact("k", "q0").id)  # q0 was used: q1 is now the oldest in use
    store.add("k", "q3", unit(3), "a")
    assert queries(store) == {"q0", "q2", "q3"}
    assert evicted == [("entries", 1)]
    assert store.search("k", unit(1), 4, 0.5) == []  # gone from the index too


def test_bytes_are_bounded_too() -> None:
    store, _, evicted = make(max_bytes=3 * (2 + 100 + 4 * DIM))
    for i in range(5):
        store.add("k", f"q{i}", unit(i), "x" * 100)
    assert queries(store) == {"q2", "q3", "q4"}
    assert store.nbytes == 3 * (2 + 100 + 4 * DIM)
    assert evicted == [("bytes", 1), ("bytes", 1)]
    assert store.add("k", "huge", unit(0), "x" * 10_000) is None  # alone over the limit


def test_entries_expire_after_the_ttl() -> None:
    store, clock, evicted = make(ttl=60)
    store.add("k", "old", unit(0), "a")
    clock.now += 59
    assert store.exact("k", "old") is not None
    clock.now += 1
    assert store.exact("k", "old") is None
    assert store.search("k", unit(0), 4, 0.5) == []
    store.add("k", "new", unit(1), "b")  # an insert sweeps the expired ones out
    assert queries(store) == {"new"} and evicted == [("ttl", 1)]


def test_a_restart_brings_every_entry_back_in_its_lru_order(tmp_path) -> None:
    path = str(tmp_path / "cache.db")
    store, clock, _ = make(path, max_entries=3)
    for i in range(3):
        clock.now += 1
        store.add("k", f"q{i}", unit(i), f"a{i}")
    clock.now += 1
    store.touch(store.exact("k", "q0").id)
    store.close()
    again, _, _ = make(path, max_entries=3)
    assert queries(again) == {"q0", "q1", "q2"}
    assert again.search("k", unit(2), 4, 0.5)[0][0].payload == "a2"
    again.add("k", "q3", unit(3), "a3")  # q1 was the least recently used before the restart
    assert queries(again) == {"q0", "q2", "q3"}


def test_a_file_of_another_embedding_model_starts_empty(tmp_path) -> None:
    path = str(tmp_path / "cache.db")
    store, _, _ = make(path)
    store.add("k", "q", unit(0), "a")
    store.close()
    other = CacheStore(path, DIM, "another-model", 100, 10**9, 0.0)
    assert len(other) == 0


def test_a_damaged_row_is_dropped_not_served(tmp_path) -> None:
    path = str(tmp_path / "cache.db")
    store, _, _ = make(path)
    store.add("k", "good", unit(0), "fine")
    store.add("k", "bad", unit(1), "fine too")
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE entries SET payload = 'tampered' WHERE query = 'bad'")
    db.commit()
    db.close()
    again, _, _ = make(path)
    assert queries(again) == {"good"} and again.dropped_on_load == 1


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path) -> None:
    path = tmp_path / "cache.db"
    path.write_bytes(b"this is not sqlite" * 100)
    store, _, _ = make(str(path))
    assert len(store) == 0
    store.add("k", "q", unit(0), "a")
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from peregrine.server.cache_store import CacheStore
    store = CacheStore(sys.argv[1], 8, "test-model", 10**6, 10**12, 0.0)
    i = 0
    while True:
        v = np.zeros(8, np.float32); v[i % 8] = 1
        store.add("k", f"q{i}", v, str(i) * 50_000)  # big rows: the kill lands mid-write
        i += 1
        if i == 20:
            print("ready", flush=True)
""")


def test_a_writer_killed_mid_write_leaves_only_whole_entries(tmp_path) -> None:
    path = str(tmp_path / "cache.db")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store, _, _ = make(path, max_entries=10**6)
    assert len(store) >= 20 and store.dropped_on_load == 0
    for e in store._entries.values():  # every entry is whole: its answer matches its query
        i = int(e.query[1:])
        assert e.payload == str(i) * 50_000
        assert e.vector[i % DIM] == 1.0
    store.add("k", "after", unit(0), "a")  # and the file takes writes again
    assert store.exact("k", "after") is not None
