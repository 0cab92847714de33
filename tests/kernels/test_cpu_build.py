"""Building the C++ kernels: a lock left by a killed build must not hang later processes."""

import os
import time

from peregrine.kernels.cpu import _clear_stale_lock


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    _clear_stale_lock(str(tmp_path))
    assert lock.exists()  # a build may be running right now
    old = time.time() - 3600
    os.utime(lock, (old, old))
    _clear_stale_lock(str(tmp_path))
    assert not lock.exists()
    _clear_stale_lock(str(tmp_path))  # no lock at all: nothing to do
